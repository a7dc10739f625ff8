"""The key basis of low-rank-key attention (Loki, Singhania et al. 2024): a calibrated PCA basis of the
attention keys per kv head, its running statistics, its recall, and its file format. Model-level
calibration (running a model to record its keys) is ``attnops.lowrank.calibrate``."""

from __future__ import annotations

import dataclasses
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
        centered: whether the keys were centred before the PCA (Loki's basis: covariance
            eigenvectors, eigenvalues the variances); else the uncentred second moment's.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    rank: Optional[int] = None
    rotary: str = "post"
    centered: bool = False

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
        if not isinstance(self.centered, bool):
            raise TypeError(f"KeyProjection.centered must be a bool, got {self.centered!r}")

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

    def loki_rank(self, fraction: float) -> int:
        """Loki's rank for ``top_r = fraction < 1`` (hpcgroup/loki, ``get_pca_components``): the most,
        over heads, components whose cumulative explained variance stays below ``fraction``,
        ``max_h #(cumsum_h < fraction)``, at least 1. One less than :meth:`rank_for` unless a head
        reaches ``fraction`` exactly: Loki's rule keeps the components before the crossing one."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        return max(1, int((self.explained_variance < fraction).sum(-1).max()))

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
        return KeyProjection(self.basis.to(device), self.eigenvalues.to(device), self.rank, self.rotary, self.centered)

    def state_dict(self) -> dict:
        return {"basis": self.basis.cpu(), "eigenvalues": self.eigenvalues.cpu(), "rank": self.rank,
                "rotary": self.rotary, "centered": self.centered}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "KeyProjection":
        return cls(state["basis"], state["eigenvalues"], state.get("rank"), state.get("rotary", "post"),
                   bool(state.get("centered", False)))

    @classmethod
    def identity(cls, num_kv_heads: int, head_dim: int) -> "KeyProjection":
        """The standard basis: scores from the first ``rank`` raw key dimensions."""
        basis = torch.eye(head_dim).expand(num_kv_heads, head_dim, head_dim).contiguous()
        return cls(basis, torch.ones(num_kv_heads, head_dim))


class KeyStatistics:
    """Running statistics of keys per kv head, in float64: the uncentred second moment ``sum k k^T``
    and the sum ``sum k``.

    The default basis is the uncentred second moment's, because scores are dot products: the basis
    that keeps the most of ``q . k`` in ``rank`` dimensions is the one that keeps the most of
    ``|k|^2``, the top eigenvectors of ``E[k k^T]`` (a key mean is part of the score, not noise to
    remove). ``centered=True`` is Loki's: sklearn's ``PCA().fit(keys)`` (hpcgroup/loki,
    pca_analysis/pca.py), the eigenvectors of the covariance ``E[k k^T] - E[k] E[k]^T``; Loki then
    projects the keys uncentred, as the ops here do."""

    def __init__(self, centered: bool = False):
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be a bool, got {centered!r}")
        self.centered = centered
        self.moment: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def update(self, keys: torch.Tensor) -> None:
        """``keys (..., Hkv, D)``: any leading dims (batch, positions)."""
        if keys.dim() < 2:
            raise ValueError(f"keys must be (..., Hkv, D), got {tuple(keys.shape)}")
        flat = keys.detach().reshape(-1, keys.shape[-2], keys.shape[-1]).to(torch.float64)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("calibration keys contain NaN or inf")
        moment = torch.einsum("nhd,nhe->hde", flat, flat).cpu()
        total = flat.sum(0).cpu()
        if self.moment is None:
            self.moment, self.total = moment, total
        elif self.moment.shape != moment.shape:
            raise ValueError(f"keys of shape (Hkv, D) = {tuple(moment.shape[:2])} after {tuple(self.moment.shape[:2])}")
        else:
            self.moment += moment
            self.total += total
        self.count += flat.shape[0]

    def projection(self, rank: Optional[Union[int, float]], rotary: str) -> KeyProjection:
        """The basis; ``rank`` (the recorded default) may be Loki's fraction of explained variance."""
        if self.moment is None or self.count == 0:
            raise ValueError("calibrate: no keys were seen")
        matrix = self.moment / self.count
        if self.centered:
            mean = self.total / self.count
            matrix = matrix - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        eigenvalues, vectors = torch.linalg.eigh(matrix)  # ascending
        eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
        proj = KeyProjection(vectors.to(torch.float32).contiguous(), eigenvalues.to(torch.float32).contiguous(),
                             None, rotary, self.centered)
        return dataclasses.replace(proj, rank=proj.loki_rank(rank) if isinstance(rank, float) else rank)


def calibrate_keys(keys: Union[torch.Tensor, Iterable[torch.Tensor]], rank: Optional[Union[int, float]] = None,
                   rotary: str = "post", centered: bool = False) -> KeyProjection:
    """The PCA key basis of sample keys: a ``(B, S, Hkv, D)`` tensor or an iterable of them."""
    if rotary not in ROTARY_CHOICES:
        raise ValueError(f"rotary must be one of {ROTARY_CHOICES}, got {rotary!r}")
    stats = KeyStatistics(centered)
    for batch in [keys] if isinstance(keys, torch.Tensor) else keys:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise ValueError("calibrate takes keys (B, S, Hkv, D) tensors (or an iterable of them) or a model")
        stats.update(batch)
    return stats.projection(rank, rotary)


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
