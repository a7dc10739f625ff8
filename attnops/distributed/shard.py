"""Splitting a sequence across the ranks of a process group, and putting it back.

``contiguous``: rank ``r`` holds the ``r``-th of ``W`` equal slices. ``zigzag``: the sequence is cut into
``2W`` chunks and rank ``r`` holds chunks ``r`` and ``2W - 1 - r``, so that under a causal mask every rank
has the same work (an early chunk sees few keys, its late partner many). A length that does not divide
evenly is padded at the end (``multiple``: each chunk's length is also a multiple of it, e.g. a block mask's
block size); padded positions are keys no query sees and queries whose outputs ``unshard`` drops.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def chunk_length(seq_len: int, world: int, layout: str, multiple: int = 1) -> int:
    """Length of one chunk: ``2W`` chunks (zigzag) or ``W`` (contiguous) covering ``seq_len``, each a multiple
    of ``multiple``."""
    _check_layout(layout)
    pieces = 2 * world if layout == "zigzag" else world
    chunk = -(-seq_len // pieces)
    return -(-chunk // multiple) * multiple


def local_spans(rank: int, world: int, chunk: int, layout: str) -> List[Tuple[int, int]]:
    """The global ``[start, end)`` ranges rank ``rank`` holds, in its local order."""
    _check_layout(layout)
    if layout == "contiguous":
        return [(rank * chunk, (rank + 1) * chunk)]
    return [(rank * chunk, (rank + 1) * chunk), ((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)]


def local_positions(rank: int, world: int, chunk: int, layout: str, device=None) -> torch.Tensor:
    """``(S_local,)`` int64: the global position of each local row (ascending: zigzag's second chunk is later)."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in local_spans(rank, world, chunk, layout)])


def check_split(local: int, world: int, layout: str, seq_len) -> int:
    """The global length of a sequence cut into shards of ``local`` rows on ``world`` ranks in ``layout``:
    ``seq_len`` (the true length when the shards were padded), default every row; validated."""
    _check_layout(layout)
    if layout == "zigzag" and local % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks: its length must be even, got {local}")
    total = local * world
    seq_len = total if seq_len is None else seq_len
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 0 < seq_len <= total:
        raise ValueError(f"seq_len must be the global length the shards were cut from (<= {total}), got {seq_len!r}")
    return seq_len


def _group_info(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnops.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: torch.Tensor, group=None, dim: int = 1, layout: str = "zigzag", multiple: int = 1) -> torch.Tensor:
    """This rank's part of ``x`` (the whole tensor, the same on every rank) along ``dim``: ``(B, S, ...)`` ->
    ``(B, S_local, ...)`` with ``S_local = chunk * (2 if zigzag else 1)``, zero-padded at the sequence's end."""
    rank, world = _group_info(group)
    dim = dim % x.dim()
    seq_len = x.shape[dim]
    chunk = chunk_length(seq_len, world, layout, multiple)
    padded = chunk * (2 * world if layout == "zigzag" else world)
    if padded > seq_len:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, padded - seq_len]
        x = torch.nn.functional.pad(x, pad)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in local_spans(rank, world, chunk, layout)], dim=dim)


def unshard(x: torch.Tensor, seq_len: int, group=None, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """The whole sequence (length ``seq_len``, padding dropped) from every rank's shard ``x`` (an all-gather;
    differentiable: the gradient of the whole is split back to the shards)."""
    rank, world = _group_info(group)
    dim = dim % x.dim()
    pieces = _AllGather.apply(x.contiguous(), group, world)
    chunk = x.shape[dim] // (2 if layout == "zigzag" else 1)
    parts = [None] * (2 * world if layout == "zigzag" else world)
    for r, piece in enumerate(pieces):
        spans = local_spans(r, world, chunk, layout)
        offset = 0
        for a, b in spans:
            parts[a // chunk] = piece.narrow(dim, offset, b - a)
            offset += b - a
    return torch.cat(parts, dim=dim).narrow(dim, 0, seq_len)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # every rank holds the whole gradient of the gathered pieces: its own piece's is the sum over ranks
        g = torch.stack([torch.zeros_like(grads[ctx.rank]) if t is None else t for t in grads])
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None, None
