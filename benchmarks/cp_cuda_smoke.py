"""Context parallelism on CUDA tensors with NCCL, on the GPUs this machine has (one process per GPU,
at most 4): each case's outputs and gradients against single-process attnops on the whole sequence.
With one GPU the group has one rank (no transfers: the CUDA path of the planning, the Triton kernels
it calls and the lse merge); with two or more, the targeted point-to-point sends run over NCCL. Without
a GPU it runs two ranks on CPU with gloo (a check of this script; tests/distributed is the CPU suite).
Usage: python benchmarks/cp_cuda_smoke.py (prints one line per case and rank; exit 1 on a mismatch)."""

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnops  # noqa: E402
from attnops import distributed as cp  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _softmax_case(rank, name, S, H, Hkv, D, kw, layout="zigzag", multiple=1):
    torch.manual_seed(1234)
    dev = _device(rank)
    q, dout = (torch.randn(2, S, H, D, device=dev) for _ in range(2))
    k, v = (torch.randn(2, S, Hkv, D, device=dev) for _ in range(2))
    if kw.get("block_mask") == "sink_local":
        kw = dict(kw, block_mask=attnops.BlockMask.sink_local(S, num_sink_blocks=1, num_local_blocks=2, block_size=64,
                                                             device=dev))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    if "block_mask" in kw:
        ref = attnops.block_sparse_attention(*leaves, kw["block_mask"])
    else:
        ref = attnops.attention(*leaves, causal=kw.get("causal", False), window_size=kw.get("window_size", (-1, -1)))
    ref.backward(dout)
    shards = [cp.shard(t, layout=layout, multiple=multiple).requires_grad_(i < 3) for i, t in enumerate((q, k, v, dout))]
    out = cp.context_parallel_attention(*shards[:3], layout=layout, seq_len=S, **kw)
    out.backward(shards[3])
    errs = [_err(out, cp.shard(ref.detach(), layout=layout, multiple=multiple))]
    errs += [_err(s.grad, cp.shard(t.grad, layout=layout, multiple=multiple)) for s, t in zip(shards[:3], leaves)]
    return name, errs


def _linear_case(rank, name, S, H, D):
    torch.manual_seed(1234)
    dev = _device(rank)
    q, k, v, dout = (torch.randn(2, S, H, D, device=dev) * 0.5 for _ in range(4))
    gate = torch.nn.functional.logsigmoid(torch.randn(2, S, H, device=dev))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attnops.linear_attention(*leaves, causal=True, gate=gate)
    ref.backward(dout)
    shards = [cp.shard(t, layout="contiguous").requires_grad_(i < 3) for i, t in enumerate((q, k, v, dout))]
    out = cp.context_parallel_linear_attention(*shards[:3], gate=cp.shard(gate, layout="contiguous"))
    out.backward(shards[3])
    errs = [_err(out, cp.shard(ref.detach(), layout="contiguous"))]
    errs += [_err(s.grad, cp.shard(t.grad, layout="contiguous")) for s, t in zip(shards[:3], leaves)]
    return name, errs


def _worker(rank, world, port, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    else:  # the same script on CPU with gloo (a dry run of the script itself)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cases = [
        lambda: _softmax_case(rank, "causal zigzag S=1000 GQA 8/2", 1000, 8, 2, 64, dict(causal=True)),
        lambda: _softmax_case(rank, "causal contiguous S=1024", 1024, 4, 4, 64, dict(causal=True), "contiguous"),
        lambda: _softmax_case(rank, "non-causal S=768 D=96", 768, 4, 4, 96, {}),
        lambda: _softmax_case(rank, "window (128, 0) S=2048", 2048, 4, 1, 64, dict(window_size=(128, 0))),
        lambda: _softmax_case(rank, "sink_local mask S=2048", 2048, 4, 4, 64, dict(block_mask="sink_local"),
                              multiple=64),
        lambda: _linear_case(rank, "linear, per-head gates S=1024", 1024, 4, 64),
    ]
    for case in cases:
        try:
            name, errs = case()
            ok = all(e < 2e-3 for e in errs)  # float32 on TF32-free Triton dots vs the same kernels unsplit
            print(f"rank {rank}/{world} {name}: max |diff| out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
                  f"dv {errs[3]:.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
            if not ok:
                failures.append(name)
        except Exception as e:  # report every case, then fail
            print(f"rank {rank}/{world} {getattr(case, '__name__', 'case')}: {type(e).__name__}: {e}", flush=True)
            failures.append(repr(e))
    print(f"rank {rank}: bytes sent {cp.STATS}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world = min(torch.cuda.device_count(), 4) if torch.cuda.is_available() else 2
    failures = mp.Manager().list()
    mp.spawn(_worker, args=(world, _free_port(), failures), nprocs=world, join=True)
    print(f"{world} rank(s): {'all cases ok' if not failures else f'{len(failures)} failure(s)'}")
    sys.exit(1 if failures else 0)
