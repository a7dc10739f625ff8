"""Methods with per-layer state in a Hugging Face model (attach / linearize). ReGLA: each attention layer equals
its equations (the model's own projections and rotary embedding, the gates from the layer's input, the float64
oracle, the norm, o_proj); the new gates train; padded, packed, windowed inputs, cached decoding steps and a model
without the gates are refused. The Routing Transformer: each layer is the op on the model's q / k / v, decoding
with the cache equals the full call, training moves the centroids."""

import pytest
import torch

import attnops
from attnops.ops.regla.reference import regla_reference

# transformers is imported inside the tests, as in the other files: importing its model code at collection
# initialises torch._dynamo before conftest's output poisoning wraps torch.empty, and the compile tests that run
# later in the same process then trace the wrapper (graph breaks)

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _model(config="LlamaConfig", **extra):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config)(**SHAPE, **extra)).double().eval()


def _qkv(layer, kwargs, B, S):
    """The layer's q, k, v (flash layout) by hand: its projections and transformers' rotary embedding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = kwargs["hidden_states"]
    q = layer.q_proj(x).view(B, S, 4, 16).transpose(1, 2)
    k = layer.k_proj(x).view(B, S, 2, 16).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
    return q.transpose(1, 2), k.transpose(1, 2), layer.v_proj(x).view(B, S, 2, 16)


def test_each_layer_equals_its_equations_and_trains():
    from attnops.integrations.transformers import linearize

    model = linearize(_model())
    assert model.config._attn_implementation == "attnops_regla"
    seen = {}

    def keep(layer, args, kwargs, output):
        seen[layer] = (kwargs, output[0])
    layers = [blk.self_attn for blk in model.model.layers]
    handles = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    ids = torch.randint(0, 97, (2, 37))
    logits = model(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    B, S = ids.shape
    for layer in layers:
        kwargs, out = seen[layer]
        gate, refine = layer.regla(kwargs["hidden_states"])
        ref = regla_reference(*_qkv(layer, kwargs, B, S), gate, refine)[0]
        expected = layer.o_proj(layer.regla.norm(ref).reshape(B, S, 64))
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    # it trains: the new gates, and the model's own projections, get gradients
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    for layer in layers:
        for p in (layer.regla.gate_proj.weight, layer.regla.refine_proj.weight, layer.regla.norm.weight,
                  layer.q_proj.weight):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    count = sum(p.numel() for p in model.parameters())
    linearize(model)
    assert sum(p.numel() for p in model.parameters()) == count  # a second call adds nothing


def test_refusals():
    from attnops.integrations.transformers import linearize

    model = linearize(_model())
    ids = torch.randint(0, 97, (2, 20))
    padded = torch.ones(2, 20, dtype=torch.long)
    padded[0, :5] = 0
    with pytest.raises(NotImplementedError, match="attn_bias"):
        model(ids, attention_mask=padded, use_cache=False)
    packed = torch.cat([torch.arange(10), torch.arange(10)]).expand(2, -1)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=packed, use_cache=False)
    out = model(ids[:, :12], use_cache=True)  # a prefill fills the cache; the next step is refused
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model(ids[:, 12:13], past_key_values=out.past_key_values, use_cache=True)
    windowed = linearize(_model("MistralConfig", sliding_window=8))
    with pytest.raises(NotImplementedError, match="sliding window"):
        windowed(ids, use_cache=False)
    bare = _model()
    bare.set_attn_implementation(attnops.integrations.transformers.register("attnops_regla"))
    with pytest.raises(RuntimeError, match="linearize"):
        bare(ids, use_cache=False)
    with pytest.raises(RuntimeError, match="linearize"):
        attnops.nn.Attention(64, 4, attention=attnops.nn.ReGLASpec())(torch.randn(1, 10, 64))
    with pytest.raises(TypeError, match="ReGLASpec"):
        linearize(_model(), spec=attnops.nn.LLNSpec())
    with pytest.raises(ValueError, match="key_shift"):
        attnops.nn.ReGLASpec(key_shift="global")


def test_routing_transformer_family_equals_its_op_decodes_and_learns_centroids():
    """attach(model, RoutingSpec): each layer is routing_attention on the model's own q / k / v (rotary applied)
    with the layer's centroids; a cached decoding step equals the full call's row; training moves the centroids,
    evaluation does not."""
    from attnops.integrations.transformers import attach

    model = attach(_model(), attnops.nn.RoutingSpec(num_clusters=3))
    assert model.config._attn_implementation == "attnops_routing"
    layers = [blk.self_attn for blk in model.model.layers]
    assert tuple(layers[0].routing_centroids.shape) == (2, 3, 16)
    seen = {}

    def keep(layer, args, kwargs, output):
        seen[layer] = (kwargs, output[0])
    handles = [layer.register_forward_hook(keep, with_kwargs=True) for layer in layers]
    ids = torch.randint(0, 97, (2, 30))
    before = [layer.routing_centroids.clone() for layer in layers]
    full = model(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    B, S = ids.shape
    for layer, c0 in zip(layers, before):
        assert torch.equal(layer.routing_centroids, c0)  # eval: fixed
        kwargs, out = seen[layer]
        ref = attnops.routing_attention(*_qkv(layer, kwargs, B, S), layer.routing_centroids, causal=True,
                                        softmax_scale=16 ** -0.5)
        torch.testing.assert_close(out, layer.o_proj(ref.reshape(B, S, 64)), rtol=1e-9, atol=1e-10)
    prefill = model(ids[:, :25], use_cache=True)
    step = prefill
    for t in range(25, 30):
        step = model(ids[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], full[:, t], rtol=1e-9, atol=1e-9)
    model.train()
    model(ids, use_cache=False).logits.sum().backward()
    assert not torch.equal(layers[0].routing_centroids, before[0])
    padded = torch.ones(2, 30, dtype=torch.long)
    padded[0, :4] = 0
    with pytest.raises(NotImplementedError, match="attn_bias"):
        model(ids, attention_mask=padded, use_cache=False)
    bare = _model()
    bare.set_attn_implementation(attnops.integrations.transformers.register("attnops_routing"))
    with pytest.raises(RuntimeError, match="attach"):
        bare(ids, use_cache=False)
    with pytest.raises(TypeError, match="per-layer state"):
        attach(_model(), attnops.nn.LLNSpec())
    with pytest.raises(ValueError, match="num_clusters"):
        attnops.nn.RoutingSpec(num_clusters=0)
