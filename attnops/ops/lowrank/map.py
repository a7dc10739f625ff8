"""The block map of low-rank-key attention, from the keys the kernel chose and its lse."""

from __future__ import annotations

import torch

from attnops.core.block_map import MapRequest, finish


def lowrank_block_map(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, request: MapRequest,
                      softmax_scale: float, budget: int = 1 << 24) -> torch.Tensor:
    """The block map of low-rank-key (Loki) attention from the keys its kernel chose.

    ``q (B, Sq, H, D)`` and ``k (B, Sk, Hkv, D)`` as the exact pass saw them, ``indices
    (B, H, Sq, n)`` int32 the chosen keys (-1 past the last), ``lse (B, H, Sq)`` over them. A query
    puts ``exp(q . k_j * scale - lse)`` on each chosen key and nothing elsewhere; the probabilities
    are recomputed for the chosen keys only, in query chunks of at most ``budget`` gathered
    elements: O(Sq * n * D) work, no Sq x Sk tensor. Returns ``(B, H, ceil(Sq/bq), ceil(Sk/bk))``."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    n = indices.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    nq, nk = -(-Sq // request.block_q), -(-Sk // request.block_k)
    partial = torch.zeros(B, H, nq * nk, dtype=dtype, device=q.device)
    if n == 0 or Sq == 0:
        return finish(partial.view(B, H, nq, nk), lse, request.block_q, request)
    k_rows = k.reshape(B * Sk * Hkv, D)
    kv_head = (torch.arange(H, device=q.device) // (H // Hkv)).view(1, H, 1, 1)
    batch = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    chunk = max(1, budget // max(1, B * H * n * D))
    for i0 in range(0, Sq, chunk):
        idx = indices[:, :, i0:i0 + chunk].long()  # (B, H, c, n)
        chosen = idx >= 0
        rows = (batch * Sk + idx.clamp(min=0)) * Hkv + kv_head
        kg = k_rows[rows.flatten()].view(*idx.shape, D).to(dtype)
        qc = q[:, i0:i0 + chunk].transpose(1, 2).to(dtype)  # (B, H, c, D)
        s = torch.einsum("bhcd,bhcnd->bhcn", qc, kg) * softmax_scale
        p = torch.exp(s - lse[:, :, i0:i0 + chunk].to(dtype).unsqueeze(-1)).masked_fill(~chosen, 0.0)
        qblock = (torch.arange(i0, i0 + idx.shape[2], device=q.device) // request.block_q).view(1, 1, -1, 1)
        cell = (qblock * nk + idx.clamp(min=0) // request.block_k).expand_as(idx).reshape(B, H, -1)
        if request.reduce == "max":
            partial.scatter_reduce_(-1, cell, p.reshape(B, H, -1), reduce="amax")
        else:
            partial.scatter_add_(-1, cell, p.reshape(B, H, -1))
    return finish(partial.view(B, H, nq, nk), lse, request.block_q, request)
