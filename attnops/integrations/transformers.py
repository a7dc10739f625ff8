"""Hugging Face transformers: attnops as an ``attn_implementation``.

    import attnops.integrations.transformers as hf_attnops
    hf_attnops.register()                                   # "attnops": exact dense attention
    hf_attnops.register("attnops_moba")                     # a default spec per family name (DEFAULTS)
    hf_attnops.register("attnops_sparse", attnops.nn.BlockSparseSpec(pattern=...))  # or any spec
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnops")
    model.set_attn_implementation("attnops")                # or switch an existing model

Unmodified Llama / Qwen2 / GPT-2 style models then run their attention through attnops (prefill,
training and cached decoding: the kernels align ``causal`` bottom-right, which is where the new
queries of a cached step sit). The mask function registered beside it is transformers' own
flash-attention one: no mask for unpadded batches, the 2-d padding mask otherwise, which this
adapter refuses with a clear error (the kernels take lengths and block masks, not token padding).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from attnops.maps.capture import attend
from attnops.core.masks import BlockMask
from attnops.nn.specs import AttentionSpec, BlockSparseSpec, SoftmaxSpec, LinearAttentionSpec, MoBASpec, resolve_spec

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
    "attnops_linear": LinearAttentionSpec(feature_map="elu", normalize=True),  # a drop-in without an output norm: normalised
}


def _attention_forward(spec: AttentionSpec):
    def attnops_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                  scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
        """transformers' attention-function contract: ``query (B, H, Sq, D)``, ``key, value
        (B, Hkv, Sk, D)`` -> ``(attn_output (B, Sq, H, D), None)``."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("attnops attention: padded batches (an attention_mask with zeros) are not "
                                      "supported; run unpadded sequences or one sequence per batch")
        if dropout and module.training:
            raise NotImplementedError("attnops attention has no attention dropout; set the config's "
                                      "attention_dropout to 0 for training")
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("attnops attention does not support logit softcapping")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash_attn layout, no copy
        out, _ = attend(module, spec, q, k, v, causal=bool(causal), softmax_scale=scaling)  # maps: attnops.maps
        return out, None

    return attnops_attention_forward


def register(name: str = "attnops", spec: Optional[AttentionSpec] = None) -> str:
    """Register ``spec`` with transformers' ``AttentionInterface`` (and the matching mask function)
    under ``name``; returns the name to pass as ``attn_implementation``. Without a spec, a name of
    :data:`DEFAULTS` gets its default (``"attnops"``: exact dense, ``"attnops_sparse"``: sink + local
    window, ``"attnops_moba"``: MoBA, block 512, top-3, ``"attnops_linear"``: normalised elu + 1 linear
    attention) and any other name dense attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    spec = resolve_spec(spec, DEFAULTS.get(name, SoftmaxSpec()), "spec")
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")
    AttentionInterface.register(name, _attention_forward(spec))
    AttentionMaskInterface.register(name, flash_attention_mask)
    _SPECS[name] = spec
    return name


def registered() -> Dict[str, AttentionSpec]:
    """The names this process registered, with their specs."""
    return dict(_SPECS)
