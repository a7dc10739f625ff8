"""Linear attention's feature maps ``phi``: applied to q and k where the kernels consume them (per
token; the op probes one token for the width)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FOCUSED_POWER = 3


def focused_feature_map(power: float = FOCUSED_POWER) -> Callable[[torch.Tensor], torch.Tensor]:
    """FLatten's focused map (Han et al., ICCV 2023): ``r = relu(x) + 1e-6``,
    ``phi(x) = ||r|| * r^p / ||r^p||``: the direction sharpens towards the largest channels, the norm
    is kept. (FLatten's learned softplus scale belongs to the module, not the map.)"""
    if not isinstance(power, (int, float)) or isinstance(power, bool) or not power > 0:
        raise ValueError(f"the focused feature map's power must be a number > 0, got {power!r}")

    def focused(x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x) + 1e-6
        rp = r ** power
        return rp * (torch.linalg.vector_norm(r, dim=-1, keepdim=True)
                     / torch.linalg.vector_norm(rp, dim=-1, keepdim=True))

    focused.__name__ = f"focused_p{power:g}"
    return focused


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


FEATURE_MAPS = {
    "identity": _identity,
    "elu": lambda x: F.elu(x).add_(1.0),  # Katharopoulos et al. 2020: positive, so the normaliser is > 0
    "relu": F.relu,
    "focused": focused_feature_map(),
}


def resolve_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
