"""Low-rank keys (Loki, Singhania et al. 2024): a calibrated PCA basis of the attention keys.

Keys live in a low-dimensional subspace: scores computed from their first ``rank`` principal
components rank the keys almost as the full scores do. :func:`calibrate` finds the basis per kv
head from sample keys (or from a model run on sample inputs); :func:`attnops.lowrank_key_attention`
and ``decode_attention(..., lowrank=...)`` use it to pick the top-k keys per query cheaply and
attend to them exactly.

    >>> proj = attnops.lowrank.calibrate(keys, rank=32)             # keys: (B, S, Hkv, D) tensors
    >>> out = attnops.lowrank_key_attention(q, k, v, proj, rank=32, topk=1024)
    >>> projs = attnops.lowrank.calibrate(model, inputs=batches)    # {module name: KeyProjection}
    >>> attnops.lowrank.apply(model, projs, rank=32, topk=1024)     # low-rank decoding in every layer
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Union

import torch

ROTARY_CHOICES = ("post", "pre")


@dataclass(frozen=True)
class KeyProjection:
    """An orthonormal key basis per kv head, principal components first.

    Attributes:
        basis: ``(Hkv, D, D)`` float32; column ``c`` of ``basis[h]`` is the ``c``-th principal
            direction of head ``h``'s keys, so ``k @ basis[h]`` are the key's coordinates, largest
            variance first. Orthonormal: ``q . k = (q @ basis[h]) . (k @ basis[h])`` exactly.
        eigenvalues: ``(Hkv, D)`` float32, descending: the keys' second moment along each direction.
        rank: the rank it was calibrated for (a default; the ops take their own ``rank``).
        rotary: ``"post"`` or ``"pre"``: whether the keys it was fit on had the rotary embedding.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    rank: Optional[int] = None
    rotary: str = "post"

    def __post_init__(self):
        b, e = self.basis, self.eigenvalues
        if not isinstance(b, torch.Tensor) or b.dim() != 3 or b.shape[1] != b.shape[2]:
            raise ValueError(f"KeyProjection.basis must be a (Hkv, D, D) tensor, got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        if not isinstance(e, torch.Tensor) or tuple(e.shape) != tuple(b.shape[:2]):
            raise ValueError(f"KeyProjection.eigenvalues must be (Hkv, D) = {tuple(b.shape[:2])}")
        if self.rank is not None and not (isinstance(self.rank, int) and 1 <= self.rank <= b.shape[1]):
            raise ValueError(f"KeyProjection.rank must be an int in [1, {b.shape[1]}], got {self.rank!r}")
        if self.rotary not in ROTARY_CHOICES:
            raise ValueError(f"KeyProjection.rotary must be one of {ROTARY_CHOICES}, got {self.rotary!r}")

    @property
    def num_kv_heads(self) -> int:
        return self.basis.shape[0]

    @property
    def head_dim(self) -> int:
        return self.basis.shape[1]

    @property
    def explained_variance(self) -> torch.Tensor:
        """``(Hkv, D)``: the fraction of the keys' second moment in the first ``1..D`` components
        (the explained-variance curve; its last entry is 1)."""
        total = self.eigenvalues.clamp(min=0).sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        return self.eigenvalues.clamp(min=0).cumsum(-1) / total

    def rank_for(self, fraction: float) -> int:
        """The smallest rank whose explained variance reaches ``fraction`` in every head."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        reached = self.explained_variance >= fraction - 1e-6
        return int(reached.float().argmax(-1).max()) + 1

    def rotate(self, x: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        """``x (B, S, H, D)`` (H a multiple of Hkv; query head h uses kv head ``h // (H / Hkv)``) in the
        basis: ``(B, S, H, rank or D)``, in x's dtype."""
        if x.dim() != 4 or x.shape[-1] != self.head_dim or x.shape[2] % self.num_kv_heads:
            raise ValueError(f"rotate takes (B, S, H, {self.head_dim}) with H a multiple of {self.num_kv_heads}, "
                             f"got {tuple(x.shape)}")
        r = self.head_dim if rank is None else rank
        B, S, H, D = x.shape
        basis = self.basis[:, :, :r].to(device=x.device, dtype=x.dtype)  # (Hkv, D, r)
        grouped = x.reshape(B, S, self.num_kv_heads, H // self.num_kv_heads, D)
        return torch.einsum("bshgd,hdr->bshgr", grouped, basis).reshape(B, S, H, r).contiguous()

    def to(self, device=None) -> "KeyProjection":
        return KeyProjection(self.basis.to(device), self.eigenvalues.to(device), self.rank, self.rotary)

    def state_dict(self) -> dict:
        return {"basis": self.basis.cpu(), "eigenvalues": self.eigenvalues.cpu(), "rank": self.rank,
                "rotary": self.rotary}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "KeyProjection":
        return cls(state["basis"], state["eigenvalues"], state.get("rank"), state.get("rotary", "post"))

    @classmethod
    def identity(cls, num_kv_heads: int, head_dim: int) -> "KeyProjection":
        """The standard basis: scores from the first ``rank`` raw key dimensions."""
        basis = torch.eye(head_dim).expand(num_kv_heads, head_dim, head_dim).contiguous()
        return cls(basis, torch.ones(num_kv_heads, head_dim))


class KeyStatistics:
    """Running uncentred second moment ``sum k k^T`` of keys per kv head, in float64.

    Uncentred, because scores are dot products: the basis that keeps the most of ``q . k`` in
    ``rank`` dimensions is the one that keeps the most of ``|k|^2``, the top eigenvectors of
    ``E[k k^T]`` (a key mean is part of the score, not noise to remove)."""

    def __init__(self):
        self.moment: Optional[torch.Tensor] = None
        self.count = 0

    def update(self, keys: torch.Tensor) -> None:
        """``keys (..., Hkv, D)``: any leading dims (batch, positions)."""
        if keys.dim() < 2:
            raise ValueError(f"keys must be (..., Hkv, D), got {tuple(keys.shape)}")
        flat = keys.detach().reshape(-1, keys.shape[-2], keys.shape[-1]).to(torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("calibration keys contain NaN or inf")
        moment = torch.einsum("nhd,nhe->hde", flat, flat).cpu()
        if self.moment is None:
            self.moment = moment
        elif self.moment.shape != moment.shape:
            raise ValueError(f"keys of shape (Hkv, D) = {tuple(moment.shape[:2])} after {tuple(self.moment.shape[:2])}")
        else:
            self.moment += moment
        self.count += flat.shape[0]

    def projection(self, rank: Optional[int], rotary: str) -> KeyProjection:
        if self.moment is None or self.count == 0:
            raise ValueError("calibrate: no keys were seen")
        eigenvalues, vectors = torch.linalg.eigh(self.moment / self.count)  # ascending
        eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
        return KeyProjection(vectors.to(torch.float32).contiguous(), eigenvalues.to(torch.float32).contiguous(),
                             rank, rotary)


def calibrate(source: Union[torch.Tensor, Iterable[torch.Tensor], torch.nn.Module], rank: Optional[int] = None, *,
              inputs=None, rotary: str = "post") -> Union[KeyProjection, Dict[str, KeyProjection]]:
    """The PCA key basis (:class:`KeyProjection`) from sample keys, or per attention layer of a model.

    Args:
        source: a keys tensor ``(B, S, Hkv, D)`` or an iterable of them -> one :class:`KeyProjection`;
            or a model whose attention layers are :class:`attnops.nn.Attention` modules (including
            ``MultiQueryAttention``) -> ``{module name: KeyProjection}``.
        rank: recorded as the projection's default rank.
        inputs: with a model: one input (a tensor or a tuple of positional arguments) or an iterable
            of them; the model runs on each under ``torch.no_grad()``.
        rotary: ``"post"`` fits the keys after the rotary embedding (the keys the cache holds);
            ``"pre"`` before it (Loki reports pre-rotary keys are of lower rank). Either way the
            ops apply the basis to the keys they are given.
    """
    if rotary not in ROTARY_CHOICES:
        raise ValueError(f"rotary must be one of {ROTARY_CHOICES}, got {rotary!r}")
    if isinstance(source, torch.nn.Module):
        return _calibrate_model(source, rank, inputs, rotary)
    stats = KeyStatistics()
    for keys in [source] if isinstance(source, torch.Tensor) else source:
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise ValueError("calibrate takes keys (B, S, Hkv, D) tensors (or an iterable of them) or a model")
        stats.update(keys)
    return stats.projection(rank, rotary)


def _attention_layers(model: torch.nn.Module):
    from attnops.nn.attention import Attention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def _calibrate_model(model, rank, inputs, rotary) -> Dict[str, KeyProjection]:
    if inputs is None:
        raise ValueError("calibrate(model): pass inputs= (a tensor, a tuple of arguments, or an iterable of them)")
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("calibrate(model): the model has no attnops.nn.Attention layers")
    stats = {name: KeyStatistics() for name, _ in layers}
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


def recall(q: torch.Tensor, k: torch.Tensor, projection: Optional[KeyProjection], rank: int, topk: int,
           chunk: int = 256) -> float:
    """How well ``rank``-dim scores find the true top-k keys: the mean, over query rows, of the
    fraction of a row's ``topk`` keys of highest full score that are also among its ``topk`` of
    highest low-rank score (every key a candidate; GQA by head groups). ``q (B, Sq, H, D)``,
    ``k (B, Sk, Hkv, D)``; chunked over queries, memory O(chunk * Sk)."""
    proj = projection if projection is not None else KeyProjection.identity(k.shape[2], k.shape[3])
    group = q.shape[2] // k.shape[2]
    qf, kf = q.float(), k.float()
    kk = kf.repeat_interleave(group, dim=2)
    kr = proj.rotate(kf, rank).repeat_interleave(group, dim=2)
    topk = min(topk, k.shape[1])
    hits, rows = 0.0, 0
    for i0 in range(0, q.shape[1], chunk):
        qc = qf[:, i0:i0 + chunk]
        true = torch.einsum("bqhd,bkhd->bhqk", qc, kk).topk(topk, dim=-1).indices
        approx = torch.einsum("bqhr,bkhr->bhqk", proj.rotate(qc, rank), kr).topk(topk, dim=-1).indices
        picked = torch.zeros(*approx.shape[:-1], k.shape[1], dtype=torch.bool, device=q.device)
        picked.scatter_(-1, approx, True)
        hits += float(picked.gather(-1, true).sum())
        rows += true.numel() // topk
    return hits / (rows * topk) if rows else 1.0


def save(projections: Union[KeyProjection, Mapping[str, KeyProjection]], path: Union[str, os.PathLike]) -> None:
    """Writes one projection or a ``{name: projection}`` mapping with ``torch.save``."""
    if isinstance(projections, KeyProjection):
        payload = {"single": projections.state_dict()}
    else:
        payload = {"layers": {name: p.state_dict() for name, p in projections.items()}}
    torch.save(payload, path)


def load(path: Union[str, os.PathLike]) -> Union[KeyProjection, Dict[str, KeyProjection]]:
    """Reads what :func:`save` wrote."""
    payload = torch.load(path, weights_only=True)
    if "single" in payload:
        return KeyProjection.from_state_dict(payload["single"])
    return {name: KeyProjection.from_state_dict(s) for name, s in payload["layers"].items()}
