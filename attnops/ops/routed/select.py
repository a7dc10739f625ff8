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


def rule_value(x, name: str, num_heads: int, device, *, low: float, high: float, low_open: bool = False,
               count: bool = False) -> Optional[torch.Tensor]:
    """A selection hyper-parameter as SpargeAttn takes it: ``None``, a number, or one value per head
    (a sequence or tensor of ``num_heads`` values) -> ``None`` or a ``(num_heads,)`` float64 tensor,
    every value checked against ``[low, high]`` (``(low, high]`` when ``low_open``), on ``device``.
    ``count``: an int (or an integer tensor) is a block count >= 1, returned as an int64 tensor."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor, list, tuple)):
        raise TypeError(f"{name} must be a number or one number per head, got {x!r}")
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)  # checked here, also for meta
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a number or one number per head, got {x!r}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != num_heads):
        raise ValueError(f"{name} must be a number or {num_heads} values (one per head), got shape {tuple(t.shape)}")
    t = t.expand(num_heads)
    if count and not t.is_floating_point():
        if bool((t < 1).any()):
            raise ValueError(f"{name} must be an int >= 1 (a count) or a fraction in (0, 1], got {x!r}")
        return t.to(device=device, dtype=torch.int64)
    t = t.to(torch.float64)
    bad = (t <= low) if low_open else (t < low)
    if bool((bad | (t > high) | torch.isnan(t)).any()):
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        if count:
            raise ValueError(f"{name} must be an int >= 1 (a count) or a float in {span} (a fraction), got {x!r}")
        raise ValueError(f"{name} must lie in {span}, got {x!r}")
    return t.to(device)


def block_count(topk: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """``(H,)`` blocks to keep per head from :func:`rule_value`'s ``topk``: an int64 count as given, a
    fraction as SpargeAttn turns it into one, ``int(float32(topk) * Nk)``, at least 1."""
    if not topk.is_floating_point():
        return topk
    return (topk.float() * num_key_blocks).to(torch.int64).clamp(min=1)


def select_blocks(probs: torch.Tensor, allowed: torch.Tensor, *, topk=None, threshold=None,
                  cdf_threshold=None) -> torch.Tensor:
    """Bool ``(..., Nq, Nk)``: per row, the blocks of ``probs`` (block attention mass estimates, rows
    summing to 1 over ``allowed``) that exactly one rule keeps: the ``topk`` largest (an int: a count; a
    float in (0, 1]: that fraction of the ``Nk`` key blocks, at least one), those ``>= threshold``, or the
    fewest largest whose mass reaches ``cdf_threshold``. Each may be one value per head (``probs`` is then
    ``(B, H, Nq, Nk)``). Shared by :func:`predict_block_mask` and :class:`attnops.nn.BlockGate`."""
    given = [name for name, x in (("topk", topk), ("threshold", threshold), ("cdf_threshold", cdf_threshold))
             if x is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of topk=, threshold=, cdf_threshold= (got {given or 'none'})")
    heads = probs.shape[-3] if probs.dim() >= 3 else 1
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    if topk is not None:
        count = block_count(rule_value(topk, "topk", heads, probs.device, low=0.0, high=1.0, low_open=True,
                                       count=True), probs.shape[-1])
        rank = torch.argsort(torch.argsort(probs, dim=-1, descending=True, stable=True), dim=-1)
        return allowed & (rank < _per_head(count, probs))
    if threshold is not None:
        threshold = rule_value(threshold, "threshold", heads, probs.device, low=0.0, high=1.0)
        return allowed & (probs >= _per_head(threshold, probs).to(probs.dtype))
    cdf_threshold = rule_value(cdf_threshold, "cdf_threshold", heads, probs.device, low=0.0, high=1.0, low_open=True)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the larger blocks
    keep_sorted = before < _per_head(cdf_threshold, probs).to(probs.dtype)
    return allowed & torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _per_head(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(H,)`` -> broadcastable against ``like (..., H, Nq, Nk)`` (a scalar's H is 1)."""
    return values.view(-1, 1, 1) if like.dim() >= 3 else values.view(-1, 1)
