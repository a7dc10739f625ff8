"""The composed methods as specs (MoHSpec, AgentSpec, FlowSpec, LLNSpec): in attnops.nn.Attention and as Hugging Face
family names (``attnops_moh``, ``attnops_flow``, ``attnops_lln``), against ports of the authors' code run as eager
attention functions in the same unmodified model; and what each refuses."""

import copy

import pytest
import torch

import attnops
from attnops.nn import AgentSpec, FlowSpec, LLNSpec, MoHSpec
from authors_ref import flow_attention_causal_core, lln_attention_port, moh_llama3_head_mask

SPECS = {"moh": MoHSpec(num_shared_heads=2, top_k=1), "agent": AgentSpec(num_agents=7), "flow": FlowSpec(),
         "lln": LLNSpec(), "lln-diag": LLNSpec(diag=True)}


@pytest.mark.parametrize("name", list(SPECS))
def test_module_runs_the_spec_forward_and_backward(name):
    spec = SPECS[name]
    causal = name != "agent"
    torch.manual_seed(0)
    block = attnops.nn.Attention(64, 4, num_kv_heads=2, attention=spec, causal=causal)
    x = torch.randn(2, 45, 64, requires_grad=True)
    y = block(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    q, k, v = block._qkv(x.detach(), None)
    torch.testing.assert_close(block._output(spec.attend(q, k, v, causal=causal)), y.detach())
    if causal and not name.startswith("lln"):  # LLN's moment matching reads the whole call's statistics
        x2 = x.detach().clone()
        x2[:, -1] += 1.0
        torch.testing.assert_close(block(x2)[:, :-1], y.detach()[:, :-1])


def test_refusals():
    q, k, v = torch.randn(1, 16, 4, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="non-causal"):
        AgentSpec(4).attend(q, k, v, causal=True)
    for spec in (FlowSpec(), LLNSpec()):
        with pytest.raises(NotImplementedError, match="cached decoding step"):
            spec.attend(q[:, :1], k, v, causal=True)
        with pytest.raises(NotImplementedError, match="softmax_scale"):
            spec.attend(q, k, v, softmax_scale=1.0)
        spec.attend(q, k, v, softmax_scale=8 ** -0.5)  # a model's default scale passes
    for spec in SPECS.values():
        with pytest.raises(NotImplementedError, match="no block map"):
            spec.attend(q, k, v, return_block_map=True)
        with pytest.raises(NotImplementedError, match="cannot apply"):
            spec.attend(q, k, v, attn_bias=torch.zeros(16, 16))
    with pytest.raises(ValueError, match="top_k"):
        MoHSpec(top_k=0)
    with pytest.raises(ValueError, match="num_shared_heads"):
        MoHSpec(num_shared_heads=1.5)
    with pytest.raises(ValueError, match="with 4 heads"):
        MoHSpec(num_shared_heads=0.5, top_k=0.1).attend(q, k, v)  # int(4 * 0.1) = 0 routed heads
    with pytest.raises(ValueError, match="num_agents"):
        AgentSpec(0)
    with pytest.raises(ValueError, match="source_clamp"):
        FlowSpec(source_clamp=0)
    with pytest.raises(TypeError, match="diag"):
        LLNSpec(diag=1)


def _port(kind):
    """An eager attention function (transformers' contract) computing the authors' method on the model's q / k / v,
    GQA by repeating the kv heads as the models' eager path does; causal, no padding (the tests send none)."""
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        B, H, S, D = query.shape
        if kind == "moh":
            mask = moh_llama3_head_mask(query.transpose(1, 2).reshape(B, S, H * D), H, D, H // 2, H // 4)
            scores = (query @ key.transpose(-2, -1)) * scaling
            causal = torch.ones(S, key.shape[2], dtype=torch.bool).tril(key.shape[2] - S)
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out = torch.einsum("bne,bned->bned", mask, (probs @ value).transpose(1, 2))
        elif kind == "flow":
            out = flow_attention_causal_core(query, key, value).transpose(1, 2)
        else:
            out = lln_attention_port(query, key, value, causal=True).transpose(1, 2)
        return out.contiguous(), None
    return forward


@pytest.mark.parametrize("kind", ["moh", "flow", "lln"])
def test_family_names_equal_the_authors_code_in_a_model(kind):
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"attnops_{kind}"
    AttentionInterface.register(f"port_{kind}", _port(kind))
    AttentionMaskInterface.register(f"port_{kind}", sdpa_mask)
    # LLN's scales are the stds of the call's q and k: of k's own heads in the op, of the repeated heads in the port
    # (the authors' code has no GQA), so LLN is compared without it
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=8 if kind == "lln" else 4, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).double().eval()
    theirs = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=f"port_{kind}").double().eval()
    theirs.load_state_dict(ours.state_dict())
    assert transformers is not None and attnops.integrations.transformers.registered()[name] is \
        attnops.integrations.transformers.DEFAULTS[name]
    ids = torch.randint(0, 97, (2, 70))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-9, atol=1e-9)
    out = ours(ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    if kind == "moh":  # cached generation routes each new token by its own query, as the authors' code
        g1 = ours.generate(ids[:, :20], max_new_tokens=5, do_sample=False)
        g2 = theirs.generate(ids[:, :20], max_new_tokens=5, do_sample=False)
        assert torch.equal(g1, g2)
    else:
        with pytest.raises(NotImplementedError, match="cached decoding step"):
            ours.generate(ids[:, :20], max_new_tokens=2, do_sample=False)
        assert ours.generate(ids[:, :20], max_new_tokens=2, do_sample=False, use_cache=False).shape == (2, 22)


@pytest.mark.parametrize("name", ["attnops_moh", "attnops_flow", "attnops_lln", "attnops_sea", "attnops_hyper"])
def test_family_names_refuse_padding_packing_and_windows_by_name(name):
    """The composed family names have no padding mask, document bounds or window: a left-padded batch, packed rows
    and a sliding-window model each get a clear error, never an output that ignores them."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    shape = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=name).eval()
    ids = torch.randint(0, 97, (2, 20))
    padded = torch.ones(2, 20, dtype=torch.long)
    padded[0, :5] = 0
    with pytest.raises(NotImplementedError, match="attn_bias"):
        model(ids, attention_mask=padded)
    packed = torch.cat([torch.arange(10), torch.arange(10)]).expand(2, -1)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=packed)
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**shape, sliding_window=8),
                                                attn_implementation=name).eval()
    with pytest.raises(NotImplementedError, match="sliding window"):
        windowed(ids)
