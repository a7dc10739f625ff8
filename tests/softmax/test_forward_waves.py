"""The CPU forward runs its (batch, kv head) pairs in waves that reuse one set of K / V panels
(csrc/cpu/kernels/block_sparse_attention.cpp): a wave's tasks compute exactly what one pass over every pair
computed, so outputs, lse and block maps equal the single-wave run bit for bit, for every feature that reads the
panels (GQA, masks, segments, score modifiers, dropout, maps) and for bf16's per-wave choice of products. One pair
per wave is forced with the test aid ``_C._set_wave_bytes(1)``. The fused backward packs its per-head operands
(q, dO and their panels, lse, delta) in waves the same way (two pairs a thread a wave at least). The forward's
panels come from the workspace cache (csrc/ops.h), reused across calls."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import backends

from helpers import assert_accurate, make_qkv

pytestmark = pytest.mark.skipif(not backends.EXTENSION, reason="needs the C++ extension")


@pytest.fixture
def waves():
    from attnops import _C

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a wave needs 8 tasks a thread: with one thread, one pair per wave
    previous = _C._set_wave_bytes(1 << 40)
    yield _C
    _C._set_wave_bytes(previous)
    torch.set_num_threads(threads)


def _both(C, fn):
    C._set_wave_bytes(1 << 40)
    one = fn()
    C._set_wave_bytes(1)
    return one, fn()


def _equal(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,S,H,Hkv,D,kw", [
    (2, 333, 6, 3, 40, dict(causal=True)),
    (3, 129, 4, 4, 96, dict(window_size=(50, 10), softcap=15.0)),
    (1, 200, 8, 2, 64, dict(causal=True, dropout_p=0.2, seed=3)),
])
def test_waves_equal_one_pass(waves, dtype, B, S, H, Hkv, D, kw):
    q, k, v = make_qkv(B, S, S, H, Hkv, D, dtype)
    kw = dict(kw)
    seed = kw.pop("seed", None)

    def run():
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return attnops.attention(q, k, v, return_lse=True, generator=gen, **kw)

    one, many = _both(waves, run)
    _equal(one, many)
    if dtype == torch.float32 and "dropout_p" not in kw:
        ref = attnops.attention(q.double(), k.double(), v.double(), backend="reference", return_lse=True, **kw)
        low = attnops.attention(q, k, v, backend="reference", return_lse=True, **kw)
        assert_accurate("out", many[0], ref[0], low[0])


def test_waves_block_mask_map_and_segments(waves):
    q, k, v = make_qkv(2, 640, 640, 4, 2, 64, torch.float32)
    mask = BlockMask.sliding_window((640, 640), window=200, block_size=64)
    one, many = _both(waves, lambda: attnops.block_sparse_attention(q, k, v, mask, return_block_map=True))
    _equal(one, many)
    cu = torch.tensor([0, 300, 301, 1280], dtype=torch.int32)
    qp, kp, vp = (t.reshape(1280, *t.shape[2:]) for t in (q, k, v))
    one, many = _both(waves, lambda: attnops.varlen_attention(qp, kp, vp, cu, cu, 979, 979, causal=True))
    _equal(one, many)


def test_bf16_nan_in_v_falls_back_per_wave(waves):
    """A wave whose V holds NaN runs the float path (its exact rerun keeps 0 * NaN away from rows that never see
    the key); the other waves keep the bf16 products. Rows before the NaN key stay finite."""
    q, k, v = make_qkv(1, 200, 200, 4, 4, 64, torch.bfloat16)
    v[0, 150, 1, 5] = float("nan")
    waves._set_wave_bytes(1)
    out = attnops.attention(q, k, v, causal=True)
    nan = torch.zeros(out.shape, dtype=torch.bool)
    nan[0, 150:, 1, 5] = True
    assert torch.isnan(out[nan]).all() and torch.isfinite(out[~nan]).all()
    ref = attnops.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    low = attnops.attention(q, k, v, causal=True, backend="reference")
    keep = ~nan
    assert_accurate("out", out[keep], ref[keep], low[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,H,Hkv,D,kw", [
    (2, 333, 6, 3, 40, dict(causal=True)),
    (3, 129, 4, 4, 96, dict(window_size=(50, 10), softcap=15.0)),
    (5, 150, 4, 1, 64, dict(causal=True, dropout_p=0.2, seed=3)),
])
def test_backward_waves_equal_one_pass(waves, dtype, B, S, H, Hkv, D, kw):
    """The fused backward (one thread, which B * Hkv pairs fill) in waves of two pairs, the budget at one byte
    (3-6 waves here): the gradients, through out and lse, equal the one-wave run's bit for bit."""
    previous = waves._set_backward_mode(0)
    try:
        q, k, v = make_qkv(B, S, S, H, Hkv, D, dtype)
        kw = dict(kw)
        seed = kw.pop("seed", None)
        dout, dlse = torch.randn_like(q), torch.randn(B, H, S)

        def run():
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            out, lse = attnops.attention(qq, kk, vv, return_lse=True, generator=gen, **kw)
            return torch.autograd.grad((out.float() * dout.float()).sum() + (lse * dlse).sum(), (qq, kk, vv))

        one, many = _both(waves, run)
        _equal(tuple(one), tuple(many))
        assert all(torch.isfinite(g).all() for g in many)
    finally:
        waves._set_backward_mode(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_workspace_cache_reuse(dtype):
    """The forward's K / V panels come from the workspace cache (csrc/ops.h), kept between calls up to its limit:
    a call that reuses a larger call's dirty buffer (poisoning off: stale values, not NaN) gives the result of one
    with fresh buffers (cache off) bit for bit, odd key counts (padded panels) included; limit 0 empties it."""
    from attnops import _C

    previous_poison = backends.set_poison_outputs(False)
    previous = _C._set_workspace_cache_bytes(64 << 20)
    try:
        big = make_qkv(2, 1000, 1000, 4, 2, 96, dtype)
        attnops.attention(*big, causal=True)  # leaves its panels in the cache
        assert 0 < _C._workspace_cached_bytes() <= 64 << 20
        calls = [(make_qkv(1, 333, 257, 6, 3, 40, dtype), dict(causal=True)),
                 (make_qkv(2, 129, 131, 4, 4, 96, dtype), dict(window_size=(50, 10), softcap=15.0))]
        reused = [attnops.attention(*qkv, return_lse=True, **kw) for qkv, kw in calls]
        _C._set_workspace_cache_bytes(0)
        assert _C._workspace_cached_bytes() == 0
        fresh = [attnops.attention(*qkv, return_lse=True, **kw) for qkv, kw in calls]
        assert _C._workspace_cached_bytes() == 0
        for a, b in zip(reused, fresh):
            _equal(a, b)
    finally:
        _C._set_workspace_cache_bytes(previous)
        backends.set_poison_outputs(previous_poison)
