"""The dropout mask of the softmax core, by its definition: the counter-based hash of csrc/cpu/dropout.h
(and of the Triton kernels), so that every backend, the float64 oracle and the backward draw the same
mask from one int64 seed without storing it."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2**32`` for int64 tensors holding uint32 values, in two 16-bit halves of ``c`` so that
    no product leaves int64."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep(seed: int, dropout_p: float, batch: int, num_heads: int, seq_len_q: int, seq_len_k: int,
                 rows: Optional[torch.Tensor] = None, device=None) -> Tuple[torch.Tensor, float]:
    """The dropout mask the kernels draw for ``seed``: ``keep (B, H, R, Sk)`` bool for the query rows
    ``rows`` (default all) and the scale ``1 / keep rate`` of the kept probabilities. The hash of
    csrc/cpu/dropout.h: pair (i, j) of query head ``bh = b * H + h`` is kept when
    ``fmix32(row(seed, bh, i) + j * 0x846CA68B) >> 8 >= round(p * 2**24)``."""
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    threshold = round(dropout_p * 2 ** 24)
    bh = torch.arange(batch * num_heads, dtype=torch.int64, device=device)
    head = _fmix32(seed_lo ^ _fmix32((seed_hi + _mul32(bh, 0x9E3779B9)) & _MASK32))  # (BH,)
    i = (torch.arange(seq_len_q, device=device) if rows is None else rows.to(device)).to(torch.int64)
    row = _fmix32((head[:, None] + _mul32(i, 0x7FEB352D)[None, :]) & _MASK32)  # (BH, R)
    j = _mul32(torch.arange(seq_len_k, dtype=torch.int64, device=device), 0x846CA68B)
    bits = _fmix32((row[:, :, None] + j[None, None, :]) & _MASK32)
    keep = (bits >> 8) >= threshold
    return keep.view(batch, num_heads, -1, seq_len_k), 2 ** 24 / (2 ** 24 - threshold)
