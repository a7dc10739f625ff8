"""PNG heatmaps of block maps (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency: `pip install attnops[plot]`
        raise ImportError("attnops.maps plots need matplotlib (pip install matplotlib)") from e
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _matrix(block_map: torch.Tensor) -> torch.Tensor:
    m = block_map.detach().float().cpu()
    while m.dim() > 2:  # (B, H, Nq, Nk) / (H, Nq, Nk): the first batch element, heads averaged
        m = m[0] if m.dim() == 4 else m.mean(0)
    if m.dim() != 2:
        raise ValueError(f"a heatmap needs a 2-d map (or (B, H, Nq, Nk)), got shape {tuple(block_map.shape)}")
    return m


def to_heatmap(block_map: torch.Tensor, path: Union[str, Path], title: Optional[str] = None,
               log_scale: bool = False) -> Path:
    """Writes one map as a PNG: ``(Nq, Nk)``, or ``(B, H, Nq, Nk)`` (first batch element, heads
    averaged). ``log_scale`` colours log10 of the mass (long-context maps are mostly tiny). Returns
    the path."""
    plt = _pyplot()
    m = _matrix(block_map)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    _draw(ax, m, log_scale)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    if title:
        ax.set_title(title)
    fig.colorbar(ax.images[0], ax=ax, label=_scale_label(log_scale))
    return _save(fig, plt, path)


def _scale_label(log_scale: bool) -> str:
    return "log10 attention mass" if log_scale else "attention mass (probability)"


def plot_grid(maps: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]], path: Union[str, Path],
              heads: Optional[int] = None, log_scale: bool = False, batch_index: int = 0) -> Path:
    """Layers x heads grid of block maps as one PNG: ``maps`` as in ``capture.maps`` (or a list of
    ``(B, H, Nq, Nk)``), one row per layer, one column per head (the first ``heads`` heads)."""
    plt = _pyplot()
    items = list(maps.items()) if isinstance(maps, Mapping) else [(f"layer {i}", m) for i, m in enumerate(maps)]
    if not items:
        raise ValueError("plot_grid needs at least one map")
    num_heads = min(m.shape[1] for _, m in items)
    cols = num_heads if heads is None else max(1, min(heads, num_heads))
    fig, axes = plt.subplots(len(items), cols, figsize=(1.8 * cols + 1.6, 1.8 * len(items) + 0.5), squeeze=False,
                             layout="constrained")
    panels = [[m[batch_index, h].detach().float().cpu() for h in range(cols)] for _, m in items]
    # one colour scale for every panel, so that colours compare across layers and heads
    values = torch.stack([_scaled(p, log_scale) for row in panels for p in row])
    finite = values[torch.isfinite(values)]
    limits = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    for row, (name, m) in enumerate(items):
        for h in range(cols):
            ax = axes[row][h]
            _draw(ax, panels[row][h], log_scale, limits)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.colorbar(axes[0][0].images[0], ax=axes, shrink=0.8, label=_scale_label(log_scale))
    return _save(fig, plt, path, tight=False)


def _scaled(m: torch.Tensor, log_scale: bool) -> torch.Tensor:
    return torch.log10(m.clamp(min=1e-8)) if log_scale else m


def _draw(ax, m: torch.Tensor, log_scale: bool, limits=None) -> None:
    vmin, vmax = limits if limits else (None, None)
    ax.imshow(_scaled(m, log_scale).numpy(), cmap="viridis", interpolation="nearest", aspect="auto", vmin=vmin,
              vmax=vmax)


def _save(fig, plt, path: Union[str, Path], tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
