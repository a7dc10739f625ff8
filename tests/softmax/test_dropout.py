"""Attention dropout on the softmax core: the mask is a hash of one seed drawn per call from the generator,
the same on every backend and regenerated in the backward. Exact tests hand the reference the kernels' own
mask (fwd + bwd under the accuracy rule, gradcheck, flash_attn's attention_ref with that mask); statistical
tests check the keep rate, its spread and the independence of rows and heads through the kernels' outputs."""

import math

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core.checks import draw_dropout_seed
from attnops.ops.softmax import reference
from authors_ref import attention_ref
from helpers import DTYPE_IDS, compare_with_reference, make_qkv

# odd lengths, head dims 40 / 96, GQA 2 and MQA (the square MHA shape adds nothing the mask does not)
SHAPES = [(1, 130, 100, 4, 2, 40), (2, 100, 150, 4, 1, 96)]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]
CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window_softcap_alibi": dict(window_size=(25, 10), softcap=3.0, alibi=True),
    "sinks_causal": dict(causal=True, sinks=True),
    "bias_grad": dict(bias=True),
    "block_mask": dict(block_mask=True),
}


def _generator(device, seed=1234):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dropout_matches_reference(shape, case, dtype, impl):
    """out, lse, dq, dk, dv (and dsinks / dbias) with p = 0.3: the reference draws the same seed from a
    generator in the same state, so it applies the kernels' mask."""
    B, Sq, Sk, H, Hkv, D = shape
    spec = CASES[case]
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=impl.device)
    labels = ["dq", "dk", "dv"]
    opts = {n: spec[n] for n in ("causal", "window_size", "softcap") if n in spec}
    if spec.get("alibi"):
        opts["alibi_slopes"] = torch.rand(H, device=impl.device) * 0.3
    if spec.get("sinks"):
        inputs.append(torch.randn(H, dtype=dtype, device=impl.device))
        labels.append("dsinks")
    if spec.get("bias"):
        inputs.append(torch.randn(1, H, Sq, Sk, dtype=dtype, device=impl.device))
        labels.append("dbias")
    mask = BlockMask.random((Sq, Sk), density=0.6, block_size=16, seed=3) if spec.get("block_mask") else None

    def call(backend, q, k, v, *extra):
        extra_kw = {}
        if extra:
            extra_kw["sinks" if spec.get("sinks") else "attn_bias"] = extra[0]
        kw = {**opts, **extra_kw}
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = kw["alibi_slopes"].to(q.device)
        gen = _generator(impl.device)
        if mask is not None:
            return attnops.block_sparse_attention(q, k, v, mask.to(q.device), dropout_p=0.3, generator=gen,
                                                  return_lse=True, backend=backend, **kw)
        return attnops.attention(q, k, v, dropout_p=0.3, generator=gen, return_lse=True, backend=backend, **kw)

    compare_with_reference(lambda *t: call(impl.backend, *t), lambda *t: call("reference", *t), inputs, dtype,
                           name=case, labels=labels)


def test_reference_mask_is_flash_attn_attention_ref():
    """The reference with dropout equals flash_attn's attention_ref given the reference's mask."""
    B, Sq, Sk, H, Hkv, D = 2, 50, 70, 4, 2, 24
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64)
    out = attnops.attention(q, k, v, causal=True, dropout_p=0.25, generator=_generator("cpu"), backend="reference")
    seed = int(draw_dropout_seed(_generator("cpu"), torch.device("cpu")))
    keep, scale = reference.dropout_keep(seed, 0.25, B, H, Sq, Sk)
    assert scale == 2 ** 24 / (2 ** 24 - round(0.25 * 2 ** 24)) == 1 / 0.75
    want, _ = attention_ref(q, k, v, causal=True, dropout_p=0.25, dropout_mask=keep)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p, fwd_impl):
    """With q = k = 0 every probability is 1 / Sk, and with v = e_h-style ones the output of a row is its
    kept fraction times the scale: its mean over rows is 1 (unbiased: the scale is the exact inverse of the
    keep rate), its spread over rows that of a binomial (independent keys), and rows and heads are
    uncorrelated."""
    B, Sq, Sk, H, D = 1, 128, 1024, 4, 16
    z = torch.zeros(B, Sq, H, D, device=fwd_impl.device)
    kz = torch.zeros(B, Sk, H, D, device=fwd_impl.device)
    v = torch.ones(B, Sk, H, D, device=fwd_impl.device)
    out = attnops.attention(z, kz, v, dropout_p=p, generator=_generator(fwd_impl.device, 7),
                            backend=fwd_impl.backend)[..., 0].double().cpu()  # (B, Sq, H)
    scale = 2 ** 24 / (2 ** 24 - round(p * 2 ** 24))
    kept = out / scale  # fraction of the row's keys kept
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (n * Sk))
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(p * (1 - p) / (n * Sk)) * scale
    var = kept.var().item()
    want = p * (1 - p) / Sk  # binomial spread of independent keys
    assert 0.75 * want < var < 1.3 * want, (var, want)
    rows = kept[0].T  # (H, Sq)
    for a, b in ((rows[0], rows[1]), (rows[0, :-1], rows[0, 1:])):  # heads, adjacent rows
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(Sq), corr


def test_masks_differ_per_call_and_repeat_under_manual_seed():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, torch.float32)
    torch.manual_seed(5)
    a = attnops.attention(q, k, v, dropout_p=0.5)
    b = attnops.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    c = attnops.attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)
    g = _generator("cpu", 9)
    d = attnops.attention(q, k, v, dropout_p=0.5, generator=g)
    assert torch.equal(d, attnops.attention(q, k, v, dropout_p=0.5, generator=_generator("cpu", 9)))


def test_no_dropout_draws_nothing_and_is_plain():
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, torch.float32)
    g = _generator("cpu", 3)
    state = g.get_state()
    out = attnops.attention(q, k, v, causal=True, dropout_p=0.0, generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(out, attnops.attention(q, k, v, causal=True))


def test_lse_and_block_maps_are_before_dropout(fwd_impl):
    q, k, v = make_qkv(1, 130, 130, 2, 1, 32, torch.float32, device=fwd_impl.device)
    _, lse, bmap = attnops.attention(q, k, v, causal=True, dropout_p=0.4, generator=_generator(fwd_impl.device),
                                     return_lse=True, return_block_map=True, backend=fwd_impl.backend)
    _, lse0, bmap0 = attnops.attention(q, k, v, causal=True, return_lse=True, return_block_map=True,
                                       backend=fwd_impl.backend)
    torch.testing.assert_close(lse, lse0)
    torch.testing.assert_close(bmap, bmap0)


def test_gradcheck_with_a_fixed_seed():
    """With the generator reset on every call the op is a deterministic function: its backward (the mask
    regenerated from the seed) is the derivative of its forward."""
    q, k, v = make_qkv(1, 20, 24, 2, 1, 8, torch.float64, requires_grad=True)

    def f(q, k, v):
        return attnops.attention(q, k, v, causal=True, dropout_p=0.3, generator=_generator("cpu", 11))

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_moba_dropout_is_the_core_on_its_routing():
    q, k, v = make_qkv(1, 256, 256, 2, 2, 32, torch.float32)
    out = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2, dropout_p=0.2, generator=_generator("cpu"))
    mask = attnops.moba_block_mask(q, k, block_size=64, topk=2)
    want = attnops.block_sparse_attention(q, k, v, mask, dropout_p=0.2, generator=_generator("cpu"))
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad, err", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                      (True, TypeError), (torch.tensor(0.1), TypeError), ("0.1", TypeError)])
def test_bad_dropout_p(bad, err):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(err, match="dropout_p"):
        attnops.attention(q, k, v, dropout_p=bad)


def test_bad_generator():
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="generator"):
        attnops.attention(q, k, v, dropout_p=0.1, generator=3)


@pytest.mark.parametrize("seed, match", [(None, "needs a dropout_seed"),
                                         (torch.tensor([1], dtype=torch.int32), "one int64"),
                                         (torch.tensor([1, 2]), "one int64")])
def test_operator_checks_its_seed(seed, match):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.attnops.block_sparse_attn_fwd(q, k, v, None, None, None, None, 0, 0, 0.25, False, -1, -1,
                                                dropout_p=0.5, dropout_seed=seed)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.attnops.block_sparse_attn_fwd(q, k, v, None, None, None, None, 0, 0, 0.25, False, -1, -1,
                                                dropout_p=1.5, dropout_seed=torch.tensor([1]))


def test_compiles_fullgraph():
    """The seed draw and the operator trace without graph breaks; a compiled step repeats under manual_seed."""
    q = torch.randn(1, 64, 2, 32, requires_grad=True)
    f = torch.compile(lambda q: attnops.attention(q, q, q, causal=True, dropout_p=0.2), fullgraph=True)
    torch.manual_seed(0)
    a = f(q)
    a.sum().backward()
    torch.manual_seed(0)
    assert torch.equal(a, f(q))
