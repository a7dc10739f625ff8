"""Left-padded KV caches (``cache_leftpad``, flash_attn's): sequence ``b``'s keys are the cache rows
``[cache_leftpad[b], cache_seqlens[b])``; the rows before are padding that is never attended (they hold NaN here, so
an attended pad row shows), and positions stay the cache's (causality, windows and ALiBi count from row 0).

Checked three ways: against the float64 reference (accuracy rule) on every backend, contiguous and paged, with
windows, score modifiers, block masks and maps; against decoding the same keys moved to the cache's start, which
needs no leftpad at all. flash_attn's own ``test_flash_attn_kvcache`` with ``has_leftpad``, through
``attnops.compat.flash_attn``: tests/nn/test_flash_attn_compat.py."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core.block_map import check_request
from attnops.ops.decode import reference
from decode.test_paged import PAGED_BACKENDS, device_of, paged_copy, to
from helpers import DTYPE_IDS, assert_accurate

# (B, S_max, H, Hkv, D, Sq_new)
SHAPES = [(4, 300, 8, 2, 64, 1), (3, 257, 6, 3, 40, 3), (2, 190, 32, 1, 96, 2), (3, 130, 4, 4, 128, 16)]
SHAPE_IDS = ["B{}-S{}-H{}-Hkv{}-D{}-new{}".format(*s) for s in SHAPES]


def left_padded(shape, dtype, seed=0):
    """q, caches whose pad rows are NaN, lengths and left pads: a sequence with no padding, one padded to its last
    key but one, one empty (pad = length), a long pad across several 64-key tiles."""
    B, S, H, Hkv, D, Sq = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, S, Hkv, D, generator=g).to(dtype) for _ in range(2))
    lens = torch.randint(Sq, S + 1, (B,), generator=g, dtype=torch.int32)
    lens[-1] = S
    pads = (torch.rand(B, generator=g) * lens).to(torch.int32)
    pads[0] = 0
    pads[1] = lens[1] - 1
    if B > 2:
        pads[2] = lens[2]
    if B > 3:
        pads[3] = min(int(lens[3]) - 1, 150)
    for b in range(B):
        k[b, :pads[b]] = float("nan")
        v[b, :pads[b]] = float("nan")
    return q, k, v, lens, pads


def check(q, k, v, lens, pads, backend, paged=None, **kw):
    """decode_attention with ``cache_leftpad`` against the float64 reference (and its own dtype's run)."""
    D = q.shape[-1]
    dev = device_of(backend)
    map_kw = dict(return_block_map=True, map_block_size=kw.pop("map_block")) if "map_block" in kw else {}
    if paged is not None:
        pk, pv, table = paged_copy(k, v, lens, paged)
        cache = dict(k_cache=pk, v_cache=pv, block_table=table)
    else:
        cache = dict(k_cache=k, v_cache=v)
    cache = {n: to(t, dev) for n, t in cache.items()}
    res = attnops.decode_attention(to(q, dev), cache.pop("k_cache"), cache.pop("v_cache"), to(lens, dev),
                                   cache_leftpad=to(pads, dev), return_lse=True, backend=backend, **cache,
                                   **{n: to(x, dev) for n, x in kw.items()}, **map_kw)
    res = [t.cpu() for t in res]
    opts = dict(window_size=(kw.get("window_size", (-1, -1))[0], 0), softmax_scale=D ** -0.5,
                softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"), sinks=kw.get("sinks"),
                cache_leftpad=pads)
    mask = kw.get("block_mask")
    clean = [t.nan_to_num() for t in (k, v)]  # the reference masks scores, so a NaN pad would reach it through V
    ref64 = reference.decode_attention(q.double(), *(t.double() for t in clean), lens, mask, **opts,
                                       block_map=_request(map_kw, mask) if map_kw else None)
    refT = reference.decode_attention(q, *clean, lens, mask, **opts)
    assert_accurate("out", res[0], ref64[0], refT[0])
    assert_accurate("lse", res[1], ref64[1], refT[1])
    if map_kw:
        torch.testing.assert_close(res[2].double(), ref64[2], rtol=1e-4, atol=1e-6)
    empty = pads == lens
    assert torch.all(res[0][empty] == 0)  # no key: zeros, and lse -inf (the sink's logit with sinks)
    assert torch.all(torch.isneginf(res[1][empty]) if "sinks" not in kw else res[1][empty] == kw["sinks"].view(-1, 1))
    return res


def _request(map_kw, mask):
    return check_request(map_kw["map_block_size"], "mean", mask.block_size if mask is not None else (64, 64), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_leftpad_matches_reference(shape, num_splits, dtype, fwd_impl):
    if fwd_impl.backend == "cuda":
        pytest.skip("the CUDA decode kernel refuses cache_leftpad (test_the_cuda_kernel_refuses_leftpad)")
    q, k, v, lens, pads = left_padded(shape, dtype)
    check(q, k, v, lens, pads, fwd_impl.backend, num_splits=num_splits)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_leftpad_with_windows_score_modifiers_masks_maps_and_pages(backend):
    q, k, v, lens, pads = left_padded((4, 336, 8, 2, 64, 2), torch.float32, seed=1)
    H = q.shape[2]
    mask = BlockMask.from_dense(torch.rand(1, H, 1, 6, generator=torch.Generator().manual_seed(3)) < 0.6,
                                block_size=(64, 64), seq_len=(2, 336))
    for kw in (dict(window_size=(70, 0)), dict(window_size=(3, 0), num_splits=5), dict(softcap=20.0),
               dict(alibi_slopes=torch.rand(H) * 0.1), dict(alibi_slopes=torch.rand(4, H) * 0.1, num_splits=2),
               dict(sinks=torch.randn(H)), dict(block_mask=mask), dict(map_block=64), dict(map_block=32)):
        check(q, k, v, lens, pads, backend, **dict(kw))
        check(q, k, v, lens, pads, backend, paged=48, **dict(kw))


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_leftpad_equals_the_keys_moved_to_the_start(backend):
    """Without windows or ALiBi a decode step sees only which keys are there: a left-padded cache gives what the
    same keys give at the start of a cache (each sequence's rows shifted left by its pad), with no leftpad at
    all: the semantics checked without the reference's own leftpad code."""
    q, k, v, lens, pads = left_padded((4, 300, 8, 2, 64, 3), torch.float32, seed=2)
    dev = device_of(backend)
    moved_k, moved_v = torch.zeros_like(k), torch.zeros_like(v)
    for b in range(q.shape[0]):
        n = int(lens[b] - pads[b])
        moved_k[b, :n], moved_v[b, :n] = k[b, pads[b]:lens[b]], v[b, pads[b]:lens[b]]
    out, lse = attnops.decode_attention(*(to(t, dev) for t in (q, k, v, lens)), cache_leftpad=to(pads, dev),
                                        return_lse=True, backend=backend)
    want, want_lse = attnops.decode_attention(*(to(t, dev) for t in (q, moved_k, moved_v, lens - pads)),
                                              return_lse=True, backend=backend)
    torch.testing.assert_close(out.cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.cpu(), want_lse.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, error, words", [
    (dict(cache_leftpad=[0, 0]), TypeError, "must be a tensor"),
    (dict(cache_leftpad=torch.zeros(2)), TypeError, "integer"),
    (dict(cache_leftpad=torch.zeros(3, dtype=torch.int32)), ValueError, r"shape \(2,\)"),
    (dict(cache_leftpad=torch.tensor([0, 41], dtype=torch.int32)), ValueError, "sequence 1 has cache_leftpad 41"),
    (dict(cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, r"\[0, cache_seqlens\[b\]\]"),
])
def test_leftpad_bad_input(change, error, words):
    q, k = torch.randn(2, 1, 4, 32), torch.randn(2, 64, 2, 32)
    lens = torch.tensor([10, 40], dtype=torch.int32)
    with pytest.raises(error, match=words):
        attnops.decode_attention(q, k, k, lens, **change)


def test_leftpad_is_refused_where_it_is_not_implemented():
    q, k = torch.randn(1, 1, 4, 32), torch.randn(1, 64, 2, 32)
    lens, pads = torch.tensor([40], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    proj = attnops.lowrank.KeyProjection.identity(2, 32)
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        attnops.decode_attention(q, proj.rotate(k), k, lens, cache_leftpad=pads, lowrank=proj, rank=8, topk=8)


@pytest.mark.skipif(not attnops.dispatch.is_available("cuda"),
                    reason="CUDA decode kernel unavailable (no GPU, or attnops._C built without CUDA)")
def test_the_cuda_kernel_refuses_leftpad():
    q, k = torch.randn(1, 1, 4, 32, device="cuda"), torch.randn(1, 64, 2, 32, device="cuda")
    lens, pads = torch.tensor([40], dtype=torch.int32, device="cuda"), torch.tensor([5], dtype=torch.int32,
                                                                                     device="cuda")
    with pytest.raises(RuntimeError, match="cache_leftpad"):
        attnops.decode_attention(q, k, k, lens, cache_leftpad=pads, backend="cuda")
