"""The float64 oracle of low-rank-key attention (Loki): the selection rule and exact attention over
the chosen keys."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import MapRequest
from attnops.ops.softmax.reference import masked_attention, pool_block_map


def lowrank_selection(q_score: torch.Tensor, k_score: torch.Tensor, seqlens: Optional[torch.Tensor], *, topk: int,
                      local: int, causal: bool) -> torch.Tensor:
    """``(B, H, Sq, Sk)`` bool: the keys each query attends to under Loki's selection.

    ``q_score (B, Sq, H, R)``, ``k_score (B, Sk, Hkv, R)``: the first R components of the rotated
    queries and keys. Query ``i`` of sequence ``b`` sits at ``pos = len_b - Sq + i`` (``len_b``:
    ``seqlens[b]``, default Sk) and may see the keys ``j < len_b`` (causal: also ``j <= pos``).
    It attends to the newest ``local`` of them (causal only) and, of the rest, to the
    ``topk - local`` with the highest approximate score ``q_score . k_score``; ties go to the later
    key, NaN scores rank highest (so NaN reaches the output). With ``topk`` or fewer keys in
    view, all of them: ``topk >= Sk`` is dense attention."""
    B, Sq, H, _ = q_score.shape
    Sk, Hkv = k_score.shape[1], k_score.shape[2]
    device = q_score.device
    scores = torch.einsum("bqhr,bkhr->bhqk", q_score, k_score.repeat_interleave(H // Hkv, dim=2))
    scores = torch.nan_to_num(scores, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    lens = (torch.full((B,), Sk, device=device) if seqlens is None else seqlens.to(device)).long().view(B, 1, 1, 1)
    j = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
    pos = lens - Sq + torch.arange(Sq, device=device).view(1, 1, Sq, 1) if causal else lens - 1
    valid = (j < lens) & (j <= pos)
    is_local = valid & (j > pos - local)
    candidate = (valid & ~is_local).expand(B, H, Sq, Sk)
    # rank the candidates by (candidate first, score descending, later key first): stable sorts of
    # the key-reversed row, the last sort by the most significant criterion
    flipped, cand = scores.flip(-1), candidate.flip(-1)
    by_score = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
    by_cand = torch.sort(cand.gather(-1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    ranked = by_score.gather(-1, by_cand)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(Sk, device=device).expand_as(ranked))
    budget = topk - is_local.sum(-1, keepdim=True)
    return (cand & (rank < budget)).flip(-1) | is_local


def lowrank_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_score: torch.Tensor,
                          k_score: torch.Tensor, seqlens: Optional[torch.Tensor], *, topk: int, local: int,
                          causal: bool, softmax_scale: float,
                          block_map: Optional[MapRequest] = None) -> Tuple[torch.Tensor, ...]:
    """Loki: exact softmax attention of ``q (B, Sq, H, D)`` over the keys of ``k, v (B, Sk, Hkv, D)``
    that :func:`lowrank_selection` picks from the low-rank scores. Returns out ``(B, Sq, H, D)`` and
    lse ``(B, H, Sq)`` over the chosen keys, and with ``block_map`` the pooled block map."""
    allowed = lowrank_selection(q_score, k_score, seqlens, topk=topk, local=local, causal=causal)
    out, lse, probs = masked_attention(q, k, v, allowed, softmax_scale, return_probs=True)
    if block_map is None:
        return out, lse
    return out, lse, pool_block_map(probs, lse, block_map)


dispatch.register("lowrank_key_attention", "reference", lowrank_key_attention)
