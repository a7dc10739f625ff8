"""The transformers adapter never drops what a model sends (issue 21): sliding windows are honoured
(against eager, on tiny models of the families that use them), everything it cannot honour is refused
with the argument's name, and nn.Attention applies its own causality to whatever spec it is given."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnops  # noqa: E402
from attnops.integrations import transformers as hf_attnops  # noqa: E402
from helpers import assert_accurate, left_padded_batch, same_mask_dropout, sdpa_and_attnops  # noqa: E402

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


def _pair(cfg, auto, init=None, **extra):
    """(eager float64, ours float32, eager float32) with one set of weights; ``init(model)`` edits the
    random weights first (e.g. sinks far from their zero init)."""
    auto_cls = getattr(transformers, auto)
    torch.manual_seed(0)
    impl = hf_attnops.register()
    ref = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation="eager", **extra).double().eval()
    if init is not None:
        with torch.no_grad():
            init(ref)
    ours = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation=impl, **extra).eval()
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = auto_cls.from_config(copy.deepcopy(cfg), attn_implementation="eager", **extra).eval()
    low.load_state_dict(ours.state_dict())
    return ref, ours, low


def _loss_and_grads(model, ids, names):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    params = dict(model.named_parameters())
    return loss.detach(), [params[n].grad.detach().clone() for n in names]


def _compare_training(name, ref, ours, low, ids, names):
    """Loss and the gradients of ``names`` (the attention's own parameters among them) against eager."""
    got, want, base = (_loss_and_grads(m, ids, names) for m in (ours, ref, low))
    assert_accurate(f"{name} loss", got[0], want[0], base[0])
    for n, a, b, c in zip(names, got[1], want[1], base[1]):
        assert_accurate(f"{name} d{n}", a, b, c)


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


def _assert_same_generation(ours, low, prompt, new_tokens=8):
    """Greedy cached generation picks the same tokens as eager (float32 both)."""
    with torch.no_grad():
        a = ours.eval().generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
        b = low.eval().generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


def test_cached_generation_with_a_window_matches_eager():
    cfg, auto = _window_configs()["mistral-window64"]
    _, ours, low = _pair(cfg, auto)
    _assert_same_generation(ours, low, torch.randint(0, 97, (1, 80)))


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


def _gpt_oss():
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                       layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0))

    def sinks_far_from_zero(model):  # gpt-oss initialises them N(0, std); trained sinks are O(1)
        for n, p in model.named_parameters():
            if n.endswith("sinks"):
                p.normal_(0.0, 2.0)

    # the MoE's grouped matmul has no float64 kernel: the eager experts run in every copy
    return _pair(cfg, "AutoModelForCausalLM", init=sinks_far_from_zero, experts_implementation="eager")


def test_gpt_oss_sinks_and_window_match_eager():
    """gpt-oss: learnable sinks (s_aux) on every layer, a sliding window on the first: logits, loss and
    gradients (the sinks' own included), and a check that the sinks matter."""
    ref, ours, low = _gpt_oss()
    ids = torch.randint(0, 97, (2, 90))  # longer than the window
    with torch.no_grad():
        assert_accurate("gpt-oss logits", ours(ids).logits, ref(ids).logits, low(ids).logits)
        plain = copy.deepcopy(ref)
        for n, p in plain.named_parameters():
            if n.endswith("sinks"):
                p.fill_(-1e4)  # no sink
        assert (plain(ids).logits - ref(ids).logits).abs().max() > 1e-3
    names = ["model.layers.0.self_attn.sinks", "model.layers.1.self_attn.sinks", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    _compare_training("gpt-oss", ref.train(), ours.train(), low.train(), ids, names)


def test_gpt_oss_cached_generation_matches_eager():
    _, ours, low = _gpt_oss()
    _assert_same_generation(ours, low, torch.randint(0, 97, (1, 40)))


def _inkling2():
    """(eager, attnops) float32 Inkling 2 models with one set of weights: its router casts to float32, so it has no
    float64 run; float32 eager is the reference, as in tests/nn/test_model_zoo.py."""
    from transformers import AutoModelForCausalLM, Inkling2TextConfig

    cfg = Inkling2TextConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                             swa_head_dim=16, sliding_window_size=12, moe_intermediate_size=32, n_routed_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                             layer_types=["hybrid_sliding", "hybrid"])
    torch.manual_seed(0)
    ref, ours = (AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl,
                                                  experts_implementation="eager").eval()
                 for impl in ("eager", hf_attnops.register()))
    with torch.no_grad():  # the sink projections start near zero; make each row's sink matter
        for n, p in ref.named_parameters():
            if "sink_proj" in n:
                p.normal_(0.0, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _close(what, got, want, tol=2e-5):
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= tol * scale, f"{what}: {err:.3e} (scale {scale:.3g})"


def test_inkling2_per_query_sinks_match_eager():
    """Inkling 2 sends one sink logit per query and head (``sinks (B, H, Sq, 1)``, projected from the hidden
    states) with a relative position bias and, on its first layer, a window of 12: left-padded logits, loss and
    gradients (the sink projections' included) against eager, cached generation, and a check that the sinks matter."""
    ref, ours = _inkling2()
    ids, mask = left_padded_batch(vocab=97, length=40)
    real = mask.bool()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        _close("inkling2 logits", ours(ids, attention_mask=mask).logits[real], want[real])
        plain = copy.deepcopy(ref)
        for n, p in plain.named_parameters():
            if "sink_proj" in n:
                p.zero_()  # every sink logit 0: still a sink, a different one
        assert (plain(ids, attention_mask=mask).logits - want)[real].abs().max() > 1e-3
    names = ["model.layers.0.self_attn.sink_proj.weight", "model.layers.1.self_attn.sink_proj.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
             "model.layers.0.self_attn.rel_logits_proj.proj"]
    (got_loss, got), (want_loss, wanted) = (_loss_and_grads(m.train(), ids[:1], names) for m in (ours, ref))
    _close("inkling2 loss", got_loss, want_loss)
    for n, a, b in zip(names, got, wanted):
        _close(f"inkling2 d{n}", a, b)
    _assert_same_generation(ours.eval(), ref.eval(), ids[:1, :30])


def test_per_query_sinks_of_a_wrong_shape_or_on_other_specs_are_refused():
    with pytest.raises(ValueError, match="sinks must be"):
        _call(sinks=torch.zeros(2, 4, 8))
    fn = hf_attnops._attention_forward(attnops.nn.MoBASpec(block_size=4, topk=1))
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(NotImplementedError, match="per-query sinks"):  # also on a padded batch (MoBA's varlen path)
        fn(torch.nn.Module().eval(), q, k, k, torch.tensor([[0] * 3 + [1] * 7]), sinks=torch.zeros(1, 4, 10, 1))


def test_gemma2_softcap_and_window_match_eager():
    """Gemma 2: attention logit softcapping on every layer (50 is its default; 2 here so that the cap bites on
    random weights), a sliding window on local layers."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(**COMMON, head_dim=16, sliding_window=40, attn_logit_softcapping=2.0, query_pre_attn_scalar=16,
                       layer_types=["sliding_attention", "full_attention"])
    def sharp_scores(model):  # random init gives |scores| << 1, where tanh is the identity
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)

    ref, ours, low = _pair(cfg, "AutoModelForCausalLM", init=sharp_scores)
    ids = torch.randint(0, 97, (2, 100))
    with torch.no_grad():
        assert_accurate("gemma2 logits", ours(ids).logits, ref(ids).logits, low(ids).logits)
        uncapped = copy.deepcopy(cfg)
        uncapped.attn_logit_softcapping = None
        free = transformers.AutoModelForCausalLM.from_config(uncapped, attn_implementation="eager").double().eval()
        free.load_state_dict(ref.state_dict())
        assert (free(ids).logits - ref(ids).logits).abs().max() > 1e-3
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    _compare_training("gemma2", ref.train(), ours.train(), low.train(), ids, names)
    _assert_same_generation(ours, low, ids[:1, :50], new_tokens=6)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_a_window_the_model_puts_only_in_its_mask_is_honoured(padded):
    """Phimoe builds sliding-window masks but sends no ``sliding_window`` to the attention function (its eager path
    applies the window through the mask; so does Qwen2-MoE): the flash-form mask dropped the window. Layer 0's
    attention output (the rest of the model routes experts, which amplifies float64 rounding) against SDPA's,
    float64."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    cfg = PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=12)
    models = sdpa_and_attnops(PhimoeForCausalLM, cfg, experts_implementation="eager")
    ids, mask = left_padded_batch()
    if not padded:
        mask = torch.ones_like(mask)
    outs = []
    for model in models:
        seen = []
        hook = model.model.layers[0].self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        hook.remove()
        outs.append(seen[0][mask.bool()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


def test_qwen2_moe_sliding_layers_without_the_argument_match_sdpa():
    """Qwen2-MoE with use_sliding_window: sliding and full layers, and only the module's ``sliding_window`` attribute
    says which (the call sends none). Every expert active (top-k = all: routing without flips), float64, left-padded:
    logits against SDPA's, and cached greedy generation."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=4, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32, use_sliding_window=True, sliding_window=12,
                         max_window_layers=2, layer_types=["sliding_attention", "full_attention"])
    ref, ours = (m.eval() for m in sdpa_and_attnops(Qwen2MoeForCausalLM, cfg, experts_implementation="eager"))
    assert ref.model.layers[0].self_attn.sliding_window == 12
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want, got = (m(input_ids=ids, attention_mask=mask).logits[mask.bool()] for m in (ref, ours))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_a_window_not_sent_is_taken_from_the_masks_or_refused():
    """A call without ``sliding_window`` takes the window its model's masks were built with; an explicit None (Gemma's
    full layers) stays full; a model whose masks have a window and none, and which sends neither, is refused."""
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    module.config = type("Config", (), {})()
    torch.manual_seed(3)
    q, k = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16)
    full, _ = fn(module, q, k, k, None)
    windowed, _ = fn(module, q, k, k, None, sliding_window=5)
    hf_attnops._note_mask(module.config, "causal", 5)
    torch.testing.assert_close(fn(module, q, k, k, None)[0], windowed)
    torch.testing.assert_close(fn(module, q, k, k, None, sliding_window=None)[0], full)
    hf_attnops._note_mask(module.config, "causal", None)
    with pytest.raises(NotImplementedError, match="does not say which"):
        fn(module, q, k, k, None)
    torch.testing.assert_close(fn(module, q, k, k, None, sliding_window=5)[0], windowed)


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_an_encoder_whose_layers_do_not_say_is_causal_is_bidirectional(padding):
    """Splinter's self-attention (BERT-era code) has no ``is_causal``; transformers' integrations default to causal
    there, which ran the encoder causally (0.03 off eager, silently). The layer now takes the kind of mask its model
    builds: bidirectional. Against eager in float32 (Splinter has no SDPA path)."""
    from transformers import AutoModel, SplinterConfig

    cfg = SplinterConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    ref, ours = (AutoModel.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
                 for impl in ("eager", hf_attnops.register()))
    ours.load_state_dict(ref.state_dict())
    assert not hasattr(ours.encoder.layer[0].attention.self, "is_causal")
    ids, mask = left_padded_batch(vocab=97, length=30)
    mask = {"right": mask.flip(-1), "left": mask, "none": None}[padding]
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        want, got = (m(input_ids=ids, attention_mask=mask).last_hidden_state[real] for m in (ref, ours))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_layer_without_is_causal_in_a_model_with_both_kinds_of_mask_is_refused():
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    module.config = type("Config", (), {})()
    q = torch.randn(1, 4, 10, 16)
    causal, _ = fn(module, q, q[:, :2], q[:, :2], None)  # nothing noted: causal, as transformers defaults
    torch.testing.assert_close(causal, fn(module, q, q[:, :2], q[:, :2], None, is_causal=True)[0])
    hf_attnops._note_mask(module.config, "bidirectional")
    torch.testing.assert_close(fn(module, q, q[:, :2], q[:, :2], None)[0],
                               fn(module, q, q[:, :2], q[:, :2], None, is_causal=False)[0])
    hf_attnops._note_mask(module.config, "causal")
    with pytest.raises(NotImplementedError, match="has no is_causal"):
        fn(module, q, q[:, :2], q[:, :2], None)


def test_sinks_and_softcap_are_refused_by_specs_that_cannot_apply_them():
    fn = hf_attnops._attention_forward(attnops.nn.LinearAttentionSpec(feature_map="elu"))
    q = torch.randn(1, 4, 16, 16)
    with pytest.raises(NotImplementedError, match="sinks"):
        fn(torch.nn.Module().eval(), q, q, q, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="softcap"):
        fn(torch.nn.Module().eval(), q, q, q, None, softcap=30.0)


def _call(**kwargs):
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    q = torch.randn(1, 4, 10, 16)
    k = torch.randn(1, 2, 10, 16)
    mask = kwargs.pop("attention_mask", None)
    return fn(module, q, k, k, mask, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(cu_seq_lens_q=torch.tensor([0, 5, 10])), "cu_seq_lens_q and cu_seq_lens_k must both be given"),
    (dict(seq_idx=torch.zeros(1, 10, dtype=torch.int32)), "seq_idx"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(head_mask=torch.ones(4)), "head_mask"),
    (dict(some_new_argument=3), "some_new_argument"),
    (dict(attention_mask=torch.zeros(1, 10, 10)), "3-d attention_mask"),
])
def test_what_the_adapter_cannot_honour_is_refused_by_name(kwargs, words):
    with pytest.raises(NotImplementedError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _call(**kwargs)


def test_packed_rows_become_documents_and_other_specs_refuse_them():
    """position_ids that restart inside a row (or cu_seq_lens) run as documents: each document's rows equal the
    document alone; a spec without document bounds refuses them by name; a packed row in a cached call is
    refused."""
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    torch.manual_seed(5)
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)
    out, _ = fn(module, q, k, k, None, position_ids=pos)
    for a, b in ((0, 4), (4, 10)):
        alone, _ = fn(module, q[:, :, a:b], k[:, :, a:b], k[:, :, a:b], None)
        torch.testing.assert_close(out[:, a:b], alone)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    torch.testing.assert_close(fn(module, q, k, k, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                                  max_length_k=6)[0], out)
    lowrank = hf_attnops._attention_forward(attnops.nn.LowRankKeySpec(None, rank=8, topk=4))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        lowrank(module, q, k, k, None, position_ids=pos)
    with pytest.raises(NotImplementedError, match="cache"):
        fn(module, q[:, :, -3:], k, k, None, position_ids=pos[:, -3:] * 0 + torch.tensor([[7, 0, 1]]))


def test_multimodal_rotary_positions_are_not_packing():
    """GLM-4V-MoE hands its layers 3-d rotary positions (3, B, S): an image's tokens share a temporal position, which
    is no packed-row restart (reading them as one crashed on a padded batch); transformers' packed form (4, B, S) leads
    with the text positions, which are."""
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().eval()
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    text = torch.arange(10).expand(2, 10)
    image = torch.stack([torch.tensor([0, 1, 2, 2, 2, 2, 3, 4, 5, 6])] * 3)[:, None].expand(3, 2, 10)
    plain, _ = fn(module, q, k, k, mask)
    torch.testing.assert_close(fn(module, q, k, k, mask, position_ids=image)[0], plain)
    packed = torch.cat([torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2)[None], image])
    torch.testing.assert_close(fn(module, q, k, k, None, position_ids=packed)[0][:1],
                               fn(module, q[:1], k[:1], k[:1], None, position_ids=packed[0, :1])[0])
    assert not torch.allclose(fn(module, q, k, k, None, position_ids=packed)[0], fn(module, q, k, k, None)[0])
    torch.testing.assert_close(fn(module, q, k, k, mask, position_ids=text[None].expand(3, 2, 10))[0], plain)


def test_harmless_arguments_are_accepted():
    out, weights = _call(position_ids=torch.arange(10)[None], cache_position=torch.arange(10), use_cache=True,
                         output_attentions=False, s_aux=None, softcap=None, deterministic=True, sliding_window=None)
    assert out.shape == (1, 10, 4, 16) and weights is None


def test_dropout_is_applied_in_training_only():
    """The adapter passes the model's dropout to the kernels in training (eager: F.dropout(p, training=
    module.training)) and ignores it in eval; a spec that cannot apply it refuses it by name."""
    fn = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module().train()
    q = torch.randn(1, 4, 10, 16)
    torch.manual_seed(3)
    out, _ = fn(module, q, q, q, None, dropout=0.4)
    torch.manual_seed(3)
    want = attnops.attention(*(t.transpose(1, 2) for t in (q, q, q)), causal=True, dropout_p=0.4)
    assert torch.equal(out, want)
    assert not torch.equal(out, fn(module.eval(), q, q, q, None, dropout=0.4)[0])
    torch.testing.assert_close(fn(module.eval(), q, q, q, None, dropout=0.4)[0], fn(module, q, q, q, None)[0])
    linear = hf_attnops._attention_forward(attnops.nn.LinearAttentionSpec())
    with pytest.raises(NotImplementedError, match="dropout_p"):
        linear(module.train(), q, q, q, None, dropout=0.1)


def _dropout_models():
    from transformers import BertConfig, GPT2Config

    return {
        "gpt2": (GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.2), "AutoModelForCausalLM",
                 ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"]),
        "bert": (BertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.2), "AutoModelForMaskedLM",
                 ["bert.encoder.layer.0.attention.self.query.weight",
                  "bert.encoder.layer.1.attention.self.value.weight"]),
    }


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_attention_dropout_in_training_matches_eager_with_the_same_mask(name, monkeypatch):
    """GPT-2 and BERT with attention dropout, in training: loss and gradients equal eager's when eager
    drops the same pairs (the kernels' mask, handed to eager); the dropout changes the loss."""
    cfg, auto, names = _dropout_models()[name]
    ref, ours, low = _pair(cfg, auto)
    same_mask_dropout(monkeypatch)
    ids = torch.randint(1, 97, (2, 70))
    results = []
    for model in (ours, ref, low):
        model.train()
        torch.manual_seed(123)
        results.append(_loss_and_grads(model, ids, names))
    got, want, base = results
    assert_accurate(f"{name} loss", got[0], want[0], base[0])
    for n, a, b, c in zip(names, got[1], want[1], base[1]):
        assert_accurate(f"{name} d{n}", a, b, c)
    plain = _loss_and_grads(ours.eval(), ids, names)[1][0]  # the dropout matters: without it, other gradients
    assert (plain - got[1][0]).abs().max() > 1e-2 * plain.abs().max()


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


# ---- padded batches, additive masks and T5's position bias: through attn_bias ---------------------------------

def _llama_pair():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**COMMON)
    ref, ours, low = _pair(cfg, "AutoModelForCausalLM")
    # transformers' eager float64 mask arithmetic gives NaN rows under left padding (finfo.min + finfo.min =
    # -inf): the float64 yardstick is SDPA there, which unmasks fully masked rows
    return _sdpa_twin(cfg, "AutoModelForCausalLM", ref), ours, low


def _sdpa_twin(cfg, auto, ref):
    """A float64 SDPA model with ``ref``'s weights: the truth where eager's float64 masks make NaN rows."""
    sdpa = getattr(transformers, auto).from_config(copy.deepcopy(cfg), attn_implementation="sdpa").double().eval()
    sdpa.load_state_dict(ref.state_dict())
    return sdpa


def _left_padded(B=2, S=60, pads=(17, 0)):
    ids = torch.randint(1, 97, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return ids, mask


def test_left_padded_batch_matches_eager():
    """Llama, a left-padded batch: logits at the real tokens, loss and gradients (pads labelled -100)."""
    ref, ours, low = _llama_pair()
    ids, mask = _left_padded()
    real = mask.bool()
    with torch.no_grad():
        got, want, base = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, ref, low))
    assert_accurate("llama padded logits", got[real], want[real], base[real])
    labels = ids.masked_fill(~real, -100)

    def loss_and_grads(model, names):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        params = dict(model.named_parameters())
        return [params[n].grad.clone() for n in names]

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    for n, a, b, c in zip(names, *(loss_and_grads(m.train(), names) for m in (ours, ref, low))):
        assert_accurate(f"llama padded d{n}", a, b, c)


def test_left_padded_cached_generation_matches_eager():
    _, ours, low = _llama_pair()
    ids, mask = _left_padded(pads=(9, 0), S=30)
    with torch.no_grad():
        a = ours.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
        b = low.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


def _t5():
    from transformers import T5Config

    cfg = T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)

    def sharp_bias(model):  # the relative position bias initialises near 0; a trained one is O(1)
        for n, p in model.named_parameters():
            if n.endswith("relative_attention_bias.weight"):
                p.normal_(0.0, 2.0)

    return _pair(cfg, "AutoModelForSeq2SeqLM", init=sharp_bias)


def test_t5_position_bias_and_padding_match_eager():
    """T5: the relative position bias (learned, so with its gradient) in encoder, decoder and not in cross
    attention, a padded encoder batch, no 1/sqrt(d) scaling: logits, loss and gradients."""
    ref, ours, low = _t5()
    ids = torch.randint(1, 97, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0
    dec = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        got, want, base = (m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
                           for m in (ours, ref, low))
        assert_accurate("t5 logits", got, want, base)
        flat = copy.deepcopy(ref)
        for n, p in flat.named_parameters():
            if n.endswith("relative_attention_bias.weight"):
                p.zero_()
        assert (flat(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits - want).abs().max() > 1e-3
    names = ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.block.1.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.1.EncDecAttention.k.weight"]

    def loss_and_grads(model):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=dec).loss.backward()
        params = dict(model.named_parameters())
        return [params[n].grad.clone() for n in names]

    for n, a, b, c in zip(names, *(loss_and_grads(m.train()) for m in (ours, ref, low))):
        assert_accurate(f"t5 d{n}", a, b, c)


def _padded_configs():
    from transformers import BertConfig, DistilBertConfig, GPT2Config, ModernBertConfig, Qwen2Config

    common = {**COMMON, "num_key_value_heads": 1}
    return {
        "qwen2-mqa": (Qwen2Config(**common), "AutoModelForCausalLM"),
        "mistral-window64": _window_configs()["mistral-window64"],
        "gpt2": (GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0), "AutoModelForCausalLM"),
        "bert": (BertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0), "AutoModelForMaskedLM"),
        "distilbert": (DistilBertConfig(vocab_size=97, dim=64, hidden_dim=96, n_layers=2, n_heads=4, dropout=0.0,
                                        attention_dropout=0.0, max_position_embeddings=256), "AutoModelForMaskedLM"),
        "modernbert-local32": (ModernBertConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, local_attention=32,
                                                global_attn_every_n_layers=2, max_position_embeddings=512,
                                                pad_token_id=0, attention_dropout=0.0, embedding_dropout=0.0,
                                                mlp_dropout=0.0), "AutoModelForMaskedLM"),
    }


@pytest.mark.parametrize("name", ["qwen2-mqa", "mistral-window64", "gpt2", "bert", "distilbert",
                                  "modernbert-local32"])
def test_right_padded_batches_match_eager(name):
    """Right-padded batches (sequences of 100, 71 and 9 tokens) on decoders (logits, loss, gradients with pads
    labelled -100) and encoders (logits) against eager: the padding mask reaches the kernels on every family
    member, windows included."""
    cfg, auto = _padded_configs()[name]
    ref, ours, low = _pair(cfg, auto)
    if name == "mistral-window64":
        # eager's float64 mask arithmetic (finfo.min + finfo.min = -inf) gives NaN rows where the window holds
        # only padding, and the NaN spreads: the float64 truth is SDPA there (as for left padding above)
        ref = _sdpa_twin(cfg, auto, ref)
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (3, 100))
    mask = torch.ones(3, 100, dtype=torch.long)
    mask[1, 71:] = 0
    mask[2, 9:] = 0
    real = mask.bool()
    with torch.no_grad():
        got, want, base = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, ref, low))
    assert_accurate(f"{name} padded logits", got[real], want[real], base[real])
    if auto != "AutoModelForCausalLM":
        return
    labels = ids.masked_fill(~real, -100)

    def loss_and_grads(model):
        model.train().zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "attn" in n][:4]
        return [loss.detach(), *grads]

    for i, (a, b, c) in enumerate(zip(*(loss_and_grads(m) for m in (ours, ref, low)))):
        assert_accurate(f"{name} padded loss/grad {i}", a, b, c)
