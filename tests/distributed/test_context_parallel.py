"""Context-parallel attention on CPU with gloo: process groups of 2 and 4 ranks spawned once per world size,
each running every case; outputs, lse and gradients must equal single-process attnops on the whole
sequence (float64: to rounding; float32: under the accuracy rule's yardstick), and shards nobody needs
must not be sent (counted bytes)."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnops
from attnops import distributed as cp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(q, k, v, dout, kw):
    """attnops on the whole sequence, one process: out, lse and the gradients."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    mask = kw.get("block_mask")
    if mask is not None:
        out, lse = attnops.block_sparse_attention(q, k, v, mask, return_lse=True)
    else:
        out, lse = attnops.attention(q, k, v, causal=kw.get("causal", False), window_size=kw.get("window_size", (-1, -1)),
                                     return_lse=True)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _run_case(name, world, S, H, Hkv, D, dtype, layout, kw, multiple=1, mask_fn=None):
    torch.manual_seed(1234)  # the same global tensors on every rank
    q = torch.randn(2, S, H, D, dtype=dtype)
    k = torch.randn(2, S, Hkv, D, dtype=dtype)
    v = torch.randn(2, S, Hkv, D, dtype=dtype)
    dout = torch.randn(2, S, H, D, dtype=dtype)
    kw = dict(kw)
    if mask_fn is not None:
        kw["block_mask"] = mask_fn(q, k)
    ref = _single(q, k, v, dout, kw)
    shards = [cp.shard(t, layout=layout, multiple=multiple).requires_grad_(i < 3)
              for i, t in enumerate((q, k, v, dout))]
    out, lse = cp.context_parallel_attention(*shards[:3], causal=kw.get("causal", False),
                                             window_size=kw.get("window_size", (-1, -1)),
                                             block_mask=kw.get("block_mask"), return_lse=True, layout=layout,
                                             seq_len=S)
    out.backward(shards[3])
    with torch.no_grad():  # the all-gather-KV baseline computes the same rows
        base = cp.allgather_kv_attention(*(t.detach() for t in shards[:3]), causal=kw.get("causal", False),
                                         window_size=kw.get("window_size", (-1, -1)), block_mask=kw.get("block_mask"),
                                         layout=layout, seq_len=S)
    torch.testing.assert_close(base, out.detach(), rtol=1e-6, atol=1e-6)
    got = [cp.unshard(t.detach(), S, layout=layout) for t in (out, shards[0].grad, shards[1].grad, shards[2].grad)]
    got.insert(1, cp.unshard(lse.transpose(1, 2).detach(), S, layout=layout).transpose(1, 2))
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m: f"{name} (W={world}) {label}: {m}")


def _sink_local(q, k):
    return attnops.BlockMask.sink_local(q.shape[1], num_sink_blocks=1, num_local_blocks=2, block_size=16)


def _random_mask(q, k):
    n = -(-q.shape[1] // 16)
    dense = torch.rand(1, q.shape[2], n, n, generator=torch.Generator().manual_seed(5)) < 0.4
    return attnops.BlockMask.from_dense(dense | torch.eye(n, dtype=torch.bool), q.shape[1], 16)


def _moba(q, k):
    return attnops.moba_block_mask(q, k, block_size=64, topk=2, causal=True)


CASES = [
    # name, S, H, Hkv, D, dtype, layout, kwargs, multiple, mask
    ("causal zigzag GQA", 96, 4, 2, 16, torch.float64, "zigzag", dict(causal=True), 1, None),
    ("causal zigzag odd length", 101, 2, 1, 8, torch.float64, "zigzag", dict(causal=True), 1, None),
    ("causal contiguous", 100, 2, 2, 8, torch.float64, "contiguous", dict(causal=True), 1, None),
    ("non-causal zigzag MQA", 90, 4, 1, 16, torch.float64, "zigzag", {}, 1, None),
    ("sliding window", 120, 2, 2, 8, torch.float64, "contiguous", dict(causal=True, window_size=(20, 0)), 1, None),
    ("symmetric window zigzag", 110, 2, 2, 8, torch.float64, "zigzag", dict(window_size=(9, 13)), 1, None),
    ("sink_local mask", 200, 2, 1, 8, torch.float64, "zigzag", {}, 16, _sink_local),
    ("random mask", 190, 4, 2, 8, torch.float64, "contiguous", {}, 16, _random_mask),
    ("moba mask", 512, 2, 1, 16, torch.float64, "zigzag", {}, 64, _moba),
    ("causal float32", 128, 4, 2, 40, torch.float32, "zigzag", dict(causal=True), 1, None),
]


LINEAR_CASES = [
    # name, S, H, Hkv, Dk, Dv, options, gate shape ("head" / "channel" / None)
    ("linear plain GQA", 130, 4, 2, 8, 12, dict(), None),
    ("linear retnet decay", 100, 2, 2, 8, 8, dict(decay="retnet"), None),
    ("linear gate per head, normalised", 97, 2, 1, 8, 8, dict(normalize=True, feature_map="relu"), "head"),
    ("linear per-channel gate + decay", 128, 2, 2, 8, 8, dict(decay="retnet", chunk_size=16), "channel"),
    # non-causal: one global state; padded keys (elu: phi(0) = 1 would count in the normaliser) must stay out of it
    ("linear non-causal zigzag GQA, padded", 101, 4, 2, 8, 12, dict(causal=False, layout="zigzag"), None),
    ("linear non-causal normalised, a rank all padding", 9, 2, 1, 8, 8, dict(causal=False, normalize=True), None),
]


def _linear_case(name, world, S, H, Hkv, Dk, Dv, options, gate_kind):
    torch.manual_seed(99)
    q, k = torch.randn(2, S, H, Dk, dtype=torch.float64), torch.randn(2, S, Hkv, Dk, dtype=torch.float64)
    v, dout = torch.randn(2, S, Hkv, Dv, dtype=torch.float64), torch.randn(2, S, H, Dv, dtype=torch.float64)
    gate = None
    if gate_kind:
        shape = (2, S, H) if gate_kind == "head" else (2, S, H, Dk)
        gate = torch.nn.functional.logsigmoid(torch.randn(shape, dtype=torch.float64) + 2)
    inputs = [q, k, v] + ([gate] if gate is not None else [])
    options = dict(options)
    layout = options.pop("layout", "contiguous")
    full = [t.clone().requires_grad_(True) for t in inputs]
    out = attnops.linear_attention(*full[:3], gate=full[3] if gate is not None else None, **options)
    out.backward(dout)
    local = [cp.shard(t, layout=layout).requires_grad_(True) for t in inputs]
    got = cp.context_parallel_linear_attention(*local[:3], gate=local[3] if gate is not None else None, layout=layout,
                                               seq_len=S, **options)
    got.backward(cp.shard(dout, layout=layout))
    pairs = [("out", cp.unshard(got.detach(), S, layout=layout), out.detach())]
    pairs += [(f"d{n}", cp.unshard(t.grad, S, layout=layout), f.grad)
              for n, t, f in zip(("q", "k", "v", "gate"), local, full)]
    for label, a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} (W={world}) {label}: {m}")


def _module_trains_like_one_process(world, S=70, layout="zigzag", **kwargs):
    """A tiny attention block, sequence split over the ranks: loss and parameter gradients (summed over
    ranks, as data-parallel training reduces them) equal the single-process ones. ``kwargs``: the block's
    ``attention`` spec and ``causal``."""
    torch.manual_seed(7)
    model = attnops.nn.Attention(32, 4, num_kv_heads=2, rope=10000.0, **kwargs).double()
    split = attnops.nn.Attention(32, 4, num_kv_heads=2, rope=10000.0, context_parallel_group=dist.group.WORLD,
                                 context_parallel_layout=layout, **kwargs).double()
    split.load_state_dict(model.state_dict())
    x, w = torch.randn(2, S, 32, dtype=torch.float64), torch.randn(2, S, 32, dtype=torch.float64)
    loss = (model(x) * w).sum()
    loss.backward()
    local = (split(cp.shard(x, layout=layout), seq_len=S) * cp.shard(w, layout=layout)).sum()
    local.backward()
    total = local.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(model.named_parameters(), split.parameters()):
        g = q.grad.clone()
        dist.all_reduce(g)
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def _bad_input_is_refused(world):
    q = cp.shard(torch.randn(1, 8 * world, 2, 8))
    mask = attnops.BlockMask.causal(8 * world, block_size=16)
    softmax, linear = cp.context_parallel_attention, cp.context_parallel_linear_attention
    full = attnops.BlockMask.full(8 * world, block_size=16)
    cases = [(softmax, dict(seq_len=8 * world + 1), "seq_len"), (softmax, dict(layout="ring"), "layout"),
             (softmax, dict(block_mask=mask), "multiple of the mask's block size"),
             (softmax, dict(causal=True, block_mask=full), "causal"),
             (linear, dict(layout="zigzag"), "layout='contiguous'"), (linear, dict(seq_len=0), "seq_len"),
             (linear, dict(causal=1), "bool"), (linear, dict(causal=False, decay="retnet"), "causal=True")]
    for fn, kwargs, words in cases:
        try:
            fn(q, q, q, **kwargs)
        except (ValueError, TypeError) as e:
            assert words in str(e), (fn.__name__, kwargs, str(e))
        else:
            raise AssertionError(f"{fn.__name__}: {kwargs} was accepted")
    block = attnops.nn.Attention(16, 2, context_parallel_group=dist.group.WORLD)
    with attnops.maps.capture(), pytest.raises(NotImplementedError, match="capture would miss"):
        block(cp.shard(torch.randn(1, 8 * world, 16)))  # it records no maps: refused, not silently missed


def _worker(rank, world, port, queue):
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for case in CASES:
            _run_case(case[0], world, *case[1:])
        for case in LINEAR_CASES:
            _linear_case(case[0], world, *case[1:])
        _module_trains_like_one_process(world)
        linear = attnops.nn.LinearAttentionSpec()  # normalised: padded keys would count in the normaliser
        _module_trains_like_one_process(world, layout="contiguous", attention=linear)
        _module_trains_like_one_process(world, attention=linear, causal=False)
        _bad_input_is_refused(world)
        # a window narrower than a contiguous shard moves one neighbour shard per rank, forward and backward
        cp.STATS.clear()
        S = 64 * world
        torch.manual_seed(0)
        q, k, v = (cp.shard(torch.randn(1, S, 2, 8), layout="contiguous").requires_grad_(True) for _ in range(3))
        out = cp.context_parallel_attention(q, k, v, causal=True, window_size=(20, 0), layout="contiguous")
        out.sum().backward()
        shard_bytes = 2 * q.numel() * q.element_size()  # k and v
        expected = 0 if rank == world - 1 else shard_bytes + shard_bytes  # its shard forward and backward
        expected += 0 if rank == 0 else shard_bytes  # the neighbour's dk / dv back
        queue.put((rank, cp.STATS.get("bytes_sent", 0), expected, cp.STATS.get("steps_skipped", 0)))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (the parent reports it)
        queue.put((rank, "error", traceback.format_exc(), None))
        raise


def test_without_a_process_group_the_error_says_so():
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.context_parallel_attention(q, q, q)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_context_parallel_equals_single_process(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:  # a deadlock must fail the test, not hang CI
        reports = [queue.get(timeout=300) for _ in range(world)]
    except Exception as e:  # noqa: BLE001  (queue.Empty)
        pytest.fail(f"the ranks did not report within 300 s (deadlock?): {e!r}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r[2] for r in reports if r[1] == "error"]
    assert not errors, errors[0]
    for rank, sent, expected, skipped in reports:
        assert sent == expected, f"rank {rank} sent {sent} bytes, expected {expected}"
        assert skipped == (world - 1 if rank == 0 else world - 2), (rank, skipped)  # ring steps not taken


TINY_CP_SUITE = """
kind = "context_parallel"
repeats = 2
warmup = 0

[[cases]]
world = 2
N = 256
H = 2
D = 16
causal = true
layout = ["zigzag", "contiguous"]
"""


def test_cp_benchmark_runs(tmp_path, capsys):
    from attnops.bench.__main__ import main

    suite = tmp_path / "cp_tiny.toml"
    suite.write_text(TINY_CP_SUITE)
    assert main(["--suite", str(suite), "--out", str(tmp_path / "out")]) == 0
    import json

    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert r["err"] < 1e-4 and r["speedup"] > 0 and r["sent_mib"] <= r["ring_mib"]
    contiguous = rows[1]  # causal, contiguous: rank 0 needs no keys of rank 1
    assert contiguous["skipped"] == 1 and contiguous["sent_mib"] < contiguous["ring_mib"]
    assert "context parallelism" in capsys.readouterr().out
