"""``python -m attnops.bench --suite cp``: context-parallel attention across ranks this command launches itself
(gloo on CPU, one thread per rank; NCCL with ``--device cuda``, one GPU per rank).

Per case (suite ``cp.toml``): the slowest rank's time per call against one process doing the whole sequence on
one rank's resources (their ratio is the parallel speedup, ``W`` at best), the load imbalance between ranks
(max / min rank time), the bytes all ranks sent against a dense ring's (every shard to every rank), the ring
steps skipped, and the all-gather-KV baseline (every rank gathers every key shard, then attends: what torch's
Flex context parallel does). Medians of ``repeats`` calls after ``warmup``, the ranks synchronised by a barrier
before each call. Outputs are checked against the one-process result before timing.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand(suite: dict) -> List[dict]:
    """The suite's ``[[cases]]`` with list values as axes (the harness's grid rule)."""
    import itertools

    cases = []
    for entry in suite.get("cases", []):
        axes = {k: v if isinstance(v, list) else [v] for k, v in entry.items()}
        for values in itertools.product(*axes.values()):
            cases.append(dict(zip(axes, values)))
    return cases


def label(case: dict) -> str:
    pred = "causal" if case.get("causal") else "full"
    if case.get("window"):
        pred = f"window{case['window']}"
    if case.get("mask"):
        pred = {"sliding_window": f"swin{case.get('mask_window', '')}"}.get(case["mask"], case["mask"])
    heads = f"H{case['H']}" if case.get("Hkv", case["H"]) == case["H"] else f"H{case['H']}/{case['Hkv']}"
    layout = {"zigzag": "zz", "contiguous": "contig"}[case.get("layout", "zigzag")]
    mode = {"fwd": "f", "fwd+bwd": "f+b"}[case.get("mode", "fwd")]
    return f"{pred} {layout} W{case['world']} N{case['N']} {heads} {mode}"


def _inputs(case: dict, device):
    torch.manual_seed(0)
    dtype = DTYPES[case.get("dtype", "float32")]
    B, N, H, D = case.get("B", 1), case["N"], case["H"], case["D"]
    Hkv = case.get("Hkv", H)
    q = torch.randn(B, N, H, D, dtype=dtype, device=device)
    k = torch.randn(B, N, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, N, Hkv, D, dtype=dtype, device=device)
    return q, k, v


def _options(case: dict, q, k):
    import attnops

    if case.get("mask") == "sliding_window":
        return dict(block_mask=attnops.BlockMask.sliding_window(case["N"], window=case["mask_window"]))
    if case.get("mask") == "moba":
        return dict(block_mask=attnops.moba_block_mask(q, k, block_size=case.get("block_size", 512),
                                                       topk=case.get("topk", 3)))
    return dict(causal=bool(case.get("causal")), window_size=(case["window"], 0) if case.get("window") else (-1, -1))


def _timed(fn, repeats: int, warmup: int, barrier) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _single(case: dict, q, k, v, opts):
    """The whole sequence in one process: attnops.attention / block_sparse_attention."""
    import attnops

    if "block_mask" in opts:
        return lambda: attnops.block_sparse_attention(q, k, v, opts["block_mask"])
    return lambda: attnops.attention(q, k, v, **opts)


def _rank(rank: int, case: dict, port: int, queue, repeats: int, warmup: int, device_type: str):
    try:
        import torch.distributed as dist

        from attnops import distributed as cp

        torch.set_num_threads(case.get("threads_per_rank", 1))
        world = case["world"]
        backend = "nccl" if device_type == "cuda" else "gloo"
        device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        layout = case.get("layout", "zigzag")
        q, k, v = _inputs(case, device)
        opts = _options(case, q, k)
        multiple = opts["block_mask"].block_size[0] if "block_mask" in opts else 1
        ql, kl, vl = (cp.shard(t, layout=layout, multiple=multiple) for t in (q, k, v))
        mode = case.get("mode", "fwd")
        grad = mode == "fwd+bwd"
        if grad:
            ql, kl, vl = (t.requires_grad_(True) for t in (ql, kl, vl))

        def run_cp():
            out = cp.context_parallel_attention(ql, kl, vl, layout=layout, seq_len=case["N"], **opts)
            if grad:
                out.sum().backward()
            return out

        # correctness first: the shards of the one-process result
        with torch.no_grad():
            want = cp.shard(_single(case, q, k, v, opts)(), layout=layout, multiple=multiple)
            got = cp.context_parallel_attention(ql.detach(), kl.detach(), vl.detach(), layout=layout,
                                                seq_len=case["N"], **opts)
            err = float((got.float() - want.float()).abs().max())
        cp.STATS.clear()
        run_cp()
        sent = cp.STATS.get("bytes_sent", 0)
        skipped = cp.STATS.get("steps_skipped", 0)
        ms = _timed(run_cp, repeats, warmup, dist.barrier)

        def run_allgather():  # every rank gathers every key shard, then attends its queries to all of them
            with torch.no_grad():
                return cp.allgather_kv_attention(ql.detach(), kl.detach(), vl.detach(), layout=layout,
                                                 seq_len=case["N"], **opts)

        gather_ms = _timed(run_allgather, repeats, warmup, dist.barrier) if not grad else None
        single_ms = None
        if rank == 0:  # one process, one rank's threads, the whole sequence
            qs, ks, vs = (t.detach().requires_grad_(grad) for t in (q, k, v))

            def run_single():
                out = _single(case, qs, ks, vs, opts)()
                if grad:
                    out.sum().backward()

            single_ms = _timed(run_single, repeats, warmup, lambda: None)
        shard_bytes = 2 * kl.numel() * kl.element_size()
        queue.put(dict(rank=rank, ms=ms, gather_ms=gather_ms, single_ms=single_ms, sent=sent, skipped=skipped,
                       # a dense ring moves every shard to every rank: forward; backward again, plus dk / dv
                       ring_bytes=(world - 1) * shard_bytes * (3 if grad else 1), err=err))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (reported by the parent)
        queue.put(dict(rank=rank, error=traceback.format_exc()))


def run_case(case: dict, repeats: int, warmup: int, device_type: str = "cpu") -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, case, port, queue, repeats, warmup, device_type))
             for r in range(case["world"])]
    for p in procs:
        p.start()
    reports = []
    try:
        reports = [queue.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        return dict(case=label(case), status="error", message=errors[0])
    times = [r["ms"] for r in reports]
    single = next(r["single_ms"] for r in reports if r["single_ms"] is not None)
    return dict(case=label(case), status="ok", world=case["world"], ms_max=max(times), ms_min=min(times),
                single_ms=single, speedup=single / max(times), imbalance=max(times) / min(times),
                sent_mib=sum(r["sent"] for r in reports) / 2 ** 20,
                ring_mib=sum(r["ring_bytes"] for r in reports) / 2 ** 20,
                skipped=max(r["skipped"] for r in reports),
                gather_ms=None if reports[0]["gather_ms"] is None else max(r["gather_ms"] for r in reports),
                err=max(r["err"] for r in reports))


def main(suite: dict, suite_name: str, out_dir: Optional[Path], repeats: Optional[int], device: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from attnops.bench.report import environment

    cases = expand(suite)
    repeats = repeats or suite.get("repeats", 5)
    warmup = suite.get("warmup", 1)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    console = Console(width=None if os.isatty(1) else 100)
    results = []
    for i, case in enumerate(cases):
        console.print(f"[{i + 1}/{len(cases)}] {label(case)}")
        results.append(run_case(case, repeats, warmup, device_type))
    env = environment(device, 1)
    table = Table(title=f"context parallelism — {env['device_name']}, {device_type}, one thread per rank")
    for col in ("case", "ms", "1 proc", "speedup", "max/min", "MiB", "ring", "skip", "AG ms"):
        table.add_column(col, justify="left" if col == "case" else "right", no_wrap=True,
                         max_width=30 if col == "case" else None, overflow="ellipsis")
    for r in results:
        if r["status"] != "ok":
            table.add_row(r["case"], "[red]error[/]", *["—"] * 7)
            continue
        table.add_row(r["case"], f"{r['ms_max']:.1f}", f"{r['single_ms']:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['imbalance']:.2f}", f"{r['sent_mib']:.2f}", f"{r['ring_mib']:.2f}", str(r["skipped"]),
                      "—" if r["gather_ms"] is None else f"{r['gather_ms']:.1f}")
    console.print(table)
    console.print("ms: the slowest rank's median per call; 1 proc: the whole sequence in one process on one "
                  "rank's threads; MiB: sent by all ranks together (ring: a dense ring's); skip: ring steps "
                  "not taken; AG ms: the all-gather-KV baseline's ms/rank (forward cases)")
    for r in results:
        if r["status"] != "ok":
            console.print(f"[red]error[/] {r['case']}: {r['message'].strip().splitlines()[-1]}")
    out_dir = out_dir or Path("benchmarks/results") / f"{suite_name}-{device_type}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"environment": env, "results": results}, indent=1,
                                                     default=str))
    console.print(f"results: {out_dir / 'results.json'}")
    return 1 if any(r["status"] != "ok" for r in results) else 0


def is_cp_suite(suite: dict) -> bool:
    """Suites of ``kind = "context_parallel"`` run here, not through the per-op harness."""
    return suite.get("kind") == "context_parallel"
