"""Mixture-of-Head attention (Jin et al. 2024): the op against its float64 oracle (forward, and the gradients of q,
k, v and the head weights) over odd shapes on every backend, only the chosen (token, head) pairs reaching the core,
the routers and the module against ports of the authors' code (SkyworkAI/MoH), and the refusals."""

import pytest
import torch

import attnops
from attnops.core import dispatch
from attnops.ops.moh import learned_head_gates, query_norm_heads, reference
from authors_ref import moh_llama3_head_mask, moh_vit_attention
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D)
SHAPES = [(2, 333, 333, 4, 2, 40), (1, 200, 150, 6, 3, 96), (2, 64, 300, 2, 1, 64)]
MASKS = {"full": dict(), "causal": dict(causal=True), "window": dict(causal=True, window_size=(37, 0)),
         "two-sided": dict(window_size=(20, 45))}


def _weights(B, S, H, g, density=0.5):
    w = torch.rand(B, S, H, generator=g) + 0.5
    return w * (torch.rand(B, S, H, generator=g) < density)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype, mask, fwd_impl):
    B, Sq, Sk, H, Hkv, D = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    w = _weights(B, Sq, H, g)
    kw = MASKS[mask]

    def ours(q, k, v, w):
        return attnops.moh_attention(q, k, v, w, backend=fwd_impl.backend, **kw)

    def oracle(q, k, v, w):
        return reference.moh_attention(q, k, v, w, **kw)

    inputs = [q, k, v, w]
    dout = torch.randn(B, Sq, H, D, generator=g)
    out = assert_op_matches_oracle(ours, oracle, inputs, dout, dtype, fwd_impl.device,
                                   ("dq", "dk", "dv", "d head_weights"))
    chosen = (w != 0)[..., None]
    assert (out.float() * ~chosen == 0).all(), "an unchosen (token, head) pair got a nonzero output"


def test_only_the_chosen_pairs_reach_the_core(monkeypatch):
    """The core sees one query row per chosen (token, head) pair, and every kv head's keys once (not per query
    head); a bool head mask is weight 1."""
    g = torch.Generator().manual_seed(2)
    B, S, H, Hkv, D = 2, 96, 8, 2, 16
    q, k, v = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D,
                                                                                                       generator=g)
    chosen = torch.rand(B, S, H, generator=g) < 0.3
    seen = []
    real = dispatch.resolve

    def spy(name, *a, **kw):
        impl = real(name, *a, **kw)

        def wrapped(q, k, v, *rest, **kws):
            seen.append((q.shape, k.shape))
            return impl(q, k, v, *rest, **kws)
        return wrapped

    monkeypatch.setattr(dispatch, "resolve", spy)
    out = attnops.moh_attention(q, k, v, chosen, causal=True)
    assert seen == [(torch.Size([1, int(chosen.sum()), 1, D]), torch.Size([1, B * Hkv * S, 1, D]))]
    ref = reference.moh_attention(q.double(), k.double(), v.double(), chosen.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_nothing_chosen_and_nan_inputs():
    q, k, v = torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8), torch.randn(1, 32, 2, 8)
    none = torch.zeros(1, 32, 2)
    assert (attnops.moh_attention(q, k, v, none) == 0).all()
    w = torch.ones(1, 32, 2)
    w[0, 5, 1] = 0.0
    q[0, 5, 1, 0] = float("nan")  # an unchosen pair: not computed, so it stays out
    out = attnops.moh_attention(q, k, v, w, causal=True)
    assert torch.isfinite(out).all() and (out[0, 5, 1] == 0).all()
    k[0, 3, 0, 0] = float("nan")  # a key: NaN reaches the rows that see it, causally
    out = attnops.moh_attention(q, k, v, w, causal=True)
    assert torch.isnan(out[0, 3:, 0]).all() and torch.isfinite(out[0, :3]).all()


def test_long_sequence_without_n_by_n():
    """64K tokens with a local window: only chosen rows and their windows run (an N x N float32 would be 16 GiB)."""
    g = torch.Generator().manual_seed(3)
    S = 65536
    q, k, v = (torch.randn(1, S, 2, 16, generator=g) for _ in range(3))
    w = (torch.rand(1, S, 2, generator=g) < 0.5).float()
    out = attnops.moh_attention(q, k, v, w, causal=True, window_size=(63, 0))
    assert out.shape == q.shape and torch.isfinite(out).all()
    rows = slice(S - 200, S)
    ref = reference.moh_attention(q[:, rows].double(), k[:, S - 263:].double(), v[:, S - 263:].double(),
                                  w[:, rows].double(), causal=True, window_size=(63, 0))
    torch.testing.assert_close(out[:, rows].double(), ref, rtol=1e-5, atol=1e-5)


def test_refusals():
    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    w = torch.ones(1, 16, 4)
    with pytest.raises(ValueError, match="head_weights must be"):
        attnops.moh_attention(q, k, v, torch.ones(1, 16, 2))
    with pytest.raises(TypeError, match="floating .* or bool"):
        attnops.moh_attention(q, k, v, w.long())
    with pytest.raises(TypeError, match="must be a tensor"):
        attnops.moh_attention(q, k, v, None)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnops.moh_attention(q, k, v, w, causal=1)
    with pytest.raises(TypeError, match="positional"):
        attnops.moh_attention(q, k, v, w, True)
    with pytest.raises(ValueError, match="num_heads|multiple"):
        attnops.moh_attention(torch.randn(1, 16, 3, 8), k, v, torch.ones(1, 16, 3))
    with pytest.raises(ValueError, match="top_k must be"):
        query_norm_heads(q, 2, 3)
    with pytest.raises(ValueError, match="num_shared_heads"):
        query_norm_heads(q, 4, 1)
    with pytest.raises(ValueError, match="top_k must be"):
        learned_head_gates(torch.randn(1, 16, 3), 0)
    with pytest.raises(ValueError, match="mix_logits"):
        learned_head_gates(torch.randn(1, 16, 3), 1, shared_logits=torch.randn(1, 16, 2))
    with pytest.raises(ValueError, match="top_k must be"):
        attnops.nn.MoHAttention(32, 4, 2, 3)
    with pytest.raises(ValueError, match="num_shared_heads"):
        attnops.nn.MoHAttention(32, 4, 5, 1)


def test_query_norm_router_equals_the_authors_llama3_rule():
    """Their code prepends ``ones_like(routed mask)`` for the shared heads, which is right for their configuration
    (half the heads shared, so as many shared as routed): compared there."""
    g = torch.Generator().manual_seed(4)
    for H, shared, top_k in ((8, 4, 2), (32, 16, 8), (6, 3, 1)):
        q = torch.randn(2, 50, H, 16, generator=g) * torch.rand(1, 1, H, 1, generator=g)
        ours = query_norm_heads(q, shared, top_k)
        theirs = moh_llama3_head_mask(q.reshape(2, 50, H * 16), H, 16, shared, top_k)
        assert torch.equal(ours, theirs)
        assert (ours.sum(-1) == shared + top_k).all()


@pytest.mark.parametrize("heads", [(6, 2, 2), (4, 1, 1), (4, 0, 2), (4, 4, 0)], ids=lambda h: "H{}-shared{}-topk{}".format(*h))
def test_module_equals_the_authors_vit_attention(heads):
    """attnops.nn.MoHAttention(causal=False) with the authors' weights gives their output and load-balance loss
    (a single shared head, where their module has no wg_1 and would fail, has the gate 1 their formula gives)."""
    H, shared, top_k = heads
    torch.manual_seed(5)
    dim = 48
    module = attnops.nn.MoHAttention(dim, H, shared, top_k, causal=False).double()
    x = torch.randn(2, 37, dim, dtype=torch.float64)
    qkv_w = torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight])
    qkv_b = torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias])
    wg = module.routed_gate.weight if module.routed_gate is not None else None
    wg_0 = module.mix_gate.weight if module.mix_gate is not None else None
    wg_1 = module.shared_gate.weight if module.shared_gate is not None else torch.zeros(1, dim, dtype=torch.float64)
    theirs, l_aux = moh_vit_attention(x, qkv_w, qkv_b, module.out_proj.weight, module.out_proj.bias, wg, wg_0, wg_1,
                                      H, shared, top_k if shared < H else 0)
    ours = module(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    if l_aux is not None:
        torch.testing.assert_close(module.load_balance_loss, l_aux, rtol=1e-7, atol=0)  # their f_i: a float32 mean
    assert module.active_fraction == pytest.approx((shared + (top_k if shared < H else 0)) / H)


def test_module_trains_its_router_and_is_causal():
    torch.manual_seed(6)
    module = attnops.nn.MoHAttention(32, 4, 1, 2, num_kv_heads=2)
    x = torch.randn(2, 40, 32)
    y = module(x)
    (y.square().mean() + 0.01 * module.load_balance_loss).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert module.routed_gate.weight.grad.abs().sum() > 0 and module.mix_gate.weight.grad.abs().sum() > 0
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(module(x2)[:, :-1], y[:, :-1])  # the last token changes nothing before it
