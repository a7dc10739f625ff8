"""Head dim 512 (Gemma 4's full-attention layers) against 256, attnops side by side with torch SDPA on the CPU:
causal prefill, forward and forward+backward, B=1, H=8, Hkv=2 (SDPA with ``enable_gqa``), float32 and bfloat16,
providers interleaved, median of 5 after a warm-up call; then one-token decoding from a full cache
(``decode_attention`` against SDPA on the same cache), median of 7 rounds of 5 calls.

Run from the repository root: ``python benchmarks/wide_heads.py``. Prints Markdown tables; times in ms; prefill
ratios are attnops / SDPA (below 1: attnops faster), decode speedups SDPA / attnops."""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnops  # noqa: E402
from attnops.core import backends  # noqa: E402


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prefill_rows():
    print("| case | attnops ms | sdpa ms | attnops / sdpa |\n|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for n, d, backward in [(1024, 256, False), (1024, 512, False), (4096, 256, False), (4096, 512, False),
                               (1024, 256, True), (1024, 512, True)]:
            q = torch.randn(1, n, 8, d, dtype=dtype, requires_grad=backward)
            k, v = (torch.randn(1, n, 2, d, dtype=dtype, requires_grad=backward) for _ in range(2))
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(backward) for t in (q, k, v))

            def ours():
                out = attnops.attention(q, k, v, causal=True)
                if backward:
                    out.sum().backward()

            def sdpa():
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                if backward:
                    out.sum().backward()

            ours(), sdpa()
            a, b = [], []
            for _ in range(5):
                a.append(_seconds(ours))
                b.append(_seconds(sdpa))
            ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            name = f"causal {'fwd+bwd' if backward else 'fwd'} {str(dtype)[6:]} N={n} D={d}"
            print(f"| {name} | {ma:.1f} | {mb:.1f} | {ma / mb:.2f} |", flush=True)


def decode_rows():
    print("\n| decode, one token | attnops ms | sdpa ms | speedup |\n|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for s, d in [(8192, 256), (8192, 512), (32768, 512)]:
            q = torch.randn(1, 1, 8, d, dtype=dtype)
            k, v = (torch.randn(1, s, 2, d, dtype=dtype) for _ in range(2))
            lens = torch.tensor([s], dtype=torch.int32)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

            def ours():
                return attnops.decode_attention(q, k, v, lens)

            def sdpa():
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

            ours(), sdpa()
            a, b = [], []
            for _ in range(7):
                a.append(_seconds(lambda: [ours() for _ in range(5)]) / 5)
                b.append(_seconds(lambda: [sdpa() for _ in range(5)]) / 5)
            ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
            print(f"| {str(dtype)[6:]} S={s} D={d} | {ma:.2f} | {mb:.2f} | {mb / ma:.1f}x |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, attnops CPU level {backends.cpu_isa()['kernels']}\n")
    prefill_rows()
    decode_rows()
