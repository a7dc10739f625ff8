"""The float64 oracle of decoding: attention of a few new queries against a KV cache."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import MapRequest
from attnops.core.masks import BlockMask
from attnops.ops.decode.kv_cache import gather_pages
from attnops.ops.softmax.reference import masked_attention, pool_block_map


def decode_token_mask(cache_seqlens: torch.Tensor, num_new: int, max_len: int, block_mask: Optional[BlockMask],
                      window_size: Tuple[int, int], device=None,
                      cache_leftpad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, H|1, Sq_new, S_max)`` bool for decoding: new query i of sequence b sits at position
    ``seqlen_b - Sq_new + i`` and sees the cache keys ``[pos - left, pos]`` below ``seqlen_b``, none before
    ``cache_leftpad[b]`` (flash_attn's left padding in the cache)."""
    left = window_size[0]
    lens = cache_seqlens.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    i = torch.arange(num_new, device=device).view(1, 1, -1, 1)
    j = torch.arange(max_len, device=device).view(1, 1, 1, -1)
    pos = lens - num_new + i
    allowed = (j < lens) & (j <= pos)
    if left >= 0:
        allowed &= j >= pos - left
    if cache_leftpad is not None:
        allowed &= j >= cache_leftpad.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    if block_mask is not None:
        bq, bk = block_mask.block_size
        blocks = block_mask.to_dense().to(device)  # (B|1, H|1, Nq, Nk)
        allowed = allowed & blocks.repeat_interleave(bq, dim=2)[:, :, :num_new].repeat_interleave(bk, dim=3)[
            ..., :max_len]
    return allowed


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_mask: Optional[BlockMask],
    *,
    window_size: Tuple[int, int],
    softmax_scale: float,
    num_splits: int = 0,
    block_map: Optional[MapRequest] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Attention of ``q (B, Sq_new, H, D)`` against the first ``cache_seqlens[b]`` keys of
    ``k_cache, v_cache (B, S_max, Hkv, D)``, causal within the new tokens (see
    :func:`decode_token_mask`), and with ``block_map`` the pooled block map over the cache.
    Score modifiers as in :func:`attnops.ops.softmax.reference.masked_attention`; ALiBi's distance is
    from each new token's cache position. ``num_splits`` is a kernel knob the reference ignores. A paged cache
    (``block_table``) is gathered first."""
    if block_table is not None:
        k_cache, v_cache = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    allowed = decode_token_mask(cache_seqlens, q.shape[1], k_cache.shape[1], block_mask, window_size, q.device,
                                cache_leftpad)
    bias = None
    if alibi_slopes is not None:
        Sq, S = q.shape[1], k_cache.shape[1]
        pos = cache_seqlens.to(device=q.device, dtype=torch.long).view(-1, 1, 1, 1) - Sq + torch.arange(
            Sq, device=q.device).view(1, 1, -1, 1)
        slopes = alibi_slopes.double().to(q.device)
        slopes = (slopes if slopes.dim() == 2 else slopes.unsqueeze(0))[:, :, None, None]
        bias = -slopes * (pos - torch.arange(S, device=q.device)).abs().double()
    out, lse, probs = masked_attention(q, k_cache, v_cache, allowed, softmax_scale, return_probs=True,
                                       softcap=softcap, bias=bias, sinks=sinks)
    if block_map is None:
        return out, lse
    return out, lse, pool_block_map(probs, lse, block_map)


dispatch.register("decode_attention", "reference", decode_attention)
