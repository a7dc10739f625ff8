"""attnops.nn.LinearAttention and the Linear spec: against the op on the module's own projections,
prefill + token-by-token decoding == one call, training, compile, swap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnops
from attnops.nn import Attention, LinearAttentionSpec, LinearAttention


def manual(module: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The block written out: projections, gate, op, per-head RMSNorm, output projection."""
    B, T, _ = x.shape
    H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
    q = module.q_proj(x).view(B, T, H, D)
    k = module.k_proj(x).view(B, T, Hkv, D)
    v = module.v_proj(x).view(B, T, Hkv, D)
    gate = None
    if module.gated:
        gate = F.logsigmoid(module.gate_proj(x)) / 16.0
        if module.gated == "channel":
            gate = gate.view(B, T, H, D)
    out = attnops.linear_attention(q, k, v, feature_map=module.feature_map, decay=module.decay, gate=gate,
                                   normalize=module.normalize, backend="reference")
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * module.norm.weight
    return module.out_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("kwargs", [dict(), dict(num_kv_heads=2, decay="retnet"), dict(gated=True, feature_map="relu"),
                                    dict(gated="channel", decay="lightning", normalize=True)],
                         ids=["elu", "gqa-retnet", "gate-head", "gate-channel-normalize"])
def test_module_matches_the_op_and_decodes_token_by_token(kwargs):
    torch.manual_seed(0)
    module = LinearAttention(64, 4, **kwargs).double()
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    y = module(x)
    torch.testing.assert_close(y, manual(module, x), rtol=1e-9, atol=1e-9)
    y_prefix, state = module(x[:, :20], use_cache=True)
    outs = [y_prefix]
    for t in range(20, 37):
        y_t, state = module(x[:, t:t + 1], state=state, use_cache=True)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, dim=1), y, rtol=1e-9, atol=1e-9)


def test_module_trains_and_compiles():
    torch.manual_seed(0)
    module = LinearAttention(32, 4, gated=True, decay="retnet")
    x = torch.randn(2, 50, 32)
    module(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [(dict(gated="yes"), "gated"), (dict(output_norm="layernorm"), "output_norm"),
                                          (dict(num_kv_heads=3), "multiple"), (dict(decay=torch.ones(4)), "<= 0"),
                                          (dict(feature_map="softmax"), "feature_map")])
def test_module_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LinearAttention(64, 4, **kwargs)


def test_linear_spec_in_attention_block_and_cached_step():
    torch.manual_seed(0)
    spec = LinearAttentionSpec(feature_map="elu", normalize=True, causal=True)
    block = Attention(64, 4, num_kv_heads=2, attention=spec).double()
    x = torch.randn(2, 30, 64, dtype=torch.float64)
    q, k, v = block._qkv(x)
    want = attnops.linear_attention(q, k, v, normalize=True, backend="reference")
    torch.testing.assert_close(block(x), block._output(want), rtol=1e-9, atol=1e-9)
    # a cached decoding step (fewer queries than keys): the recurrence over the prefix, then the new tokens
    torch.testing.assert_close(spec.attend(q[:, -3:], k, v), want[:, -3:], rtol=1e-9, atol=1e-9)


def test_linear_spec_swaps_into_a_transformer_encoder_and_cross_attends():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).double().eval()
    report = attnops.swap(model, LinearAttentionSpec(feature_map="relu"))
    assert len(report) == 2
    x = torch.randn(2, 25, 32, dtype=torch.float64)
    y = model(x)
    mha = model.layers[0].self_attn
    q, k, v = (t.view(2, 25, 4, 8) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
    attn = attnops.linear_attention(q, k, v, feature_map="relu", causal=False, normalize=True, backend="reference")
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], mha.out_proj(attn.reshape(2, 25, 32)))
    assert torch.isfinite(y).all()
    # non-causal linear attention may cross-attend: keys of their own length
    spec = LinearAttentionSpec()
    out = spec.attend(torch.randn(1, 7, 2, 8), torch.randn(1, 11, 2, 8), torch.randn(1, 11, 2, 8))
    assert out.shape == (1, 7, 2, 8)


def test_linear_spec_block_maps_through_need_weights_and_capture():
    torch.manual_seed(0)
    mha = attnops.nn.MultiheadAttention(32, 4, batch_first=True, attention=LinearAttentionSpec(normalize=True))
    x = torch.randn(1, 100, 32)
    out, weights = mha(x, x, x)  # need_weights=True: the block map, averaged over heads
    assert weights.shape == (1, 2, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2), rtol=1e-5, atol=1e-5)  # normalised rows
    assert mha(x, x, x, need_weights=False)[1] is None
    block = Attention(32, 4, attention=LinearAttentionSpec(causal=True))
    model = nn.Sequential(block, Attention(32, 4, attention=LinearAttentionSpec(causal=True)))
    with attnops.maps.capture(model, map_block_size=16) as cap:
        model(torch.randn(2, 50, 32))
    assert len(cap.maps) == 2 and all(m.shape == (2, 4, 4, 4) for m in cap.maps.values())
    assert all(bool((m.triu(1) == 0).all()) for m in cap.maps.values())  # causal: nothing above the diagonal
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8)
    with pytest.raises(NotImplementedError, match="cached decoding step"):
        LinearAttentionSpec(causal=True).attend(q, k, v, return_block_map=True)


def test_linear_spec_validates():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttentionSpec(feature_map="softmax")
    with pytest.raises(ValueError, match="causal=True"):
        LinearAttentionSpec(decay="retnet")
    with pytest.raises(ValueError, match="retnet"):
        LinearAttentionSpec(decay="alibi", causal=True)
