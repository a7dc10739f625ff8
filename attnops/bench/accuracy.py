"""The correctness gate of a benchmark case: errors against the float64 reference on sampled query
rows, judged by the DESIGN.md rule ``max|out - ref64| <= 2 * max|ref_T - ref64| + 1e-5``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

RULE_FACTOR = 2.0
RULE_ATOL = 1e-5


@dataclass
class Accuracy:
    err_max: float  # max |op - ref64| on the sampled rows
    err_rel: float  # err_max / max |ref64|
    ref_lp_err: float  # max |ref_T - ref64|: the yardstick
    tolerance: float
    passed: bool
    provider_err: Dict[str, float] = field(default_factory=dict)  # same-function providers' max error

    def ratio_to(self, provider: str) -> Optional[float]:
        """op error / provider error (the flash_attn-style comparison with the baseline)."""
        e = self.provider_err.get(provider)
        if e is None:
            return None
        return self.err_max / e if e > 0 else (0.0 if self.err_max == 0 else float("inf"))


def sample_rows(n: int, max_rows: int = 192) -> torch.Tensor:
    """Evenly spread query rows, always with the first and the last (causal edge cases)."""
    if n <= max_rows:
        return torch.arange(n)
    rows = torch.linspace(0, n - 1, max_rows).round().long()
    return torch.unique(rows)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; equal infinities and shared NaNs count as 0, other non-finite
    mismatches as inf."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def judge(op_rows: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor,
          provider_rows: Dict[str, torch.Tensor]) -> Accuracy:
    err = max_abs_diff(op_rows, ref64)
    yardstick = max_abs_diff(ref_lp, ref64)
    if yardstick == float("inf"):
        yardstick = 0.0
    tol = RULE_FACTOR * yardstick + RULE_ATOL
    scale = float(ref64.detach().double().abs().nan_to_num(0, 0, 0).max()) if ref64.numel() else 0.0
    return Accuracy(
        err_max=err,
        err_rel=err / scale if scale > 0 else err,
        ref_lp_err=yardstick,
        tolerance=tol,
        passed=err <= tol,
        provider_err={name: max_abs_diff(rows, ref64) for name, rows in provider_rows.items()},
    )
