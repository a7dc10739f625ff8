"""Score modifiers of the softmax core (conventions.md): softcap, ALiBi and attention sinks, forward and
backward, on every implementation, alone and composed with causal / window / GQA / block masks, maps
and lse; against the float64 reference, which is itself checked against a port of the authors' code
(flash_attn's ``attention_ref`` with ``attn_bias_from_alibi_slopes``, gpt-oss's ``sdpa`` with sinks)."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.softmax import reference
from authors_ref import attention_ref
from helpers import DTYPE_IDS, compare_with_reference, make_qkv


# ---- cases ------------------------------------------------------------------------------------------------

SHAPES = [(2, 63, 63, 4, 4, 32), (1, 130, 100, 4, 2, 40), (1, 100, 200, 8, 1, 96), (1, 50, 70, 4, 2, 512)]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]
MODS = {
    "softcap": dict(softcap=4.0),
    "alibi": dict(alibi="H"),
    "alibi_batch_causal": dict(alibi="BH", causal=True),
    "sinks": dict(sinks=True),
    "all_causal": dict(softcap=2.5, alibi="H", sinks=True, causal=True),
    "all_window": dict(softcap=2.5, alibi="BH", sinks=True, window_size=(30, 9)),
}


def _materialise(mods, B, H, dtype, device):
    """Tensors for a MODS entry: ALiBi slopes (float32, from the ALiBi paper's geometric sequence, so
    that distant keys are strongly damped), sinks in q's dtype (a model parameter)."""
    mods = dict(mods)
    kind = mods.pop("alibi", None)
    if kind is not None:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        mods["alibi_slopes"] = (slopes if kind == "H" else slopes * torch.rand(B, 1) * 2).to(device)
    if mods.pop("sinks", False):
        mods["sinks"] = (torch.randn(H, dtype=torch.float64) * 2).to(dtype).to(device)
    return mods


@pytest.mark.parametrize("mods", list(MODS))
def test_reference_matches_the_authors_code(mods):
    B, Sq, Sk, H, Hkv, D = 2, 50, 70, 4, 2, 24
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64)
    kw = _materialise(MODS[mods], B, H, torch.float64, "cpu")
    causal, window = kw.pop("causal", False), kw.pop("window_size", (-1, -1))
    out, lse = reference.block_sparse_attention(q, k, v, None, causal=causal, window_size=window,
                                                softmax_scale=D ** -0.5, **kw)
    ref_out, ref_lse = attention_ref(q, k, v, causal=causal, window_size=window, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_causal_alibi_matches_flash_attn_kernel_form():
    """FA2's causal kernel adds ``slope * j`` instead of ``-slope * |i + Sk - Sq - j|``: a per-row constant
    apart, so the output is the same and lse differs by ``slope * (i + Sk - Sq)`` (documented)."""
    B, Sq, Sk, H, D = 1, 40, 60, 2, 16
    q, k, v = make_qkv(B, Sq, Sk, H, H, D, torch.float64)
    slopes = torch.tensor([0.25, 0.0625], dtype=torch.float64)
    out, lse = attnops.attention(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True)
    bias = slopes.view(1, H, 1, 1) * torch.arange(Sk, dtype=torch.float64)
    allowed = reference.token_mask(Sq, Sk, None, True, (-1, -1))
    fa_out, fa_lse = reference.masked_attention(q, k, v, allowed, D ** -0.5, bias=bias)
    torch.testing.assert_close(out, fa_out, rtol=1e-10, atol=1e-10)
    shift = slopes.view(H, 1) * (torch.arange(Sq, dtype=torch.float64) + Sk - Sq)
    torch.testing.assert_close(lse, fa_lse - shift, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_score_mods_match_reference(shape, mods, dtype, impl):
    """out, lse, dq, dk, dv and dsinks under the accuracy rule."""
    B, Sq, Sk, H, Hkv, D = shape
    kw = _materialise(MODS[mods], B, H, dtype, impl.device)
    sinks = kw.pop("sinks", None)
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=impl.device) + ([sinks] if sinks is not None else [])
    causal, window = kw.pop("causal", False), kw.pop("window_size", (-1, -1))

    def kernel(q, k, v, *s):
        return attnops.attention(q, k, v, causal=causal, window_size=window, sinks=s[0] if s else None,
                                 return_lse=True, backend=impl.backend, **kw)

    def ref(q, k, v, *s):
        slopes = kw.get("alibi_slopes")
        extra = dict(kw, alibi_slopes=slopes.cpu() if slopes is not None else None)
        return reference.block_sparse_attention(q, k, v, None, causal=causal, window_size=window,
                                                softmax_scale=D ** -0.5, sinks=s[0] if s else None, **extra)

    compare_with_reference(kernel, ref, inputs, dtype, name=mods, labels=("dq", "dk", "dv", "dsinks"))


@pytest.mark.parametrize("mods", ["softcap", "alibi", "sinks", "all_window"])
def test_score_mods_on_a_block_mask(mods, impl):
    """Composed with a block LUT (random blocks: rows of blocks with nothing kept included) and GQA."""
    B, S, H, Hkv, D = 2, 150, 4, 2, 40
    kw = _materialise(MODS[mods], B, H, torch.float32, impl.device)
    kw.pop("causal", None)
    kw.pop("window_size", None)
    sinks = kw.pop("sinks", None)
    mask = BlockMask.random(S, 0.4, seed=3, batch=B, num_heads=H, block_size=32, device=impl.device)
    inputs = make_qkv(B, S, S, H, Hkv, D, torch.float32, device=impl.device) + ([sinks] if sinks is not None else [])

    def kernel(q, k, v, *s):
        return attnops.block_sparse_attention(q, k, v, mask, sinks=s[0] if s else None, return_lse=True,
                                              backend=impl.backend, **kw)

    def ref(q, k, v, *s):
        slopes = kw.get("alibi_slopes")
        return reference.block_sparse_attention(q, k, v, mask.to("cpu"), causal=False, window_size=(-1, -1),
                                                softmax_scale=D ** -0.5, sinks=s[0] if s else None,
                                                **dict(kw, alibi_slopes=slopes.cpu() if slopes is not None else None))

    compare_with_reference(kernel, ref, inputs, torch.float32, name=mods, labels=("dq", "dk", "dv", "dsinks"))


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("mods", ["softcap", "alibi", "sinks", "all_causal"])
def test_block_maps_reflect_the_modified_probabilities(mods, reduce, fwd_impl):
    B, Sq, Sk, H, Hkv, D = 1, 100, 130, 4, 2, 32
    kw = _materialise(MODS[mods], B, H, torch.float32, fwd_impl.device)
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float32, device=fwd_impl.device)
    got = attnops.attention(q, k, v, return_block_map=True, map_block_size=(32, 32), reduce=reduce,
                            backend=fwd_impl.backend, **kw).block_map
    cpu_kw = {n: (t.cpu().double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    want = attnops.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), return_block_map=True,
                             map_block_size=(32, 32), reduce=reduce, backend="reference", **cpu_kw).block_map
    plain = attnops.attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), return_block_map=True,
                              map_block_size=(32, 32), reduce=reduce, backend="reference",
                              causal=kw.get("causal", False)).block_map
    assert (want - plain).abs().max() > 1e-3  # the modifier changes the map: the comparison can fail
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-5)


def test_rows_without_keys_give_zeros_and_the_sink(impl):
    """Sq > Sk causal: the first Sq - Sk queries see no key. With sinks they output 0, lse = sink, and
    their gradients are exact zeros; dsinks gets -p_sink * delta = 0 from them (delta = 0)."""
    B, Sq, Sk, H, D = 1, 90, 40, 2, 32
    q, k, v = make_qkv(B, Sq, Sk, H, H, D, torch.float32, device=impl.device)
    sinks = torch.tensor([0.5, -1.0], device=impl.device)
    out, lse = attnops.attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=impl.backend)
    assert torch.equal(out[:, :Sq - Sk].cpu(), torch.zeros(B, Sq - Sk, H, D))
    torch.testing.assert_close(lse[:, :, :Sq - Sk].cpu(), sinks.cpu().view(1, H, 1).expand(B, H, Sq - Sk))
    compare_with_reference(
        lambda *t: attnops.attention(*t[:3], causal=True, sinks=t[3], return_lse=True, backend=impl.backend),
        lambda *t: reference.block_sparse_attention(*t[:3], None, causal=True, window_size=(-1, -1),
                                                    softmax_scale=D ** -0.5, sinks=t[3]),
        [q, k, v, sinks], torch.float32, name="empty rows", labels=("dq", "dk", "dv", "dsinks"))


def test_gradcheck_float64():
    """Exact gradients of the C++ kernels in float64 (q, k, v and the sinks), every modifier at once."""
    B, Sq, Sk, H, Hkv, D = 1, 9, 13, 2, 1, 8
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64, requires_grad=True)
    sinks = torch.randn(H, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.3, 0.1], dtype=torch.float64)

    def f(q, k, v, sinks):
        return attnops.attention(q, k, v, causal=True, softcap=1.5, alibi_slopes=slopes, sinks=sinks,
                                 window_size=(6, -1), return_lse=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_nan_sink_gives_nan_rows_only_for_its_head(fwd_impl):
    B, S, H, D = 1, 40, 2, 16
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float32, device=fwd_impl.device)
    sinks = torch.tensor([float("nan"), 0.0], device=fwd_impl.device)
    out = attnops.attention(q, k, v, causal=True, sinks=sinks, backend=fwd_impl.backend).cpu()
    assert out[:, :, 0].isnan().all() and out[:, :, 1].isfinite().all()


def test_moba_takes_the_modifiers():
    B, S, H, D = 1, 256, 2, 32
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float64)
    sinks = torch.randn(H, dtype=torch.float64)
    kw = dict(softcap=3.0, alibi_slopes=torch.tensor([0.1, 0.02], dtype=torch.float64), sinks=sinks)
    out = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2, **kw)
    mask = attnops.moba_block_mask(q, k, block_size=64, topk=2)
    want = reference.block_sparse_attention(q, k, v, mask, causal=True, window_size=(-1, -1),
                                            softmax_scale=D ** -0.5, **kw)[0]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
