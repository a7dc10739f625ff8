"""Side-by-side GPU timing of the decode backends (Triton, CUDA) and SDPA on one cache, with the
K/V bytes read per second: ``python benchmarks/decode_backends_gpu.py`` from the repository root."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import attnops  # noqa: E402

B, H, D, S = 1, 32, 128, 32768
print(f"B{B} H{H} D{D} cache {S} bf16; median ms (GB/s of K/V read)")
for Hkv in (32, 8, 1):
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    ks, vs = (t.repeat_interleave(H // Hkv, 1).contiguous() if Hkv < H else t.contiguous() for t in (ks, vs))
    runs = {
        "triton": lambda: attnops.decode_attention(q, k, v, lens, backend="triton"),
        "cuda": lambda: attnops.decode_attention(q, k, v, lens, backend="cuda"),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs),
    }
    ref = runs["triton"]().float()
    err = (runs["cuda"]().float() - ref).abs().max().item()
    gb = 2 * B * S * Hkv * D * 2 / 1e9
    cells = []
    for name, fn in runs.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        cells.append(f"{name} {ms:.4f} ({gb / ms * 1e3:.0f})")
    print(f"Hkv={Hkv:2d}: " + "   ".join(cells) + f"   |cuda - triton| {err:.1e}")
