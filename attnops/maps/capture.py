"""Recording the block attention maps of a forward pass without touching model code.

Every attnops attention module (``nn.MultiheadAttention``, ``nn.Attention``, ``nn.MultiQueryAttention``,
the transformers adapter) runs its spec through :func:`attend`. While a :func:`capture` is open,
:func:`attend` asks the kernels for the block map (computed with the forward, see
``attnops.core.block_map``) and hands it to the capture; otherwise it is the plain call.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

# Open captures, innermost last. A plain list: torch.compile guards on it being empty.
_OPEN: List["BlockMapCapture"] = []


class BlockMapCapture:
    """The maps recorded while a :func:`capture` context is open.

    ``maps``: ``{name: block_map (B, H, Nq, Nk)}`` in call order, float32 on the model's device
    (detached). ``name`` is the module's qualified name in ``model`` (``"layers.0.self_attn"``); a
    module called twice in one capture gets ``name#1``, ``name#2`` for the later calls.
    """

    def __init__(self, model: Optional[nn.Module], map_block_size, reduce: str):
        self.map_block_size, self.reduce = map_block_size, reduce
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self.maps: Dict[str, torch.Tensor] = {}

    def record(self, module: nn.Module, block_map: torch.Tensor) -> None:
        base = self._names.get(id(module)) or f"{type(module).__name__}@{id(module):x}"
        name, n = base, 0
        while name in self.maps:
            n += 1
            name = f"{base}#{n}"
        self.maps[name] = block_map.detach()

    def stacked(self) -> torch.Tensor:
        """The maps as one ``(layers, B, H, Nq, Nk)`` tensor (they must share a shape)."""
        return torch.stack(list(self.maps.values()))

    def __len__(self) -> int:
        return len(self.maps)


@contextlib.contextmanager
def capture(model: Optional[nn.Module] = None, *, map_block_size=None, reduce: str = "mean",
            block_size=None) -> Iterator[BlockMapCapture]:
    """Records the block map of every attnops attention call inside the ``with`` block.

    Args:
        model: names the recorded modules (``model.named_modules()``); optional.
        map_block_size: the maps' granularity (int or ``(block_q, block_k)``, powers of two >= 16);
            default: each spec's kernel block (64, or the block mask's). (``block_size=``: its
            former name, deprecated.)
        reduce: ``"mean"`` or ``"max"`` (see ``attnops.attention``).

    Example::

        >>> with attnops.maps.capture(model) as cap:
        ...     model(tokens)
        >>> list(cap.maps)            # ['layers.0.attn', 'layers.1.attn']
        >>> attnops.maps.rollout(cap.stacked())
    """
    if block_size is not None:
        if map_block_size is not None:
            raise TypeError("pass map_block_size= only (block_size= is its deprecated alias)")
        warnings.warn("capture(block_size=) is deprecated: use map_block_size=", DeprecationWarning, stacklevel=3)
        map_block_size = block_size
    cap = BlockMapCapture(model, map_block_size, reduce)
    _OPEN.append(cap)
    try:
        yield cap
    finally:
        _OPEN.remove(cap)


def capturing() -> bool:
    return bool(_OPEN)


def map_options() -> dict:
    """The ``map_block_size`` / ``reduce`` the innermost open capture asks for ({} when none is open)."""
    return {"map_block_size": _OPEN[-1].map_block_size, "reduce": _OPEN[-1].reduce} if _OPEN else {}


def record(module: nn.Module, block_map: torch.Tensor) -> None:
    """Hands ``module``'s map of one call to the innermost open capture, if any."""
    if _OPEN:
        _OPEN[-1].record(module, block_map)


def attend(module: nn.Module, spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
           softmax_scale: Optional[float] = None, need_map: bool = False,
           **options) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``spec.attend(q, k, v, **options)`` for ``module``: ``(out, block_map)``, the map computed when a
    capture is open (and recorded there) or when ``need_map`` (e.g. ``need_weights=True``), else None."""
    if getattr(spec, "needs_module", False):  # the method's parameters live on the layer (ReGLASpec)
        options = dict(options, module=module)
    if not (_OPEN or need_map):
        return spec.attend(q, k, v, causal=causal, softmax_scale=softmax_scale, **options), None
    out, block_map = spec.attend(q, k, v, causal=causal, softmax_scale=softmax_scale, return_block_map=True,
                                 **map_options(), **options)
    record(module, block_map)
    return out, block_map
