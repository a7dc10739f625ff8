"""Low-rank keys (Loki, Singhania et al. 2024): a calibrated PCA basis of the attention keys.

Keys live in a low-dimensional subspace: scores computed from their first ``rank`` principal
components rank the keys almost as the full scores do. :func:`calibrate` finds the basis per kv
head from sample keys (or from a model run on sample inputs); :func:`attnops.lowrank_key_attention`
and ``decode_attention(..., lowrank=...)`` use it to pick the top-k keys per query cheaply and
attend to them exactly.

    >>> proj = attnops.lowrank.calibrate(keys, rank=32)             # keys: (B, S, Hkv, D) tensors
    >>> out = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=32, topk=1024)
    >>> projs = attnops.lowrank.calibrate(model, inputs=batches)    # {module name: KeyProjection}
    >>> attnops.lowrank.apply(model, projs, rank=32, topk=1024)     # low-rank decoding in every layer
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Union

import torch

from attnops.nn.attention import Attention
from attnops.ops.lowrank.projection import (ROTARY_CHOICES, KeyProjection, KeyStatistics, calibrate_keys, load,
                                            recall, save)

__all__ = ["KeyProjection", "KeyStatistics", "apply", "calibrate", "load", "recall", "save"]


def calibrate(source: Union[torch.Tensor, Iterable[torch.Tensor], torch.nn.Module],
              rank: Optional[Union[int, float]] = None, *, inputs=None, rotary: str = "post",
              centered: bool = False) -> Union[KeyProjection, Dict[str, KeyProjection]]:
    """The PCA key basis (:class:`KeyProjection`) from sample keys, or per attention layer of a model.

    Args:
        source: a keys tensor ``(B, S, Hkv, D)`` or an iterable of them -> one :class:`KeyProjection`;
            or a model whose attention layers are :class:`attnops.nn.Attention` modules (including
            ``MultiQueryAttention``) -> ``{module name: KeyProjection}``.
        rank: recorded as the projection's default rank; a float in (0, 1) is Loki's ``top_r``
            (:meth:`KeyProjection.loki_rank`).
        inputs: with a model: one input (a tensor or a tuple of positional arguments) or an iterable
            of them; the model runs on each under ``torch.no_grad()``.
        rotary: ``"post"`` fits the keys after the rotary embedding (the keys the cache holds);
            ``"pre"`` before it (Loki reports pre-rotary keys are of lower rank). Either way the
            ops apply the basis to the keys they are given.
        centered: ``True`` reproduces Loki's basis exactly: sklearn's ``PCA`` of the keys (centred,
            hpcgroup/loki pca_analysis/pca.py); ``False`` (default): the uncentred second moment's,
            which keeps the most of the dot products (see :class:`KeyStatistics`).
    """
    if rotary not in ROTARY_CHOICES:
        raise ValueError(f"rotary must be one of {ROTARY_CHOICES}, got {rotary!r}")
    if isinstance(source, torch.nn.Module):
        return _calibrate_model(source, rank, inputs, rotary, centered)
    return calibrate_keys(source, rank, rotary, centered)


def _attention_layers(model: torch.nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def _calibrate_model(model, rank, inputs, rotary, centered) -> Dict[str, KeyProjection]:
    if inputs is None:
        raise ValueError("calibrate(model): pass inputs= (a tensor, a tuple of arguments, or an iterable of them)")
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("calibrate(model): the model has no attnops.nn.Attention layers")
    stats = {name: KeyStatistics(centered) for name, _ in layers}
    # record the keys where the layer computes them: after the rotary embedding (_qkv) or before it
    # (_project, which _qkv calls), through an instance attribute over the method
    hook = "_qkv" if rotary == "post" else "_project"
    for name, layer in layers:
        def recording(*args, _stats=stats[name], _inner=getattr(layer, hook)):
            q, k, v = _inner(*args)
            _stats.update(k)
            return q, k, v

        setattr(layer, hook, recording)
    try:
        batches = [inputs] if isinstance(inputs, (torch.Tensor, tuple)) else inputs
        with torch.no_grad():
            for batch in batches:
                model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for _, layer in layers:
            delattr(layer, hook)  # the instance attribute; the class method shows through again
    return {name: s.projection(rank, rotary) for name, s in stats.items()}


def apply(model: torch.nn.Module, projections: Union[KeyProjection, Mapping[str, KeyProjection]], rank: int,
          topk: int, local: int = 0) -> int:
    """Turns on low-rank-key decoding in every :class:`attnops.nn.Attention` layer of ``model``
    (``projections``: one for all or ``{module name: projection}`` from :func:`calibrate`); returns how
    many layers it set. Clear the caches made before: they hold keys in the old basis."""
    count = 0
    for name, layer in _attention_layers(model):
        proj = projections if isinstance(projections, KeyProjection) else projections.get(name)
        if proj is None:
            continue
        layer.set_lowrank(proj, rank=rank, topk=topk, local=local)
        count += 1
    if count == 0:
        raise ValueError("apply: no attnops.nn.Attention layer matched the projections")
    return count
