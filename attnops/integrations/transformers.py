"""Hugging Face transformers: attnops as an ``attn_implementation``.

    import attnops                                          # registers DEFAULTS' names when transformers loads
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnops")   # exact dense attention
    import attnops.integrations.transformers as hf_attnops
    hf_attnops.register("attnops_sparse", attnops.nn.BlockSparseSpec(pattern=...))  # any spec, any name
    model.set_attn_implementation("attnops")                # or switch an existing model

Unmodified Llama / Qwen2 / Mistral / GPT-2 style models then run their attention through attnops (prefill,
training and cached decoding: the kernels align ``causal`` bottom-right, which is where the new queries of a
cached step sit). Sliding windows (Mistral, Qwen2, Gemma local layers, ModernBERT) are honoured with
flash-attention's convention, gpt-oss's attention sinks (``s_aux``, with their gradient) and Gemma 2's logit
``softcap`` through the kernels' score modifiers, Inkling 2's per-query sinks (``sinks``) from the kernels'
log-sum-exp, T5's ``position_bias`` (with its gradient) and padding / additive masks through ``attn_bias``,
attention dropout in training through the kernels' ``dropout_p``. Everything else a model passes is either
accepted (it cannot change the result) or refused with the argument's name (:data:`REFUSED`: head masks,
``output_attentions``): never silently dropped. Packed rows (``DataCollatorWithFlattening``: ``position_ids``
that restart inside a row, or the ``cu_seq_lens_*`` kwargs) become the kernels' ``document_ids``: each
document attends only itself, exactly. The MoBA and linear specs take padded or packed prefill through their
``cu_seqlens`` form (unpad, run, re-pad, as transformers' flash-attention path does). The mask function
registered beside it (:func:`_layer_mask`) is transformers' flash-attention one where that describes the
layer: no mask for unpadded batches, the 2-d padding mask otherwise (a ``(B, 1, 1, Sk)`` key mask for the
kernels: padded batches cost no ``Sq x Sk`` tensor); Llama 4's chunked layers get their chunks as document ids
in prefill and training (:class:`ChunkedMask`); custom and blockwise patterns, and cached chunked steps, get
transformers' 4-d bool mask.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from attnops.core.checks import additive_mask
from attnops.maps.capture import attend, refuse_uncaptured
from attnops.ops.decode.library import fold_sinks
from attnops.core.masks import BlockMask
from attnops.nn.specs import (SCORE_MOD_SPECS, VARLEN_SPECS, AttentionSpec, BlockSparseSpec, FlowSpec,
                              HyperSpec, LinearAttentionSpec, LLNSpec, MoBASpec, MoHSpec, ReGLASpec, RoutingSpec, SEASpec,
                              SoftmaxSpec,
                              attend_unpadded, resolve_spec)

_SPECS: Dict[str, AttentionSpec] = {}


def streaming_pattern(seq_len_q: int, seq_len_k: int) -> BlockMask:
    """The default of ``"attnops_sparse"``: StreamingLLM's attention sink + local window, causal: the
    first 64 keys and the 1024 keys up to each query (bottom-right aligned, so cached decoding steps
    see the same sink + window)."""
    return BlockMask.sink_local((seq_len_q, seq_len_k), num_sink_blocks=1, num_local_blocks=16, causal=True)


# The spec a family name gets when register() is called without one.
DEFAULTS: Dict[str, AttentionSpec] = {
    "attnops": SoftmaxSpec(),
    "attnops_sparse": BlockSparseSpec(pattern=streaming_pattern),
    "attnops_moba": MoBASpec(block_size=512, topk=3),
    "attnops_moh": MoHSpec(),  # MoH-LLaMA3's router: half the heads shared, a quarter routed by query norm
    "attnops_flow": FlowSpec(),
    "attnops_sea": SEASpec(),  # Performer-estimated block map, 8 key blocks of 64 per query block + the diagonal
    "attnops_lln": LLNSpec(),
    "attnops_hyper": HyperSpec(),  # HyperAttention, the authors' defaults (exact below 4096 tokens)
    "attnops_regla": ReGLASpec(),  # ReGLA, on layers given its gates by linearize()
    "attnops_routing": RoutingSpec(),  # Routing Transformer, 16 clusters, on layers given centroids by attach()
    "attnops_linear": LinearAttentionSpec(feature_map="elu", normalize=True),  # a drop-in without an output norm: normalised
}


# What transformers models pass to an attention function besides q, k, v and the mask, and what this
# adapter does with each: honour it, accept it (it does not change the computation), or refuse it with
# a clear error. An argument outside these lists is refused too unless it is None or False: a model
# must never have something silently dropped.
HONOURED = ("dropout", "scaling", "is_causal", "sliding_window", "deterministic", "s_aux", "softcap", "position_bias",
            "attention_mask", "indices", "sinks")
ACCEPTED = ("position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "output_hidden_states",
            "output_router_logits", "num_items_in_batch", "layer_idx", "position_embeddings")
# Packed rows (DataCollatorWithFlattening): transformers' flash-attention kwargs, or position_ids that restart
# inside a row; both become the kernels' document_ids (softmax specs).
PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
REFUSED = {
    "head_mask": "a head mask is not supported",
    "seq_idx": "packed sequences given as seq_idx are not supported (cu_seq_lens or position_ids are)",
    "output_attentions": "output_attentions needs the full attention weights, which attnops never builds; capture "
                         "block maps with attnops.maps.capture",
}


def _check_call(module, attention_mask, kwargs) -> None:
    """Refuses, with the argument's name, whatever this adapter would otherwise drop."""
    for name, value in kwargs.items():
        if name in ACCEPTED or name in PACKING or value is None or value is False:
            continue
        reason = REFUSED.get(name, "this adapter does not know it, and ignoring it could change the result")
        raise NotImplementedError(f"attnops attention: {name}={_short(value)}: {reason}")


def _selected_keys(attention_mask, indices: torch.Tensor, seq_len_k: int) -> torch.Tensor:
    """DeepSeek sparse attention (DeepSeek V3.2, GLM-5 and their kin): ``indices (B, Sq, topk)``, the keys each query's
    indexer chose, which transformers hands implementations other than eager / SDPA instead of masking them. Applied as
    eager applies them: the model's 4-d mask (the mask function materialises it for these models: they ask for it)
    and-ed with a ``(B, 1, Sq, Sk)`` mask of the chosen keys. Sq x Sk, as the model's own mask already is."""
    if attention_mask is None or attention_mask.dim() != 4:
        raise NotImplementedError("attnops attention: indices (sparse attention's chosen keys) are applied on the "
                                  "model's 4-d mask, and this call has none")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.is_floating_point():
        raise ValueError(f"attnops attention: indices must be an integer (B, Sq, topk) tensor, got {_short(indices)}")
    B, Sq = attention_mask.shape[0], attention_mask.shape[2]
    if indices.shape[:2] != (B, Sq):
        raise ValueError(f"attnops attention: indices {tuple(indices.shape)} do not match the mask's (B, Sq) = "
                         f"{(B, Sq)}")
    idx = indices.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= seq_len_k):
        raise ValueError(f"attnops attention: indices must lie in [0, {seq_len_k}) (the keys)")
    chosen = torch.zeros(B, 1, Sq, seq_len_k, dtype=torch.bool, device=attention_mask.device)
    chosen.scatter_(-1, idx.unsqueeze(1).to(attention_mask.device), True)
    if attention_mask.dtype == torch.bool:
        return attention_mask & chosen
    return attention_mask.masked_fill(~chosen, torch.finfo(attention_mask.dtype).min)


def _document_ids(attention_mask, q_len: int, k_len: int, kwargs) -> Optional[torch.Tensor]:
    """``(B, S)`` document ids of packed rows, or None. From ``cu_seq_lens_q`` / ``_k`` (one packed row, the
    flash-attention kwargs of DataCollatorWithFlattening) or from ``position_ids`` that restart inside a row
    (transformers' own detection for flash attention). Restarts next to padding do not count: left padding
    restarts positions too, and the padding mask already hides it."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
            raise NotImplementedError("attnops attention: cu_seq_lens_q and cu_seq_lens_k must both be given and "
                                      "equal (packed self-attention)")
        if q_len != k_len or int(cu_q[-1]) != q_len:
            raise ValueError(f"attnops attention: cu_seq_lens end at {int(cu_q[-1])}, the packed row has {q_len} "
                             f"queries and {k_len} keys")
        rows = torch.arange(q_len, device=cu_q.device)
        return torch.searchsorted(cu_q[1:].to(torch.int64).contiguous(), rows, right=True)[None]
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3:
        # multimodal rotary positions (3, B, S) (GLM-4V-MoE hands its layers those): no sequence positions, no packing;
        # transformers' packed form (4, B, S) leads with the text positions
        position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] < 2 or q_len < 2:
        return None
    if attention_mask is not None and attention_mask.dim() != 2:
        return None  # a 4-d mask says itself what attends what
    tracing = torch.compiler.is_compiling()
    if tracing and (q_len != k_len or position_ids.shape[-1] != q_len):
        return None  # a cached call: packing is refused below when seen, which needs a host read
    position_ids = position_ids.reshape(-1, position_ids.shape[-1])
    restart = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if attention_mask is not None and attention_mask.shape[-1] == position_ids.shape[-1]:
        real = attention_mask.bool()
        restart = restart & real[:, 1:] & real[:, :-1]
    # Traced, whether a row restarts is a value the graph cannot branch on: the ids always go to the kernels (one
    # document when none restarts), as transformers' own mask does under compile. Skipping them silently attended
    # across the packed documents (0.49 off eager, Llama, compiled training forward).
    if not tracing and not bool(restart.any()):
        return None
    if q_len != k_len or position_ids.shape[-1] != q_len:
        raise NotImplementedError("attnops attention: position_ids restart inside a row (packed sequences) in a "
                                  "call with a cache; packing is supported for prefill and training")
    zero = torch.zeros_like(restart[:, :1], dtype=torch.int64)
    return torch.cat([zero, restart.to(torch.int64).cumsum(1)], dim=1)


def _joined(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Document ids ``(B, S)`` whose runs are the intersections of ``a``'s and ``b``'s (either may be None): a new
    document wherever either starts one (a chunked layer's chunks within packed rows)."""
    if a is None or b is None:
        return a if b is None else b
    a, b = torch.broadcast_tensors(a, b.to(a.device))
    starts = (a[:, 1:] != a[:, :-1]) | (b[:, 1:] != b[:, :-1])
    return torch.cat([torch.zeros_like(a[:, :1]), starts.to(a.dtype).cumsum(dim=1)], dim=1)


def _attn_bias(attention_mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor], seq_len_k: int):
    """What the model adds to the scores, as the kernels' ``attn_bias``: T5's ``position_bias`` (float, its
    gradient flows) plus the mask: a 2-d padding mask ``(B, Sk)`` (the flash-attention mask function's)
    becomes a ``(B, 1, 1, Sk)`` bool key mask, a 4-d bool mask stays a mask, a float one is additive
    (transformers' ``finfo.min`` entries act as -inf). None when there is nothing."""
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 2:
            if mask.shape[-1] != seq_len_k:
                raise ValueError(f"attnops attention: a 2-d attention_mask must be (B, Sk = {seq_len_k}), got "
                                 f"{tuple(mask.shape)}")
            mask = mask.bool()[:, None, None, :]
        elif mask.dim() != 4:
            raise NotImplementedError(f"attnops attention: a {mask.dim()}-d attention_mask is not supported "
                                      "(2-d padding masks and 4-d masks are)")
        elif mask.dtype != torch.bool and not mask.is_floating_point():
            mask = mask.bool()
        if mask.dtype == torch.bool and bool(mask.all()):
            mask = None  # nothing masked: the plain kernels
    if mask is None or position_bias is None:
        return position_bias if mask is None else mask
    if mask.dtype == torch.bool:
        mask = additive_mask(mask, position_bias.dtype)
    return position_bias + mask.to(position_bias.dtype)


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)[:40]


def _is_causal(module: torch.nn.Module, is_causal: Optional[bool], attention_mask: Optional[torch.Tensor]) -> bool:
    """Causality as transformers' own integrations decide it: an explicit ``is_causal`` wins; else the module's
    (``module.is_causal``) with no mask or the 2-d padding mask of the flash-attention mask function registered here
    (it leaves causality to the kernel); with a 4-d mask, none: eager attention adds the mask and nothing else (so does
    the SDPA integration), and a model or user that sends one has put the causal part in it (transformers' own 4-d
    masks) or deliberately left it out (a prefix-LM mask, a custom tree mask). Taking the module's causality on top
    cut the bidirectional prefix of such a mask: Llama logits 0.33 off eager's. A module without ``is_causal`` (BERT-era
    code: Splinter, ALIGN's text encoder) takes the kind of mask its model builds (:func:`_causal_of_masks`)."""
    if is_causal is not None:
        return bool(is_causal)
    if attention_mask is not None and attention_mask.dim() == 4:
        return False
    causal = getattr(module, "is_causal", None)
    return _causal_of_masks(module) if causal is None else bool(causal)


def _causal_of_masks(module: torch.nn.Module) -> bool:
    """Causality of a module that does not say, from the masks its model's config built (noted by the mask function in
    eager calls): only bidirectional ones, an encoder (transformers' integrations default to causal there, which ran
    Splinter's encoder causally: 0.03 off eager, silently); only causal ones or none noted, causal; both, refused."""
    kinds = _MASKS_NOTED.get(id(getattr(module, "config", None)), {}).get("kinds", frozenset())
    if kinds == {"bidirectional"}:
        return False
    if len(kinds) > 1:
        raise NotImplementedError(f"attnops attention: {type(module).__name__} has no is_causal and its model builds "
                                  "causal and bidirectional masks, so attnops cannot tell which this layer uses; set "
                                  "the module's is_causal")
    return True


# A model tells the attention function its window through ``sliding_window``, and the mask function registered here
# hands sliding layers the flash-attention form, which has none. Some models build a sliding-window mask but do not send
# the argument (Phimoe, Qwen2-MoE with use_sliding_window in transformers 5.23; their eager path applies the window
# through the mask): their window came out dropped (Phimoe 0.14 off eager). A call that sends no ``sliding_window``
# takes its layer's (:func:`_unsent_window`), from the module, the config's layer types, or the windows the mask
# function noted per model config (None: a full mask).
_NOT_SENT = object()
# id(config) -> {"windows": the windows its masks were built with (None: none), "kinds": "causal" / "bidirectional"}
_MASKS_NOTED: Dict[int, Dict[str, frozenset]] = {}


def _note_mask(config, kind: str, window=_NOT_SENT) -> None:
    """Records that ``config``'s model built a ``kind`` of mask ("causal" or "bidirectional"), with ``window`` (None:
    none; not given: the mask's local size is not a window, a chunk). Eager calls only (a traced mask function would
    record into the graph); the entry goes with the config."""
    if config is None or torch.compiler.is_compiling():
        return
    key = id(config)
    noted = _MASKS_NOTED.get(key)
    if noted is None:
        try:
            weakref.finalize(config, _MASKS_NOTED.pop, key, None)
        except TypeError:  # not weak-referenceable: nothing to key on safely
            return
        noted = _MASKS_NOTED[key] = {"windows": frozenset(), "kinds": frozenset()}
    noted["kinds"] |= {kind}
    if window is not _NOT_SENT:  # Qwen2-MoE builds a sliding mask of window 0 (admitting no key) that no layer uses
        noted["windows"] |= {window or None}


def _unsent_window(module: torch.nn.Module) -> Optional[int]:
    """The window of a call that sent no ``sliding_window``: the module's own ``sliding_window`` (Qwen2-MoE sets it on
    its sliding layers), else its layer's kind in ``config.layer_types`` (``config.sliding_window`` on a
    "sliding_attention" layer, none on a "full_attention" one), else the one its model's masks were built with, where
    they all had it. A model that builds windowed and full masks and says nothing per layer is refused. What the
    module and its config decide is read once per module (3 us a call otherwise, in a decode step of ~80); the masks'
    windows at every call (each forward notes them before its layers run)."""
    eager = not torch.compiler.is_compiling()
    known = _LAYER_WINDOWS.get(module) if eager else None
    if known is None:
        known = _layer_window(module)
        if eager:
            _LAYER_WINDOWS[module] = known
    decided, window, config_key = known
    if decided:
        return window
    windows = _MASKS_NOTED.get(config_key, {}).get("windows", frozenset())
    sliding = windows - {None}
    if not sliding:
        return None
    if len(windows) > 1:
        raise NotImplementedError(f"attnops attention: {type(module).__name__}'s model builds masks with windows "
                                  f"{sorted(sliding)} and without one, but its attention does not say which it uses "
                                  "(no sliding_window argument); attnops cannot apply the right one")
    return next(iter(sliding))


_LAYER_WINDOWS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _layer_window(module: torch.nn.Module) -> tuple:
    """``(decided, window, config key)`` from the module and its config alone (see :func:`_unsent_window`); the key
    finds the windows its model's masks were built with when the module and config do not decide."""
    config = getattr(module, "config", None)
    if hasattr(module, "sliding_window"):
        return True, getattr(module, "sliding_window") or None, id(config)
    kinds, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if isinstance(kinds, (list, tuple)) and isinstance(index, int) and 0 <= index < len(kinds):
        if kinds[index] == "sliding_attention":
            return True, getattr(config, "sliding_window", None) or None, id(config)
        if kinds[index] == "full_attention":
            return True, None, id(config)
    return False, None, id(config)


def _window(sliding_window, causal: bool):
    """transformers' sliding_window (the window's size, the query included) as the kernels' (left, right):
    flash-attention's convention, ``(w - 1, w - 1)``; the right side is moot under causal."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"attnops attention: sliding_window must be an int >= 1, got {sliding_window!r}")
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


@dataclasses.dataclass(frozen=True)
class ChunkedMask:
    """What the registered mask function hands a chunked layer (Llama 4's ``attention_chunk_size``) in a call whose
    queries are its keys (prefill, training: ``Sq == Sk``, same positions): ``document_ids (B, S)`` int64, the chunk
    of every position as transformers counts it (``(position - left padding) // chunk``), and ``padding (B, S)`` bool
    (True: a real token; None: none padded). The attention function runs it as the kernels' document ids with the
    module's causality and a key mask: nothing ``Sq x Sk`` (transformers' 4-d mask is one byte per pair: 1 GiB a row
    at 32K), and tiles of other chunks are never visited. transformers lets a mask function return its own mask type
    (flex attention's is a ``BlockMask``); this one goes only to the attention function registered beside it."""

    document_ids: torch.Tensor
    padding: Optional[torch.Tensor]

    def contiguous(self) -> "ChunkedMask":
        """generate() makes the masks of a compileable (static) cache contiguous, tensor by tensor."""
        return ChunkedMask(self.document_ids.contiguous(), None if self.padding is None else self.padding.contiguous())


@dataclasses.dataclass(frozen=True)
class BidirectionalWindow:
    """What the registered mask function hands a bidirectional sliding-window layer (an encoder's local attention):
    transformers' window ``w`` (a key within ``|i - j| <= w`` attends) and the 2-d padding mask (None: no padding). The
    attention function runs it as the kernels' window ``(w, w)`` whatever ``sliding_window`` the layer sends (T5Gemma
    sends w, ModernBERT w + 1), over the key mask: nothing ``Sq x Sk``."""

    window: int
    padding: Optional[torch.Tensor]

    def contiguous(self) -> "BidirectionalWindow":
        return self if self.padding is None else BidirectionalWindow(self.window, self.padding.contiguous())


def _is_window(mask_function: Callable, window: int, length: int, device) -> bool:
    """Whether ``mask_function`` is the plain bidirectional window ``|i - j| <= window`` (checked at its edges and
    one past them, for every query of a self-attention call of ``length`` tokens): anything else (overlays, packed
    rows) keeps the 4-d mask."""
    q = torch.arange(length, device=device)
    zero = torch.zeros_like(q)
    inside = mask_function(zero, zero, q, (q - window).clamp(min=0)) & mask_function(zero, zero, q,
                                                                                     (q + window).clamp(max=length - 1))
    left, right = q - window - 1, q + window + 1
    outside = (mask_function(zero, zero, q, left.clamp(min=0)) & (left >= 0)) | \
              (mask_function(zero, zero, q, right.clamp(max=length - 1)) & (right < length))
    return bool(inside.all()) and not bool(outside.any())


def _chunked_mask(batch_size: int, length: int, offset: int, chunk: int, mask_function: Callable,
                  attention_mask: Optional[torch.Tensor], device) -> Optional[ChunkedMask]:
    """The :class:`ChunkedMask` of a chunked layer's self-attention call, or None where ``mask_function`` is not the
    plain chunked causal one (packed rows remap positions per document; overlays): each row's allowed keys are checked
    against ``mask_function`` at both edges of the predicted interval ``[chunk start, query]`` and one past each, so
    a pattern this form would not reproduce falls back to the 4-d mask instead of being approximated."""
    pos = torch.arange(offset, offset + length, device=device)
    if attention_mask is not None:  # transformers' count: positions before the first real token
        left = (attention_mask.cumsum(dim=-1) == 0).sum(dim=-1).to(device)
    else:
        left = torch.zeros(batch_size, dtype=torch.int64, device=device)
    ids = torch.div(pos[None, :] - left[:, None], chunk, rounding_mode="floor")
    q = pos[None, :].expand(batch_size, length)
    b = torch.arange(batch_size, device=device)[:, None].expand(batch_size, length)
    h = torch.zeros_like(b)
    start = (left[:, None] + ids * chunk).clamp(min=offset)  # the first key of each query's chunk in this call
    end = offset + length
    allowed = mask_function(b, h, q, start) & mask_function(b, h, q, q)
    before = mask_function(b, h, q, (start - 1).clamp(min=offset)) & (start > offset)
    after = mask_function(b, h, q, (q + 1).clamp(max=end - 1)) & (q + 1 < end)
    if not bool(allowed.all()) or bool(before.any()) or bool(after.any()):
        return None
    padding = None
    if attention_mask is not None:
        padding = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if bool(padding.all()):
            padding = None
    return ChunkedMask(ids, padding)


# Models written for eager's float 4-d mask, which get it (transformers' eager_mask): each of them read the flash form
# wrongly or not at all.
# - DeepSeek V4 appends its compressed-KV block bias (0 / -inf) to the mask: given no tensor, every query saw every
#   compressed slot (0.43 off eager, silently); a bool mask turned its bias into the opposite mask (0 -> False).
# - NLLB-MoE's router reads the padding from the mask's last row (mask[:, :, -1, :]; RuntimeError on the 2-d form).
# - BigBird-Pegasus: its encoder's own attention adds the mask to its scores (RuntimeError on the 2-d form); its
#   decoder's self-attention says is_causal=False and relies on the mask alone, and so does Pegasus-X's: the flash
#   form left causality to the module and ran those decoders bidirectionally (0.18 / 0.06 off eager, silently).
# - Moonshine's layers send is_causal = (no mask given), SDPA's idiom for a 4-d mask that holds the causal part: with
#   the 2-d padding mask its padded decoder ran bidirectionally (0.53 off SDPA, silently).
# tests/nn/test_model_zoo.py runs every model that dispatches to attnops, so another such model fails there.
_NEEDS_EAGER_MASK = ("deepseek_v4", "nllb-moe", "bigbird_pegasus", "pegasus_x", "moonshine", "moonshine_streaming")

# Config fields of sparse-attention indexers, which read the 4-d mask in every step (a static cache's too): DeepSeek
# V3.2, GLM-5 and their kin (index_topk), Qwen4-Exp's QSA (indexer_budget: it reads mask[b, 0, q] to pick key blocks)
_INDEXER_FIELDS = ("index_topk", "indexer_budget")


def _packed(mask_function: Callable) -> bool:
    """Whether transformers wrapped ``mask_function`` for packed rows (``packed_sequence_compatibility_function``:
    an ``and_masks`` closure holding ``packed_sequence_mask_function``'s mask). A miss only costs speed: the caller
    then takes the 4-d mask, which is exact."""
    for cell in getattr(mask_function, "__closure__", None) or ():
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        for fn in held if isinstance(held, tuple) else (held,):
            if getattr(fn, "__qualname__", "").startswith("packed_sequence_mask_function"):
                return True
    return False


def _layer_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """The mask interface registered beside the attention function. transformers' flash-attention form (no mask, or the
    2-d padding mask) where the layer's mask is causal or bidirectional with padding, windows and packing, which reach
    the kernels as the module's causality, ``sliding_window`` and ``position_ids``; otherwise transformers' own 4-d
    bool mask (its SDPA form, never skipped), which the attention function applies as the whole mask. Otherwise is:
    custom or/and mask functions (``use_vmap``: image tokens attending each other, bidirectional overlays), blockwise
    overlays (an ``or_masks`` function), and Llama 4's chunked attention (a mask function other than the causal one
    in a config with ``attention_chunk_size``). The flash form drops those patterns (transformers' FA2 path refuses
    chunks longer than a chunk and ignores the rest): Llama 4's chunked layers came out 0.46 off eager. A chunked
    layer's self-attention call (prefill, training; not while tracing) gets a :class:`ChunkedMask` instead of the 4-d
    mask where its mask function is checked to be the plain chunked causal one; cached steps keep the 4-d mask, which
    has only their new queries' rows (one row per decoded token)."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function, eager_mask,
                                            flash_attention_mask, sdpa_mask)

    mask_function = causal_mask_function if mask_function is None else mask_function
    device = kwargs.get("device", "cpu")
    sizes = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, attention_mask=attention_mask)

    def materialised(**extra):  # transformers' 4-d bool mask of this layer, never skipped
        return sdpa_mask(**sizes, mask_function=mask_function, allow_is_causal_skip=False, device=device, **extra)

    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None) and mask_function is not causal_mask_function
    # local_size: the window of a sliding-window mask, a chunked one's chunk
    local_size = kwargs.get("local_size")
    bidirectional = "allow_is_bidirectional_skip" in kwargs  # create_bidirectional_mask alone sends it
    if chunked:
        _note_mask(kwargs.get("config"), "causal")
    else:
        _note_mask(kwargs.get("config"), "bidirectional" if bidirectional else "causal", local_size)
    # while tracing, a cache position held in a tensor cannot size the keys (below) without a host read: the 4-d mask
    traced_offset = torch.compiler.is_compiling() and isinstance(q_offset, torch.Tensor)
    overlay = kwargs.get("use_vmap") or getattr(mask_function, "__name__", "") == "or_mask"
    if chunked and local_size == kwargs["config"].attention_chunk_size and not overlay and q_length == kv_length and \
            not torch.compiler.is_compiling() and isinstance(q_offset, int) and q_offset == kv_offset and q_length:
        compact = _chunked_mask(batch_size, q_length, q_offset, int(local_size), mask_function, attention_mask, device)
        if compact is not None:
            return compact
    if overlay or chunked or traced_offset:
        return materialised(use_vmap=bool(kwargs.get("use_vmap")))
    written = int(q_offset) + q_length - int(kv_offset)  # keys up to the last query's position
    if bidirectional and local_size is not None:
        # a bidirectional sliding window: transformers' mask admits |q - k| <= w, and the argument its layers send is
        # w for some models (T5Gemma's encoder) and w + 1 for others (ModernBERT sends half its local attention + 1),
        # so only the mask says which (T5Gemma's encoder was 0.08 off on the flash form): the window goes with it
        if q_length == kv_length and q_offset == kv_offset and not torch.compiler.is_compiling() and \
                _is_window(mask_function, int(local_size), q_length, device):
            padding = flash_attention_mask(**sizes, mask_function=bidirectional_mask_function)
            return BidirectionalWindow(int(local_size), padding)
        return materialised(allow_is_bidirectional_skip=False)
    if getattr(kwargs.get("config"), "model_type", None) in _NEEDS_EAGER_MASK:
        return eager_mask(**sizes, mask_function=mask_function, dtype=kwargs.get("dtype", torch.float32), device=device)
    asked = kwargs.get("allow_is_causal_skip") is False and not bidirectional
    reads_mask = any(getattr(kwargs.get("config"), name, None) is not None for name in _INDEXER_FIELDS)
    if asked and (written >= kv_length or reads_mask) and not torch.compiler.is_compiling() \
            and not _packed(mask_function):
        # the model asked for a materialised mask (allow_is_causal_skip=False) and reads it itself: DeepSeek V3.2's
        # and GLM-5's sparse-attention indexers take mask[:, 0], Doge adds its dynamic mask to it (IndexError on the
        # 2-d form). transformers asks too for packed rows (which keep the flash form and become documents), for a
        # static cache's step (written < kv_length: the flash form, keys cut to the written slots; not for a model
        # with an indexer, which reads the mask in every step) and for every bidirectional mask
        # (create_bidirectional_mask, which alone sends allow_is_bidirectional_skip: encoders keep the flash form).
        # Not while tracing (the closure is not inspected there): such a model then fails on the 2-d form, loudly
        return materialised()
    mask = flash_attention_mask(**sizes, mask_function=mask_function)
    if mask is not None and getattr(kwargs.get("config"), "num_kv_shared_layers", 0):
        # Gemma 4's generate() cuts the KV-shared layers' queries to the last tokens and every layer's mask with them
        # (mask[:, :, rows, :]), which only the 4-d form has: the 2-d padding mask raised IndexError there
        return materialised()
    if mask is None and written < kv_length and not bidirectional:
        # a static cache spans its whole buffer, written only up to the last query: the flash form gives no mask
        # for an unpadded batch, and the kernels would read the unwritten slots (zero keys: weight exp(0) each).
        # Not a bidirectional mask: a decoder's cross-attention has its queries' positions (a few) and the encoder's
        # keys (all of them, every one written); cutting those to the query count ran BART, T5, Marian, Pegasus and
        # M2M-100 decoders on their first keys alone whenever the batch had no padding mask (0.2 off SDPA, silently)
        mask = torch.ones(batch_size, max(written, 0), dtype=torch.bool, device=device)
    return mask


def _attention_forward(spec: AttentionSpec):
    def attnops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                  scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                  sliding_window=_NOT_SENT, deterministic: Optional[bool] = None,
                                  s_aux: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                                  position_bias: Optional[torch.Tensor] = None, **kwargs):
        """transformers' attention-function contract: ``query (B, H, Sq, D)``, ``key, value
        (B, Hkv, Sk, D)`` -> ``(attn_output (B, Sq, H, D), None)``. ``s_aux``: gpt-oss's per-head sink
        logits; ``softcap``: Gemma 2's ``attn_logit_softcapping`` (None: off); ``position_bias``: T5's
        relative position bias, added to the scores; ``dropout``: attention dropout, applied in training as
        eager applies it (one seed per call from the default generator)."""
        indices, row_sinks = kwargs.pop("indices", None), kwargs.pop("sinks", None)
        _check_call(module, attention_mask, kwargs)
        if row_sinks is not None and not isinstance(spec, (SoftmaxSpec, BlockSparseSpec)):
            raise NotImplementedError(f"attnops attention: per-query sinks need the softmax's log-sum-exp, which the "
                                      f"{type(spec).__name__} registered here does not return; register the "
                                      "SoftmaxSpec (the default) for this model")
        if indices is not None:
            attention_mask = _selected_keys(attention_mask, indices, key.shape[2])
        if sliding_window is _NOT_SENT:
            sliding_window = _unsent_window(module)
        chunks = None
        if isinstance(attention_mask, BidirectionalWindow):  # the mask's own window, both sides
            window_of_mask, attention_mask = attention_mask.window, attention_mask.padding
            sliding_window, is_causal = None, False
        else:
            window_of_mask = None
        if isinstance(attention_mask, ChunkedMask):  # a chunked layer's prefill: chunks as documents, its padding
            chunks, attention_mask = attention_mask.document_ids, attention_mask.padding
            if not query.shape[2] == key.shape[2] == chunks.shape[-1]:
                raise ValueError(f"attnops attention: a chunked mask of {chunks.shape[-1]} positions for "
                                 f"{query.shape[2]} queries and {key.shape[2]} keys")
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] < key.shape[2]:
            # a static cache: k / v span the whole buffer, the flash-form mask only the positions written so far (the
            # cache fills from 0), so the keys are those positions: causality then aligns to the last of them
            written = attention_mask.shape[-1]
            key, value = key[:, :, :written], value[:, :, :written]
            if position_bias is not None and position_bias.shape[-1] > written:  # T5's bias spans the buffer too
                position_bias = position_bias[..., :written]
        mods = {}
        documents = _joined(chunks, _document_ids(attention_mask, query.shape[2], key.shape[2], kwargs))
        if isinstance(spec, VARLEN_SPECS) and position_bias is None and \
                query.shape[2] == key.shape[2] and (attention_mask is None or attention_mask.dim() == 2):
            keep = None if attention_mask is None else attention_mask.bool()
            if documents is not None or (keep is not None and not bool(keep.all())):
                # padded or packed prefill: unpad to sequences, run the family's varlen form, re-pad
                causal = _is_causal(module, is_causal, attention_mask)
                extra = {}
                if dropout and module.training:
                    extra["dropout_p"] = float(dropout)
                if s_aux is not None:
                    extra["sinks"] = s_aux
                if softcap:
                    extra["softcap"] = float(softcap)
                if sliding_window is not None or window_of_mask is not None:
                    raise NotImplementedError(f"attnops attention: the model asks for a sliding window of "
                                              f"{sliding_window or window_of_mask}, which the {type(spec).__name__} "
                                              "registered here cannot apply")
                q, k, v = (t.transpose(1, 2) for t in (query, key, value))
                refuse_uncaptured(f"a padded or packed batch on the {type(spec).__name__} (unpadded sequences)")
                try:
                    return attend_unpadded(spec, q, k, v, keep, documents, causal, scaling, **extra), None
                except NotImplementedError as e:
                    raise NotImplementedError(f"attnops attention: the model sends {e}") from None
        if documents is not None:
            if not isinstance(spec, (SoftmaxSpec, BlockSparseSpec)):
                raise NotImplementedError(f"attnops attention: packed sequences (position_ids restarting inside a "
                                          f"row, or cu_seq_lens) need document bounds, which the "
                                          f"{type(spec).__name__} registered here cannot apply; register the "
                                          "SoftmaxSpec (the default) or a BlockSparseSpec")
            mods["document_ids"] = documents.to(query.device)
        if dropout and module.training:  # as eager: F.dropout(weights, p=dropout, training=module.training)
            mods["dropout_p"] = float(dropout)
        if s_aux is not None:
            mods["sinks"] = s_aux
        if softcap is not None and softcap != 0:
            mods["softcap"] = float(softcap)
        bias = _attn_bias(attention_mask, position_bias, key.shape[2])
        if bias is not None:
            mods["attn_bias"] = bias
        if set(mods) - {"document_ids"} and not isinstance(spec, SCORE_MOD_SPECS):
            raise NotImplementedError(f"attnops attention: the model sends {' and '.join(sorted(mods))}, which the "
                                      f"{type(spec).__name__} registered here cannot apply (only softmax specs can; "
                                      "attn_bias: a padding mask or a position bias); register the SoftmaxSpec (the "
                                      "default) for this model")
        causal = _is_causal(module, is_causal, attention_mask)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash_attn layout, no copy
        call_spec = spec
        if attention_mask is not None and attention_mask.dim() == 4:
            # a 4-d mask is the whole mask, as in eager and SDPA (transformers builds sliding layers' with the window
            # in it); DeepSeek V4 appends compressed-KV slots to the keys, where a window counted by key index cut
            # them wrongly
            sliding_window = None
        window = _window(sliding_window, causal) if window_of_mask is None else (window_of_mask, window_of_mask)
        if window != (-1, -1):
            if not isinstance(spec, SoftmaxSpec) or spec.window != (-1, -1):
                raise NotImplementedError(f"attnops attention: the model asks for a sliding window of "
                                          f"{sliding_window}, which the {type(spec).__name__} registered here cannot "
                                          "apply; register the SoftmaxSpec (the default) for this model")
            call_spec = _windowed(spec, window)
        if row_sinks is not None:
            return _with_row_sinks(call_spec, row_sinks, q, k, v, causal, scaling, mods), None
        out, _ = attend(module, call_spec, q, k, v, causal=causal, softmax_scale=scaling, **mods)  # maps: attnops.maps
        return out, None

    def attnops_attention_forward_any_value_dim(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                                value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                                dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
        """Values of another head dim than queries and keys (multi-head latent attention: DeepSeek V2 / V3, Kimi K2
        with qk 192, v 128) as transformers' flash-attention path runs them: v zero-padded to the qk dim and the
        output cut back (the zero columns give zero outputs); wider values pad q and k instead on the softmax specs
        (zero channels add nothing to a score), with the scale of the qk dim."""
        d, dv = query.shape[-1], value.shape[-1]
        if dv == d:
            return attnops_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        scaling = d ** -0.5 if scaling is None else scaling
        if dv < d:
            out, weights = attnops_attention_forward(module, query, key, F.pad(value, (0, d - dv)), attention_mask,
                                                     dropout, scaling, **kwargs)
            return out[..., :dv], weights
        if not isinstance(spec, (SoftmaxSpec, BlockSparseSpec)):
            raise NotImplementedError(f"attnops attention: value head dim {dv} > query/key head dim {d} needs the "
                                      f"SoftmaxSpec or a BlockSparseSpec (q and k are zero-padded), not "
                                      f"{type(spec).__name__}")
        return attnops_attention_forward(module, F.pad(query, (0, dv - d)), F.pad(key, (0, dv - d)), value,
                                         attention_mask, dropout, scaling, **kwargs)

    return attnops_attention_forward_any_value_dim


def _with_row_sinks(spec: SoftmaxSpec, sinks: torch.Tensor, q, k, v, causal: bool, scaling, mods: dict):
    """Attention with one sink logit per query and head (Inkling 2 projects them from the hidden states: ``sinks
    (B, H, Sq, 1)``): an extra logit with a zero value in each row's softmax, as eager concatenates it. The kernels run
    without it and return the log-sum-exp; the sink joins after, as decoding joins per-head sinks
    (:func:`attnops.ops.decode.library.fold_sinks`): exact, in autograd ops, so the gradients reach the sinks and,
    through the lse, q and k. A row that saw no key gets 0 (eager: all its weight on the sink's zero value)."""
    B, Sq, H = q.shape[:3]
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or \
            tuple(sinks.shape) not in ((B, H, Sq, 1), (B, H, Sq)):
        raise ValueError(f"attnops attention: sinks must be a float (B, H, Sq, 1) = {(B, H, Sq, 1)} tensor (one sink "
                         f"logit per query and head), got {_short(sinks)}")
    if "sinks" in mods:
        raise NotImplementedError("attnops attention: both s_aux and per-query sinks were sent")
    refuse_uncaptured("per-query sinks")
    out, lse = spec.attend(q, k, v, causal=causal, softmax_scale=scaling, return_lse=True, **mods)
    return fold_sinks(out, lse, sinks.reshape(B, H, Sq))[0]


_WINDOWED: Dict[tuple, SoftmaxSpec] = {}


def _windowed(spec: SoftmaxSpec, window) -> SoftmaxSpec:
    """The spec with the model's window (cached: specs are frozen and compare by value)."""
    key = (spec, window)
    out = _WINDOWED.get(key)
    if out is None:
        out = _WINDOWED[key] = dataclasses.replace(spec, window=window)
    return out


def register(name: str = "attnops", spec: Optional[AttentionSpec] = None) -> str:
    """Register ``spec`` with transformers' ``AttentionInterface`` (and the matching mask function)
    under ``name``; returns the name to pass as ``attn_implementation``. Without a spec, a name of
    :data:`DEFAULTS` gets its default (``"attnops"``: exact dense, ``"attnops_sparse"``: sink + local
    window, ``"attnops_moba"``: MoBA, block 512, top-3, ``"attnops_moh"``: Mixture-of-Head attention with
    MoH-LLaMA3's query-norm router, ``"attnops_flow"``: Flowformer, ``"attnops_lln"``: Linear Log-Normal,
    ``"attnops_sea"``: SEA's estimated mask, ``"attnops_hyper"``: HyperAttention, ``"attnops_regla"``: ReGLA
    (after :func:`linearize`), ``"attnops_routing"``: the Routing Transformer (after :func:`attach`),
    ``"attnops_linear"``: normalised elu + 1 linear attention) and any other name dense attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    spec = resolve_spec(spec, DEFAULTS.get(name, SoftmaxSpec()), "spec")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    AttentionInterface.register(name, _attention_forward(spec))
    AttentionMaskInterface.register(name, _layer_mask)
    _SPECS[name] = spec
    return name


def registered() -> Dict[str, AttentionSpec]:
    """The names this process registered, with their specs."""
    return dict(_SPECS)


def attach(model: torch.nn.Module, spec, name: Optional[str] = None) -> torch.nn.Module:
    """For a method whose state lives on each attention layer (a spec with ``needs_module``: ``ReGLASpec``'s gates,
    ``RoutingSpec``'s centroids): gives every attention layer of a Hugging Face ``model`` that state
    (``spec.attach_to``; a layer that has it keeps it), registers ``spec`` under ``name`` (default
    ``"attnops_regla"`` / ``"attnops_routing"``) and switches the model to it. The model's q / k / v / o
    projections, rotary embeddings and norms stay. Attention layers are the modules with ``q_proj``, ``k_proj``,
    ``v_proj``, ``head_dim`` and a ``config``. Returns the model."""
    spec = resolve_spec(spec, ReGLASpec(), "spec")
    if not getattr(spec, "needs_module", False):
        raise TypeError(f"attach takes a spec with per-layer state (ReGLASpec, RoutingSpec), got {type(spec).__name__}; "
                        "register() the others")
    layers = [m for m in model.modules()
              if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim", "config"))]
    if not layers:
        raise ValueError("attach: no attention layer (q_proj / k_proj / v_proj / head_dim / config) in this model")
    for layer in layers:
        spec.attach_to(layer, layer.config.hidden_size, layer.q_proj.out_features // layer.head_dim,
                       layer.k_proj.out_features // layer.head_dim, layer.head_dim)
    if name is None:
        name = "attnops_regla" if isinstance(spec, ReGLASpec) else "attnops_routing"
    model.set_attn_implementation(register(name, spec))
    return model


def linearize(model: torch.nn.Module, spec: Optional[ReGLASpec] = None, name: str = "attnops_regla"
              ) -> torch.nn.Module:
    """Post-linearization (ReGLA's paper: a pretrained softmax model continues training as ReGLA): :func:`attach`
    with ``spec`` (default ``ReGLASpec()``), which gives every attention layer ReGLA's new, trainable gates
    (``layer.regla``: gate and refining-gate projections of the layer's input, and the output norm)."""
    spec = resolve_spec(spec, ReGLASpec(), "spec")
    if not isinstance(spec, ReGLASpec):
        raise TypeError(f"linearize takes a ReGLASpec, got {type(spec).__name__}")
    return attach(model, spec, name)
