"""What the ops return: the output tensor, or a named tuple when optional outputs are asked for."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionOutput(NamedTuple):
    """``out (B, Sq, H, D)`` and ``lse (B, H, Sq)`` (natural-log log-sum-exp of the scaled scores,
    float32; float64 for float64 inputs; -inf for rows with nothing to attend to)."""

    out: torch.Tensor
    lse: torch.Tensor
