"""The block-sparse core's CPU benchmark (core issue): attnops against torch SDPA and FlexAttention
(compiled, same block mask) at B=1 H=8 N=4096 D=64 float32 with 2 threads, median of interleaved
repeats after warm-up. Equivalent to `python -m attnops.bench --suite core`; extra arguments pass
through (e.g. --out DIR, --repeats 11).
"""

import sys

from attnops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "core", *sys.argv[1:]]))
