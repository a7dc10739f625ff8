"""What the ops return: the output tensor, or a named tuple when optional outputs are asked for."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch


class AttentionOutput(NamedTuple):
    """``out (B, Sq, H, D)`` and ``lse (B, H, Sq)`` (natural-log log-sum-exp of the scaled scores,
    float32; float64 for float64 inputs; -inf for rows with nothing to attend to)."""

    out: torch.Tensor
    lse: torch.Tensor


class AttentionMapOutput(NamedTuple):
    """``out`` and the block attention map ``(B, H, ceil(Sq / block_q), ceil(Sk / block_k))`` (float32;
    float64 for float64 inputs; definition in ``attnops.core.block_map``)."""

    out: torch.Tensor
    block_map: torch.Tensor


class AttentionLseMapOutput(NamedTuple):
    """``out``, ``lse`` and ``block_map``, as in the two tuples above."""

    out: torch.Tensor
    lse: torch.Tensor
    block_map: torch.Tensor


class AttentionMaxOutput(NamedTuple):
    """``out`` and ``max_scores (B, H, Sq)``: each query row's largest score, the logit its softmax subtracts
    (float32; float64 for float64 inputs; -inf for rows with nothing to attend to). QK-clip (MuonClip) reads
    its per-head maximum, ``max_scores.amax(dim=(0, 2))``."""

    out: torch.Tensor
    max_scores: torch.Tensor


class AttentionLseMaxOutput(NamedTuple):
    """``out``, ``lse`` and ``max_scores``."""

    out: torch.Tensor
    lse: torch.Tensor
    max_scores: torch.Tensor


class AttentionMapMaxOutput(NamedTuple):
    """``out``, ``block_map`` and ``max_scores``."""

    out: torch.Tensor
    block_map: torch.Tensor
    max_scores: torch.Tensor


class AttentionLseMapMaxOutput(NamedTuple):
    """``out``, ``lse``, ``block_map`` and ``max_scores``."""

    out: torch.Tensor
    lse: torch.Tensor
    block_map: torch.Tensor
    max_scores: torch.Tensor


Result = Union[torch.Tensor, AttentionOutput, AttentionMapOutput, AttentionLseMapOutput, AttentionMaxOutput,
               AttentionLseMaxOutput, AttentionMapMaxOutput, AttentionLseMapMaxOutput]


# The ops' shared docstring lines for the block-map arguments.
MAP_ARGS_DOC = """return_block_map: also return the block attention map ``(B, H, ceil(Sq / block_q),
            ceil(Sk / block_k))`` (float32): the mean, over the queries of a query block that attend
            to something, of the probability they put on each key block (rows sum to 1; blocks
            the mask drops are exactly 0). Computed exactly with the forward from its lse, never
            as an Sq x Sk matrix.
        map_block_size: the map's granularity, an int or ``(block_q, block_k)``, powers of two >= 16
            (``block_size=``: its former name, deprecated).
        reduce: ``"mean"`` (above) or ``"max"``: the largest probability of any (query, key) pair
            of the tile (SeerAttention's gate target)."""


MAX_SCORES_DOC = """return_max_scores: also return ``max_scores (B, H, Sq)`` (float32; float64 for float64 inputs), each
            query row's largest score over the keys it attends: the logit its softmax subtracts, after the
            scale, softcap, ALiBi and ``attn_bias`` (sinks are not keys; -inf for a row that attends nothing).
            Not differentiable. QK-clip (MuonClip) takes the per-head maximum,
            ``max_scores.amax(dim=(0, 2))``."""


def pack(out: torch.Tensor, lse: torch.Tensor, block_map: Optional[torch.Tensor], return_lse: bool,
         max_scores: Optional[torch.Tensor] = None) -> Result:
    """``out`` alone, or the named tuple of ``out`` and what was asked for (``block_map`` / ``max_scores`` given =
    asked), in the order out, lse, block_map, max_scores."""
    if max_scores is not None:
        if block_map is not None:
            return (AttentionLseMapMaxOutput(out, lse, block_map, max_scores) if return_lse
                    else AttentionMapMaxOutput(out, block_map, max_scores))
        return AttentionLseMaxOutput(out, lse, max_scores) if return_lse else AttentionMaxOutput(out, max_scores)
    if block_map is not None:
        return AttentionLseMapOutput(out, lse, block_map) if return_lse else AttentionMapOutput(out, block_map)
    return AttentionOutput(out, lse) if return_lse else out
