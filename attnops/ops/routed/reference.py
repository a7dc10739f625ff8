"""The float64 oracle of block-routed attention: MoBA's selection (token or tile routing), its LUT and
its attention."""

from __future__ import annotations

from typing import Tuple

import torch

from attnops.core import dispatch
from attnops.core.masks import compress
from attnops.ops.routed.library import moba_lut_width
from attnops.ops.softmax.reference import masked_attention


def _group_means(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x (B, S, H, D)`` -> ``(B, ceil(S / rows), H, D)``: the mean of each group of ``rows``
    positions (a partial last group averages what it has)."""
    B, S, H, D = x.shape
    n = -(-S // rows)
    sums = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * rows - S)).view(B, n, rows, H, D).sum(2)
    counts = torch.clamp(S - torch.arange(n, device=x.device) * rows, max=rows).to(x.dtype)
    return sums / counts.view(1, n, 1, 1)


def moba_selection(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   route_rows: int = 1) -> torch.Tensor:
    """``(B, H, R, NB)`` bool: the MoBA blocks (``block_size`` keys, ``NB = ceil(S / block_size)``)
    that each group of ``route_rows`` query rows attends, ``R = ceil(S / route_rows)``.

    MoBA (Lu et al. 2025): the gate of a query against key block j is ``q . mean(k[block j])``; the
    query's own block is always chosen; under ``causal`` later blocks never are; the other
    ``topk - 1`` blocks are the highest gates among the remaining candidates. ``route_rows=1`` is
    the paper's token-level routing; a group routes with its mean query (the kernels' query-tile
    routing is ``route_rows=64``). Ties go to the lower block index, NaN gates rank highest."""
    B, S, H, D = q.shape
    kmean = _group_means(k, block_size).repeat_interleave(H // k.shape[2], dim=2)  # (B, NB, H, D)
    gates = torch.einsum("brhd,bnhd->bhrn", _group_means(q, route_rows), kmean)
    gates = torch.where(torch.isnan(gates), float("inf"), gates)
    R, NB = gates.shape[-2:]
    own = (torch.arange(R, device=q.device) * route_rows // block_size).unsqueeze(1)  # (R, 1)
    j = torch.arange(NB, device=q.device)
    cand = (j < own) if causal else (j != own)  # (R, NB)
    gi, gj = gates.unsqueeze(-1), gates.unsqueeze(-2)  # i: the competitor, j: the ranked block
    beats = cand.unsqueeze(-1) & ((gi > gj) | ((gi == gj) & (j.view(-1, 1) < j.view(1, -1))))
    rank = beats.sum(-2)  # (B, H, R, NB): candidates that outrank block j
    return (cand & (rank < topk - 1)) | (j == own)


def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
               route_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router backends' contract: the query-tile selection of :func:`moba_selection` as a block
    LUT at ``(route_block, route_block)`` granularity, ``(kv_num_blocks (B, H, Nt), kv_indices
    (B, H, Nt, W))`` int32, ascending, zero-padded to the router's width."""
    S = q.shape[1]
    chosen = moba_selection(q, k, block_size=block_size, topk=topk, causal=causal, route_rows=route_block)
    tiles = chosen.shape[2]
    blocks = chosen.repeat_interleave(block_size // route_block, dim=-1)[..., :tiles]  # (B, H, Nt, Nt)
    if causal:
        t = torch.arange(tiles, device=q.device)
        blocks = blocks & (t.view(1, -1) <= t.view(-1, 1))  # the own block ends at the tile's diagonal
    counts, indices = compress(blocks)
    width = moba_lut_width(S, block_size, topk, route_block)
    return counts, torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))[..., :width].contiguous()


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   softmax_scale: float, route_rows: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention by its definition: each query attends, with one softmax, to the keys of the
    blocks :func:`moba_selection` chose for it (causal inside its own block). ``route_rows=1``:
    the paper's token-level routing; ``route_rows=64``: what the kernels compute. Builds S x S."""
    S = q.shape[1]
    chosen = moba_selection(q, k, block_size=block_size, topk=topk, causal=causal, route_rows=route_rows)
    rows = torch.arange(S, device=q.device)
    allowed = chosen[:, :, rows // route_rows].repeat_interleave(block_size, dim=-1)[..., :S]
    if causal:
        allowed = allowed & (rows.view(1, -1) <= rows.view(-1, 1))
    return masked_attention(q, k, v, allowed, softmax_scale)


dispatch.register("moba_route", "reference", moba_route)
