"""``return_max_scores``: each query row's largest score (the logit its softmax subtracts; what QK-clip /
MuonClip reads), from the kernels' own running maximum, on every implementation of the softmax core, against
the float64 reference's max over its masked, modified score matrix (accuracy rule), with every score modifier
and mask; asking for it changes nothing else."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import results
from helpers import DTYPE_IDS, assert_accurate, make_qkv

SHAPES = [(2, 77, 77, 4, 2, 40), (1, 130, 70, 6, 1, 96), (1, 1, 200, 8, 2, 64), (1, 40, 60, 4, 2, 320)]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]
CASES = {
    "dense": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(20, 5)),
    "mods_causal": dict(causal=True, softcap=3.0, alibi=True, sinks=True),
    "float_bias": dict(bias="float"),
    "bool_mask": dict(bias="bool", sinks=True),  # rows it empties: -inf, the sink is not a key
    "documents": dict(causal=True, documents=True),
    "dropout": dict(dropout_p=0.3),  # the maxima are of the scores, before dropout
}


def _arguments(case, B, Sq, Sk, H, device):
    kw = dict(CASES[case])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]).to(device)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H).to(device)
    bias = kw.pop("bias", None)
    if bias == "float":
        kw["attn_bias"] = (torch.randn(B, 1, Sq, Sk) * 2).to(device)
    elif bias == "bool":
        allowed = torch.rand(B, H, Sq, Sk) < 0.4
        allowed[:, :, ::5] = False  # whole rows masked
        kw["attn_bias"] = allowed.to(device)
    if kw.pop("documents", False):
        kw["document_ids"] = (torch.arange(Sq) * 3 // max(Sq, 1)).to(device)
    return kw


def _maxima(q, k, v, kw, backend, **extra):
    res = attnops.attention(q, k, v, return_lse=True, return_max_scores=True, backend=backend, **kw, **extra)
    assert isinstance(res, results.AttentionLseMaxOutput)
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_scores_match_the_reference(fwd_impl, shape, case, dtype):
    B, Sq, Sk, H, Hkv, D = shape
    if case == "documents" and Sq != Sk:
        pytest.skip("document_ids pack self-attention (Sq == Sk)")
    if dtype == torch.float64 and fwd_impl.backend == "triton":
        pytest.skip("the Triton kernels refuse float64")
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64)
    kw = _arguments(case, B, Sq, Sk, H, "cpu")
    dev = fwd_impl.device
    kw_dev = {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    kw_ref = dict(kw)
    if "attn_bias" in kw and kw["attn_bias"].is_floating_point():
        kw_ref["attn_bias"] = kw["attn_bias"].to(dtype)
    ours = _maxima(q.to(dtype).to(dev), k.to(dtype).to(dev), v.to(dtype).to(dev), kw_dev, fwd_impl.backend)
    ref64 = _maxima(q, k, v, dict(kw, attn_bias=kw["attn_bias"].double()) if "attn_bias" in kw and
                    kw["attn_bias"].is_floating_point() else kw, "reference").max_scores
    ref_lp = _maxima(q.to(dtype), k.to(dtype), v.to(dtype), kw_ref, "reference").max_scores
    assert ours.max_scores.shape == (B, H, Sq) and ours.max_scores.dtype == ours.lse.dtype
    assert not ours.max_scores.requires_grad
    assert_accurate("max_scores", ours.max_scores.cpu(), ref64, ref_lp)
    empty = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(ours.max_scores.cpu()), empty)  # rows that attend nothing, exactly
    if case == "bool_mask":
        assert bool(empty.any())
    # asking for the maxima changes nothing else (the dropout mask is drawn from the seed: reseed)
    torch.manual_seed(1)
    plain = attnops.attention(q.to(dtype).to(dev), k.to(dtype).to(dev), v.to(dtype).to(dev), return_lse=True,
                              backend=fwd_impl.backend, **kw_dev)
    torch.manual_seed(1)
    again = _maxima(q.to(dtype).to(dev), k.to(dtype).to(dev), v.to(dtype).to(dev), kw_dev, fwd_impl.backend)
    if fwd_impl.backend == "cpu" and Sq == 1:  # one query: the plain call ran on the decode kernel (other sums)
        tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else {}  # one bf16 rounding apart
        torch.testing.assert_close(again.out, plain.out, **tol)
        torch.testing.assert_close(again.lse, plain.lse, **tol)
    else:
        assert torch.equal(plain.out, again.out) and torch.equal(plain.lse, again.lse)


def test_max_scores_with_block_masks_maps_and_gradients(fwd_impl):
    """block_sparse_attention with a block map and the maxima; gradients through ``out`` are those of a call without
    them, and the maxima take none."""
    B, S, H, Hkv, D = 1, 150, 4, 2, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, torch.float64)
    mask = BlockMask.sliding_window(S, window=40, block_size=32, causal=True)
    dev = fwd_impl.device
    inputs = [t.float().to(dev).requires_grad_(True) for t in (q, k, v)]
    res = attnops.block_sparse_attention(*inputs, mask.to(dev), return_max_scores=True, return_block_map=True,
                                         backend=fwd_impl.backend)
    assert isinstance(res, results.AttentionMapMaxOutput)
    ref64 = attnops.block_sparse_attention(q, k, v, mask, return_max_scores=True, backend="reference").max_scores
    ref32 = attnops.block_sparse_attention(q.float(), k.float(), v.float(), mask, return_max_scores=True,
                                           backend="reference").max_scores
    assert_accurate("max_scores", res.max_scores.detach().cpu(), ref64, ref32)
    dout = torch.randn(B, S, H, D, device=dev)
    grads = torch.autograd.grad(res.out, inputs, dout)
    plain = attnops.block_sparse_attention(*inputs, mask.to(dev), backend=fwd_impl.backend)
    for g, want in zip(grads, torch.autograd.grad(plain, inputs, dout)):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_varlen_max_scores_are_each_sequence_alone(fwd_impl):
    H, Hkv, D = 4, 2, 32
    lengths = [37, 0, 90, 5]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, h, D) for h in (H, Hkv, Hkv))
    dev = fwd_impl.device
    res = attnops.varlen_attention(q.to(dev), k.to(dev), v.to(dev), cu.to(dev), cu.to(dev), 90, 90, causal=True,
                                   softcap=5.0, return_max_scores=True, backend=fwd_impl.backend)
    assert isinstance(res, results.AttentionMaxOutput) and res.max_scores.shape == (H, total)
    for s, n in enumerate(lengths):
        if n == 0:
            continue
        a, b = int(cu[s]), int(cu[s + 1])
        alone = attnops.attention(q[None, a:b].double(), k[None, a:b].double(), v[None, a:b].double(), causal=True,
                                  softcap=5.0, return_max_scores=True, backend="reference").max_scores[0]
        torch.testing.assert_close(res.max_scores[:, a:b].cpu().double(), alone, rtol=1e-5, atol=1e-5)


def test_max_scores_flag_is_checked():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="return_max_scores"):
        attnops.attention(q, k, v, return_max_scores=1)
    out, max_scores = attnops.attention(q, k, v, return_max_scores=True)
    torch.testing.assert_close(max_scores, (torch.einsum("bqhd,bkhd->bhqk", q, k) * 16 ** -0.5).amax(-1))


def test_nan_reaches_exactly_the_rows_that_attend_it(fwd_impl):
    """NaN in, NaN out: a NaN in q[i] makes row i's maximum NaN, a NaN in k[j] the maxima of the rows that attend key
    j (causal: the later rows of its kv heads), every other row's stays finite; +Inf in q[i] gives +inf where the
    reference has it."""
    B, S, H, Hkv, D = 1, 90, 4, 2, 32
    q, k, v = make_qkv(B, S, S, H, Hkv, D, torch.float32)
    q[0, 5, 0, 3] = float("nan")
    k[0, 40, 1, 2] = float("nan")
    q[0, 70, 0] = 0.0
    q[0, 70, 0, 0] = float("inf")
    dev = fwd_impl.device
    got = attnops.attention(q.to(dev), k.to(dev), v.to(dev), causal=True, return_max_scores=True,
                            backend=fwd_impl.backend).max_scores.cpu()
    want = attnops.attention(q.double(), k.double(), v.double(), causal=True, return_max_scores=True,
                             backend="reference").max_scores
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert bool(torch.isnan(want[0, 0, 5])) and bool(torch.isnan(want[0, 2:, 40:]).all())
    assert not bool(torch.isnan(want[0, 2:, :40]).any())
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-5)
