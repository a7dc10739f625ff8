"""The transformers adapter never drops what a model sends (issue 21): sliding windows are honoured
(against eager, on tiny models of the families that use them), everything it cannot honour is refused
with the argument's name, and nn.Attention applies its own causality to whatever spec it is given."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnops  # noqa: E402
from attnops.integrations import transformers as hf_attnops  # noqa: E402
from helpers import assert_accurate  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def _window_configs():
    from transformers import Gemma3TextConfig, MistralConfig, Qwen2Config

    return {
        "mistral-window64": (MistralConfig(**COMMON, sliding_window=64), "AutoModelForCausalLM"),
        "qwen2-window48": (Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=48, max_window_layers=0,
                                       layer_types=["sliding_attention", "sliding_attention"]),
                           "AutoModelForCausalLM"),
        "gemma3-local": (Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=40,
                                          layer_types=["sliding_attention", "full_attention"]),
                         "AutoModelForCausalLM"),
    }


def _pair(cfg, auto):
    auto_cls = getattr(transformers, auto)
    torch.manual_seed(0)
    impl = hf_attnops.register()
    ref = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation="eager").double().eval()
    ours = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    low.load_state_dict(ours.state_dict())
    return ref, ours, low


@pytest.mark.parametrize("name", ["mistral-window64", "qwen2-window48", "gemma3-local"])
def test_sliding_window_models_match_eager(name):
    cfg, auto = _window_configs()[name]
    ref, ours, low = _pair(cfg, auto)
    ids = torch.randint(0, 97, (2, 200))  # longer than the windows
    with torch.no_grad():
        assert_accurate(f"{name} logits", ours(ids).logits, ref(ids).logits, low(ids).logits)
    # the window matters here: without it the logits differ (what the adapter used to compute)
    unwindowed = copy.deepcopy(cfg)
    unwindowed.sliding_window = 4096  # wider than the sequence
    full = getattr(transformers, auto).from_config(unwindowed, attn_implementation="eager").double().eval()
    full.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert (full(ids).logits - ref(ids).logits).abs().max() > 1e-3


def test_cached_generation_with_a_window_matches_eager():
    cfg, auto = _window_configs()["mistral-window64"]
    _, ours, low = _pair(cfg, auto)
    ids = torch.randint(0, 97, (1, 80))
    with torch.no_grad():
        a = ours.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        b = low.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


def test_modernbert_local_attention_matches_eager():
    from transformers import ModernBertConfig

    cfg = ModernBertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, local_attention=32, global_attn_every_n_layers=2,
                           max_position_embeddings=512, pad_token_id=0, attention_dropout=0.0,
                           embedding_dropout=0.0, mlp_dropout=0.0)
    ref, ours, low = _pair(cfg, "AutoModelForMaskedLM")
    ids = torch.randint(1, 97, (2, 120))
    with torch.no_grad():
        assert_accurate("modernbert logits", ours(ids).logits, ref(ids).logits, low(ids).logits)


def _call(**kwargs):
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    q = torch.randn(1, 4, 10, 16)
    k = torch.randn(1, 2, 10, 16)
    mask = kwargs.pop("attention_mask", None)
    return fn(module, q, k, k, mask, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(s_aux=torch.zeros(4)), "s_aux"),
    (dict(softcap=50.0), "softcap"),
    (dict(position_bias=torch.zeros(1, 4, 10, 10)), "position_bias"),
    (dict(cu_seq_lens_q=torch.tensor([0, 5, 10])), "cu_seq_lens_q"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(head_mask=torch.ones(4)), "head_mask"),
    (dict(some_new_argument=3), "some_new_argument"),
    (dict(attention_mask=torch.zeros(1, 1, 10, 10)), "float (additive) attention_mask"),
    (dict(attention_mask=torch.tensor([[True] * 8 + [False] * 2])), "padded"),
    (dict(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])), "packed"),
])
def test_what_the_adapter_cannot_honour_is_refused_by_name(kwargs, words):
    with pytest.raises(NotImplementedError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _call(**kwargs)


def test_harmless_arguments_are_accepted():
    out, weights = _call(position_ids=torch.arange(10)[None], cache_position=torch.arange(10), use_cache=True,
                         output_attentions=False, s_aux=None, softcap=None, deterministic=True, sliding_window=None)
    assert out.shape == (1, 10, 4, 16) and weights is None


def test_dropout_in_training_is_refused():
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().train()
    q = torch.randn(1, 4, 10, 16)
    with pytest.raises(NotImplementedError, match="dropout"):
        fn(module, q, q, q, None, dropout=0.1)


def test_a_window_is_refused_by_specs_that_cannot_apply_it():
    fn = hf_attnops._attention_forward(attnops.nn.MoBASpec(block_size=64, topk=2))
    q = torch.randn(1, 4, 128, 16)
    with pytest.raises(NotImplementedError, match="sliding window"):
        fn(torch.nn.Module().eval(), q, q, q, None, sliding_window=32)


@pytest.mark.parametrize("spec", [attnops.nn.MoBASpec(block_size=64, topk=2), attnops.nn.SoftmaxSpec(),
                                  attnops.nn.LinearAttentionSpec(feature_map="elu")],
                         ids=["moba", "softmax", "linear"])
def test_attention_block_is_causal_whatever_the_spec(spec):
    """Position 0's output must not change when the last token changes (the README example with a MoBA
    spec used to run bidirectional)."""
    torch.manual_seed(0)
    block = attnops.nn.Attention(64, 4, attention=spec)
    x = torch.randn(1, 128, 64)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        assert torch.equal(block(x)[:, :-1], block(y)[:, :-1])
        enc = attnops.nn.Attention(64, 4, attention=attnops.nn.SoftmaxSpec(), causal=False)
        assert not torch.equal(enc(x)[:, 0], enc(y)[:, 0])  # an encoder block sees the whole sequence
