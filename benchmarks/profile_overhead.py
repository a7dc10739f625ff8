"""Where the fixed cost of a small attention call goes on a GPU: host time per call of each layer
(public op, registered operator, bare launcher), then a torch.profiler table of fwd+bwd.
Run from the repository root: ``python benchmarks/profile_overhead.py``."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import attnops  # noqa: E402
from attnops.ops.decode import triton as tdec  # noqa: E402
from attnops.ops.softmax import triton as tbs  # noqa: E402

B, H, N, D = 4, 16, 1024, 64
q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
qd, kd, vd = (t.detach() for t in (q, k, v))
dec = (torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16),
       *(torch.randn(1, 4096, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)),
       torch.full((1,), 4096, dtype=torch.int32, device="cuda"))
scale = D ** -0.5


def fb():
    o = attnops.attention(q, k, v)
    o.backward(torch.ones_like(o))


layers = {
    "launcher _fwd": lambda: tbs._fwd(qd, kd, vd, None, None, None, None, 0, 0, scale, False, -1, -1),
    "custom op fwd": lambda: torch.ops.attnops.block_sparse_attn_fwd_triton(qd, kd, vd, None, None, None, None, 0, 0,
                                                                            scale, False, -1, -1),
    "attention fwd (no grad)": lambda: attnops.attention(qd, kd, vd),
    "attention fwd (grad)": lambda: attnops.attention(q, k, v),
    "attention fwd+bwd": fb,
    "decode op (B1 H32 S4096)": lambda: attnops.decode_attention(*dec),
    "decode launcher": lambda: tdec._decode(*dec, None, 0, 0, 128 ** -0.5, -1, 0),
    "sdpa fwd+bwd": lambda: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).sum().backward(),
}
for name, fn in layers.items():
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        fn()
    host = (time.perf_counter() - t) / 50
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 50
    print(f"{name:26s} host {host * 1e3:7.3f} ms/call   wall {wall * 1e3:7.3f} ms/call")

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(5):
        fb()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
