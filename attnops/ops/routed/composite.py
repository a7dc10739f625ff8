"""The pure-PyTorch MoBA router (``composite``): the fallback where the C++ extension is not built.

Per query tile of ``route_block`` rows, the tile's mean query scores every MoBA block's mean key
(``(B, H, Nt, NB)`` gates, tile x block, never token x token); the own block is always taken and the
``topk - 1`` best other candidates (causal: earlier blocks) by one stable sort, so ties go to the lower
block index as in the kernels; NaN gates rank highest.
"""

from __future__ import annotations

from typing import Tuple

import torch

from attnops.core import dispatch
from attnops.ops.routed.library import moba_lut_width
from attnops.ops.routed.select import block_means


def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
               route_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router contract (:func:`attnops.ops.routed.reference.moba_route`): ``kv_num_blocks (B, H, Nt)`` and
    ``kv_indices (B, H, Nt, W)`` int32 at ``(route_block, route_block)`` granularity, ascending."""
    B, S, H, _ = q.shape
    group = H // k.shape[2]
    kmeans = block_means(k, block_size).repeat_interleave(group, dim=1)  # (B, H, NB, D)
    gates = torch.matmul(block_means(q, route_block), kmeans.transpose(-1, -2))  # (B, H, Nt, NB)
    gates = torch.where(torch.isnan(gates), float("inf"), gates)
    tiles, blocks = gates.shape[-2:]
    own = torch.arange(tiles, device=q.device) * route_block // block_size  # (Nt,)
    j = torch.arange(blocks, device=q.device)
    cand = (j < own.unsqueeze(1)) if causal else (j != own.unsqueeze(1))  # (Nt, NB)
    # stable sorts: by gate (descending), then candidates first, so the first topk - 1 are the best candidates
    order = torch.sort(gates, dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, torch.sort(cand.expand_as(gates).gather(-1, order).to(torch.int8), dim=-1,
                                               descending=True, stable=True).indices)
    chosen = torch.zeros_like(gates, dtype=torch.bool)
    take = min(topk - 1, blocks)
    if take > 0:
        chosen.scatter_(-1, order[..., :take], True)
    chosen = (chosen & cand) | (j == own.unsqueeze(1))
    # the chosen blocks ascending, each as its tiles: the valid entries form a prefix (the partial last block and,
    # under causal, the own block past the tile's diagonal are the highest ones), so no compaction is needed
    kb = min(topk, blocks)
    picked = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kb]
    per_block = block_size // route_block
    indices = (picked.unsqueeze(-1) * per_block + torch.arange(per_block, device=q.device)).flatten(-2)
    slot = torch.arange(kb, device=q.device).repeat_interleave(per_block)
    valid = (slot < chosen.sum(-1, keepdim=True)) & (indices < tiles)
    if causal:
        valid &= indices <= torch.arange(tiles, device=q.device).view(-1, 1)
    width = moba_lut_width(S, block_size, topk, route_block)
    counts = valid.sum(-1, dtype=torch.int32)
    indices = torch.where(valid, indices, 0)[..., :width]
    return counts, torch.nn.functional.pad(indices, (0, width - indices.shape[-1])).to(torch.int32).contiguous()


dispatch.register("moba_route", "composite", moba_route)
