"""What every block router shares: block means of q / k, the selection rules (top-k, threshold,
cumulative mass) with their tie rules. Used by the training-free predictor and ``attnops.nn.BlockGate``."""

from __future__ import annotations

from typing import Optional

import torch


def block_counts(seq_len: int, block: int, device) -> torch.Tensor:
    """``(ceil(seq_len / block),)`` float32: rows per block (the last may be partial)."""
    n = -(-seq_len // block)
    return torch.clamp(seq_len - torch.arange(n, device=device) * block, max=block).float()


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, N, D)`` float32 block means (float64 for float64 x; a partial last block:
    its rows)."""
    B, S, Hx, D = x.shape
    n = -(-S // block)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.nn.functional.pad(x.to(work), (0, 0, 0, 0, 0, n * block - S)).view(B, n, block, Hx, D).sum(2)
    return (sums / block_counts(S, block, x.device).view(1, n, 1, 1)).transpose(1, 2)


def select_blocks(probs: torch.Tensor, allowed: torch.Tensor, *, topk: Optional[int] = None,
                  threshold: Optional[float] = None, cdf_threshold: Optional[float] = None) -> torch.Tensor:
    """Bool ``(..., Nq, Nk)``: per row, the blocks of ``probs`` (block attention mass estimates, rows
    summing to 1 over ``allowed``) that exactly one rule keeps: the ``topk`` largest, those ``>=
    threshold``, or the fewest largest whose mass reaches ``cdf_threshold``. Shared by
    :func:`predict_block_mask` and :class:`attnops.nn.BlockGate`."""
    given = [name for name, x in (("topk", topk), ("threshold", threshold), ("cdf_threshold", cdf_threshold))
             if x is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of topk=, threshold=, cdf_threshold= (got {given or 'none'})")
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    if topk is not None:
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        rank = torch.argsort(torch.argsort(probs, dim=-1, descending=True, stable=True), dim=-1)
        return allowed & (rank < topk)
    for name, x in (("threshold", threshold), ("cdf_threshold", cdf_threshold)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            raise TypeError(f"{name} must be a number, got {x!r}")
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        return allowed & (probs >= threshold)
    if not 0.0 < float(cdf_threshold) <= 1.0:
        raise ValueError(f"cdf_threshold must lie in (0, 1], got {cdf_threshold}")
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the larger blocks
    keep_sorted = before < cdf_threshold
    return allowed & torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
