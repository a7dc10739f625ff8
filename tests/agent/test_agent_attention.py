"""Agent attention (Han et al. 2024) on the softmax core: against its float64 oracle (forward and the gradients
of q, k, v and both biases) over odd shapes, against a port of the authors' AgentAttention core, and its
refusals."""

import pytest
import torch

import attnops
from attnops.ops.agent import agent_tokens
from attnops.ops.agent import reference
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D, n)
SHAPES = [(2, 333, 333, 4, 2, 40, 49), (1, 200, 150, 4, 4, 96, 7), (2, 64, 300, 2, 1, 64, 1)]


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "biases"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-n{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype, with_bias, fwd_impl):
    B, Sq, Sk, H, Hkv, D, n = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    inputs = [q, k, v]
    if with_bias:  # broadcast shapes as the paper's per-head position biases
        inputs += [torch.randn(1, H, n, Sk, generator=g) * 0.5, torch.randn(1, H, Sq, n, generator=g) * 0.5]
    scale = D ** -0.5

    def ours(q, k, v, *b):
        kw = dict(agent_bias=b[0], query_bias=b[1]) if b else {}
        return attnops.agent_attention(q, k, v, num_agents=n, backend=fwd_impl.backend, **kw)

    def oracle(q, k, v, *b):
        kw = dict(agent_bias=b[0], query_bias=b[1]) if b else {}
        return reference.agent_attention(q, k, v, agent_tokens(q, n), softmax_scale=scale, **kw)

    dout = torch.randn(B, Sq, H, D, generator=g)
    names = ("dq", "dk", "dv", "d agent_bias", "d query_bias")[:len(inputs)]
    assert_op_matches_oracle(ours, oracle, inputs, dout, dtype, fwd_impl.device, names)


def test_matches_the_authors_agent_attention_core():
    """LeapLabTHU/Agent-Attention agent_transformer/models/agent_deit.py, AgentAttention.forward (commit 36cf0da):
    agents pooled from the queries over the image grid with AdaptiveAvgPool2d, softmax((A * scale) @ K^T +
    position_bias) @ V, then softmax((Q * scale) @ A^T + agent_bias) @ agent_v (ported below without the
    class token and the depthwise-conv term, which act outside attention). Given the same agents, the op
    equals it."""
    torch.manual_seed(0)
    b, h, w, heads, head_dim, agent_num = 2, 14, 14, 4, 32, 49
    n, c = h * w, heads * head_dim
    q, k, v = (torch.randn(b, n, c, dtype=torch.float64) for _ in range(3))
    position_bias = torch.randn(b, heads, agent_num, n, dtype=torch.float64) * 0.1
    agent_bias = torch.randn(b, heads, n, agent_num, dtype=torch.float64) * 0.1
    # the authors' forward, heads split as they split them
    pool = torch.nn.AdaptiveAvgPool2d(output_size=(7, 7))
    agent = pool(q.reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    split = lambda x: x.reshape(b, -1, heads, head_dim).permute(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh, ah = split(q), split(k), split(v), split(agent)
    scale = head_dim ** -0.5
    agent_v = torch.softmax((ah * scale) @ kh.transpose(-2, -1) + position_bias, -1) @ vh
    theirs = (torch.softmax((qh * scale) @ ah.transpose(-2, -1) + agent_bias, -1) @ agent_v).transpose(1, 2)
    ours = attnops.agent_attention(q.view(b, n, heads, head_dim), k.view(b, n, heads, head_dim),
                                   v.view(b, n, heads, head_dim), agents=agent.view(b, agent_num, heads, head_dim),
                                   agent_bias=position_bias, query_bias=agent_bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_agents_are_adaptive_bins_of_the_queries():
    q = torch.randn(2, 10, 3, 8)
    a = agent_tokens(q, 4)  # bins [0, 3), [2, 5), [5, 8), [7, 10)
    for i, (lo, hi) in enumerate(((0, 3), (2, 5), (5, 8), (7, 10))):
        torch.testing.assert_close(a[:, i], q[:, lo:hi].mean(1))
    torch.testing.assert_close(agent_tokens(q, 10), q)


def test_refusals():
    q, k, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    with pytest.raises(ValueError, match="non-causal"):
        attnops.agent_attention(q, k, v, num_agents=4, causal=True)
    with pytest.raises(ValueError, match="exactly one"):
        attnops.agent_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        attnops.agent_attention(q, k, v, num_agents=4, agents=torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="num_agents"):
        attnops.agent_attention(q, k, v, num_agents=0)
    with pytest.raises(ValueError, match="must not exceed"):
        attnops.agent_attention(q, k, v, num_agents=33)
    with pytest.raises(ValueError, match="agents must be"):
        attnops.agent_attention(q, k, v, agents=torch.randn(1, 4, 3, 16))
    with pytest.raises(ValueError, match="agent_bias must broadcast"):
        attnops.agent_attention(q, k, v, num_agents=4, agent_bias=torch.randn(1, 2, 5, 32))
    with pytest.raises(ValueError, match="query_bias must broadcast"):
        attnops.agent_attention(q, k, v, num_agents=4, query_bias=torch.randn(1, 2, 32, 32))
    with pytest.raises(TypeError, match="positional"):
        attnops.agent_attention(q, k, v, 4)


def test_no_n_by_n_and_nan_propagates():
    """Scores are (n x Sk) and (Sq x n): the op runs at a length whose N x N float32 would need 16 GiB; a NaN
    query reaches its agent and every output that agent feeds."""
    q, k, v = (torch.randn(1, 65536, 1, 16) for _ in range(3))
    out = attnops.agent_attention(q, k, v, num_agents=8)
    assert out.shape == q.shape and torch.isfinite(out).all()
    q2 = torch.randn(1, 64, 2, 16)
    q2[0, 3, 0, 0] = float("nan")
    out2 = attnops.agent_attention(q2, k[:, :64], v[:, :64], num_agents=4)
    assert torch.isnan(out2[0, :, 0]).all() and torch.isfinite(out2[0, :, 1]).all()
