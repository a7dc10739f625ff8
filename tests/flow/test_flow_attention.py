"""Flowformer's flow attention on the linear core: against ports of the authors' non-causal and causal code
(thuml/Flowformer), forward and the gradients, over odd shapes, GQA and cross-attention lengths."""

import pytest
import torch

import attnops
from helpers import DTYPE_IDS, assert_accurate, output_and_grads
from tests.authors_ref import flow_attention_causal_core, flow_attention_core

# (B, Sq, Sk, H, Hkv, D, Dv)
SHAPES = [(2, 333, 333, 4, 2, 40, 40), (1, 130, 130, 2, 2, 96, 32), (2, 65, 200, 4, 1, 16, 8)]


def _theirs(causal):
    port = flow_attention_causal_core if causal else flow_attention_core

    def run(q, k, v):
        g = q.shape[2] // k.shape[2]
        bhld = [t.transpose(1, 2) for t in (q, k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2))]
        return port(*bhld).transpose(1, 2)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-Dv{}".format(*s))
def test_matches_the_authors_code(shape, causal, dtype):
    B, Sq, Sk, H, Hkv, D, Dv = shape
    if causal and Sq != Sk:
        pytest.skip("causal flow attention is self-attention")
    g = torch.Generator().manual_seed(Sq + Sk)
    q, k = torch.randn(B, Sq, H, D, generator=g), torch.randn(B, Sk, Hkv, D, generator=g)
    v = torch.randn(B, Sk, Hkv, Dv, generator=g)
    dout = torch.randn(B, Sq, H, Dv, generator=g)
    theirs = _theirs(causal)

    def ours(q, k, v):
        return attnops.flow_attention(q, k, v, causal=causal, source_clamp=10.0 if causal else 1.0)

    out64, g64 = output_and_grads(theirs, [q.double(), k.double(), v.double()], dout.double())
    outT, gT = output_and_grads(theirs, [t.to(dtype) for t in (q, k, v)], dout)
    out, grads = output_and_grads(ours, [t.to(dtype) for t in (q, k, v)], dout)
    assert out.dtype == dtype and out.shape == (B, Sq, H, Dv)
    assert_accurate("out", out, out64, outT)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, gT):
        assert_accurate(name, a, b, c)


def test_refusals_and_nan():
    q, k, v = torch.randn(1, 20, 2, 8), torch.randn(1, 30, 2, 8), torch.randn(1, 30, 2, 4)
    with pytest.raises(ValueError, match="Sq == Sk"):
        attnops.flow_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="v must be"):
        attnops.flow_attention(q, k, v[:, :29])
    with pytest.raises(ValueError, match="eps"):
        attnops.flow_attention(q, k, v, eps=0.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnops.flow_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="positional"):
        attnops.flow_attention(q, k, v, True)
    q2, k2, v2 = torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8)
    v2[0, 25, 1, 0] = float("nan")
    out = attnops.flow_attention(q2, k2, v2, causal=True)
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[:, 25:, 1, 0] = True  # the value column it sits in, from its position on, in the heads that read it
    assert torch.equal(torch.isnan(out), nan)
