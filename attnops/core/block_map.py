"""Block attention maps: the part every backend shares.

``block_map[b, h, i, j]`` is the mean, over the queries of query block ``i`` that attend to at least
one key, of the softmax probability they put on the keys of key block ``j`` (``reduce="max"``: the
largest single probability in the tile, SeerAttention's target). A row of a mean map sums to 1, or
is all 0 when no query of the block sees a key; blocks the mask drops are exactly 0.

The attention kernels write a *partial* map: sums (or maxima) of the probabilities over ``rows``
queries x ``block_k`` keys, with ``rows`` a divisor of the map's query block that fits the kernels'
query tiles (:func:`partial_rows`). :func:`finish` pools the partial rows into map rows and divides
by the number of queries that attend to something, read off the lse (``-inf`` = nothing).
The families' own map code (decode, linear, low-rank keys) lives in their folders.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Tuple

import torch

REDUCTIONS = ("mean", "max")
# The kernels' query tile: C++ tasks and the Triton map kernel cover at most 64 queries per row
# block, so partial rows never need more.
_MAX_PARTIAL_ROWS = 64


class MapRequest(NamedTuple):
    """What a caller asks of a kernel: map block sizes (powers of two) and the reduction."""

    block_q: int
    block_k: int
    reduce: str


def partial_rows(request: MapRequest, lut_block_q: int = 0) -> int:
    """Queries per partial-map row: a power of two dividing the map's query block and the kernels'
    query tile (which never straddles two LUT rows)."""
    rows = min(request.block_q, _MAX_PARTIAL_ROWS)
    return min(rows, lut_block_q) if lut_block_q else rows


def finish(partial: torch.Tensor, lse: torch.Tensor, rows: int, request: MapRequest) -> torch.Tensor:
    """Pools ``partial (B, H, ceil(Sq/rows), Nk)`` into ``(B, H, ceil(Sq/block_q), Nk)`` float32 (float64
    for float64 inputs): sum or max over ``block_q / rows`` partial rows, then, for the mean, a
    division by the number of queries of the block with a finite (or NaN) lse."""
    B, H, _, Nk = partial.shape
    Sq = lse.shape[-1]
    nq = -(-Sq // request.block_q)
    factor = request.block_q // rows
    if factor > 1:
        pad = nq * factor - partial.shape[2]
        partial = torch.nn.functional.pad(partial, (0, 0, 0, pad)).view(B, H, nq, factor, Nk)
        partial = partial.amax(dim=3) if request.reduce == "max" else partial.sum(dim=3)
    if request.reduce == "max":
        return partial
    attends = torch.nn.functional.pad((lse != float("-inf")).to(partial.dtype), (0, nq * request.block_q - Sq))
    count = attends.view(B, H, nq, request.block_q).sum(-1, keepdim=True)
    return partial / count.clamp(min=1)


def check_request(block_size, reduce: str, default: Tuple[int, int], deprecated_block_size=None) -> MapRequest:
    """Validates the ops' ``map_block_size`` / ``reduce`` arguments (raised before any kernel runs).
    ``deprecated_block_size``: the ops' former name for ``map_block_size`` (``block_size`` also names
    the mask's and MoBA's blocks), accepted for one release with a DeprecationWarning."""
    if deprecated_block_size is not None:
        if block_size is not None:
            raise TypeError("pass map_block_size= only (block_size= is its deprecated alias)")
        warnings.warn("block_size= for the block map is deprecated: use map_block_size= (block_size names the "
                      "mask's and MoBA's blocks)", DeprecationWarning, stacklevel=3)
        block_size = deprecated_block_size
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if block_size is None:
        block_q, block_k = default
    elif isinstance(block_size, int) and not isinstance(block_size, bool):
        block_q = block_k = block_size
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        block_q, block_k = block_size
    else:
        raise TypeError(f"map_block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1):
            raise ValueError(f"block map {name} must be a power of two >= 16, got {b!r}")
    return MapRequest(block_q, block_k, reduce)
