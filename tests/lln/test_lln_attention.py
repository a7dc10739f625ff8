"""Linear Log-Normal attention on the linear core against a port of the authors' LLNAttention and
LLNPlusDiagAttention (average), forward and gradients, causal and not, over odd shapes."""

import pytest
import torch

import attnops
from helpers import DTYPE_IDS, assert_accurate, output_and_grads
from tests.authors_ref import lln_attention_port

# (B, S, H, D): lengths that are not multiples of D (LLN+Diag's partial last block)
SHAPES = [(2, 333, 4, 40), (1, 130, 2, 96), (2, 64, 3, 16)]


@pytest.mark.parametrize("diag", [False, True], ids=["lln", "lln+diag"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}-D{}".format(*s))
def test_matches_the_authors_code(shape, dtype, causal, diag):
    B, S, H, D = shape
    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    dout = torch.randn(B, S, H, D, generator=g)

    def theirs(q, k, v):
        return lln_attention_port(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal, diag=diag).transpose(1, 2)

    def ours(q, k, v):
        return attnops.lln_attention(q, k, v, causal=causal, diag=diag)

    out64, g64 = output_and_grads(theirs, [q.double(), k.double(), v.double()], dout.double())
    outT, gT = output_and_grads(theirs, [t.to(dtype) for t in (q, k, v)], dout)
    out, grads = output_and_grads(ours, [t.to(dtype) for t in (q, k, v)], dout)
    assert out.dtype == dtype
    assert_accurate("out", out, out64, outT)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, gT):
        assert_accurate(name, a, b, c)


def test_gqa_reads_each_kv_head_and_scales_are_the_papers():
    """GQA equals the kv heads repeated (the scales from the same statistics), and the scales satisfy the
    moment fit: alpha sigma_q = beta sigma_k = sigma~."""
    q, k, v = torch.randn(1, 100, 4, 32, dtype=torch.float64), torch.randn(1, 100, 2, 32, dtype=torch.float64), \
        torch.randn(1, 100, 2, 32, dtype=torch.float64)
    out = attnops.lln_attention(q, k, v, causal=True)
    alpha, beta = attnops.ops.lln.lln_scales(q, k)
    sig = (alpha * q.std()).item()
    assert sig == pytest.approx((beta * k.std()).item(), rel=1e-6)
    assert sig ** 2 == pytest.approx((q.std() ** 2 * k.std() ** 2 + 0.35487039130661086).item() / (2 * 0.14855178144710912),
                                     rel=1e-5)
    phi_q = torch.exp(alpha * q - (alpha * q).amax(-1, keepdim=True))
    ks = beta * k
    phi_k = torch.exp(ks - ks.amax(dim=(1, 3), keepdim=True)).repeat_interleave(2, dim=2)
    vv = v.repeat_interleave(2, dim=2)
    w = torch.einsum("bihd,bjhd->bhij", phi_q, phi_k).tril()
    ref = torch.einsum("bhij,bjhe->bihe", w, vv) / (w.sum(-1).transpose(1, 2).unsqueeze(-1) + 1e-8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_refusals():
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(ValueError, match="Sq == Sk"):
        attnops.lln_attention(q, torch.randn(1, 30, 2, 8), torch.randn(1, 30, 2, 8), causal=True)
    with pytest.raises(ValueError, match="eps"):
        attnops.lln_attention(q, q, q, eps=-1.0)
    with pytest.raises(TypeError, match="bools"):
        attnops.lln_attention(q, q, q, diag=1)
    with pytest.raises(TypeError, match="positional"):
        attnops.lln_attention(q, q, q, True)
