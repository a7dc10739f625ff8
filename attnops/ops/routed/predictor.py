"""A training-free block mask from pooled queries and keys (after SpargeAttn, Zhang et al. 2025): block
attention mass estimated from block means, selected by one of the shared rules."""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import check_causal, check_qkv, resolve_softmax_scale
from attnops.core.masks import BlockMask, Grid, check_block_size
from attnops.ops.routed.select import block_counts, block_means, select_blocks


def _self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, N)``: the mean pairwise cosine similarity of the tokens of each
    block of ``n`` rows, ``(n |mean u|^2 - 1) / (n - 1)`` with ``u`` the unit rows (1 for n = 1)."""
    mean_u = block_means(torch.nn.functional.normalize(x.float(), dim=-1), block)
    count = block_counts(x.shape[1], block, x.device).view(1, 1, -1)
    sim = (count * mean_u.pow(2).sum(-1) - 1) / (count - 1).clamp(min=1)
    return torch.where(count > 1, sim, torch.ones_like(sim))


def pooled_block_map(q: torch.Tensor, k: torch.Tensor, block_size=64, causal: bool = False,
                     softmax_scale: Optional[float] = None) -> torch.Tensor:
    """The block attention map estimated from block means, ``(B, H, Nq, Nk)`` float32:
    ``softmax_j(scale * mean(q_i) . mean(k_j) + log n_j)`` over the key blocks query block ``i`` may
    see (``n_j`` keys in block ``j``; ``causal``: bottom-right aligned, up to the diagonal block).
    Exact when every block's queries and keys are each one repeated vector; the estimate
    :func:`predict_block_mask` selects from. q ``(B, Sq, H, D)``, k ``(B, Sk, Hkv, D)``."""
    shape = check_qkv(q, k, k)
    check_causal(causal)
    grid = Grid((shape.seq_len_q, shape.seq_len_k), check_block_size(block_size), q.device)
    return _pooled(q, k, grid, resolve_softmax_scale(softmax_scale, shape.head_dim), causal)


def _pooled(q: torch.Tensor, k: torch.Tensor, grid: Grid, scale: float, causal: bool) -> torch.Tensor:
    """:func:`pooled_block_map` for validated inputs on ``grid``."""
    kmean = block_means(k, grid.bk).repeat_interleave(q.shape[2] // k.shape[2], dim=1)  # (B, H, Nk, D)
    logits = scale * block_means(q, grid.bq) @ kmean.transpose(-1, -2)  # (B, H, Nq, Nk)
    logits = logits + torch.log(block_counts(k.shape[1], grid.bk, q.device))
    logits = logits.masked_fill(~grid.visible(causal), float("-inf"))
    no_key = torch.isneginf(logits).all(-1, keepdim=True)  # causal rows before the first key
    return torch.softmax(logits.masked_fill(no_key, 0.0), dim=-1).masked_fill(no_key, 0.0)


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size=64,
    *,
    topk: Optional[int] = None,
    threshold: Optional[float] = None,
    cdf_threshold: Optional[float] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    sim_threshold: Optional[float] = None,
    num_sink_blocks: int = 1,
) -> BlockMask:
    """A training-free block mask from pooled queries and keys (after SpargeAttn, Zhang et al. 2025).

    The attention mass of query block ``i`` on key block ``j`` is estimated from the block means
    (:func:`pooled_block_map`): ``p[i, j] = softmax_j(scale * mean(q_i) . mean(k_j) + log n_j)`` over
    the key blocks block ``i`` may see (``n_j`` keys in block ``j``: a block of similar keys holds
    ``n_j`` times one key's mass; ``causal``: up to the diagonal block). Per row, exactly one rule
    selects: the ``topk`` largest blocks, the blocks with ``p >= threshold``, or the fewest largest
    blocks whose mass reaches ``cdf_threshold``. The diagonal block and the first ``num_sink_blocks`` key blocks are always
    kept. ``sim_threshold``: pooled means only summarise blocks whose tokens agree, so query blocks
    whose mean pairwise cosine similarity is below it keep every key block, and key blocks below it
    are kept in every row (SpargeAttn's self-similarity check; off by default: random data has none,
    real models' q/k blocks mostly do; SpargeAttn tunes it per layer).

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0`` (any lengths; causal is
            bottom-right aligned).
        block_size: an int or ``(block_q, block_k)``, powers of two >= 16.

    Returns:
        a ``BlockMask`` with ``(B, H)`` rows and the token-level causal predicate when ``causal``.
        Memory: ``B x H x Nq x Nk`` block scores, never a token matrix.
    """
    shape = check_qkv(q, k, k)
    check_causal(causal)
    bq, bk = check_block_size(block_size)
    if sim_threshold is not None and (isinstance(sim_threshold, bool) or not isinstance(sim_threshold, (int, float))):
        raise TypeError(f"sim_threshold must be a number, got {sim_threshold!r}")
    if sim_threshold is not None and not -1.0 <= float(sim_threshold) <= 1.0:
        raise ValueError(f"sim_threshold must lie in [-1, 1], got {sim_threshold}")
    if not isinstance(num_sink_blocks, int) or num_sink_blocks < 0:
        raise ValueError(f"num_sink_blocks must be an int >= 0, got {num_sink_blocks!r}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    group = shape.num_heads // shape.num_kv_heads
    grid = Grid((shape.seq_len_q, shape.seq_len_k), (bq, bk), q.device)
    allowed = grid.visible(causal)
    with torch.no_grad():
        probs = _pooled(q, k, grid, scale, causal)
        keep = select_blocks(probs, allowed, topk=topk, threshold=threshold, cdf_threshold=cdf_threshold)
        keep = keep | (grid.kb == grid.diag) | (grid.kb < num_sink_blocks)
        if sim_threshold is not None:
            q_loose = (_self_similarity(q, bq) < sim_threshold).unsqueeze(-1)  # (B, H, Nq, 1)
            k_loose = (_self_similarity(k, bk) < sim_threshold).repeat_interleave(group, dim=1).unsqueeze(-2)
            keep = keep | q_loose | k_loose
        keep = keep & allowed
    return BlockMask.from_dense(keep, (shape.seq_len_q, shape.seq_len_k), (bq, bk), causal=causal)
