"""SEA-style estimated-mask attention (Lee et al. 2023, "SEA: Sparse Linear Attention with Estimated Attention
Mask"): a kernelized linear attention estimates the attention map in O(N), the largest estimated key blocks of
every query block are kept, and exact attention runs there (the block-sparse core).

The estimator is Performer's positive random features (FAVOR+): ``exp(s q . k) ~ phi(q) . phi(k)`` with
``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m)``, ``x' = s^(1/2) x``, ``W`` ``m`` orthogonal Gaussian rows drawn from
``seed``. A query's probability mass on key block J is then ``phi(q_i) . K_J / phi(q_i) . K_vis`` (``K_J`` the sum of
the block's key features, ``K_vis`` over the keys the row may see), and averaging over the rows of query block I
is one product, ``Phi_I . K_J`` with ``Phi_I`` the mean of the row-normalised query features: the estimated block
map costs O(N m + Nq Nk m), never N x N. Per-row and per-head constants (the exponent stabilisers) cancel in the
normalisation. The paper's estimator is a trained network (a Performer plus a CNN decoder); this is its
training-free core, so any model can use it, and its estimate is the block map it returns.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from attnops.core.checks import check_causal, check_qkv, resolve_softmax_scale
from attnops.core.masks import BlockMask, Grid, check_block_size
from attnops.ops.routed.select import select_blocks
from attnops.ops.softmax.op import block_sparse_attention


def _orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """``(m, d)`` float64: Gaussian rows, orthogonal in blocks of ``d``, with chi-distributed norms (Performer)."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-m // d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return w * norms


def _features(x: torch.Tensor, w: torch.Tensor, scale: float, per_row: bool) -> torch.Tensor:
    """Positive random features of ``x (B, S, Hx, D)`` -> ``(B, Hx, S, m)``, float64, up to a constant per row
    (``per_row``) or per head."""
    xs = x.double().transpose(1, 2) * math.sqrt(scale)
    logits = xs @ w.T - 0.5 * xs.square().sum(-1, keepdim=True)
    shift = logits.amax(dim=-1, keepdim=True) if per_row else logits.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(logits - shift)


def estimate_block_map(q: torch.Tensor, k: torch.Tensor, *, block_size: Union[int, Tuple[int, int]] = 64,
                       num_features: int = 64, causal: bool = False, softmax_scale: Optional[float] = None,
                       seed: int = 0) -> torch.Tensor:
    """``(B, H, Nq, Nk)`` float32: the estimated mean attention probability of each query block on each key block
    (rows sum to 1 over the visible blocks; causal: up to the diagonal block, bottom-right aligned), from
    ``q (B, Sq, H, D)`` and ``k (B, Sk, Hkv, D)``."""
    shape = check_qkv(q, k, k)
    causal = check_causal(causal)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    grid = Grid((shape.seq_len_q, shape.seq_len_k), check_block_size(block_size), q.device)
    with torch.no_grad():
        w = _orthogonal_features(num_features, shape.head_dim, seed).to(q.device)
        group = shape.num_heads // shape.num_kv_heads
        phi_q = _features(q, w, scale, per_row=True)  # (B, H, Sq, m)
        phi_k = _features(k, w, scale, per_row=False).repeat_interleave(group, dim=1)  # (B, H, Sk, m)
        Sq, Sk = shape.seq_len_q, shape.seq_len_k
        if causal:  # the keys row i may see: j <= i + Sk - Sq
            prefix = torch.cumsum(phi_k, dim=2)
            last = torch.arange(Sq, device=q.device) + Sk - Sq
            seen = torch.where((last >= 0).view(1, 1, -1, 1), prefix[:, :, last.clamp(min=0)], torch.zeros(()))
        else:
            seen = phi_k.sum(dim=2, keepdim=True)
        norm = (phi_q * seen).sum(-1, keepdim=True)
        phi_q = torch.where(norm > 0, phi_q / norm, torch.zeros(()))  # a row that sees nothing: no mass
        pad_q, pad_k = grid.nq * grid.bq - Sq, grid.nk * grid.bk - Sk
        counts = torch.clamp(Sq - torch.arange(grid.nq, device=q.device) * grid.bq, max=grid.bq).view(1, 1, -1, 1)
        rows = torch.nn.functional.pad(phi_q, (0, 0, 0, pad_q)).unflatten(2, (grid.nq, grid.bq)).sum(3) / counts
        keys = torch.nn.functional.pad(phi_k, (0, 0, 0, pad_k)).unflatten(2, (grid.nk, grid.bk)).sum(3)
        est = rows @ keys.transpose(-1, -2)  # (B, H, Nq, Nk)
        est = torch.where(grid.visible(causal), est, torch.zeros(()))
        if causal:  # the diagonal block is partial for each row: its own prefix inside the block
            diag = grid.diag.view(-1)  # (Nq,)
            first_block = torch.div(grid.first_pos.view(-1).clamp(min=0), grid.bk, rounding_mode="floor")
            if bool((first_block != diag.clamp(min=0)).any()):
                raise NotImplementedError("causal SEA estimates need every query block inside one key block's rows "
                                          "(bq <= bk, with Sk - Sq a multiple of bk)")
            row_diag = diag.repeat_interleave(grid.bq)[:Sq].clamp(min=0)  # (Sq,)
            start = row_diag * grid.bk - 1
            before = torch.where((start >= 0).view(1, 1, -1, 1), prefix[:, :, start.clamp(min=0)], torch.zeros(()))
            part = (phi_q * (seen - before)).sum(-1)  # (B, H, Sq)
            part = torch.nn.functional.pad(part, (0, pad_q)).unflatten(2, (grid.nq, grid.bq)).sum(3) / counts[..., 0]
            index = diag.clamp(min=0).view(1, 1, -1, 1).expand(*est.shape[:2], -1, 1)
            est = est.scatter(-1, index, torch.where(diag.view(1, 1, -1, 1) >= 0, part.unsqueeze(-1), torch.zeros(())))
        return (est / est.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def sea_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: Union[int, Tuple[int, int]] = 64,
                   topk: Union[int, float] = 8, num_features: int = 64, causal: bool = False,
                   softmax_scale: Optional[float] = None, seed: int = 0) -> Tuple[BlockMask, torch.Tensor]:
    """The ``BlockMask`` SEA keeps (each query block's diagonal key block, plus its ``topk`` largest estimated
    blocks: an int count or a float fraction of the key blocks) and the estimated map it chose from."""
    est = estimate_block_map(q, k, block_size=block_size, num_features=num_features, causal=causal,
                             softmax_scale=softmax_scale, seed=seed)
    grid = Grid((q.shape[1], k.shape[1]), check_block_size(block_size), q.device)
    allowed = grid.visible(causal)
    diagonal = (grid.kb == grid.diag) & allowed  # the query block's own keys (none for rows that see nothing)
    keep = select_blocks(est, allowed.expand_as(est), topk=topk) | diagonal
    return grid.mask(keep, causal=causal), est


def sea_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  block_size: Union[int, Tuple[int, int]] = 64, topk: Union[int, float] = 8, num_features: int = 64,
                  causal: bool = False, softmax_scale: Optional[float] = None, seed: int = 0,
                  return_estimate: bool = False, backend: Optional[str] = None):
    """Exact attention on the key blocks a linear-attention estimate ranks highest.

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        block_size: the blocks of the estimate and of the mask (an int or ``(bq, bk)``, powers of two >= 16).
        topk: key blocks kept per query block besides its diagonal block: an int count, or a float fraction of
            the key blocks.
        num_features: Performer features of the estimate (more: a closer estimate, O(N m) work).
        causal: bottom-right causal attention (and estimate).
        softmax_scale: default ``D ** -0.5``.
        seed: the random features' seed (the same seed, the same mask).
        return_estimate: also return the estimated block map ``(B, H, Nq, Nk)`` (float32, rows summing to 1).
        backend: the block-sparse core's backend.

    Returns:
        ``out (B, Sq, H, D)``, or ``(out, estimate)``. Forward and backward (through the exact core on the chosen
        blocks; the selection takes no gradient).
    """
    if not isinstance(return_estimate, bool):
        raise TypeError(f"return_estimate must be a bool, got {return_estimate!r}")
    mask, est = sea_block_mask(q, k, block_size=block_size, topk=topk, num_features=num_features, causal=causal,
                               softmax_scale=softmax_scale, seed=seed)
    out = block_sparse_attention(q, k, v, mask, softmax_scale=softmax_scale, backend=backend)
    return (out, est) if return_estimate else out
