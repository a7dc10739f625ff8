"""Every causal LM, masked LM (encoder), encoder-decoder LM, speech-to-text model and other text model (AutoModel: text
encoders, embedding models, language towers) of the pinned transformers whose attention dispatches to a registered
attention function, built tiny from its own config class (random weights, nothing downloaded) and run with attnops
registered, against transformers' own path: SDPA in float64 where the model has one (exact to rounding; eager's
softmax runs in float32 even for float64 inputs), eager in float32 otherwise. Causal LMs: a left-padded batch and an
unpadded row, then cached greedy generation; masked LMs: a right-padded and a left-padded batch (bidirectional
masks); encoder-decoders: the encoder right- and left-padded, the decoder padded too, no mask at all, then cached
generation with and without a mask; speech-to-text: padded audio, a padded decoder, no mask, then cached generation;
other text models: right- and left-padded; logits (last hidden states) on the real tokens. Each forward must reach
attnops. Then one training step on a right-padded batch: the loss and every parameter's gradient. Image classifiers
(AutoModelForImageClassification): two random images (SigLIP 2: patch sequences, one padded), logits and a step.

The configs keep what makes each family's attention its own and cut the sizes: a sliding window of 12 and chunks of 8
on 30 tokens, GQA (4 heads, 2 kv heads), a sparse-attention indexer choosing 8 keys (DeepSeek V3.2 and kin). The
sweeps this came from found, in models with no test of their own, what the adapter dropped or broke: Gemma 4's
512-wide heads (refused), Gemma 4's KV-shared layers (IndexError), Phimoe's window (dropped, 0.14 off), DeepSeek
V3.2's indexer (IndexError, then its chosen keys refused), Doge (IndexError), DeepSeek V4's compressed-KV bias (0.43
off, silently); then, once models were chosen by what they dispatch rather than by transformers'
_supports_attention_backend flag (which BART, Whisper, StableLM, Jamba, Qwen3.5 and some thirty others leave False
while calling attnops): every BART / T5 / Marian / Pegasus / M2M-100 decoder's cross-attention on an unmasked batch
(keys cut to the query count, 0.2 off, silently), BigBird-Pegasus's and Pegasus-X's decoders (bidirectional: their
layers say is_causal=False; 0.18 / 0.06 off, silently), NLLB-MoE and BigBird-Pegasus's encoder (RuntimeError: they
read the 4-d mask), Qwen4-Exp's indexer on a static cache (IndexError), Inkling 2's per-query sinks (refused),
Moonshine's padded decoder (its layers send is_causal=False whenever a mask is given: bidirectional, 0.53 off,
silently), Splinter's encoder (its layers have no is_causal: causal, 0.03 off, silently), GLM-4V-MoE's 3-d rotary
positions read as packed rows (RuntimeError on a padded batch). A model type a transformers upgrade adds is run at
once if its tiny config builds; otherwise the coverage test fails until NOT_RUN names it with a reason.
"""

import copy
import functools
import inspect
import warnings
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnops.integrations import transformers as hf_attnops  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=256, moe_intermediate_size=32, num_experts=4, num_local_experts=4,
             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=32,
             n_embd=64, n_layer=2, n_head=4, n_inner=96, d_model=64, vocab_size=128, n_positions=256, num_heads=4,
             ffn_hidden_size=96, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
             v_head_dim=16, first_k_dense_replace=1, topk_group=1, n_group=1, sliding_window=12, num_kv_heads=2,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
             moe_num_experts=4, moe_topk=2, expert_intermediate_size=32, attention_chunk_size=8, index_topk=8,
             local_attention=8,
             # encoder-decoders (BART's names, T5's)
             encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=96, decoder_ffn_dim=96, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
             encoder_sparse_step=1, decoder_sparse_step=1, relative_attention_num_buckets=8,
             # MoE routing and hybrid layouts (Kimi Linear, Bailing; Jamba, Bamba: an attention layer in two)
             num_experts_per_token=2, num_expert_group=1, attn_layer_period=2, attn_layer_offset=1,
             attn_layer_indices=[1],
             # Qwen4-Exp's QSA indexer: 8 keys in blocks of 4
             indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
             # speech-to-text (Whisper's names, Speech2Text's)
             num_mel_bins=16, max_source_positions=16, max_target_positions=64, input_feat_per_channel=16,
             conv_channels=32)

# Causal LMs of transformers 5.23 that this test does not run, and why. The ones without the attention-function
# interface (transformers refuses any attn_implementation but its own there) are found by the coverage test itself.
NOT_RUN = {
    "cohere_compass_text": "its config cannot be built at these sizes (KeyError 'full_attention')",
    "dbrx": "its config class cannot be built with these sizes (DbrxAttentionConfig has no rope_theta)",
    "dots3_note": "a multimodal wrapper whose config has no pad_token_id; dots3_note_text is run",
    "emu3": "a multimodal wrapper whose config has no pad_token_id",
    "ernie4_5_moe": "its tiny MoE config routes out of range (selected index k out of range) on every implementation",
    "gemma3": "a multimodal wrapper (SigLIP vision tower, 400M parameters at its default sizes); gemma3_text is run",
    "gemma3n": "a multimodal wrapper that needs timm; gemma3n_text is run",
    "gemma4": "a multimodal wrapper; gemma4_text is run",
    "blt": "its nested patcher / encoder / decoder configs are not cut by these sizes (24 GB at their defaults)",
    "git": "a multimodal wrapper (vision tower) over 50M parameters at its default sizes",
    "qwen3_5": "a multimodal wrapper whose config has no vocab_size; qwen3_5_text is run",
    "qwen3_5_moe": "a multimodal wrapper whose config has no vocab_size; qwen3_5_moe_text is run",
    "qwen4_exp": "a multimodal wrapper whose config has no vocab_size; qwen4_exp_text is run",
    "gemma4_assistant": "its config validation rejects the sizes (hidden_size_per_layer_input must be 0)",
    "gemma4_unified": "a multimodal wrapper; gemma4_unified_text is run",
    "gemma4_unified_assistant": "its layer types cannot be cut to two layers (KV-sharing producers and users differ)",
    "granitemoehybrid": "a hybrid whose two-layer cut keeps no attention layer in the cache",
    "llama4": "a multimodal wrapper; llama4_text is run (and tests/nn/test_transformers_integration.py)",
    "lfm2_moe": "its tiny config leaves a required list None",
    "mllama": "a multimodal wrapper (vision tower)",
    "moss_transcribe_diarize": "an audio model over 50M parameters at its default sizes",
    "musicgen": "an audio model with two text configs",
    "musicgen_melody": "an audio model with two text configs",
    "phi4_multimodal": "a multimodal wrapper over 50M parameters at its default sizes; phi3 is run",
    "fuyu": "a multimodal wrapper over 50M parameters at its default sizes",
    "got_ocr2": "a multimodal wrapper (vision tower) over 50M parameters at its default sizes",
    "longcat_flash": "over 50M parameters at its default sizes",
    "recurrent_gemma": "a hybrid whose two-layer cut keeps no attention layer in the cache",
    "xmod": "needs a language set before a forward",
    "zamba": "its layer types cannot be cut to two layers",
    "zamba2": "its layer types cannot be cut to two layers",
    "zaya": "its config validation rejects two experts per token",
    "mamba2": "no attention (its config validation rejects the sizes besides)",
}


# Masked LMs (encoders) of transformers 5.23 with the attention-function interface that this test does not run.
NOT_RUN_MASKED = {
    "esm": "its tiny config has no pad token, which its mask needs",
    "esmc": "its config validation rejects grouped-query attention",
    "mobilebert": "its sizes are tied to its default hidden size (a negative dim at 64)",
    "modernvbert": "a multimodal wrapper over 50M parameters at its default sizes; modernbert is run",
    "ultravbert": "a multimodal wrapper (vision tower)",
    "xmod": "needs a language set before a forward",
}


# Encoder-decoder LMs of transformers 5.23 whose attention dispatches to a registered function that this test does not
# run. T5Gemma has its own test in tests/nn/test_transformers_integration.py.
_AUDIO_LLM = "an audio-language wrapper (audio encoder + LLM) over 50M parameters at its default sizes"
NOT_RUN_SEQ2SEQ = {
    "audioflamingo3": _AUDIO_LLM, "glmasr": _AUDIO_LLM, "granite_speech": _AUDIO_LLM, "granite_speech_plus": _AUDIO_LLM,
    "moss_transcribe_diarize": _AUDIO_LLM, "musicflamingo": _AUDIO_LLM, "nemo_speechlm": _AUDIO_LLM,
    "qwen2_audio": _AUDIO_LLM, "qwen3_asr": _AUDIO_LLM, "vibevoice_asr": _AUDIO_LLM, "voxtral": _AUDIO_LLM,
    "voxtral_realtime": _AUDIO_LLM,
    "t5gemma": "nested encoder / decoder configs not cut by these sizes (test_transformers_integration.py runs it)",
    "t5gemma2": "a multimodal wrapper (vision tower) whose nested configs are not cut by these sizes",
}


# Speech-to-text encoder-decoders of transformers 5.23 whose attention dispatches to a registered function that this
# test does not run.
NOT_RUN_SPEECH = {
    "canary": "its config validation rejects the cut vocabulary (the decoder's must match the model's)",
    "cohere_asr": _AUDIO_LLM, "dia": "a text-to-speech model over 50M parameters at its default sizes",
    "fun_asr_nano": _AUDIO_LLM, "granite_speech": _AUDIO_LLM, "granite_speech_plus": _AUDIO_LLM,
    "kyutai_speech_to_text": "its tiny config's padding index lies outside the cut vocabulary",
    "moonshine_streaming": "its config class has no num_key_value_heads at these sizes; moonshine is run",
    "pop2piano": "a MIDI model that takes input_ids, not audio",
    "qwen3_asr": _AUDIO_LLM,
    "seamless_m4t": "its speech encoder stacks feature frames (160 inputs from 80 bins), which these inputs do not",
    "seamless_m4t_v2": "its speech encoder stacks feature frames (160 inputs from 80 bins), which these inputs do not",
    "vibevoice": _AUDIO_LLM, "vibevoice_asr": _AUDIO_LLM, "voxtral": _AUDIO_LLM, "voxtral_realtime": _AUDIO_LLM,
}

# Text models with no head in the kinds above (AutoModel: text encoders, embedding models, towers of multimodal models)
# whose attention dispatches to a registered function, that this test does not run.
_DUAL = "a dual encoder whose forward needs images or audio beside the text"
NOT_RUN_BASE = {
    "aimv2": _DUAL, "align": _DUAL, "altclip": _DUAL,
    "bridgetower": _DUAL, "chinese_clip": _DUAL, "clap": _DUAL, "clip": _DUAL, "clipseg": _DUAL,
    "csm": "a speech model whose nested depth decoder config is not cut by these sizes",
    "embedding_gemma2": "a multimodal wrapper over 50M parameters at its default sizes; embedding_gemma2_text is run",
    "glm5_next_text": "its config validation rejects the cut indexer (index_topk must divide by index_kpool)",
    "glm_image": "a multimodal wrapper over 50M parameters at its default sizes", "metaclip_2": _DUAL,
    "gradium_phonon_tts": "a text-to-speech model whose flow head config is not cut by these sizes",
    "pocket_tts": "a text-to-speech model whose flow head config is not cut by these sizes",
    "owlv2": _DUAL, "owlvit": _DUAL, "pe_audio": _DUAL, "pe_audio_video": _DUAL, "pe_video": _DUAL,
    "siglip": _DUAL, "siglip2": _DUAL, "tipsv2": _DUAL, "xclip": _DUAL,
    "t5gemma2_encoder": "its text config lacks dropout_rate at these sizes (t5gemma2 is named in NOT_RUN_SEQ2SEQ)",
}

KINDS = ("causal", "masked", "seq2seq", "speech", "base")


def _auto_class(kind: str):
    return getattr(transformers, {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM",
                                  "seq2seq": "AutoModelForSeq2SeqLM", "speech": "AutoModelForSpeechSeq2Seq",
                                  "base": "AutoModel"}[kind])


@functools.lru_cache(maxsize=None)  # base's costs 5 s (a class per model type): collection and coverage share it
def _model_types(kind: str = "causal") -> tuple:
    # (BERT-like model types are in both causal and masked: their causal LM runs them as decoders, the masked LM as the
    # encoders they are; BART-like ones in causal and seq2seq: their causal LM is the decoder alone)
    types = tuple(sorted(_auto_class(kind)._model_mapping._model_mapping))
    if kind != "base":
        return types
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    # base: the text models of no other kind (vision-language wrappers have their own tests), found by the class their
    # default config maps to (these sizes do not build every vision config)
    other = set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES).union(*(_model_types(k) for k in KINDS[:-1]))
    return tuple(t for t in types if t not in other and _text_model(t))


def _text_model(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = _model_class(CONFIG_MAPPING[model_type](), "base")
            # (vision towers keep the default main_input_name; their forward says what they take)
            return cls.main_input_name == "input_ids" and "input_ids" in inspect.signature(cls.forward).parameters
    except Exception:  # noqa: BLE001 - a default config that does not build, a backend not installed (torchaudio)
        return False


def _tiny_config(model_type: str, kind: str = "causal"):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    kw = {k: v for k, v in SIZES.items() if k in defaults}
    if "kv_lora_rank" in defaults or "qk_nope_head_dim" in defaults:  # latent attention: as many kv heads as heads
        kw.pop("head_dim", None)
        kw["num_key_value_heads"] = 4
    rope = defaults.get("rope_parameters")
    if "mrope_section" in getattr(config_class, "ignore_keys_at_rope_validation", ()) and isinstance(rope, dict):
        # 3-d rotary sections (Qwen2-VL, GLM-4V text models) that fit the cut head dim's rotary half
        half = int(16 * rope.get("partial_rotary_factor", 1.0)) // 2
        first = max(1, half // 4)
        second = (half - first) // 2
        kw["rope_parameters"] = dict(rope, mrope_section=[first, second, half - first - second])
    if "attention_types" in defaults:  # GPT-Neo: a global and a local (windowed) layer
        kw["attention_types"], kw["window_size"] = [[["global", "local"], 1]], 12
    if "num_kv_shared_layers" in defaults:
        kw["num_kv_shared_layers"] = 0
    if "is_decoder" in defaults and kind == "causal":  # BERT-like types as the decoders their causal LM class expects
        kw["is_decoder"] = True
    if "vocab_size_per_layer_input" in defaults:
        kw["vocab_size_per_layer_input"] = 128
    if defaults.get("hidden_size_per_layer_input"):
        kw["hidden_size_per_layer_input"] = 16
    if defaults.get("layer_types"):  # two or three layers, the attention kinds first (a sliding and a full one)
        kinds = list(dict.fromkeys(defaults["layer_types"]))
        attention = [kind for kind in kinds if "attention" in str(kind)]
        keep = (attention + [kind for kind in kinds if kind not in attention])[:3 if len(attention) >= 2 else 2]
        while len(keep) < 2:
            keep.append(keep[0])
        kw["layer_types"], kw["num_hidden_layers"] = keep, len(keep)
    config = config_class(**kw)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= 128:
            setattr(config, name, 0)
    if kind in ("seq2seq", "speech") and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = 0  # T5's config leaves it to its generation config
    _no_dropout(config)
    return config


def _no_dropout(config) -> None:
    """Every dropout probability of ``config`` (and its text / encoder / decoder parts) set to 0, so that the training
    check compares deterministic steps (attnops' attention dropout has its own tests)."""
    for name, value in config.to_dict().items():
        if isinstance(value, float) and any(word in name for word in ("dropout", "pdrop", "drop_path", "layerdrop")):
            setattr(config, name, 0.0)
    for part in ("text_config", "encoder", "decoder"):
        if isinstance(getattr(config, part, None), transformers.PretrainedConfig):
            _no_dropout(getattr(config, part))


def _model_class(config, kind: str = "causal"):
    cls = _auto_class(kind)._model_mapping[type(config)]
    return cls[0] if isinstance(cls, (list, tuple)) else cls


def _parameters(cls, config) -> int:
    """The parameter count of ``cls`` built from ``config``, on the meta device (no memory); 0 where that build fails
    (the real one then reports why)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in cls._from_config(copy.deepcopy(config)).parameters())
    except Exception:  # noqa: BLE001
        return 0


def _build(cls, config, implementation, dtype):
    try:
        model = cls._from_config(copy.deepcopy(config), attn_implementation=implementation,
                                 experts_implementation="eager")
    except (TypeError, ValueError):  # a model without experts
        model = cls._from_config(copy.deepcopy(config), attn_implementation=implementation)
    return model.to(dtype).eval()


def _runnable(kind: str = "causal"):
    out = []
    for model_type in _model_types(kind):
        if model_type in NOT_RUN_BY_KIND[kind]:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = _model_class(_tiny_config(model_type, kind), kind)
        except Exception:  # noqa: BLE001 - the coverage test names what cannot be built
            continue
        if _dispatches(cls):
            out.append(model_type)
    return out


def _dispatches(cls) -> bool:
    """Whether ``cls`` runs a registered attention function: its modeling module looks its attention up in
    ``ALL_ATTENTION_FUNCTIONS``. transformers' ``_supports_attention_backend`` flag is not the test: BART, Whisper,
    BigBird-Pegasus, StableLM, Jamba, Qwen3.5 and some thirty others leave it False and still call whatever
    ``attn_implementation`` names (transformers accepts any registered name for any model)."""
    import sys

    if getattr(cls, "_supports_attention_backend", False):
        return True
    with open(sys.modules[cls.__module__].__file__, encoding="utf-8") as f:
        return "ALL_ATTENTION_FUNCTIONS" in f.read()


NOT_RUN_BY_KIND = {"causal": NOT_RUN, "masked": NOT_RUN_MASKED, "seq2seq": NOT_RUN_SEQ2SEQ, "speech": NOT_RUN_SPEECH,
                   "base": NOT_RUN_BASE}
RUN = {kind: _runnable(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_with_an_attention_backend_is_run_or_named(kind):
    """A model of ``kind`` whose attention dispatches to a registered function is either run (``RUN[kind]``) or named
    in ``NOT_RUN_BY_KIND[kind]`` with a reason; those name only model types of this transformers."""
    types = set(_model_types(kind))
    run, named = RUN[kind], NOT_RUN_BY_KIND[kind]
    assert set(named) <= types, sorted(set(named) - types)
    unexplained = []
    for model_type in sorted(types - set(run) - set(named)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = _model_class(_tiny_config(model_type, kind), kind)
        except Exception as e:  # noqa: BLE001
            unexplained.append(f"{model_type}: {type(e).__name__}: {str(e)[:120]}")
            continue
        assert not _dispatches(cls), model_type
    assert not unexplained, "\n".join(unexplained)
    assert len(run) >= {"causal": 120, "masked": 20, "seq2seq": 15, "speech": 3, "base": 10}[kind], len(run)


@pytest.mark.parametrize("kind, model_type", [(kind, m) for kind in KINDS for m in RUN[kind]],
                         ids=[f"{kind}-{m}" for kind in KINDS for m in RUN[kind]])
def test_model_matches_transformers(kind, model_type):
    _check(model_type, kind)


def _check(model_type: str, kind: str):
    """Logits of ``model_type``'s ``kind`` of model with attnops against transformers' own path, on the real tokens
    of each batch below, then cached greedy generation (causal and seq2seq)."""
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, cls, reference, dtype = _reference(model_type, kind)
        if _parameters(cls, config) > 50e6:  # counted on the meta device: a model that its config leaves big is
            # not built (a new model type runs here at once, and BLT's default sizes took 24 GB)
            pytest.fail(f"{model_type}: the tiny config has over 50M parameters; name it in NOT_RUN")
        torch.manual_seed(0)
        ref = _build(cls, config, reference, dtype)
        ours = _build(cls, config, hf_attnops.register(), dtype)
        ours.load_state_dict(ref.state_dict())
        ids, mask = _tokens()
        # float64 against SDPA: rounding; float32 against eager: each side's float32 rounding (a dropped window, sink
        # or mask is 1e-2 or more)
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        if kind == "speech":
            ids, mask = _audio(ref, config, dtype)
        with torch.no_grad():
            for what, inputs in _batches(kind, ids, mask):
                want = _output(ref(**inputs))
                with mock.patch.object(hf_attnops, "_check_call", wraps=hf_attnops._check_call) as calls:
                    got = _output(ours(**inputs))
                assert calls.call_count, f"{model_type}: attnops never ran (the model's attention does not dispatch)"
                real = _real(kind, inputs, got)
                scale = max(1.0, float(want[real].abs().max()))
                err = float((got - want)[real].abs().max())
                assert err <= tol * scale, (f"{model_type} ({cls.__name__}) against {reference} in {dtype}, {what}: "
                                            f"{err:.3e}")
        _check_training(model_type, kind, ref, ours, ids, mask, dtype)
        with torch.no_grad():
            if kind == "speech":
                _check_generation(model_type, ref, ours, dict(ids, attention_mask=mask), tol)
            elif kind in ("causal", "seq2seq"):
                _check_generation(model_type, ref, ours, dict(input_ids=ids, attention_mask=mask), tol)
                if kind == "seq2seq":  # no mask at all: one sentence to translate (cross-attention's unmasked form)
                    _check_generation(model_type, ref, ours, dict(input_ids=ids[:1]), tol)


# One model of each path the adapter takes, in bfloat16 (dense: an MoE's routing can flip on a rounding and move a
# logit far, which says nothing of the attention): GQA, a window, softcap with windows, sinks, a bidirectional window,
# padding in an encoder, T5's position bias and BART's cross-attention, each on its padded batches.
BF16_MODELS = [("llama", "causal"), ("mistral", "causal"), ("gemma2", "causal"), ("gemma3_text", "causal"),
               ("qwen2", "causal"), ("modernbert", "masked"), ("bert", "masked"), ("t5", "seq2seq"),
               ("bart", "seq2seq"), ("whisper", "speech")]


@pytest.mark.parametrize("model_type, kind", BF16_MODELS, ids=[m for m, _ in BF16_MODELS])
def test_bfloat16_is_as_accurate_as_transformers(model_type, kind):
    """The accuracy rule of DESIGN.md on whole models: attnops in bfloat16 against the exact reference (SDPA in
    float64; eager in float32 where there is no SDPA path: Gemma 2's eager path gives NaN in float64) errs at most twice
    as much as transformers' own path in bfloat16 (plus 1e-3 of the largest logit: both errors are a few bf16 ulps of
    logits below 1), on the real tokens of each batch of the kind."""
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, cls, reference, dtype = _reference(model_type, kind)
        torch.manual_seed(0)
        exact = _build(cls, config, reference, dtype)
        with torch.no_grad():  # scores of a few units (random weights give ~0.05: near-uniform rows, which any error
            for name, param in exact.named_parameters():  # in the attention barely moves)
                if name.endswith(("q_proj.weight", "query.weight", ".q.weight", "Wqkv.weight")):
                    param.mul_(12.0)
        low, ours = (_build(cls, config, impl, torch.bfloat16) for impl in (reference, hf_attnops.register()))
        for model in (low, ours):
            model.load_state_dict(exact.state_dict())
        ids, mask = _tokens()
        if kind == "speech":
            ids, mask = _audio(exact, config, next(exact.parameters()).dtype)
        with torch.no_grad():
            for what, inputs in _batches(kind, ids, mask):
                half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
                want = _output(exact(**inputs))
                base, got = (_output(m(**half)).double() for m in (low, ours))
                real = _real(kind, inputs, got)
                err, err_base = (float((x - want)[real].abs().max()) for x in (got, base))
                slack = 1e-3 * max(1.0, float(want[real].abs().max()))
                assert err <= 2 * err_base + slack, f"{model_type} bf16, {what}: {err:.3e} against {err_base:.3e}"


def _check_training(model_type: str, kind: str, ref, ours, ids, mask, dtype) -> None:
    """One training step's loss and every parameter's gradient, against the reference (dropout 0, the same seed for
    any other randomness: router jitter). Right-padded batches: a left-padded row's padding queries see no key, which
    attnops (and SDPA with a bool mask) answers with zeros and eager with a uniform average, and transformers' loss
    reads the last padding position's logits (they predict the first real token): that term is the convention's, not
    an error. Gradients within 1e-9 (float64) or 1e-4 (float32) of each parameter's largest; those below 1e-6 of the
    largest gradient overall (a key bias's: zero but for rounding) are not compared."""
    dec = torch.randint(3, 120, (3, 11), generator=torch.Generator().manual_seed(3))
    if kind in ("causal", "masked", "base"):
        right = mask.flip(-1)
        inputs = dict(input_ids=ids, attention_mask=right, labels=ids.masked_fill(right == 0, -100))
        if kind == "base":  # no head, no labels: the mean square of the real tokens' outputs
            inputs.pop("labels")
    elif kind == "seq2seq":
        inputs = dict(input_ids=ids, attention_mask=mask.flip(-1), decoder_input_ids=dec, labels=dec)
    else:
        inputs = dict(ids, attention_mask=mask, decoder_input_ids=dec, labels=dec)
    _check_step(model_type, ref, ours, dtype, lambda model: model(**inputs).loss if kind != "base" else
                _output(model(**inputs))[right.bool()].square().mean())


def _check_step(model_type: str, ref, ours, dtype, loss_of) -> None:
    """``loss_of(model)`` and every parameter's gradient after its backward, ``ours`` against ``ref`` (the tolerances
    of :func:`_check_training`)."""
    steps, losses = [], []
    for model in (ref, ours):
        model.train().zero_grad()
        torch.manual_seed(5)
        loss = loss_of(model)
        loss.backward()
        losses.append(float(loss))
        steps.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        model.eval()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert abs(losses[1] - losses[0]) <= tol * max(1.0, abs(losses[0])), f"{model_type} training loss: {losses}"
    want, got = steps
    assert set(want) == set(got), f"{model_type}: gradients of {sorted(set(want) ^ set(got))[:4]} on one side only"
    top = max(float(g.abs().max()) for g in want.values())
    for name, g in want.items():
        scale = float(g.abs().max())
        if scale > 1e-6 * top:
            err = float((got[name] - g).abs().max())
            assert err <= tol * scale, f"{model_type} training: d{name} {err:.3e} (largest {scale:.3e})"


def _output(result) -> torch.Tensor:
    """The logits of a model with a head, else its first output (the last hidden state)."""
    return result.logits if getattr(result, "logits", None) is not None else result[0]


def _audio(model, config, dtype):
    """Three random clips in the form ``model`` takes, and their padding mask over time (two clips cut short):
    log-mel features (B, bins, frames) for Whisper (which needs 2 * max_source_positions frames), (B, frames,
    features) for Speech2Text, raw samples (B, 4000) for Moonshine."""
    gen = torch.Generator().manual_seed(1)
    if model.main_input_name == "input_values":
        inputs, frames = dict(input_values=torch.randn(3, 4000, generator=gen, dtype=dtype)), 4000
    elif config.model_type == "whisper":
        frames = 2 * config.max_source_positions
        inputs = dict(input_features=torch.randn(3, config.num_mel_bins, frames, generator=gen, dtype=dtype))
    else:
        features, frames = config.input_feat_per_channel * config.input_channels, 48
        inputs = dict(input_features=torch.randn(3, frames, features, generator=gen, dtype=dtype))
    mask = torch.ones(3, frames, dtype=torch.long)
    mask[1, frames * 3 // 5:] = 0
    mask[2, frames * 6 // 7:] = 0
    return inputs, mask


def _reference(model_type: str, kind: str):
    """``(config, class, reference implementation, its dtype)``: SDPA in float64 where the model has it, eager in
    float32 otherwise."""
    config = _tiny_config(model_type, kind)
    cls = _model_class(config, kind)
    reference = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    return config, cls, reference, torch.float64 if reference == "sdpa" else torch.float32


def _tokens():
    """``ids (3, 30)`` and a mask with rows 1 and 2 left-padded by 8 and 3."""
    ids = torch.randint(3, 120, (3, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    mask[2, :3] = 0
    return ids, mask


def _real(kind: str, inputs: dict, out: torch.Tensor) -> torch.Tensor:
    """The positions of ``out (B, S, ...)`` compared: the decoder's or the tokens' real ones, all of them where the
    output has no mask of its own (a decoder without one, a speech model's tokens)."""
    real = inputs.get("decoder_attention_mask",
                      inputs.get("attention_mask") if kind in ("causal", "masked", "base") else None)
    return torch.ones(out.shape[:2], dtype=torch.bool) if real is None else real.bool()


def _batches(kind: str, ids: torch.Tensor, mask: torch.Tensor):
    """``(what, inputs)`` of the forwards compared: a causal LM left-padded and one whole row; an encoder right- and
    left-padded; an encoder-decoder with its encoder right- and left-padded, its decoder right-padded too, and with no
    mask at all; a speech-to-text model (``ids``, ``mask``: its audio inputs and their padding) with its audio
    padded, its decoder right-padded, and unmasked."""
    if kind == "causal":
        return (("left-padded", dict(input_ids=ids, attention_mask=mask)), ("unpadded", dict(input_ids=ids[:1])))
    if kind in ("masked", "base"):
        return (("right-padded", dict(input_ids=ids, attention_mask=mask.flip(-1))),
                ("left-padded", dict(input_ids=ids, attention_mask=mask)))
    dec = torch.randint(3, 120, (3, 11), generator=torch.Generator().manual_seed(2))
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 7:] = 0
    if kind == "speech":
        return (("audio padded", dict(ids, attention_mask=mask, decoder_input_ids=dec)),
                ("decoder right-padded", dict(ids, decoder_input_ids=dec, decoder_attention_mask=dec_mask)),
                ("unmasked", dict(ids, decoder_input_ids=dec)))
    return (("encoder right-padded", dict(input_ids=ids, attention_mask=mask.flip(-1), decoder_input_ids=dec)),
            ("encoder left-padded", dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)),
            ("both right-padded", dict(input_ids=ids, attention_mask=mask.flip(-1), decoder_input_ids=dec,
                                       decoder_attention_mask=dec_mask)),
            ("unmasked", dict(input_ids=ids, decoder_input_ids=dec)))


# Static-cache generation that attnops refuses, by name, for a model whose reference runs it.
STATIC_REFUSED = {
    "moshi": "generate() builds a full mask beside the model's sliding ones and Moshi's layers send no window",
}


def _check_generation(model_type: str, ref, ours, inputs: dict, tol: float) -> None:
    """Greedy cached generation from ``inputs`` (the left-padded batch), with the default (dynamic) cache and a static
    one (what compiled generation uses): the same tokens, and every step's scores within ``tol``. A static cache the
    reference cannot run is skipped for the model."""
    kw = dict(inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    for cache in ("dynamic", "static"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        try:
            want = ref.generate(**kw, **extra)
        except Exception:  # noqa: BLE001 - the model's own path cannot run it (DeepSeek V4's layer types)
            if cache == "static":
                continue
            raise
        if cache == "static" and model_type in STATIC_REFUSED:
            with pytest.raises(NotImplementedError):
                ours.generate(**kw, **extra)
            continue
        got = ours.generate(**kw, **extra)
        assert torch.equal(got.sequences, want.sequences), f"{model_type}: {cache} cache, tokens differ"
        for step, (a, b) in enumerate(zip(got.scores, want.scores)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"{model_type}: {cache} cache, step {step}"
            err = float((a - b)[finite].abs().max()) if finite.any() else 0.0
            assert err <= tol * max(1.0, float(b[finite].abs().max())), f"{model_type}: {cache} step {step}: {err:.3e}"


# Image classifiers (AutoModelForImageClassification) whose attention dispatches: ViT and kin (DeiT, DINOv2, I-JEPA,
# ViT-MSN), BEiT's relative position bias, Swin's shifted windows with their bias (both reach the attention function as
# float masks), SegFormer's reduced keys, CLIP / SigLIP vision towers. No padding in images: the hard inputs are those
# masks and biases.
VISION_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                    patch_size=8, num_channels=3, encoder_stride=8, head_dim=16, layer_scale_init_value=0.1,
                    use_relative_position_bias=True, projection_dim=32, window_size=4)
NOT_RUN_VISION = {
    "shieldgemma2": "a Gemma 3 wrapper over 50M parameters at its default sizes (Gemma 3 with images: "
                    "test_transformers_integration.py)",
}


@functools.lru_cache(maxsize=None)
def _vision_types() -> tuple:
    return tuple(sorted(transformers.AutoModelForImageClassification._model_mapping._model_mapping))


def _vision_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()

    def cut(values: dict) -> dict:
        kw = {k: v for k, v in VISION_SIZES.items() if k in values and not isinstance(values[k], list)}
        if isinstance(values.get("depths"), list) and isinstance(values.get("num_heads"), list):  # Swin's stages
            kw.update(depths=[1, 1], num_heads=[2, 4], embed_dim=32)
        return kw

    kw = cut(defaults)
    for part in ("vision_config", "text_config"):
        if isinstance(defaults.get(part), dict):
            kw[part] = {**defaults[part], **cut(defaults[part])}
    config = config_class(**kw)
    config.num_labels = 5
    _no_dropout(config)
    return config


def _vision_class(config):
    cls = transformers.AutoModelForImageClassification._model_mapping[type(config)]
    return cls[0] if isinstance(cls, (list, tuple)) else cls


def _vision_runnable():
    out = []
    for model_type in _vision_types():
        if model_type in NOT_RUN_VISION:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = _vision_class(_vision_config(model_type))
        except Exception:  # noqa: BLE001 - the coverage test names what cannot be built
            continue
        if _dispatches(cls):
            out.append(model_type)
    return out


RUN_VISION = _vision_runnable()


def test_every_image_classifier_with_an_attention_backend_is_run_or_named():
    types = set(_vision_types())
    assert set(NOT_RUN_VISION) <= types, sorted(set(NOT_RUN_VISION) - types)
    for model_type in sorted(types - set(RUN_VISION) - set(NOT_RUN_VISION)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls = _vision_class(_vision_config(model_type))
        except Exception as e:  # noqa: BLE001 - a convolutional model whose config these sizes do not fit
            cls = _vision_class(transformers.AutoConfig.for_model(model_type))
            assert not _dispatches(cls), f"{model_type}: {type(e).__name__}: {str(e)[:160]}"
            continue
        assert not _dispatches(cls), model_type
    assert len(RUN_VISION) >= 10, RUN_VISION


@pytest.mark.parametrize("model_type", RUN_VISION)
def test_image_classifier_matches_transformers(model_type):
    """Logits of two random images with attnops against SDPA in float64 (eager in float32 where there is none); each
    forward reaches attnops; then one training step's loss and gradients (labels given)."""
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = _vision_config(model_type)
        cls = _vision_class(config)
        if _parameters(cls, config) > 50e6:
            pytest.fail(f"{model_type}: the tiny config has over 50M parameters; name it in NOT_RUN_VISION")
        reference = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
        dtype = torch.float64 if reference == "sdpa" else torch.float32
        torch.manual_seed(0)
        ref = _build(cls, config, reference, dtype)
        ours = _build(cls, config, hf_attnops.register(), dtype)
        ours.load_state_dict(ref.state_dict())
        inputs = _images(cls, config, dtype)
        with torch.no_grad():
            want = ref(**inputs).logits
            with mock.patch.object(hf_attnops, "_check_call", wraps=hf_attnops._check_call) as calls:
                got = ours(**inputs).logits
        assert calls.call_count, f"{model_type}: attnops never ran"
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        err = float((got - want).abs().max())
        assert err <= tol * max(1.0, float(want.abs().max())), f"{model_type} against {reference}: {err:.3e}"
        labels = torch.tensor([1, 3])
        _check_step(model_type, ref, ours, dtype, lambda model: model(**inputs, labels=labels).loss)


def _images(cls, config, dtype) -> dict:
    """Two random images as ``cls`` takes them: ``pixel_values (2, C, S, S)``, or SigLIP 2's patch sequences (NaFlex:
    ``(2, max_patches, C * P * P)`` with ``spatial_shapes`` and a ``pixel_attention_mask``, the second image 5 x 6
    patches and the rest padding, which the encoder's attention must leave out)."""
    vision = getattr(config, "vision_config", config)
    g = torch.Generator().manual_seed(2)
    if "pixel_attention_mask" in inspect.signature(cls.forward).parameters:
        n, width = vision.num_patches, vision.num_channels * vision.patch_size ** 2
        side = int(n ** 0.5)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, 30:] = 0
        return dict(pixel_values=torch.randn(2, n, width, generator=g).to(dtype), pixel_attention_mask=mask,
                    spatial_shapes=torch.tensor([[side, n // side], [5, 6]]))
    size = getattr(vision, "image_size", 64)
    size = size if isinstance(size, int) else size[0]
    return dict(pixel_values=torch.randn(2, vision.num_channels, size, size, generator=g).to(dtype))
