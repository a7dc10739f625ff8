"""Aaren (attention as an RNN): the chunked prefix scan against its float64 oracle (causal softmax attention of
the repeated query), forward and backward over odd shapes; exact continuation from a state, one token at a
time; empty prefixes and NaN; refusals."""

import pytest
import torch

import attnops
from attnops.ops.aaren import reference
from helpers import DTYPE_IDS, assert_accurate, output_and_grads

# (B, S, H, Hkv, D, Dv)
SHAPES = [(2, 333, 4, 2, 40, 40), (1, 64, 2, 2, 96, 32), (3, 1, 3, 1, 16, 8), (1, 1000, 8, 8, 64, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}-Hkv{}-D{}-Dv{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype):
    B, S, H, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(S)
    q = torch.randn(H, D, generator=g) * 2  # peaked softmaxes: the running max moves
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, Dv, generator=g)
    dout = torch.randn(B, S, H, Dv, generator=g)
    scale = D ** -0.5

    def oracle(q, k, v):
        return reference.aaren(q, k, v, softmax_scale=scale)

    out64, g64 = output_and_grads(oracle, [q.double(), k.double(), v.double()], dout.double())
    outT, gT = output_and_grads(oracle, [q.to(dtype), k.to(dtype), v.to(dtype)], dout)
    out, grads = output_and_grads(lambda q, k, v: attnops.aaren(q, k, v), [q.to(dtype), k.to(dtype), v.to(dtype)], dout)
    assert out.dtype == dtype and out.shape == (B, S, H, Dv)
    assert_accurate("out", out, out64, outT)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, gT):
        assert_accurate(name, a, b, c)


def test_equals_causal_attention_of_the_repeated_query():
    """The definition through the library's own exact core (another route to the same numbers)."""
    B, S, H, D = 2, 300, 4, 32
    q, k, v = torch.randn(H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    dense = attnops.attention(q.expand(B, S, H, D).contiguous(), k, v, causal=True)
    torch.testing.assert_close(attnops.aaren(q, k, v), dense, rtol=1e-5, atol=1e-5)


def test_state_continues_exactly_one_token_at_a_time():
    """A stream: the prefix's state, then each new token from the previous state (O(1) per token), equals
    the whole sequence at once; and the state's u / w is the last output."""
    B, S, H, D = 2, 150, 4, 16
    q, k, v = torch.randn(H, D, dtype=torch.float64), torch.randn(B, S, 2, D, dtype=torch.float64), \
        torch.randn(B, S, 2, D, dtype=torch.float64)
    whole, final = attnops.aaren(q, k, v, output_final_state=True)
    out, state = attnops.aaren(q, k[:, :100], v[:, :100], output_final_state=True)
    steps = [out]
    for t in range(100, S):
        o, state = attnops.aaren(q, k[:, t:t + 1], v[:, t:t + 1], initial_state=state, output_final_state=True)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(state, final):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final.u / final.w.unsqueeze(-1), whole[:, -1], rtol=1e-12, atol=1e-12)


def test_extreme_scores_and_nan():
    """Scores far beyond exp's range stay exact (the running max), and NaN in a key reaches every later output
    of the heads that read it, not the earlier ones."""
    H, D = 2, 8
    q = torch.full((H, D), 30.0)
    k = torch.randn(1, 200, 1, D) * 10
    v = torch.randn(1, 200, 1, D)
    ref = reference.aaren(q.double(), k.double(), v.double(), softmax_scale=D ** -0.5)
    torch.testing.assert_close(attnops.aaren(q, k, v).double(), ref, rtol=1e-4, atol=1e-5)
    k[0, 120, 0, 3] = float("nan")
    out = attnops.aaren(q, k, v)
    assert torch.isfinite(out[:, :120]).all() and torch.isnan(out[:, 120:]).all()


def test_refusals():
    q, k, v = torch.randn(4, 16), torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="aaren takes"):
        attnops.aaren(q[None], k, v)
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        attnops.aaren(torch.randn(3, 16), k, v)
    with pytest.raises(ValueError, match="k must be"):
        attnops.aaren(q, k, v[:, :9])
    with pytest.raises(TypeError, match="one floating dtype"):
        attnops.aaren(q.double(), k, v)
    with pytest.raises(ValueError, match="initial_state must have"):
        attnops.aaren(q, k, v, initial_state=attnops.AarenState(torch.zeros(1, 4), torch.zeros(1, 4, 16),
                                                                torch.zeros(1, 4)))
    with pytest.raises(TypeError, match="AarenState"):
        attnops.aaren(q, k, v, initial_state=(1, 2, 3))
    with pytest.raises(ValueError, match="softmax_scale"):
        attnops.aaren(q, k, v, softmax_scale=0.0)
    with pytest.raises(TypeError, match="positional"):
        attnops.aaren(q, k, v, 0.5)


def test_module_streams_and_trains():
    """attnops.nn.Aaren: a prompt then one token at a time equals the whole sequence; gradients reach the
    learned query and the projections; its output is the definition on its own projections."""
    torch.manual_seed(0)
    layer = attnops.nn.Aaren(64, 4, num_kv_heads=2).double()
    x = torch.randn(2, 90, 64, dtype=torch.float64)
    whole, _ = layer(x)
    y, state = layer(x[:, :50])
    parts = [y]
    for t in range(50, 90):
        y, state = layer(x[:, t:t + 1], state)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-12, atol=1e-12)
    k = layer.k_proj(x).view(2, 90, 2, 16)
    v = layer.v_proj(x).view(2, 90, 2, 16)
    ref = reference.aaren(layer.query, k, v, softmax_scale=16 ** -0.5).reshape(2, 90, 64)
    torch.testing.assert_close(whole, layer.out_proj(ref), rtol=1e-10, atol=1e-10)
    whole.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    with pytest.raises(ValueError, match="multiple of num_heads"):
        attnops.nn.Aaren(60, 8)
    with pytest.raises(ValueError, match="Aaren expects"):
        layer(torch.randn(2, 5, 32, dtype=torch.float64))
