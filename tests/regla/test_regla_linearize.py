"""ReGLA in a Hugging Face model after linearize(): each attention layer equals its equations (the model's own
projections and rotary embedding, the gates from the layer's input, the float64 oracle, the norm, o_proj); the new
gates train; padded, packed, windowed inputs, cached decoding steps and a model without the gates are refused."""

import pytest
import torch

import attnops
from attnops.ops.regla.reference import regla_reference

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from attnops.integrations.transformers import linearize  # noqa: E402

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _model(config=LlamaConfig, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(**SHAPE, **extra)).double().eval()


def test_each_layer_equals_its_equations_and_trains():
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
        x = kwargs["hidden_states"]
        q = layer.q_proj(x).view(B, S, 4, 16).transpose(1, 2)
        k = layer.k_proj(x).view(B, S, 2, 16).transpose(1, 2)
        v = layer.v_proj(x).view(B, S, 2, 16)
        q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        gate, refine = layer.regla(x)
        ref = regla_reference(q.transpose(1, 2), k.transpose(1, 2), v, gate, refine)[0]
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
    windowed = linearize(_model(MistralConfig, sliding_window=8))
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
