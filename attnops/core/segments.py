"""Token-exact segment bounds: packed documents and variable-length batches on the block-sparse core.

A mask of documents is, for every query row, one contiguous interval of keys, and for every key one
contiguous interval of queries. The kernels take both as int32 ``(Bb, rows, 2)`` tensors of
``[lo, hi)`` (``key_bounds`` per query, ``query_bounds`` per key, Bb in {1, B}) and intersect them with
the causal / window predicates and the block LUT: a tile inside one document is masked by nothing, a
tile wholly in another document is never visited (both columns are nondecreasing along the rows, so a
tile's range is ``[lo of its first row, hi of its last)``). Nothing ``Sq x Sk`` is built.

Two ways in:

- :func:`from_document_ids`: ``document_ids (B, S)`` of a batched, packed layout; queries attend keys
  of their own run of equal ids. Causal / window stay the ops' own predicates (a query's position and
  a key's are in the same coordinates, so ``j <= i`` within a document is ``j <= i`` globally).
- :func:`from_cu_seqlens`: flash_attn's varlen layout, ``cu_seqlens_q`` / ``cu_seqlens_k``; causal and
  windows align each sequence's own bottom-right corner, so they are folded into the bounds here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class SegmentBounds:
    """The kernels' form: ``key_bounds (Bb, Sq, 2)`` and ``query_bounds (Bb, Sk, 2)``, int32; ``query_bounds`` may
    be None for a forward no backward follows (the forwards read only ``key_bounds``). ``alibi_offsets``: int32
    ``(Sq,)``, ALiBi's distance origin per query (query ``i`` sits at key ``i + alibi_offsets[i]``), where the
    sequences of a packed layout differ in ``Lk - Lq`` (:func:`from_cu_seqlens`); None: ``i + Sk - Sq``."""

    key_bounds: torch.Tensor
    query_bounds: Optional[torch.Tensor]
    alibi_offsets: Optional[torch.Tensor] = None

    def token_mask(self, seq_len_k: int) -> torch.Tensor:
        """``(Bb, 1, Sq, Sk)`` bool: the pairs the bounds allow (the reference's form; N x N)."""
        j = torch.arange(seq_len_k, device=self.key_bounds.device)
        lo, hi = self.key_bounds[..., 0:1], self.key_bounds[..., 1:2]
        return ((j >= lo) & (j < hi)).unsqueeze(1)


def transpose_bounds(key_bounds: torch.Tensor, seq_len_k: int) -> torch.Tensor:
    """Per-key query intervals from per-query key intervals (both nondecreasing): query i sees key j
    iff ``lo_i <= j < hi_i``, so key j is seen by ``[#{i: hi_i <= j}, #{i: lo_i <= j})``."""
    lo = key_bounds[..., 0].contiguous()
    hi = key_bounds[..., 1].contiguous()
    j = torch.arange(seq_len_k, dtype=lo.dtype, device=lo.device).expand(lo.shape[0], seq_len_k).contiguous()
    q_lo = torch.searchsorted(hi, j, right=True)
    q_hi = torch.searchsorted(lo, j, right=True)
    return torch.stack([q_lo, q_hi], dim=-1).to(torch.int32).contiguous()


def _checking() -> bool:
    return not torch.compiler.is_compiling()


def from_document_ids(document_ids: torch.Tensor, batch: int, seq_len: int, device) -> SegmentBounds:
    """Bounds of a packed batch: ``document_ids`` ``(B, S)`` or ``(S,)`` (one packing for every batch
    row), any integer dtype; every id forms one contiguous run (a document), so equal ids apart from each
    other are refused rather than joined. Padding is one more document (its rows attend only each
    other; drop them after)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dtype.is_floating_point or \
            document_ids.dtype == torch.bool or document_ids.is_complex():
        raise TypeError("document_ids must be an integer tensor of shape (B, S) or (S,)")
    ids = document_ids.unsqueeze(0) if document_ids.dim() == 1 else document_ids
    if ids.dim() != 2 or ids.shape[1] != seq_len or ids.shape[0] not in (1, batch):
        raise ValueError(f"document_ids must be (B, S) = ({batch}, {seq_len}) or (S,), got "
                         f"{tuple(document_ids.shape)}")
    if ids.device != torch.device(device):
        raise ValueError(f"document_ids is on {ids.device}, q on {device}")
    Bb, S = ids.shape
    pos = torch.arange(S, device=ids.device)
    change = ids[:, 1:] != ids[:, :-1]
    ones = torch.ones(Bb, 1, dtype=torch.bool, device=ids.device)
    is_start = torch.cat([ones, change], dim=1)
    is_end = torch.cat([change, ones], dim=1)
    start = torch.where(is_start, pos, 0).cummax(dim=1).values
    end = torch.where(is_end, pos + 1, S).flip(1).cummin(dim=1).values.flip(1)
    if _checking() and S > 0:
        runs = is_start.sum(dim=1)
        distinct = torch.tensor([row.unique().numel() for row in ids], device=ids.device)
        if bool((runs != distinct).any()):
            raise ValueError("document_ids: every document must be one contiguous run of its id (an id that "
                             "appears again after another id would join two documents)")
    bounds = torch.stack([start, end], dim=-1).to(torch.int32).contiguous()
    # self-attention over one packing: key j is seen by the queries of its own document, the same interval
    return SegmentBounds(bounds, bounds)


def from_key_mask(mask: torch.Tensor, seq_len_q: int) -> Optional[SegmentBounds]:
    """Bounds of a key padding mask ``(Bm, 1, 1, Sk)`` bool (True: attended) whose kept keys form one run in
    every batch row (right, left or both-sided padding), else None (the mask then stays a bias). The same
    keys for every query: no bias to read per score, and the tiles outside the run are never visited."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or not _checking():
        return None
    m = mask[:, 0, 0]
    Sk = m.shape[1]
    pos = torch.arange(Sk, device=m.device)
    count = m.sum(dim=1)
    lo = torch.where(m, pos, Sk).amin(dim=1)
    hi = torch.where(m, pos + 1, 0).amax(dim=1)
    if not bool(((hi - lo == count) | (count == 0)).all()):
        return None
    lo, hi = torch.where(count == 0, 0, lo), torch.where(count == 0, 0, hi)
    key_bounds = torch.stack([lo, hi], dim=-1)[:, None, :].expand(m.shape[0], seq_len_q, 2)
    key_bounds = key_bounds.to(torch.int32).contiguous()
    return SegmentBounds(key_bounds, transpose_bounds(key_bounds, Sk))


def intersect(a: Optional[SegmentBounds], b: Optional[SegmentBounds], seq_len_k: int) -> Optional[SegmentBounds]:
    """The pairs both allow (either may be None). The intersection of monotone intervals is monotone; an
    empty one is kept as ``lo = hi``."""
    if a is None or b is None:
        return a if b is None else b
    if a.alibi_offsets is not None or b.alibi_offsets is not None:
        raise NotImplementedError("segments: intersecting bounds that carry ALiBi offsets")
    ka, kb = torch.broadcast_tensors(a.key_bounds, b.key_bounds)
    lo = torch.maximum(ka[..., 0], kb[..., 0])
    hi = torch.maximum(torch.minimum(ka[..., 1], kb[..., 1]), lo)
    key_bounds = torch.stack([lo, hi], dim=-1).contiguous()
    return SegmentBounds(key_bounds, transpose_bounds(key_bounds, seq_len_k))


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device, max_seqlen: Optional[int]) -> None:
    """flash_attn's ``cu_seqlens``: int32 ``(num_seqs + 1,)`` on q's device, from 0 to ``total``,
    nondecreasing; ``max_seqlen`` at least every length (values read on CPU only)."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be an int32 tensor of shape (num_seqs + 1,), got "
                         f"{getattr(cu, 'dtype', type(cu))} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != torch.device(device):
        raise ValueError(f"{name} is on {cu.device}, q on {device}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen for {name} must be an int >= 0, got {max_seqlen!r}")
    if cu.device.type != "cpu" or not _checking():
        return
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the total length {total}, got "
                         f"[{int(cu[0])}, ..., {int(cu[-1])}]")
    lengths = cu[1:] - cu[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be nondecreasing")
    if max_seqlen is not None and lengths.numel() and int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is below the longest sequence of {name} "
                         f"({int(lengths.max())})")


def from_cu_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                    causal: bool, window_size: Tuple[int, int], alibi: bool = False) -> SegmentBounds:
    """Bounds of flash_attn's varlen layout (batch 1 of ``total`` tokens): query ``a`` of sequence s
    sees the keys of sequence s, and with ``causal`` / ``window_size (left, right)`` those in
    ``[a + Lk - Lq - left, a + Lk - Lq + right]`` of its own sequence (bottom-right per sequence). With
    ``alibi``, also ALiBi's per-query offsets where the layouts differ: query ``a`` of sequence s sits at its
    sequence's key ``a + Lk - Lq`` (flash_attn's ``|i + Lk - Lq - j|`` inside the sequence), packed index
    ``cu_q[s] + a`` at ``cu_k[s] + a + Lk - Lq``: offset ``cu_k[s + 1] - cu_q[s + 1]``. One tensor for both
    layouts needs none (every offset is 0, the kernels' own ``Sk - Sq``); equal values in two tensors are not
    compared (a host read, and a data-dependent branch under torch.compile): their offsets are all 0."""
    cu_q, cu_k = cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)
    rows = torch.arange(total_q, device=cu_q.device)
    seq = torch.searchsorted(cu_q[1:].contiguous(), rows, right=True).clamp(max=max(cu_q.numel() - 2, 0))
    q0, k0 = cu_q[seq], cu_k[seq]
    len_q, len_k = cu_q[seq + 1] - q0, cu_k[seq + 1] - k0
    pos = rows - q0 + len_k - len_q  # the key position a query is aligned to, inside its sequence
    left, right = window_size
    if causal:
        right = 0
    lo = (pos - left).clamp(min=0).minimum(len_k) if left >= 0 else torch.zeros_like(pos)
    hi = (pos + right + 1).clamp(min=0).minimum(len_k) if right >= 0 else len_k
    key_bounds = torch.stack([k0 + lo, k0 + hi], dim=-1).to(torch.int32).unsqueeze(0).contiguous()
    offsets = None
    if alibi and cu_seqlens_q is not cu_seqlens_k:
        offsets = (k0 + len_k - q0 - len_q).to(torch.int32).contiguous()
    return SegmentBounds(key_bounds, transpose_bounds(key_bounds, total_k), offsets)
