"""attnops as a transformers attn_implementation in unmodified models (tiny configs, random weights,
nothing downloaded): same logits as the eager implementation, training step, cached generation."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnops  # noqa: E402
from attnops.integrations import transformers as hf_attnops  # noqa: E402
from helpers import assert_accurate, left_padded_batch, sdpa_and_attnops  # noqa: E402


def _configs():
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    return {
        "llama-gqa": LlamaConfig(**common, num_key_value_heads=2, head_dim=16),
        "qwen2-mqa": Qwen2Config(**common, num_key_value_heads=1),
        "gpt2": GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0,
                           resid_pdrop=0.0, embd_pdrop=0.0),
        "phi3-gqa": Phi3Config(**common, num_key_value_heads=2, pad_token_id=0),
    }


CONFIGS = ["llama-gqa", "qwen2-mqa", "gpt2", "phi3-gqa"]


def _models(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _configs()[name]
    impl = hf_attnops.register()
    # one config object per model: from_config records the implementation on the config it gets
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").double().eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    low.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == impl and low.config._attn_implementation == "eager"
    return ref, ours, low


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_eager(name, monkeypatch):
    import attnops.nn.specs as specs

    calls = []
    kernel = specs.attention
    monkeypatch.setattr(specs, "attention", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    ref, ours, low = _models(name)
    ids = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        expect = ref(ids).logits
        assert not calls
        got = ours(ids).logits
        assert len(calls) == 2  # one per layer: the model really ran attnops
        yard = low(ids).logits
    assert_accurate("logits", got, expect, yard)


@pytest.mark.parametrize("name", CONFIGS)
def test_training_step_grads_match(name):
    ref, ours, low = _models(name)
    ids = torch.randint(0, 97, (2, 33))
    for m in (ref, ours, low):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (n, p), (_, p64), (_, plp) in zip(ours.named_parameters(), ref.named_parameters(), low.named_parameters()):
        if p.grad is not None:
            assert_accurate(f"grad {n}", p.grad, p64.grad, plp.grad)


@pytest.mark.parametrize("dtype", ["float", "bool"])
def test_a_4d_mask_decides_causality(dtype):
    """A 4-d attention_mask given to the model (here a prefix-LM mask: the first 7 tokens see each other, padding
    in row 1) is the whole mask, as eager applies it: the module's causality is not added on top (it cut the
    bidirectional prefix, logits 0.33 off). A bool mask means what SDPA makes of it (True: attended); eager's
    reference gets the same mask as 0 / finfo.min."""
    ref, ours, low = _models("llama-gqa")
    B, S = 2, 19
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    allowed[:7, :7] = True
    allowed = allowed.expand(B, 1, S, S).clone()
    allowed[1, :, :, :3] = False  # left padding of row 1 (its padded queries still see themselves)
    allowed[1, :, torch.arange(3), torch.arange(3)] = True
    ids = torch.randint(0, 97, (B, S))

    def additive(dt):
        return torch.zeros(B, 1, S, S, dtype=dt).masked_fill(~allowed, torch.finfo(dt).min)

    with torch.no_grad():
        expect = ref(ids, attention_mask=additive(torch.float64)).logits
        yard = low(ids, attention_mask=additive(torch.float32)).logits
        got = ours(ids, attention_mask=allowed if dtype == "bool" else additive(torch.float32)).logits
    assert_accurate("logits", got, expect, yard)


def _eager_and_ours(model_cls, cfg):
    """(eager, attnops) float32 models of ``model_cls`` with one set of random weights (seed 0)."""
    torch.manual_seed(0)
    ref = model_cls(copy.deepcopy(cfg)).eval()
    ref.set_attn_implementation("eager")
    ours = model_cls(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation(hf_attnops.register())
    return ref, ours


def _llama4_pair():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           attention_chunk_size=8, num_local_experts=2, no_rope_layers=[1, 0])
    ref, ours = _eager_and_ours(Llama4ForCausalLM, cfg)
    assert ref.config.layer_types[0] == "chunked_attention"
    return ref, ours


def test_llama4_chunked_attention_matches_eager():
    """Llama 4's chunked layers (tokens attend only within their chunk of ``attention_chunk_size``): the mask
    interface hands them transformers' 4-d mask (the flash-attention form had dropped the chunks: 0.46 off),
    left-padded too, and cached greedy generation across chunk boundaries equals eager's."""
    ref, ours = _llama4_pair()
    ids = torch.randint(0, 97, (2, 21))
    pad = torch.ones(2, 21, dtype=torch.long)
    pad[1, :5] = 0
    with torch.no_grad():
        for mask in (None, pad):
            want, got = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
            kept = slice(None) if mask is None else mask.bool()
            torch.testing.assert_close(got[kept], want[kept], rtol=1e-4, atol=1e-4)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:1, :6], **kw), ref.generate(ids[:1, :6], **kw))


def _llama4_long_chunks():
    """Llama 4 pair whose chunks (24 tokens) cross the kernels' 64-token tiles, float64 (gradients compared too)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           attention_chunk_size=24, num_local_experts=2, no_rope_layers=[1, 0])
    ref, ours = _eager_and_ours(Llama4ForCausalLM, cfg)
    return ref.double(), ours.double()


def _chunked_layer_mask(model, **inputs):
    """What the registered mask function gives the chunked layers of ``model`` for ``inputs`` (no cache)."""
    from transformers.masking_utils import create_chunked_causal_mask

    embeds = model.model.embed_tokens(inputs.pop("input_ids"))
    return create_chunked_causal_mask(config=model.config, inputs_embeds=embeds, past_key_values=None, **inputs)


def test_llama4_chunked_prefill_runs_chunks_as_documents():
    """A chunked layer's prefill / training call gets its chunks as document ids (:class:`ChunkedMask`), not
    transformers' 4-d mask (one byte per query-key pair): chunks counted from each row's first real token as
    transformers counts them, left padding, right padding and unpadded rows in one batch; logits on the real tokens
    and every parameter's gradient equal eager's."""
    ref, ours = _llama4_long_chunks()
    ids = torch.randint(1, 97, (3, 150))
    mask = torch.ones(3, 150, dtype=torch.long)
    mask[1, :37] = 0  # left padding: its chunks start at 37, 61, ...
    mask[2, 131:] = 0
    got = _chunked_layer_mask(ours, input_ids=ids, attention_mask=mask.bool())
    assert isinstance(got, hf_attnops.ChunkedMask) and torch.equal(got.padding, mask.bool())
    assert torch.equal(got.document_ids[0], torch.arange(150) // 24)
    assert torch.equal(got.document_ids[1], torch.div(torch.arange(150) - 37, 24, rounding_mode="floor"))
    assert _chunked_layer_mask(ours, input_ids=ids, attention_mask=None).padding is None
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 37] = -100  # predicted from the padding before it, a row that sees no key (eager: its uniform mix)
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if model is ref:
            want = out.logits.detach()
    torch.testing.assert_close(out.logits.detach()[mask.bool()], want[mask.bool()], rtol=1e-9, atol=1e-9)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-9, atol=1e-9, msg=n)


def test_llama4_chunked_mask_falls_back_where_it_is_not_plain_chunks():
    """Where the chunked layer's mask function is not the plain chunked causal one (packed rows: transformers chunks
    each document from its own start), the registered mask function returns transformers' exact 4-d mask, and the
    model still equals eager; cached steps (queries fewer than keys) keep the 4-d mask too."""
    from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask

    ref, ours = _llama4_long_chunks()
    ids = torch.randint(1, 97, (2, 150))
    position_ids = torch.cat([torch.arange(70), torch.arange(80)])[None].expand(2, 150)
    got = _chunked_layer_mask(ours, input_ids=ids, attention_mask=None, position_ids=position_ids)
    assert isinstance(got, torch.Tensor) and got.shape == (2, 1, 150, 150)
    assert not bool(got[0, 0, 75, 70 - 1]) and bool(got[0, 0, 75, 70])  # the second document's first chunk
    with torch.no_grad():
        want = ref(ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(ours(ids, position_ids=position_ids, use_cache=False).logits, want,
                                   rtol=1e-9, atol=1e-9)
    step = hf_attnops._layer_mask(2, 3, 40, q_offset=37, kv_offset=0, local_size=24, config=ours.config,
                                  mask_function=chunked_causal_mask_function(24, torch.zeros(2, dtype=torch.long)))
    assert torch.equal(step, sdpa_mask(2, 3, 40, q_offset=37, mask_function=chunked_causal_mask_function(
        24, torch.zeros(2, dtype=torch.long)), allow_is_causal_skip=False))


def test_layer_mask_keeps_custom_patterns():
    """The registered mask interface: transformers' flash form (None / the 2-d padding mask) for plain causal
    masks, and exactly transformers' 4-d bool mask for what that form cannot carry: a blockwise overlay (image
    tokens attending each other), a custom or-mask (``use_vmap``)."""
    from transformers.masking_utils import blockwise_overlay, causal_mask_function, or_masks, sdpa_mask

    hf_attnops.register()
    mask_fn = hf_attnops._layer_mask
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, :2] = False
    assert mask_fn(2, 12, 12, mask_function=causal_mask_function) is None
    assert torch.equal(mask_fn(2, 12, 12, mask_function=causal_mask_function, attention_mask=pad), pad)
    blocks = torch.full((2, 12), -1)
    blocks[:, 3:7] = 0  # an image: four tokens that see each other
    overlay = or_masks(causal_mask_function, blockwise_overlay(blocks))
    want = sdpa_mask(2, 12, 12, mask_function=overlay, attention_mask=pad, allow_is_causal_skip=False)
    got = mask_fn(2, 12, 12, mask_function=overlay, attention_mask=pad)
    assert got.shape == (2, 1, 12, 12) and torch.equal(got, want) and bool(got[1, 0, 3, 6])
    bidirectional = or_masks(causal_mask_function, lambda *args: torch.tensor(True))
    got = mask_fn(2, 12, 12, mask_function=bidirectional, attention_mask=pad, use_vmap=True)
    assert torch.equal(got, pad[:, None, None, :].expand(2, 1, 12, 12))


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_eager(padded):
    """``cache_implementation="static"`` (the cache torch.compile'd generation uses): k / v span the whole buffer while
    the flash-form mask covers the positions written so far; the keys are those positions (it raised: a 2-d mask of
    11 against 25 keys), causality aligned to the last written one, left padding kept out."""
    ref, ours, _ = _models("llama-gqa")
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, cache_implementation="static", attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.float().generate(ids, **kw))


def test_static_cache_with_sliding_windows_matches_eager():
    """Gemma 2 (a sliding window of 6 on alternate layers, logit softcapping) with a static cache and a left-padded
    batch: the window's static layers and the full ones are cut to their written slots; generation runs past the
    window."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, sliding_window=6)
    ref, ours = _eager_and_ours(Gemma2ForCausalLM, cfg)
    ids = torch.randint(1, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=15, do_sample=False, pad_token_id=0, cache_implementation="static", attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_t5_static_cache_generation_matches_eager():
    """T5 with a static decoder cache: its position bias spans the cache's buffer as the keys do, and is cut with
    them (it raised: a (1, H, 1, 10) bias against one written key); padded encoder input."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   pad_token_id=0)
    ref, ours = _eager_and_ours(T5ForConditionalGeneration, cfg)
    ids = torch.randint(3, 97, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=mask, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def test_latent_attention_value_head_dim():
    """DeepSeek V3's multi-head latent attention: value heads of 12 against query/key heads of 24. v is padded to
    the qk dim and the output cut (it raised: k and v must have the same shape); padded batch, cached generate."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=2,
                           num_experts_per_tok=1, first_k_dense_replace=2, n_group=1, topk_group=1,
                           moe_intermediate_size=32)
    ref, ours = _eager_and_ours(DeepseekV3ForCausalLM, cfg)
    ids = torch.randint(3, 97, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("shared", [0, 2], ids=["own-kv", "kv-shared"])
def test_gemma4_global_head_dim_512_matches_sdpa(shared):
    """Gemma 4: sliding layers of head dim 16 (window 12) and full-attention layers of head dim 512 (Gemma 4's
    ``global_head_dim``: attnops took head dims up to 256 and refused every Gemma 4 model), with and without
    KV-shared layers (whose generate() slices every layer's mask: it raised IndexError on the 2-d padding mask).
    Float64, left-padded rows: logits, loss and every gradient against transformers' SDPA path (eager's softmax runs in
    float32), and cached greedy generation."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    cfg = Gemma4TextConfig(vocab_size=97, vocab_size_per_layer_input=97, hidden_size=64, intermediate_size=96,
                           hidden_size_per_layer_input=16, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, global_head_dim=512, sliding_window=12,
                           max_position_embeddings=256, num_kv_shared_layers=shared,
                           layer_types=["sliding_attention", "full_attention"] * 2)
    ref, ours = sdpa_and_attnops(Gemma4ForCausalLM, cfg)
    assert ours.model.layers[1].self_attn.head_dim == 512
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (ref, ours):
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach()[mask.bool()], out.loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_loss, want_grads), (got, got_loss, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-9, atol=1e-9)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-7, atol=1e-9, msg=name)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(ours.eval().generate(ids, **kw), ref.eval().generate(ids, **kw))


def test_t5gemma_encoder_decoder_matches_eager():
    """T5Gemma: a bidirectional Gemma encoder and a causal decoder with cross-attention, softcapping and sliding
    layers (window 12 on 40 tokens). No SDPA path: against eager, both float32, right- and left-padded encoder batches
    with a padded decoder batch; cached greedy generation."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration, T5GemmaModuleConfig

    module = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=12,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                  attn_logit_softcapping=2.0)
    cfg = T5GemmaConfig(encoder=T5GemmaModuleConfig(**module),
                        decoder=T5GemmaModuleConfig(**module, is_decoder=True), vocab_size=97)
    ref, ours = _eager_and_ours(T5GemmaForConditionalGeneration, cfg)
    with torch.no_grad():  # scores of a few units, where the cap of 2 bends them (random weights give ~0.05)
        for model in (ref, ours):
            for name, param in model.named_parameters():
                if "q_proj" in name:
                    param.mul_(40.0)
    ids, mask = left_padded_batch()
    dec = torch.randint(3, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 15:] = 0
    with torch.no_grad():
        for enc_mask in (mask.flip(-1), mask):
            want, got = (m(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec,
                           decoder_attention_mask=dec_mask).logits[dec_mask.bool()] for m in (ref, ours))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        kw = dict(attention_mask=mask.flip(-1), max_new_tokens=8, do_sample=False)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def _vision_language(family: str):
    """A tiny vision-language model of ``family`` (a 2-layer vision tower on images of 28-56 pixels) and its inputs:
    three rows with an image, two of them left-padded."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_padded_batch(vocab=100, length=30)
    ids[:, 10], ids[:, 11:15], ids[:, 15] = 121, 120, 122
    if family == "gemma3":  # image tokens attend each other both ways (token_type_ids), sliding layers around them
        text.update(head_dim=16, sliding_window=12, layer_types=["sliding_attention", "full_attention"])
        cfg = CONFIG_MAPPING[family](text_config=text, mm_tokens_per_image=4, image_token_id=120, boi_token_id=121,
                                     eoi_token_id=122, pad_token_id=0,
                                     vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=56, patch_size=14))
        inputs = dict(pixel_values=torch.randn(3, 3, 56, 56, generator=gen, dtype=torch.float64),
                      token_type_ids=(ids == 120).long())
    elif family == "paligemma":  # a prefix LM: the image and the prompt attend both ways, the suffix causally
        ids[:, 10:15] = torch.randint(3, 100, (3, 5), generator=gen)
        for row, pad in enumerate((0, 8, 3)):
            ids[row, pad:pad + 4] = 120
        cfg = CONFIG_MAPPING[family](text_config=dict(text, model_type="gemma", head_dim=16), image_token_index=120,
                                     projection_dim=64, vocab_size=128, hidden_size=64,
                                     vision_config=dict(model_type="siglip_vision_model", hidden_size=64,
                                                        intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=28, patch_size=14))
        suffix = torch.zeros_like(ids)
        suffix[:, 20:] = 1
        inputs = dict(pixel_values=torch.randn(3, 3, 28, 28, generator=gen, dtype=torch.float64), token_type_ids=suffix)
    elif family == "mllama":  # Llama 3.2 Vision: a cross-attention layer reads the image tiles under its own mask
        ids[:, 10:16] = torch.randint(3, 100, (3, 6), generator=gen)
        ids[:, 10] = 120
        cfg = CONFIG_MAPPING[family](text_config=dict(text, model_type="mllama_text_model", cross_attention_layers=[1],
                                                      pad_token_id=0), image_token_index=120,
                                     vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_global_layers=1, attention_heads=4, image_size=28,
                                                        patch_size=14, max_num_tiles=2, vision_output_dim=128,
                                                        intermediate_layers_indices=[0],
                                                        supported_aspect_ratios=[[1, 1], [1, 2]]))
        tiles = torch.zeros(3, 30, 1, 2, dtype=torch.long)
        tiles[:, 10:, 0, :] = 1
        tiles[0, 10:, 0, 1] = 0  # the first row's image has one tile
        inputs = dict(pixel_values=torch.randn(3, 1, 2, 3, 28, 28, generator=gen, dtype=torch.float64),
                      aspect_ratio_ids=torch.tensor([[1], [2], [2]]),
                      aspect_ratio_mask=torch.tensor([[[1, 0]], [[1, 1]], [[1, 1]]]), cross_attention_mask=tiles)
    else:  # Qwen2-VL / Qwen2.5-VL: 3-d rotary positions, and a vision tower that attends image by image
        text.update(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
        cfg = CONFIG_MAPPING[family](text_config=text, image_token_id=120, vision_start_token_id=121,
                                     vision_end_token_id=122,
                                     vision_config=dict(depth=2, embed_dim=64, hidden_size=64, out_hidden_size=64,
                                                        num_heads=4, mlp_ratio=2, intermediate_size=96, patch_size=14,
                                                        spatial_merge_size=2, temporal_patch_size=2,
                                                        fullatt_block_indexes=[1], window_size=56))
        inputs = dict(pixel_values=torch.randn(3 * 16, 3 * 2 * 14 * 14, generator=gen, dtype=torch.float64),
                      image_grid_thw=torch.tensor([[1, 4, 4]] * 3), mm_token_type_ids=(ids == 120).int())
    ref, ours = sdpa_and_attnops(AutoModelForImageTextToText._model_mapping[type(cfg)], cfg)
    return ref.eval(), ours.eval(), ids, dict(attention_mask=mask, **inputs)


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "mllama", "qwen2_vl", "qwen2_5_vl"])
def test_vision_language_models_with_images_match_sdpa(family):
    """Images in left-padded batches, against SDPA in float64: logits on the real tokens (the vision tower's attention
    and the language model's both run on attnops), then cached greedy generation with a dynamic and a static cache."""
    from unittest import mock

    ref, ours, ids, inputs = _vision_language(family)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        want = ref(input_ids=ids, **inputs).logits
        with mock.patch.object(hf_attnops, "_check_call", wraps=hf_attnops._check_call) as calls:
            got = ours(input_ids=ids, **inputs).logits
        assert calls.call_count >= 4, calls.call_count  # the vision tower's layers and the language model's
        torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)
        if family in ("gemma3", "paligemma"):  # the two-way attention matters here (PaliGemma: all of it causal)
            other = (torch.zeros_like if family == "gemma3" else torch.ones_like)(inputs["token_type_ids"])
            assert (ref(input_ids=ids, **dict(inputs, token_type_ids=other)).logits - want)[real].abs().max() > 1e-3
        if family == "paligemma":  # generation: the whole prompt is the prefix
            inputs = dict(inputs, token_type_ids=torch.zeros_like(ids))
        kw = dict(inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        for cache in ({}, {"cache_implementation": "static"}):
            a, b = ours.generate(ids, **kw, **cache), ref.generate(ids, **kw, **cache)
            assert torch.equal(a.sequences, b.sequences)
            for x, y in zip(a.scores, b.scores):
                torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_wider_value_heads_pad_queries_and_keys():
    """Value heads wider than query/key heads (no model yet, the same contract): q and k zero-padded, the scale
    that of the qk dim, against the float64 reference."""
    from attnops.ops.softmax import reference

    forward = hf_attnops._attention_forward(attnops.nn.SoftmaxSpec())
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 24)
    out, _ = forward(module, q, k, v, None)
    want, _ = reference.block_sparse_attention(*(t.transpose(1, 2).double() for t in (q, k, v)), None, causal=True,
                                               window_size=(-1, -1), softmax_scale=16 ** -0.5)
    assert out.shape == (2, 9, 4, 24)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_layer_mask_of_a_static_cache():
    """A static cache's buffer is longer than the positions written: eagerly, an all-True 2-d mask up to the last
    query (the attention function cuts the keys to it); while tracing, where that length would need a host read of
    the cache position, transformers' exact 4-d mask (fullgraph: no graph break)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    hf_attnops.register()
    got = hf_attnops._layer_mask(2, 3, 16, q_offset=torch.tensor(5), mask_function=causal_mask_function)
    assert got.shape == (2, 8) and bool(got.all())
    assert hf_attnops._layer_mask(2, 3, 8, q_offset=5, mask_function=causal_mask_function) is None  # all written

    def traced(offset):
        return hf_attnops._layer_mask(2, 3, 16, q_offset=offset, mask_function=causal_mask_function)

    got = torch.compile(traced, backend="eager", fullgraph=True)(torch.tensor(5))
    want = sdpa_mask(2, 3, 16, q_offset=torch.tensor(5), mask_function=causal_mask_function, allow_is_causal_skip=False)
    assert torch.equal(got, want) and bool(got[0, 0, 0, 5]) and not bool(got[0, 0, 0, 6])


def test_set_attn_implementation_and_cached_generation():
    ref, ours, low = _models("llama-gqa")
    low.set_attn_implementation(hf_attnops.register())  # switch an existing model
    assert low.config._attn_implementation == "attnops"
    ids = torch.randint(0, 97, (1, 20))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = low.generate(ids, **kw)  # attnops, with the KV cache
        b = ref.float().generate(ids, **kw)  # eager, same weights
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["attnops_linear", "attnops_moba"])
def test_padded_and_packed_batches_on_the_varlen_families(family):
    """MoBA and linear specs take padded batches (left and right) and packed rows as transformers'
    flash-attention path does: unpadded to sequences, run in the family's cu_seqlens form, re-padded; every
    real token's logits equal its sequence run alone. A bad spec is a clear error."""
    from transformers import AutoModelForCausalLM

    spec = attnops.nn.MoBASpec(block_size=64, topk=2) if family == "attnops_moba" else None
    name = hf_attnops.register(family, spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()["llama-gqa"], attn_implementation=name).double().eval()
    ids = torch.randint(0, 97, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :9] = 0  # left-padded
    mask[1, 60:] = 0  # right-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        torch.testing.assert_close(got[0, 9:], model(ids[:1, 9:]).logits[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[1, :60], model(ids[1:, :60]).logits[0], rtol=1e-9, atol=1e-9)
        packed_pos = torch.cat([torch.arange(25), torch.arange(45)])[None]
        packed = model(ids[:1], position_ids=packed_pos).logits
        torch.testing.assert_close(packed[0, 25:], model(ids[:1, 25:]).logits[0], rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match="spec"):
        hf_attnops.register("attnops_bad", spec="dense")


def test_sparse_spec_registers_under_its_name():
    from transformers import AutoModelForCausalLM

    spec = attnops.nn.BlockSparseSpec(pattern=lambda sq, sk: attnops.BlockMask.sliding_window((sq, sk), window=16,
                                                                                            block_size=16))
    name = hf_attnops.register("attnops_sparse", spec)
    model = AutoModelForCausalLM.from_config(_configs()["llama-gqa"], attn_implementation=name).eval()
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert hf_attnops.registered()[name] is spec


@pytest.mark.parametrize("name", ["attnops_sparse", "attnops_moba"])
def test_family_names_register_their_default_spec(name):
    from transformers import AutoModelForCausalLM

    assert hf_attnops.register(name) == name and hf_attnops.registered()[name] is hf_attnops.DEFAULTS[name]
    cfg = _configs()["llama-gqa"]
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=hf_attnops.register()).eval()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
    model.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 97, (1, 60))
    with torch.no_grad():  # 60 tokens: inside the default window / the first MoBA block, so dense
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 63)


def test_linear_family_generates_the_same_with_and_without_the_cache():
    """"attnops_linear" in an unmodified Llama: a cached step runs the recurrence over the cached prefix,
    so greedy generation with the cache equals recomputing the whole prefix at every step."""
    from transformers import AutoModelForCausalLM

    name = hf_attnops.register("attnops_linear")
    assert isinstance(hf_attnops.registered()[name], attnops.nn.LinearAttentionSpec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()["llama-gqa"], attn_implementation=name).eval()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        fresh = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, fresh)
        with attnops.maps.capture(model) as cap:
            model(ids)
    assert len(cap.maps) == model.config.num_hidden_layers


def test_lowrank_key_spec_in_an_unmodified_model():
    """A LowRankKey spec (calibrated on the model's own keys elsewhere; here the raw head dims) as an
    attn_implementation: cached and uncached greedy generation agree (a cached step's queries sit at
    the cache's end, bottom-right), rank = D with every key is the dense model, and maps are captured."""
    from transformers import AutoModelForCausalLM

    cfg = _configs()["llama-gqa"]
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=hf_attnops.register()).eval()
    proj = attnops.lowrank.KeyProjection.identity(2, 16)
    exact = hf_attnops.register("attnops_lowrank_exact", attnops.nn.LowRankKeySpec(proj, rank=16, topk=4096))
    approx = hf_attnops.register("attnops_lowrank", attnops.nn.LowRankKeySpec(proj, rank=4, topk=12, local=4))
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        for name, close in ((exact, True), (approx, False)):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).eval()
            model.load_state_dict(dense.state_dict())
            if close:
                torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
            cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
            fresh = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
            assert torch.equal(cached, fresh)
        with attnops.maps.capture(model) as cap:
            model(ids)
    assert len(cap.maps) == cfg.num_hidden_layers


PACKED_DOCS = [13, 30, 1, 19]


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mqa"])
def test_packed_rows_equal_each_document_alone(name, how):
    """DataCollatorWithFlattening's batch: documents packed in one row, marked by position_ids that restart
    (or by its flash-attention kwargs cu_seq_lens_*). Logits and parameter gradients equal eager run on
    every document alone (the accuracy rule; float64 eager is the truth)."""
    ref, ours, low = _models(name)
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, sum(PACKED_DOCS)))
    pos = torch.cat([torch.arange(n) for n in PACKED_DOCS])[None]
    cu = torch.tensor([0, *PACKED_DOCS]).cumsum(0).to(torch.int32)
    extra = dict(position_ids=pos)
    if how == "cu_seq_lens":
        extra.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(PACKED_DOCS), max_length_k=max(PACKED_DOCS))
    weight = torch.randn(1, sum(PACKED_DOCS), 97, dtype=torch.float64)

    def alone(model):
        outs = [model(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs, dim=1)

    results = []
    for model, run in ((ours, lambda m: m(ids, **extra).logits), (ref, alone), (low, alone)):
        model.zero_grad()
        logits = run(model)
        (logits * weight.to(logits.dtype)).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (got, g_got), (want, g_want), (yard, g_yard) = results
    assert_accurate(f"{name} {how} logits", got, want, yard)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.embed_tokens.weight"):
        assert_accurate(f"{name} {how} grad {n}", g_got[n], g_want[n], g_yard[n])


def test_packed_rows_under_torch_compile():
    """Traced, transformers always builds its packed-sequence mask (whether a row restarts is data); the adapter
    likewise always sends position_ids' document ids (one document when none restarts). It skipped them while
    tracing, and a compiled forward over packed rows attended across documents: 0.49 off eager."""
    ref, ours, low = _models("llama-gqa")
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (1, sum(PACKED_DOCS)))
    pos = torch.cat([torch.arange(n) for n in PACKED_DOCS])[None]
    cu = torch.tensor([0, *PACKED_DOCS]).cumsum(0).tolist()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    got = compiled(ids, position_ids=pos, use_cache=False).logits
    want = torch.cat([ref(ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:])], dim=1)
    yard = torch.cat([low(ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:])], dim=1)
    assert_accurate("compiled packed logits", got, want, yard)
    one = torch.arange(ids.shape[1])[None]  # no restart: the one-document ids change nothing
    assert_accurate("compiled unpacked logits", compiled(ids, position_ids=one, use_cache=False).logits,
                    ref(ids).logits, low(ids).logits)


def test_left_padded_windowed_rows_under_torch_compile():
    """Traced, the document ids always go: a left-padded batch's position_ids (generate's: 0 under the padding, then
    restarting at the first real token) must count as one document, the padding mask hiding the rest; with a
    sliding window (Mistral), against eager on the real tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=5)
    ref, ours = _eager_and_ours(MistralForCausalLM, cfg)
    ids = torch.randint(1, 97, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="eager")
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        got = compiled(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


AUTO_REGISTER = """
import copy, sys
{first}
import torch
assert "transformers" not in sys.modules or {transformers_first}  # import attnops does not load transformers
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.5)
torch.manual_seed(0)
ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnops")  # no register() call
ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
ref.load_state_dict(ours.state_dict())
lin = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnops_linear")
lin.load_state_dict(ours.state_dict())
x = torch.randint(0, 64, (2, 40))
assert ours.config._attn_implementation == "attnops"
diff = (ours(x).logits - ref(x).logits).abs().max().item()
assert diff < 1e-4, diff
assert (lin(x).logits - ref(x).logits).abs().max().item() > 1e-2  # the family names reach their own specs
import attnops.integrations.transformers as hf
assert sorted(hf.registered()) == sorted(hf.DEFAULTS)
print("ok")
"""


@pytest.mark.parametrize("order", ["attnops_first", "transformers_first"])
def test_attn_implementation_works_without_register(order):
    """attn_implementation="attnops" (and the family names) work after ``import attnops`` alone, whether
    transformers' modeling code loads after attnops (a post-import hook) or before it: transformers checks
    the name before any attnops code runs, so there is no "before register()" state to explain."""
    import subprocess
    import sys

    first = "import attnops" if order == "attnops_first" else "import transformers.modeling_utils\nimport attnops"
    code = AUTO_REGISTER.format(first=first, transformers_first=order == "transformers_first")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
