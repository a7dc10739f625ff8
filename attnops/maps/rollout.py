"""Attention rollout at block granularity (Abnar & Zuidema, 2020).

A residual layer passes on ``x + attn(x)``, so the token-mixing of layer l is modelled as
``A_l = (1 - residual) * mean_heads(W_l) + residual * I``; rollout multiplies them from the first
layer up: ``R = A_L ... A_2 A_1``. ``R[i, j]`` reads: how much of query block i's representation
at the top traces back to input block j. On block maps (rows of mean maps sum to 1) the product
stays row-stochastic, at O(L * N_blocks^3) cost instead of O(L * N^3).
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

Maps = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def _as_layers(maps: Maps) -> torch.Tensor:
    if isinstance(maps, Mapping):
        maps = list(maps.values())
    if isinstance(maps, (list, tuple)):
        if not maps:
            raise ValueError("rollout needs at least one map")
        maps = torch.stack([m.detach() for m in maps])
    if not isinstance(maps, torch.Tensor) or maps.dim() != 5:
        raise ValueError("rollout takes per-layer maps (B, H, N, N), as a list, a dict (capture.maps) or a "
                         f"(layers, B, H, N, N) tensor; got {getattr(maps, 'shape', type(maps).__name__)}")
    if maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"rollout needs square self-attention maps (same query and key blocks), got "
                         f"{tuple(maps.shape[-2:])}")
    return maps


def rollout(maps: Maps, residual: float = 0.5, head_fusion: str = "mean") -> torch.Tensor:
    """Block-level attention rollout.

    Args:
        maps: per-layer block maps ``(B, H, N, N)`` of a self-attention stack, first layer first:
            a list, ``capture.maps`` (dict in call order) or a ``(layers, B, H, N, N)`` tensor.
        residual: weight of the identity (the residual connection), in [0, 1].
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads (Abnar & Zuidema use the mean).

    Returns:
        ``(B, N, N)`` float32; row i is query block i's attribution over input blocks (rows sum to 1
        when the maps' rows do, e.g. mean maps of a causal model).
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    fuse = {"mean": lambda m: m.mean(1), "max": lambda m: m.amax(1), "min": lambda m: m.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    layers = _as_layers(maps).float()
    eye = torch.eye(layers.shape[-1], device=layers.device)
    result = None
    for layer in layers:
        a = (1.0 - residual) * fuse[head_fusion](layer) + residual * eye
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)  # max / min fusion leaves rows unnormalised
        result = a if result is None else a @ result
    return result
