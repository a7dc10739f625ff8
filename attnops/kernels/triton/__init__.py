"""The Triton backend: GPU kernels, one file per kernel family, proven on CPU tensors under
``TRITON_INTERPRET=1`` (that is how CI tests them).

Importing this package imports triton; ``AVAILABLE`` says whether it can run here (a CUDA device,
or the interpreter).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as e:  # triton is an optional dependency (`pip install attnops[triton]`)
    _IMPORT_ERROR = e

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# ATTNOPS_TRITON_AUTOTUNE=0 launches the first configuration of each kernel's table instead of
# timing them all: the test suite sets it on a GPU, where autotuning every test shape would take
# most of its time (correctness does not depend on the configuration; the benchmark harness checks
# the accuracy of the autotuned ones at full size).
AUTOTUNE = os.environ.get("ATTNOPS_TRITON_AUTOTUNE", "1") != "0"

if _IMPORT_ERROR is not None:
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not importable ({_IMPORT_ERROR})"
elif not (torch.cuda.is_available() or INTERPRET):
    AVAILABLE = False
    UNAVAILABLE_REASON = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""
    from attnops.kernels.triton.block_sparse_attention import block_sparse_attention  # noqa: F401
    from attnops.kernels.triton.decode_attention import decode_attention  # noqa: F401
    from attnops.kernels.triton.linear_attention import linear_attention  # noqa: F401
    from attnops.kernels.triton.lowrank_attention import lowrank_key_attention  # noqa: F401
    from attnops.kernels.triton.moba_route import moba_route  # noqa: F401
