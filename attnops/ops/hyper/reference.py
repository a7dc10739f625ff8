"""Float64 oracle of HyperAttention as one weighted softmax per query row.

The method's estimate is ``out_i = sum_j W_ij e^{s_ij} v_j / sum_j W_ij e^{s_ij}`` with, in the non-causal form,
``W_ij = 1`` where key ``j`` is in query ``i``'s sorted block and ``(Sk / m) * count_j`` elsewhere (``count_j``: how
often ``j`` was drawn among the ``m`` samples); in the causal form ``W``'s row ``i`` follows the recursion down to
``i``'s segment: the quarters left of ``i`` that the recursion handed to the non-causal form, then the exact causal
prefix of the last segment. This computes ``W`` for any set of query rows (O(rows x Sk) memory: the tests take all
rows of short sequences, the benchmark a sample of long ones) from the caller's codes and the same draws, in the
same order, as the op (the op draws per recursion level, deepest first, one ``(batch x 2^L, Hkv, m)`` tensor).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from attnops.ops.hyper.lsh import draw_samples, lsh_projections


def _rank(codes: torch.Tensor) -> torch.Tensor:
    """``(..., S, Hx)`` codes -> ``(..., Hx, S)``: each token's place in its head's stable order by code."""
    order = torch.sort(codes.transpose(-1, -2), dim=-1, stable=True).indices
    return torch.argsort(order, dim=-1)


def _samples_drawn(sq: int, sk: int, block_size: int, sample_size: int, min_seq_len: int) -> bool:
    if sq < min_seq_len or sample_size == 0:
        return False
    nb = -(-sk // block_size)
    return sq > -(-sq // nb) and sk > block_size


class _Blocks:
    """The non-causal form's weights for one segment: ``q_codes (Sq, H)``, ``k_codes (Sk, Hkv)``, its samples
    ``(Hkv, m)`` or None."""

    def __init__(self, q_codes, k_codes, samples, block_size, min_seq_len):
        Sq, H = q_codes.shape
        self.Sk, Hkv = k_codes.shape
        self.exact = Sq < min_seq_len
        if self.exact:
            return
        group = H // Hkv
        nb = -(-self.Sk // block_size)
        self.q_block = _rank(q_codes) // -(-Sq // nb)  # (H, Sq)
        k_rank = _rank(k_codes)  # (Hkv, Sk)
        self.k_block = (k_rank // block_size).repeat_interleave(group, dim=0)  # (H, Sk)
        self.per_key = None
        if samples is not None:
            counts = torch.zeros(Hkv, self.Sk, dtype=torch.float64)
            counts.scatter_add_(-1, samples, torch.ones(samples.shape, dtype=torch.float64))
            self.per_key = (self.Sk / samples.shape[-1]) * counts.gather(-1, k_rank).repeat_interleave(group, dim=0)

    def row(self, i: int, num_heads: int) -> torch.Tensor:
        """``(H, Sk)`` weights of query ``i`` of the segment."""
        if self.exact:
            return torch.ones(num_heads, self.Sk, dtype=torch.float64)
        inside = self.q_block[:, i:i + 1] == self.k_block
        w = inside.double()
        if self.per_key is not None:
            w = w + self.per_key * ~inside
        return w


def _halves(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0] * 2, x.shape[1] // 2, *x.shape[2:])


def weight_rows(q_codes: torch.Tensor, k_codes: torch.Tensor, rows: torch.Tensor, *, causal: bool, head_dim: int,
                block_size: int = 256, sample_size: int = 256, num_projections: int = 7, min_seq_len: int = 4096,
                seed: int = 0) -> torch.Tensor:
    """``W`` on query rows ``rows (R,)``: ``(B, H, R, Sk)`` float64 on the CPU, from ``q_codes (B, Sq, H)`` and
    ``k_codes (B, Sk, Hkv)``."""
    q_codes, k_codes = q_codes.cpu(), k_codes.cpu()
    B, Sq, H = q_codes.shape
    Sk, Hkv = k_codes.shape[1], k_codes.shape[2]
    gen = torch.Generator().manual_seed(seed)
    lsh_projections(gen, head_dim, num_projections)  # the op's first draw: the samples come after it
    rows = [int(r) for r in rows]
    out = torch.zeros(B, H, len(rows), Sk, dtype=torch.float64)
    params = (block_size, sample_size, min_seq_len)
    if causal and Sq != Sk:  # the op's exact regime for a short chunk against a longer cache
        for n, i in enumerate(rows):
            out[:, :, n, :i + Sk - Sq + 1] = 1.0
        return out
    if not causal:
        drawn = _samples_drawn(Sq, Sk, *params)
        samples = draw_samples(gen, Sk, B, Hkv, sample_size, torch.device("cpu")) if drawn else None
        for b in range(B):
            blocks = _Blocks(q_codes[b], k_codes[b], None if samples is None else samples[b], block_size, min_seq_len)
            for n, i in enumerate(rows):
                out[b, :, n] = blocks.row(i, H)
        return out

    # the recursion's levels: codes of every segment (padded to even), and the draws, deepest level first
    levels: List[tuple] = []
    qc, kc = q_codes, k_codes
    while qc.shape[1] > min_seq_len:
        if qc.shape[1] % 2:
            qc, kc = (torch.nn.functional.pad(c, (0, 0, 0, 1)) for c in (qc, kc))
        levels.append((qc, kc))
        qc, kc = _halves(qc), _halves(kc)
    draws: Dict[int, Optional[torch.Tensor]] = {}
    for level in reversed(range(len(levels))):
        h = levels[level][0].shape[1] // 2
        drawn = _samples_drawn(h, h, *params)
        draws[level] = draw_samples(gen, h, B << level, Hkv, sample_size, torch.device("cpu")) if drawn else None
    cache: Dict[tuple, _Blocks] = {}
    for b in range(B):
        for n, i in enumerate(rows):
            seg, pos, offset = b, i, 0
            for level, (qc, kc) in enumerate(levels):
                h = qc.shape[1] // 2
                if pos < h:
                    seg = 2 * seg
                    continue
                if (level, seg) not in cache:
                    samples = draws[level]
                    cache[level, seg] = _Blocks(qc[seg, h:], kc[seg, :h], None if samples is None else samples[seg],
                                                block_size, min_seq_len)
                out[b, :, n, offset:offset + h] = cache[level, seg].row(pos - h, H)
                seg, pos, offset = 2 * seg + 1, pos - h, offset + h
            out[b, :, n, offset:offset + pos + 1] = 1.0  # the last segment: exact causal
    return out


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_codes: torch.Tensor, k_codes: torch.Tensor,
                    *, causal: bool = False, softmax_scale: Optional[float] = None, block_size: int = 256,
                    sample_size: int = 256, num_projections: int = 7, min_seq_len: int = 4096, seed: int = 0,
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)`` and the LSH codes ``q_codes (B, Sq, H)``, ``k_codes (B, Sk,
    Hkv)`` (:func:`attnops.ops.hyper.lsh_codes`, computed by the caller so that a low-precision run and its float64
    oracle hash the same vectors) -> ``out (B, R, H, Dv)`` in q's dtype for query rows ``rows`` (default all)."""
    B, Sq, H, D = q.shape
    rows = torch.arange(Sq) if rows is None else rows.cpu()
    w = weight_rows(q_codes, k_codes, rows, causal=causal, head_dim=D, block_size=block_size,
                    sample_size=sample_size, num_projections=num_projections, min_seq_len=min_seq_len, seed=seed)
    group = H // k.shape[2]
    kk, vv = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q[:, rows.to(q.device)], kk) * scale
    logits = s + torch.log(w).to(s.device, s.dtype)  # log 0 = -inf: keys outside the estimate
    p = torch.softmax(logits.float() if s.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", p, vv)
