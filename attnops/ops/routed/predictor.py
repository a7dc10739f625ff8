"""A training-free block mask from pooled queries and keys (after SpargeAttn, Zhang et al. 2025): block
attention mass estimated from block means, selected by one of the shared rules."""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import check_causal, check_qkv, resolve_softmax_scale
from attnops.core.masks import BlockMask, Grid, check_block_size
from attnops.ops.routed.select import block_count, block_counts, block_means, rule_value, select_blocks

RULES = ("sparge", "mass")


def _self_similarity(x: torch.Tensor, block: int, with_self: bool = False) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, N)``: the mean cosine similarity of the pairs of tokens of each
    block of ``n`` rows, with ``u`` the unit rows. ``with_self``: over all ``n^2`` ordered pairs, self-pairs
    included, ``|mean u|^2`` (SpargeAttn's ``sum(gram) / n^2``); else over the ``n (n - 1)`` distinct
    pairs, ``(n |mean u|^2 - 1) / (n - 1)`` (1 for n = 1)."""
    mean_u = block_means(torch.nn.functional.normalize(x.float(), dim=-1), block)
    if with_self:
        return mean_u.pow(2).sum(-1)
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
    return _softmax_over(logits, grid.visible(causal))


def _softmax_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The softmax of ``logits`` over the entries ``keep`` allows (-inf elsewhere); a row with none (causal
    rows before the first key, rows whose every key block is dissimilar) is all 0, not NaN."""
    logits = logits.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(logits).all(-1, keepdim=True)
    return torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size=64,
    *,
    topk=None,
    threshold=None,
    cdf_threshold=None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    sim_threshold=None,
    num_sink_blocks: Optional[int] = None,
    rule: str = "sparge",
) -> BlockMask:
    """A training-free block mask from pooled queries and keys.

    ``rule="sparge"`` (default) is SpargeAttn's prediction (Zhang et al. 2025), block for block as
    ``get_block_map_meansim`` in thu-ml/SpargeAttn ``spas_sage_attn/utils.py`` computes it:

    - block similarity ``sum(gram) / n^2`` of each block's unit rows (self-pairs included); a block is
      similar when it is ``> sim_threshold``;
    - ``p[i, j] = softmax_j(scale * mean(q_i) . mean(k_j))`` over the visible, similar key blocks
      (dissimilar key blocks are ``-inf`` in this softmax);
    - per row keep the largest ``n`` blocks, at least one: with ``cdf_threshold`` the ``n`` whose cumulative
      mass stays ``<= cdf_threshold``; with ``topk`` a count, or a fraction ``int(topk * Nk)`` of all
      ``Nk`` key blocks as SpargeAttn takes it;
    - then every dissimilar key block (in every row) and every key block of a dissimilar query block
      is kept, causality applied, and with ``num_sink_blocks`` the first key blocks are kept
      (SpargeAttn's ``attention_sink=True`` is ``num_sink_blocks=1``). No diagonal block is forced.

    Each of ``topk``, ``cdf_threshold`` and ``sim_threshold`` may be one value per head, as SpargeAttn
    tunes them. SpargeAttn's defaults are ``block_size=(128, 64)``, ``sim_threshold=0.1``,
    ``cdf_threshold=0.9``; here ``sim_threshold=None`` skips the check (every block similar).
    Two deliberate differences, both invisible on ``Sq == Sk`` with full blocks: causality is bottom-right
    aligned (the library's convention; SpargeAttn's block mask is top-left, the same when ``Sq == Sk``),
    and a partial last block's statistics are over its rows (SpargeAttn's Triton kernel reads the
    padding rows unmasked). With GQA each query head compares its key blocks with its own threshold
    (SpargeAttn indexes the key threshold by the key head).

    ``rule="mass"`` is attnops's variant, kept because it errs towards keeping attention mass:
    ``p[i, j] = softmax_j(scale * mean(q_i) . mean(k_j) + log n_j)`` (``n_j`` keys in block ``j``: a block
    of similar keys holds ``n_j`` times one key's mass, so the estimate is exact on block-constant inputs
    and a partial block is not overweighted); per row exactly one rule selects: the ``topk`` largest,
    the blocks with ``p >= threshold``, or the fewest largest whose mass reaches ``cdf_threshold`` (the
    crossing block is kept, so the estimated kept mass is ``>= cdf_threshold``). The diagonal block and
    the first ``num_sink_blocks`` key blocks (default 1) are always kept, so no causal row is left
    without keys. ``sim_threshold``: query blocks whose mean pairwise cosine similarity over distinct pairs
    is below it keep every key block, and key blocks below it are kept in every row (they stay in the
    softmax).

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0`` (any lengths; causal is
            bottom-right aligned).
        block_size: an int or ``(block_q, block_k)``, powers of two >= 16.
        topk / cdf_threshold / threshold (``"mass"`` only): exactly one, a number or ``H`` numbers; an
            int ``topk`` is a count, a float ``topk`` in (0, 1] a fraction of the key blocks.

    Returns:
        a ``BlockMask`` with ``(B, H)`` rows and the token-level causal predicate when ``causal``.
        Memory: ``B x H x Nq x Nk`` block scores, never a token matrix.
    """
    shape = check_qkv(q, k, k)
    check_causal(causal)
    bq, bk = check_block_size(block_size)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if num_sink_blocks is None:
        num_sink_blocks = 0 if rule == "sparge" else 1
    if isinstance(num_sink_blocks, bool) or not isinstance(num_sink_blocks, int) or num_sink_blocks < 0:
        raise ValueError(f"num_sink_blocks must be an int >= 0, got {num_sink_blocks!r}")
    H, group = shape.num_heads, shape.num_heads // shape.num_kv_heads
    sim = rule_value(sim_threshold, "sim_threshold", H, q.device, low=-1.0, high=1.0)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    grid = Grid((shape.seq_len_q, shape.seq_len_k), (bq, bk), q.device)
    allowed = grid.visible(causal)
    with torch.no_grad():
        if rule == "sparge":
            keep = _sparge_keep(q, k, grid, scale, allowed, group, sim, topk=topk, threshold=threshold,
                                cdf_threshold=cdf_threshold)
        else:
            probs = _pooled(q, k, grid, scale, causal)
            keep = select_blocks(probs, allowed, topk=topk, threshold=threshold, cdf_threshold=cdf_threshold)
            keep = keep | (grid.kb == grid.diag)
            if sim is not None:
                sim = sim.float().view(H, 1)
                q_loose = (_self_similarity(q, bq) < sim).unsqueeze(-1)  # (B, H, Nq, 1)
                k_loose = (_self_similarity(k, bk).repeat_interleave(group, dim=1) < sim).unsqueeze(-2)
                keep = keep | q_loose | k_loose
        keep = (keep | (grid.kb < num_sink_blocks)) & allowed
    return BlockMask.from_dense(keep, (shape.seq_len_q, shape.seq_len_k), (bq, bk), causal=causal)


def _sparge_keep(q: torch.Tensor, k: torch.Tensor, grid: Grid, scale: float, allowed: torch.Tensor, group: int,
                 sim: Optional[torch.Tensor], *, topk, threshold, cdf_threshold) -> torch.Tensor:
    """``(B, H, Nq, Nk)`` bool: :func:`predict_block_mask`'s ``rule="sparge"`` selection before sinks and
    causality, for validated inputs."""
    given = [name for name, x in (("topk", topk), ("cdf_threshold", cdf_threshold)) if x is not None]
    if threshold is not None:
        raise ValueError("threshold= is rule='mass' only; SpargeAttn's rule takes topk= or cdf_threshold=")
    if len(given) != 1:
        raise ValueError(f"give exactly one of topk=, cdf_threshold= (got {given or 'none'})")
    H = q.shape[2]
    kmean = block_means(k, grid.bk).repeat_interleave(group, dim=1)  # (B, H, Nk, D)
    logits = scale * block_means(q, grid.bq) @ kmean.transpose(-1, -2)  # (B, H, Nq, Nk)
    q_similar = torch.ones(logits.shape[:-1], dtype=torch.bool, device=q.device)  # (B, H, Nq)
    k_similar = torch.ones(logits.shape[:-2] + logits.shape[-1:], dtype=torch.bool, device=q.device)  # (B, H, Nk)
    if sim is not None:
        sim = sim.float().view(H, 1)
        q_similar = _self_similarity(q, grid.bq, with_self=True) > sim
        k_similar = _self_similarity(k, grid.bk, with_self=True).repeat_interleave(group, dim=1) > sim
    probs = _softmax_over(logits, allowed & k_similar.unsqueeze(-2))  # an empty row's blocks are all kept below
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if cdf_threshold is not None:
        cdf = rule_value(cdf_threshold, "cdf_threshold", H, q.device, low=0.0, high=1.0, low_open=True)
        count = (torch.cumsum(sorted_p, dim=-1) <= cdf.to(probs.dtype).view(H, 1, 1)).sum(-1, keepdim=True)
    else:
        count = block_count(rule_value(topk, "topk", H, q.device, low=0.0, high=1.0, low_open=True, count=True),
                            grid.nk).view(H, 1, 1)
    ranks = torch.arange(grid.nk, device=q.device)
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, (ranks < count.clamp(min=1)).expand_as(order))
    return keep | ~k_similar.unsqueeze(-2) | ~q_similar.unsqueeze(-1)
