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
    """Positive random features of ``x (B, S, Hx, D)`` -> ``(B, Hx, S, m)`` in ``w``'s dtype, up to a constant per
    row (``per_row``) or per head (constants that cancel in the row normalisation)."""
    xs = x.to(w.dtype).transpose(1, 2) * math.sqrt(scale)
    logits = (xs @ w.T).sub_(0.5 * xs.square().sum(-1, keepdim=True))  # in place: called without autograd
    shift = logits.amax(dim=-1, keepdim=True) if per_row else logits.amax(dim=(-2, -1), keepdim=True)
    return logits.sub_(shift).exp_()


def _blocks(x: torch.Tensor, size: int, count: int) -> torch.Tensor:
    """``(B, H, S, m)`` -> ``(B, H, count, size, m)``, zero-padded."""
    return torch.nn.functional.pad(x, (0, 0, 0, count * size - x.shape[2])).unflatten(2, (count, size))


def estimate_block_map(q: torch.Tensor, k: torch.Tensor, *, block_size: Union[int, Tuple[int, int]] = 64,
                       num_features: int = 64, causal: bool = False, softmax_scale: Optional[float] = None,
                       seed: int = 0) -> torch.Tensor:
    """``(B, H, Nq, Nk)`` float32: the estimated mean attention probability of each query block on each key block
    (rows sum to 1 over the visible blocks, 0 for a block whose rows see no key; causal: up to the diagonal block,
    bottom-right aligned), from ``q (B, Sq, H, D)`` and ``k (B, Sk, Hkv, D)``. Causal estimates need every query
    block inside one key block's rows (``bq <= bk`` and ``Sk - Sq`` a multiple of ``bk``)."""
    shape = check_qkv(q, k, k)
    causal = check_causal(causal)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    grid = Grid((shape.seq_len_q, shape.seq_len_k), check_block_size(block_size), q.device)
    Sq = shape.seq_len_q
    diag = grid.diag.view(-1)  # (Nq,): the key block of each query block's last row
    if causal:
        first = torch.div(grid.first_pos.view(-1).clamp(min=0), grid.bk, rounding_mode="floor")
        if bool((first != diag.clamp(min=0)).any()):
            raise NotImplementedError("causal SEA estimates need every query block inside one key block's rows "
                                      "(bq <= bk, with Sk - Sq a multiple of bk)")
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        w = _orthogonal_features(num_features, shape.head_dim, seed).to(q.device, work)
        group = shape.num_heads // shape.num_kv_heads
        phi_q = _blocks(_features(q, w, scale, per_row=True), grid.bq, grid.nq)  # (B, H, Nq, bq, m)
        phi_k = _blocks(_features(k, w, scale, per_row=False), grid.bk, grid.nk)  # (B, Hkv, Nk, bk, m)
        key_sums = phi_k.sum(3).repeat_interleave(group, dim=1)  # (B, H, Nk, m)
        if causal:  # row i sees the blocks before its diagonal block, and that block up to its own position
            before = torch.cumsum(key_sums, dim=2) - key_sums  # (B, H, Nk, m): the sum over earlier blocks
            d = diag.clamp(min=0)
            own = phi_k[:, :, d].repeat_interleave(group, dim=1)  # (B, H, Nq, bk, m)
            pos = grid.first_pos.view(-1, 1) + torch.arange(grid.bq, device=q.device)  # (Nq, bq)
            seen_in_block = torch.arange(grid.bk, device=q.device) <= (pos - d.view(-1, 1) * grid.bk).unsqueeze(-1)
            partial = ((phi_q @ own.transpose(-1, -2)) * seen_in_block).sum(-1)  # (B, H, Nq, bq)
            norm = (phi_q @ before[:, :, d].unsqueeze(-1)).squeeze(-1) + partial
            sees = pos >= 0  # a row aligned before the first key sees nothing
        else:
            norm = phi_q @ key_sums.sum(2).view(*key_sums.shape[:2], 1, -1, 1)  # (B, H, Nq, bq, 1)
            norm = norm.squeeze(-1)
            sees = torch.ones(grid.nq, grid.bq, dtype=torch.bool, device=q.device)
        rows = torch.arange(grid.nq * grid.bq, device=q.device).view(grid.nq, grid.bq) < Sq
        sees = sees & rows & (norm > 0)
        normalised = torch.where(sees.unsqueeze(-1), phi_q / norm.clamp_min(torch.finfo(work).tiny).unsqueeze(-1),
                                 torch.zeros((), dtype=work, device=q.device))
        counts = rows.sum(-1).view(1, 1, -1, 1).to(work)
        est = (normalised.sum(3) / counts) @ key_sums.transpose(-1, -2)  # (B, H, Nq, Nk)
        visible = grid.visible(causal)
        if causal:  # the diagonal's share is what the earlier blocks leave of each seeing row's unit mass
            earlier = grid.kb < grid.diag
            est = torch.where(earlier, est, torch.zeros((), dtype=work, device=q.device))
            share = sees.sum(-1).to(work) / counts[..., 0] - est.sum(-1)
            est = est.scatter(-1, diag.clamp(min=0).view(1, 1, -1, 1).expand(*est.shape[:2], -1, 1),
                              share.clamp_min(0).unsqueeze(-1))
        est = torch.where(visible, est, torch.zeros((), dtype=work, device=q.device))
        return (est / est.sum(-1, keepdim=True).clamp_min(torch.finfo(work).tiny)).float()


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
