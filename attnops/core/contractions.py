"""Contractions with the kernels' NaN convention: a pair a mask excludes contributes nothing, even where the
other operand is NaN or infinite (a plain product gives ``0 * NaN = NaN``). Shared by the pure-PyTorch paths
of the families (the softmax fallback, linear attention's chunk form)."""

from __future__ import annotations

import torch

# Non-finite key columns handled per pass of masked_matmul's correction: bounds its (..., M, J, D) temporary.
_BAD_COLUMNS = 32


def masked_matmul(w: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w (..., M, N) @ x (..., N, D)`` where the pairs ``(m, n)`` outside ``mask (..., M, N)`` (w is 0 there)
    contribute nothing even where ``x[n]`` is NaN or infinite: the kernels' convention, which a plain product
    breaks (``0 * NaN = NaN``). The product runs on ``x`` with its non-finite entries zeroed; they are added
    back on the pairs in ``mask`` only."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return torch.matmul(w, x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.matmul(w, torch.where(finite, x, zero))
    cols = torch.nonzero((~finite).reshape(-1, *x.shape[-2:]).any(0).any(-1)).flatten()
    mask = mask.expand(w.shape)
    for part in cols.split(_BAD_COLUMNS):
        bad = torch.where(finite[..., part, :], zero, x[..., part, :])  # (..., J, D): only the non-finite entries
        terms = torch.where(mask[..., part].unsqueeze(-1), w[..., part].unsqueeze(-1) * bad.unsqueeze(-3), zero)
        out = out + terms.sum(-2)
    return out
