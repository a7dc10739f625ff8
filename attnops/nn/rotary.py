"""Rotary position embedding (RoFormer; the half-split layout of Llama / GPT-NeoX)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates channel pairs ``(d, d + D/2)`` of each head by ``position * theta^(-2d/D)``.

    ``forward(x, positions=None)``: ``x (B, T, H, D)``, ``positions (T,)`` or ``(B, T)`` integer
    (default ``0..T-1``) -> same shape as ``x``. Angles are computed in float32 (float64 for
    float64 inputs) and nothing is cached, so any length works.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        if theta <= 0:
            raise ValueError(f"rotary theta must be positive, got {theta}")
        self.head_dim, self.theta = head_dim, float(theta)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        T, D = x.shape[1], x.shape[-1]
        if D != self.head_dim:
            raise ValueError(f"rotary: expected head_dim {self.head_dim}, got {D}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        if positions is None:
            positions = torch.arange(T, device=x.device)
        _check_positions(positions, x)
        inv_freq = self.theta ** (-torch.arange(0, D, 2, device=x.device, dtype=work) / D)
        angles = positions.to(work)[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
        if angles.dim() == 2:
            angles = angles[None]
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # broadcast over heads
        x1, x2 = x[..., : D // 2].to(work), x[..., D // 2:].to(work)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _check_positions(positions, x: torch.Tensor) -> None:
    """``(T,)`` or ``(B, T)`` integer positions on x's device: a ``(1,)`` tensor would broadcast one
    position over every token, and float positions would rotate by fractional angles, both silently."""
    B, T = x.shape[0], x.shape[1]
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if tuple(positions.shape) not in ((T,), (B, T)):
        raise ValueError(f"positions must be (T,) = ({T},) or (B, T) = ({B}, {T}), got {tuple(positions.shape)}")
    if positions.device != x.device:
        raise ValueError(f"positions are on {positions.device} but the input is on {x.device}")
