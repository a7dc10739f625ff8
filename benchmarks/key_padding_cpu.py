"""A right-padded batch with a bool key padding mask, three ways side by side (calls interleaved, median of 9):
attnops with the mask run as segment bounds (what the op does with a mask whose kept keys are one run per row),
attnops with the same mask as an additive bias (the path it replaces), and torch SDPA given the mask.
Run from the repository root: ``python benchmarks/key_padding_cpu.py``."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import attnops  # noqa: E402
from attnops.ops.softmax import op as softmax_op  # noqa: E402

B, S, H, D = 4, 2048, 8, 64
LENGTHS = [2048, 1500, 1000, 600]
REPEATS = 9

torch.set_num_threads(2)
torch.manual_seed(0)
q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
keep = (torch.arange(S)[None, :] < torch.tensor(LENGTHS)[:, None])[:, None, None, :]
as_bounds = softmax_op.key_mask_as_bounds


def bounds():
    softmax_op.key_mask_as_bounds = as_bounds
    return attnops.attention(q, k, v, causal=True, attn_bias=keep)


def bias():
    softmax_op.key_mask_as_bounds = lambda attn_bias, b, keep_blocks_of, segments, shape: (b, keep_blocks_of,
                                                                                           segments)
    return attnops.attention(q, k, v, causal=True, attn_bias=keep)


def sdpa():
    mask = keep & torch.ones(S, S, dtype=torch.bool).tril()
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=mask)


runs = {"bounds": bounds, "bias": bias, "sdpa": sdpa}
assert torch.equal(bounds(), bias())
times = {name: [] for name in runs}
for _ in range(REPEATS):
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
ms = {name: sorted(t)[REPEATS // 2] * 1e3 for name, t in times.items()}
print(f"B{B} S{S} H{H} D{D} causal f32, lengths {LENGTHS}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in ms.items()))
print(f"bias / bounds {ms['bias'] / ms['bounds']:.2f}x, sdpa / bounds {ms['sdpa'] / ms['bounds']:.2f}x")
