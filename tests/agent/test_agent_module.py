"""attnops.nn.AgentAttention: the authors' DeiT Agent Attention block (position biases, dwc, class token) against a
port of their forward, output and every parameter's gradient, with their parameter names; and its refusals."""

import pytest
import torch

import attnops
from authors_ref import agent_deit_forward


@pytest.mark.parametrize("config", [(64, 4, 49, 14, True), (48, 3, 9, 5, False), (32, 2, 4, 7, True)],
                         ids=["deit-49agents-14grid", "9agents-5grid", "4agents-7grid"])
def test_equals_the_authors_module(config):
    dim, heads, agents, window, qkv_bias = config
    torch.manual_seed(0)
    module = attnops.nn.AgentAttention(dim, num_heads=heads, qkv_bias=qkv_bias, agent_num=agents,
                                       window=window).double()
    with torch.no_grad():  # the biases start at std 0.02: make them count
        for name, p in module.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0.0, 0.5)
    x = torch.randn(2, 1 + window * window, dim, dtype=torch.float64, requires_grad=True)
    out = module(x)
    params = dict(module.named_parameters())
    theirs = agent_deit_forward(x, params, heads, agents, window)
    torch.testing.assert_close(out, theirs, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    names = list(params)
    ours_g = torch.autograd.grad(out, [x, *params.values()], dout)
    theirs_g = torch.autograd.grad(theirs, [x, *params.values()], dout)
    for name, a, b in zip(["x", *names], ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    # the authors' parameter names and shapes: their state dict loads as it is
    assert set(module.state_dict()) == {"qkv.weight", *(["qkv.bias"] if qkv_bias else []), "proj.weight",
                                        "proj.bias", "dwc.weight", "dwc.bias", "an_bias", "na_bias", "ah_bias",
                                        "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"}


def test_float32_module_trains():
    module = attnops.nn.AgentAttention(64, num_heads=4, agent_num=16, window=8)
    x = torch.randn(3, 65, 64, requires_grad=True)
    module(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters()) and torch.isfinite(x.grad).all()


def test_refusals():
    with pytest.raises(ValueError, match="square"):
        attnops.nn.AgentAttention(64, agent_num=10)
    with pytest.raises(ValueError, match="window"):
        attnops.nn.AgentAttention(64, agent_num=49, window=5)
    with pytest.raises(NotImplementedError, match="attn_drop"):
        attnops.nn.AgentAttention(64, attn_drop=0.1)
    module = attnops.nn.AgentAttention(64, num_heads=4, agent_num=16, window=8)
    with pytest.raises(ValueError, match="window"):
        module(torch.randn(1, 64, 64))  # no class token
