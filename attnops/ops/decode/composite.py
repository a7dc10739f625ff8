"""Decoding in PyTorch (``composite``): the fallback where the C++ extension is not built.

The new queries of each sequence attend the first ``cache_seqlens[b]`` cache keys, causal among
themselves, with the core's score modifiers; query rows go in chunks (a long "prefill through the
cache" never forms ``Sq x S_max`` at once). ``num_splits`` is a kernel knob (how the cache is split
across threads) that does not change the result; it is accepted and has nothing to split here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import block_map as _map
from attnops.core import dispatch
from attnops.core.library import lse_dtype
from attnops.core.masks import BlockMask
from attnops.ops.decode.kv_cache import gather_pages
from attnops.ops.softmax.composite import capped_scores, chunk_rows, contract, normalise, work_dtype


def _allowed(cache_seqlens: torch.Tensor, num_new: int, r0: int, r1: int, max_len: int,
             block_mask: Optional[BlockMask], window_left: int,
             cache_leftpad: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(allowed (B|Bm, 1|Hm, C, S_max) bool, pos (B, 1, C, 1))`` for new queries ``[r0, r1)``: query ``i`` of
    sequence ``b`` sits at ``seqlen_b - Sq_new + i`` and sees the keys ``[pos - left, pos]`` below ``seqlen_b``
    (and from ``cache_leftpad[b]`` on)."""
    device = cache_seqlens.device
    lens = cache_seqlens.to(torch.long).view(-1, 1, 1, 1)
    i = torch.arange(r0, r1, device=device).view(1, 1, -1, 1)
    j = torch.arange(max_len, device=device).view(1, 1, 1, -1)
    pos = lens - num_new + i
    allowed = (j < lens) & (j <= pos)
    if window_left >= 0:
        allowed &= j >= pos - window_left
    if cache_leftpad is not None:
        allowed &= j >= cache_leftpad.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    if block_mask is not None:
        bq, bk = block_mask.block_size
        dense = block_mask.to_dense().to(device)  # (Bm, Hm, Nq, Nk)
        allowed = allowed & dense[:, :, torch.arange(r0, r1, device=device) // bq][..., j.flatten() // bk]
    return allowed, pos


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_mask: Optional[BlockMask], *, window_size: Tuple[int, int], softmax_scale: float,
                     num_splits: int = 0, block_map: Optional[_map.MapRequest] = None, softcap: float = 0.0,
                     alibi_slopes: Optional[torch.Tensor] = None,
                     sinks: Optional[torch.Tensor] = None,
                     block_table: Optional[torch.Tensor] = None,
                     cache_leftpad: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """The decode contract (:func:`attnops.ops.decode.reference.decode_attention`): q ``(B, Sq_new, H, D)``,
    caches ``(B, S_max, Hkv, D)`` -> out ``(B, Sq_new, H, D)``, lse ``(B, H, Sq_new)``, and the block map."""
    if block_table is not None:  # a paged cache, read as the contiguous one it stands for
        k_cache, v_cache = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    B, Sq, H, D = q.shape
    S = k_cache.shape[1]
    work = work_dtype(q.dtype)
    out = torch.zeros(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=lse_dtype(q.dtype), device=q.device)
    rows_map = None
    if block_map is not None:
        nk = -(-S // block_map.block_k)
        rows_map = torch.zeros(B, H, Sq, nk, dtype=lse.dtype, device=q.device)
    lens = cache_seqlens.to(q.device)
    step = chunk_rows(B, H, S, Sq, align=1)
    for r0 in range(0, Sq, step):
        r1 = min(Sq, r0 + step)
        s, _ = capped_scores(q[:, r0:r1], k_cache, softmax_scale, softcap)
        allowed, pos = _allowed(lens, Sq, r0, r1, S, block_mask, window_size[0], cache_leftpad)
        bias = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)
            dist = (pos - torch.arange(S, device=q.device)).abs().to(work)  # (B, 1, C, S)
            bias = -slopes.to(work)[:, :, None, None] * dist
        probs, lse_rows = normalise(s, allowed, bias, sinks)
        lse[:, :, r0:r1] = lse_rows
        out[:, r0:r1] = contract(probs, v_cache.to(work), allowed).to(q.dtype)
        if rows_map is not None:
            bk = block_map.block_k
            tiles = torch.nn.functional.pad(probs, (0, rows_map.shape[-1] * bk - S)).unflatten(-1, (-1, bk))
            rows_map[:, :, r0:r1] = (tiles.amax(-1) if block_map.reduce == "max" else tiles.sum(-1)).to(lse.dtype)
    if rows_map is None:
        return out, lse
    return out, lse, _map.finish(rows_map, lse, 1, block_map)


dispatch.register("decode_attention", "composite", decode_attention)
