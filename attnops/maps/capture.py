"""Recording the block attention maps (and each row's largest score) of a forward pass without touching model code.

Every attnops attention module (``nn.MultiheadAttention``, ``nn.Attention``, ``nn.MultiQueryAttention``,
the transformers adapter) runs its spec through :func:`attend`. While a :func:`capture` is open,
:func:`attend` asks the kernels for the block map (computed with the forward, see
``attnops.core.block_map``) and / or the row maxima of the scores (``max_scores=True``: what QK-clip reads) and
hands them to the capture; otherwise it is the plain call.
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
    """What was recorded while a :func:`capture` context is open.

    ``maps``: ``{name: block_map (B, H, Nq, Nk)}`` in call order, float32 on the model's device
    (detached), when the capture records maps. ``max_scores``: ``{name: (B, H, Sq)}``, each query row's largest
    score (after the scale and the score modifiers; -inf where a row attends nothing), when it records them.
    ``name`` is the module's qualified name in ``model`` (``"layers.0.self_attn"``); a module called twice in
    one capture gets ``name#1``, ``name#2`` for the later calls.
    """

    def __init__(self, model: Optional[nn.Module], map_block_size, reduce: str, with_maps: bool = True,
                 with_max_scores: bool = False):
        self.map_block_size, self.reduce = map_block_size, reduce
        self.with_maps, self.with_max_scores = with_maps, with_max_scores
        self._names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self.maps: Dict[str, torch.Tensor] = {}
        self.max_scores: Dict[str, torch.Tensor] = {}
        self._calls: Dict[str, int] = {}

    def record(self, module: nn.Module, block_map: Optional[torch.Tensor],
               max_scores: Optional[torch.Tensor] = None) -> None:
        base = self._names.get(id(module)) or f"{type(module).__name__}@{id(module):x}"
        n = self._calls.get(base, 0)
        self._calls[base] = n + 1
        name = base if n == 0 else f"{base}#{n}"
        if self.with_maps and block_map is not None:
            self.maps[name] = block_map.detach()
        if self.with_max_scores and max_scores is not None:
            self.max_scores[name] = max_scores.detach()

    def max_per_head(self) -> Dict[str, torch.Tensor]:
        """``{name: (H,)}``: each call's largest score per head, over its batch and queries (QK-clip's S_max)."""
        return {name: m.amax(dim=(0, 2)) for name, m in self.max_scores.items()}

    def stacked(self) -> torch.Tensor:
        """The maps as one ``(layers, B, H, Nq, Nk)`` tensor (they must share a shape)."""
        return torch.stack(list(self.maps.values()))

    def __len__(self) -> int:
        return len(self.maps)


@contextlib.contextmanager
def capture(model: Optional[nn.Module] = None, *, map_block_size=None, reduce: str = "mean",
            block_size=None, maps: bool = True, max_scores: bool = False) -> Iterator[BlockMapCapture]:
    """Records the block map of every attnops attention call inside the ``with`` block, and / or each query row's
    largest score.

    Args:
        model: names the recorded modules (``model.named_modules()``); optional.
        map_block_size: the maps' granularity (int or ``(block_q, block_k)``, powers of two >= 16);
            default: each spec's kernel block (64, or the block mask's). (``block_size=``: its
            former name, deprecated.)
        reduce: ``"mean"`` or ``"max"`` (see ``attnops.attention``).
        maps: record the block maps (``cap.maps``).
        max_scores: record each call's row maxima of the scores (``cap.max_scores``, ``cap.max_per_head()``), for
            QK-clip (MuonClip) or logit monitoring during training: the kernels write them with the forward (no
            second pass). The softmax specs (``SoftmaxSpec``, ``BlockSparseSpec``, ``MoBASpec``) report them; a call on
            another spec raises inside the capture.

    Example::

        >>> with attnops.maps.capture(model) as cap:
        ...     model(tokens)
        >>> list(cap.maps)            # ['layers.0.attn', 'layers.1.attn']
        >>> attnops.maps.rollout(cap.stacked())
        >>> with attnops.maps.capture(model, maps=False, max_scores=True) as cap:
        ...     loss = model(tokens).loss
        >>> cap.max_per_head()        # {'layers.0.attn': (H,), ...}
    """
    for name, flag in (("maps", maps), ("max_scores", max_scores)):
        if not isinstance(flag, bool):
            raise TypeError(f"capture: {name} must be a bool, got {flag!r}")
    if not (maps or max_scores):
        raise ValueError("capture: nothing to record (maps=False and max_scores=False)")
    if block_size is not None:
        if map_block_size is not None:
            raise TypeError("pass map_block_size= only (block_size= is its deprecated alias)")
        warnings.warn("capture(block_size=) is deprecated: use map_block_size=", DeprecationWarning, stacklevel=3)
        map_block_size = block_size
    cap = BlockMapCapture(model, map_block_size, reduce, maps, max_scores)
    _OPEN.append(cap)
    try:
        yield cap
    finally:
        _OPEN.remove(cap)


def capturing() -> bool:
    return bool(_OPEN)


def wanted() -> Tuple[bool, bool]:
    """``(maps, max_scores)``: what the innermost open capture records (both False when none is open)."""
    return (_OPEN[-1].with_maps, _OPEN[-1].with_max_scores) if _OPEN else (False, False)


def map_options() -> dict:
    """The ``map_block_size`` / ``reduce`` the innermost open capture asks for ({} when none is open)."""
    return {"map_block_size": _OPEN[-1].map_block_size, "reduce": _OPEN[-1].reduce} if _OPEN else {}


def record(module: nn.Module, block_map: Optional[torch.Tensor], max_scores: Optional[torch.Tensor] = None) -> None:
    """Hands ``module``'s map (and row maxima) of one call to the innermost open capture, if any."""
    if _OPEN:
        _OPEN[-1].record(module, block_map, max_scores)


def refuse_uncaptured(what: str) -> None:
    """For a path that runs attention without :func:`attend` (nothing to record): an error while a capture is open,
    not a capture that silently misses calls."""
    if _OPEN:
        raise NotImplementedError(f"attnops.maps.capture: {what} runs without block maps or row maxima, so this "
                                  "capture would miss it")


def attend(module: nn.Module, spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
           softmax_scale: Optional[float] = None, need_map: bool = False,
           **options) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``spec.attend(q, k, v, **options)`` for ``module``: ``(out, block_map)``, the map computed when a
    capture of maps is open (and recorded there) or when ``need_map`` (e.g. ``need_weights=True``), else None;
    a capture of row maxima gets them too (specs with ``reports_max_scores``; others raise)."""
    if getattr(spec, "needs_module", False):  # the method's parameters live on the layer (ReGLASpec)
        options = dict(options, module=module)
    want_map = need_map or (bool(_OPEN) and _OPEN[-1].with_maps)
    want_max = bool(_OPEN) and _OPEN[-1].with_max_scores
    if not (want_map or want_max):
        return spec.attend(q, k, v, causal=causal, softmax_scale=softmax_scale, **options), None
    if want_max and not getattr(spec, "reports_max_scores", False):
        raise NotImplementedError(f"attnops.maps.capture(max_scores=True): the {type(spec).__name__} does not "
                                  "report row maxima of the scores (the softmax specs do: SoftmaxSpec, "
                                  "BlockSparseSpec, MoBASpec)")
    if want_map:
        options = dict(options, return_block_map=True, **map_options())
    if want_max:
        options = dict(options, return_max_scores=True)
    res = spec.attend(q, k, v, causal=causal, softmax_scale=softmax_scale, **options)
    block_map = res[1] if want_map else None
    record(module, block_map, res[-1] if want_max else None)
    return res[0], block_map
