"""Paged KV caches (``block_table``): decoding over pages scattered in a page pool equals decoding the contiguous
cache they stand for (float64 reference, accuracy rule), for page sizes below, equal to and above the kernels'
64-key tile, ragged lengths (0 included), GQA, windows, score modifiers, block masks and block maps; the refusals.
The C++ and Triton kernels read the pages in place (Triton under the interpreter here); the PyTorch fallback
gathers them."""

import os

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.compat import flash_attn as fa
from attnops.ops.decode import reference
from helpers import DTYPE_IDS, assert_accurate


def paged_copy(k, v, lens, page, spare=3, seed=0):
    """``k, v (B, S_max, Hkv, D)`` -> a pool of pages in random order (plus ``spare`` unused pages of NaN, which no
    read may touch) and the block table; entries past a sequence's length are -1 (never read)."""
    B, S, Hkv, D = k.shape
    per_seq = -(-S // page)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * per_seq + spare, generator=g)
    pool_k = torch.full((B * per_seq + spare, page, Hkv, D), float("nan"), dtype=k.dtype)
    pool_v = pool_k.clone()
    table = torch.full((B, per_seq), -1, dtype=torch.int32)
    for b in range(B):
        for j in range(-(-int(lens[b]) // page)):
            pg = int(order[b * per_seq + j])
            rows = k[b, j * page:(j + 1) * page]
            pool_k[pg, :rows.shape[0]] = rows
            pool_v[pg, :rows.shape[0]] = v[b, j * page:(j + 1) * page]
            table[b, j] = pg
    return pool_k, pool_v, table


def inputs(B, S, H, Hkv, D, Sq, dtype, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, Sq, H, D, dtype=dtype)
    k, v = torch.randn(B, S, Hkv, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype)
    lens = torch.randint(Sq, S + 1, (B,), dtype=torch.int32)
    lens[0] = 0 if B > 2 else lens[0]  # an empty sequence
    lens[-1] = S  # a full one
    return q, k, v, lens


def device_of(backend: str) -> str:
    """Triton runs on CPU tensors under the interpreter, on CUDA tensors where a GPU is present."""
    return "cuda" if backend == "triton" and not INTERPRET else "cpu"


def to(x, device):
    return x.to(device) if isinstance(x, (torch.Tensor, BlockMask)) else x


def check_paged(q, k, v, lens, page, backend, **kw):
    D = q.shape[-1]
    pk, pv, table = paged_copy(k, v, lens, page)
    map_kw = dict(return_block_map=True, map_block_size=kw.pop("map_block", None)) if "map_block" in kw else {}
    dev = device_of(backend)
    res = attnops.decode_attention(*(to(t, dev) for t in (q, pk, pv, lens)), block_table=table.to(dev),
                                   return_lse=True, backend=backend, **{n: to(x, dev) for n, x in kw.items()},
                                   **map_kw)
    res = [t.cpu() for t in res]
    opts = dict(window_size=(kw.get("window_size", (-1, -1))[0], 0), softmax_scale=D ** -0.5,
                softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"), sinks=kw.get("sinks"),
                block_map=None)
    mask = kw.get("block_mask")
    ref64 = reference.decode_attention(*(t.double() for t in (q, k, v)), lens, mask, **opts)
    refT = reference.decode_attention(q, k, v, lens, mask, **opts)
    assert_accurate("out", res[0], ref64[0], refT[0])
    assert_accurate("lse", res[1], ref64[1], refT[1])
    if map_kw:  # the same map as the contiguous cache's (itself tested against the reference in test_block_map)
        want = attnops.decode_attention(*(to(t, dev) for t in (q, k, v, lens)), backend=backend,
                                        **{n: to(x, dev) for n, x in kw.items()}, **map_kw)[1].cpu()
        torch.testing.assert_close(res[2], want, rtol=1e-4, atol=1e-6)
    return res


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = attnops.dispatch.is_available("triton") and (INTERPRET or torch.cuda.is_available())
PAGED_BACKENDS = ["cpu", "composite", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON, reason="triton needs TRITON_INTERPRET=1 (CPU tensors) or a GPU"))]


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("page", [1, 16, 48, 64, 256])
@pytest.mark.parametrize("shape", [(3, 300, 8, 2, 64, 1), (2, 257, 32, 1, 128, 3), (2, 190, 6, 3, 40, 2),
                                   (2, 130, 8, 1, 512, 1)],
                         ids=lambda s: "B{}-S{}-H{}-Hkv{}-D{}-new{}".format(*s))
def test_paged_decode_equals_the_contiguous_cache(shape, page, dtype, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take 16- and 32-bit floats")
    q, k, v, lens = inputs(*shape, dtype)
    out, lse = check_paged(q, k, v, lens, page, backend)
    if shape[0] > 2:  # the empty sequence
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [16, 100])
def test_paged_decode_with_score_modifiers_window_and_splits(page, backend):
    q, k, v, lens = inputs(2, 333, 8, 2, 64, 2, torch.float32, seed=1)
    H = q.shape[2]
    for kw in (dict(window_size=(70, 0)), dict(softcap=20.0), dict(alibi_slopes=torch.rand(H) * 0.1),
               dict(sinks=torch.randn(H)), dict(num_splits=5), dict(num_splits=1, window_size=(3, 0))):
        check_paged(q, k, v, lens, page, backend, **kw)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [32, 96, 128])
def test_paged_decode_with_block_mask_and_map(page, backend):
    """A 128-key mask block over pages of 96 rows: the kernel's tile divides both (32 keys). The mask covers the
    pages' positions, max_pages * page_size (384 here for every page size)."""
    q, k, v, lens = inputs(2, 384, 4, 2, 64, 1, torch.float32, seed=2)
    mask = BlockMask.from_dense(torch.rand(1, 4, 1, 3) < 0.6, block_size=(64, 128), seq_len=(1, 384))
    check_paged(q, k, v, lens, page, backend, block_mask=mask)
    check_paged(q, k, v, lens, page, backend, map_block=64)


def test_paged_pages_past_the_length_are_never_read():
    """Entries past each sequence's length are -1 and the spare pages NaN: a read of either would show."""
    q, k, v, lens = inputs(3, 200, 4, 4, 64, 1, torch.float32)
    pk, pv, table = paged_copy(k, v, lens, 64)
    assert (table == -1).any()
    out = attnops.decode_attention(q, pk, pv, lens, block_table=table, backend="cpu")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(block_table=a["block_table"].long()), ValueError, "int32"),
    (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "(B, max_pages)"),
    (lambda a: a["block_table"].__setitem__((1, 0), 99), ValueError, "not a page of the cache"),
    (lambda a: a["block_table"].__setitem__((1, 0), -1), ValueError, "not a page of the cache"),
    (lambda a: a.update(cache_seqlens=torch.tensor([0, 129], dtype=torch.int32)), ValueError, "S_max=128"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :32]), ValueError, "same shape"),
    (lambda a: a.update(lowrank=attnops.lowrank.calibrate(torch.randn(1, 64, 1, 64)), rank=8, topk=4),
     NotImplementedError, "paged"),
])
def test_paged_bad_input(change, error, words):
    torch.manual_seed(0)
    args = dict(q=torch.randn(2, 1, 4, 64), k_cache=torch.randn(5, 64, 1, 64), v_cache=torch.randn(5, 64, 1, 64),
                cache_seqlens=torch.tensor([0, 100], dtype=torch.int32),
                block_table=torch.tensor([[3, 4], [0, 2]], dtype=torch.int32))
    change(args)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        attnops.decode_attention(**args)


def test_the_operators_refuse_pages_out_of_range():
    """The registered operators check their own arguments (a direct torch.ops call never reads past the pool)."""
    q, k, v = torch.randn(1, 1, 2, 64), torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
    table = torch.tensor([[1, 7]], dtype=torch.int32)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not a page of the cache"):
        torch.ops.attnops.decode_attn_fwd(q, k, v, lens, None, 0, 0, 0.125, -1, 0, 0, False, 0.0, None, table)
    if TRITON and INTERPRET:  # (the operator checks pages on CPU tensors only)
        with pytest.raises(RuntimeError, match="not a page of the cache"):
            torch.ops.attnops.decode_attn_fwd_triton(q, k, v, lens, None, 0, 0, 0.125, -1, 0, 0.0, None, table)


@pytest.mark.parametrize("page", [16, 256])
def test_flash_attn_with_kvcache_pages(page):
    """flash_attn's paged call: new keys appended into their pages in place (with rotary), then attended; equal to
    the contiguous call on the cache the pages stand for."""
    torch.manual_seed(3)
    B, S, Hkv, H, D, new = 3, 512, 2, 8, 64, 2
    lens = torch.tensor([0, 37, 500], dtype=torch.int32)
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    q, k_new, v_new = torch.randn(B, new, H, D), torch.randn(B, new, Hkv, D), torch.randn(B, new, Hkv, D)
    cos, sin = torch.randn(S, D // 4).cos(), torch.randn(S, D // 4).sin()
    pk, pv, table = paged_copy(k, v, lens + new, page, spare=0)
    pk, pv = pk.nan_to_num(0.0), pv.nan_to_num(0.0)  # the pages about to receive the new keys
    kw = dict(rotary_cos=cos, rotary_sin=sin, causal=True, return_softmax_lse=True)
    got, got_lse = fa.flash_attn_with_kvcache(q, pk, pv, k_new, v_new, cache_seqlens=lens, block_table=table, **kw)
    kc, vc = k.clone(), v.clone()
    want, want_lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    from attnops.ops.decode.kv_cache import gather_pages
    gk, gv = gather_pages(pk, table), gather_pages(pv, table)
    for b in range(B):  # the appended (rotated) keys and the values sit where the contiguous call put them
        n = int(lens[b]) + new
        torch.testing.assert_close(gk[b, :n], kc[b, :n], rtol=0, atol=0)
        torch.testing.assert_close(gv[b, :n], vc[b, :n], rtol=0, atol=0)


@pytest.mark.parametrize("page", [64, 128])
def test_paged_nan_reaches_the_rows_it_reaches_in_the_contiguous_cache(page):
    """NaN in a paged key or value (the C++ kernel's exact rerun reads pages too): with tiles of 64 keys either way,
    the paged call gives the contiguous call's bits, NaN where it has NaN."""
    q, k, v, lens = inputs(3, 300, 8, 2, 64, 2, torch.float32, seed=4)
    lens[0] = 50
    k[0, 3, 1] = float("nan")
    v[1, 70, 0] = float("nan")
    v[2, 299, 1] = float("inf")
    pk, pv, table = paged_copy(k, v, lens, page)
    got = attnops.decode_attention(q, pk, pv, lens, block_table=table, backend="cpu")
    want = attnops.decode_attention(q, k, v, lens, backend="cpu")
    assert got[0].isnan().any() and not got[0].isnan().all() and got[2].isinf().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_flash_attn_with_kvcache_refuses_a_missing_page_before_writing():
    """A new key whose page entry is not a page of the pool is refused before anything is written (-1 would have
    indexed the pool's last page); and cache_batch_idx does not combine with a table (flash_attn's rule)."""
    q, k_new, v_new = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 64)
    pk, pv = torch.zeros(3, 16, 2, 64), torch.zeros(3, 16, 2, 64)
    table = torch.tensor([[0, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([16], dtype=torch.int32)  # the new key goes to position 16: page entry 1
    with pytest.raises(ValueError, match="not pages of the cache"):
        fa.flash_attn_with_kvcache(q, pk, pv, k_new, v_new, cache_seqlens=lens, block_table=table)
    assert not pk.any() and not pv.any()
    with pytest.raises(ValueError, match="cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, pk, pv, k_new, v_new, cache_seqlens=lens, block_table=table,
                                   cache_batch_idx=torch.tensor([0]))
