"""Block attention maps: capture them from a model, roll them out, draw them.

- :func:`capture` records the block map of every attnops attention module in a forward pass;
- :func:`rollout` is attention rollout (Abnar & Zuidema, 2020) at block granularity;
- :func:`to_heatmap` / :func:`plot_grid` write PNGs (matplotlib);
- ``python -m attnops.maps`` runs a small model on a text and writes the PNGs.

The maps themselves come from the ops (``return_block_map=True``), computed by the kernels with the
forward; their definition is in ``attnops.core.block_map``.
"""

from attnops.maps.capture import BlockMapCapture, attend, capture, capturing
from attnops.maps.plot import plot_grid, to_heatmap
from attnops.maps.rollout import rollout

__all__ = ["BlockMapCapture", "attend", "capture", "capturing", "plot_grid", "rollout", "to_heatmap"]
