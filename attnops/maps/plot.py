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
    fig.colorbar(ax.images[0], ax=ax)
    return _save(fig, plt, path)


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
    fig, axes = plt.subplots(len(items), cols, figsize=(1.8 * cols + 1, 1.8 * len(items) + 0.5), squeeze=False)
    for row, (name, m) in enumerate(items):
        for h in range(cols):
            ax = axes[row][h]
            _draw(ax, m[batch_index, h].detach().float().cpu(), log_scale)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(name, fontsize=7)
    return _save(fig, plt, path)


def _draw(ax, m: torch.Tensor, log_scale: bool) -> None:
    data = torch.log10(m.clamp(min=1e-8)) if log_scale else m
    ax.imshow(data.numpy(), cmap="viridis", interpolation="nearest", aspect="auto")


def _save(fig, plt, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
