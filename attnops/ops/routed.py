"""Block-routed attention: a router picks, per (batch, head, query block), the key blocks to attend,
as a ``BlockMask``; the attention itself is the exact block-sparse core.

- :func:`moba_attention` / :func:`moba_block_mask`: MoBA (Mixture of Block Attention, Lu et al.
  2025), routed by a kernel (C++ on CPU, Triton on GPU) from the mean key of every block.
- :func:`predict_block_mask`: a training-free predictor from pooled queries and keys
  (SpargeAttn-style), any ``BlockMask`` op can run it.
- the learned gate (SeerAttention-style) is a module: :class:`attnops.nn.BlockGate`.

Routing is a hard choice: no gradient flows through it; gradients reach q, k and v through the
blocks chosen. No router allocates anything larger than ``B x H x Nq x Nk`` blocks.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops import dispatch
from attnops.masks import BlockMask, _check_block_size, _Grid
from attnops.ops._checks import QKVShape, check_causal, check_qkv, refuse_forward_ad, resolve_softmax_scale
from attnops.ops._result import MAP_ARGS_DOC, Result
from attnops.ops.attention import block_sparse_attention

# Routing granularity of the MoBA kernels: query tiles of this many rows, and the key sub-block of
# the LUT. MoBA blocks are multiples of it.
MOBA_KERNEL_BLOCK = 64


def check_moba_args(block_size, topk, prefix: str = "") -> None:
    """MoBA's block size (a multiple of the kernel block) and ``topk`` (>= 1); shared with the
    ``attnops.nn.MoBA`` spec, whose ``prefix`` names it in the message."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < MOBA_KERNEL_BLOCK \
            or block_size % MOBA_KERNEL_BLOCK:
        raise ValueError(f"{prefix}block_size must be a multiple of the kernel block, i.e. a multiple of "
                         f"{MOBA_KERNEL_BLOCK}, got {block_size!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{prefix}topk must be an int >= 1 (it counts the query's own block), got {topk!r}")


def _check_moba(shape: QKVShape, block_size, topk, causal) -> None:
    check_causal(causal)
    if shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"moba_attention is self-attention over one sequence: q and k lengths differ "
                         f"({shape.seq_len_q} vs {shape.seq_len_k})")
    check_moba_args(block_size, topk)


def _routed_mask(q: torch.Tensor, k: torch.Tensor, seq_len: int, block_size: int, topk: int, causal: bool,
                 backend: Optional[str]) -> BlockMask:
    """The router's ``BlockMask`` for validated inputs."""
    route = dispatch.resolve("moba_route", q.device, backend)
    with torch.no_grad():
        counts, indices = route(q.detach(), k.detach(), block_size=block_size, topk=topk, causal=causal,
                                route_block=MOBA_KERNEL_BLOCK)
    return BlockMask(counts, indices, seq_len, MOBA_KERNEL_BLOCK, causal=causal, validate=False, _trusted=True)


def moba_block_mask(q: torch.Tensor, k: torch.Tensor, block_size: int = 512, topk: int = 3, causal: bool = True, *,
                    backend: Optional[str] = None) -> BlockMask:
    """The ``BlockMask`` MoBA's router chooses for ``q (B, S, H, D)`` and ``k (B, S, Hkv, D)``:
    ``(B, H)`` rows at ``(64, 64)`` granularity (arguments as in :func:`moba_attention`)."""
    shape = check_qkv(q, k, k)
    _check_moba(shape, block_size, topk, causal)
    return _routed_mask(q, k, shape.seq_len_q, block_size, topk, causal, backend)


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 512,
    topk: int = 3,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
) -> Result:
    r"""MoBA: each query block attends to its own key block and the ``topk - 1`` others whose mean key
    scores highest against it.

    Definition (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"): keys are
    split into blocks of ``block_size``; the gate of a query against block ``j`` is
    ``q . mean(k[block j])``; the query's own block is always selected and attended causally; under
    ``causal`` later blocks are never selected; the remaining ``topk - 1`` slots go to the highest
    gates (``topk`` counts the own block, as in the paper and its code: ``topk=3`` means the own
    block and two others). GQA: each query head routes itself, against the keys of its kv head.

    Granularity: the paper routes every query token; these kernels route every **query tile of 64
    rows** with the tile's mean query (which ranks blocks exactly as the sum of the tile's token
    gates does). A token-level choice would need a per-row block set inside the attention kernels;
    a tile-level one is a ``BlockMask`` row, so MoBA runs on the exact block-sparse core (fwd and bwd,
    CPU and GPU). ``attnops.kernels.reference.moba_attention`` computes both: ``route_rows=1`` (the
    paper) and ``route_rows=64`` (this op, which the tests hold it to). Ties go to the lower block
    index; a NaN gate ranks highest.

    Args:
        q: ``(B, S, H, D)``; k, v: ``(B, S, Hkv, D)`` with ``H % Hkv == 0`` (self-attention: one
            length).
        block_size: keys per MoBA block, a multiple of 64 (the last block may be partial).
        topk: blocks per query, own block included (>= 1; ``topk >= ceil(S / block_size)`` is
            dense attention).
        causal: bottom-right causal attention inside the own block, earlier blocks only.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, H, S)``.
        {map_args}
            (``map_block_size`` here, since ``block_size`` is MoBA's; default 64.)
        backend: force ``"cpu"``, ``"triton"`` or ``"reference"`` for the router and the attention.

    Returns:
        ``out (B, S, H, D)``, or a named tuple as in :func:`attnops.attention`.
    """
    shape = check_qkv(q, k, v)
    refuse_forward_ad("moba_attention", q, k, v)
    _check_moba(shape, block_size, topk, causal)
    mask = _routed_mask(q, k, shape.seq_len_q, block_size, topk, causal, backend)
    return block_sparse_attention(q, k, v, mask, softmax_scale, return_lse, return_block_map=return_block_map,
                                  block_size=map_block_size, reduce=reduce, backend=backend)


moba_attention.__doc__ = moba_attention.__doc__.replace(
    "{map_args}", MAP_ARGS_DOC.replace("block_size: the map's", "map_block_size: the map's"))


def _self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, N)``: the mean pairwise cosine similarity of the tokens of each
    block of ``n`` rows, ``(n |mean u|^2 - 1) / (n - 1)`` with ``u`` the unit rows (1 for n = 1)."""
    mean_u = block_means(torch.nn.functional.normalize(x.float(), dim=-1), block)
    count = _block_counts(x.shape[1], block, x.device).view(1, 1, -1)
    sim = (count * mean_u.pow(2).sum(-1) - 1) / (count - 1).clamp(min=1)
    return torch.where(count > 1, sim, torch.ones_like(sim))


def _block_counts(seq_len: int, block: int, device) -> torch.Tensor:
    """``(ceil(seq_len / block),)`` float32: rows per block (the last may be partial)."""
    n = -(-seq_len // block)
    return torch.clamp(seq_len - torch.arange(n, device=device) * block, max=block).float()


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x (B, S, Hx, D)`` -> ``(B, Hx, N, D)`` float32 block means (a partial last block: its rows)."""
    B, S, Hx, D = x.shape
    n = -(-S // block)
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, n * block - S)).view(B, n, block, Hx, D).sum(2)
    return (sums / _block_counts(S, block, x.device).view(1, n, 1, 1)).transpose(1, 2)


def select_blocks(probs: torch.Tensor, allowed: torch.Tensor, *, topk: Optional[int] = None,
                  threshold: Optional[float] = None, cdf_threshold: Optional[float] = None) -> torch.Tensor:
    """Bool ``(..., Nq, Nk)``: per row, the blocks of ``probs`` (block attention mass estimates, rows
    summing to 1 over ``allowed``) that exactly one rule keeps: the ``topk`` largest, those ``>=
    threshold``, or the fewest largest whose mass reaches ``cdf_threshold``. Shared by
    :func:`predict_block_mask` and :class:`attnops.nn.BlockGate`."""
    given = [name for name, x in (("topk", topk), ("threshold", threshold), ("cdf_threshold", cdf_threshold))
             if x is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of topk=, threshold=, cdf_threshold= (got {given or 'none'})")
    probs = torch.where(allowed, probs, torch.zeros_like(probs))
    if topk is not None:
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an int >= 1, got {topk!r}")
        rank = torch.argsort(torch.argsort(probs, dim=-1, descending=True, stable=True), dim=-1)
        return allowed & (rank < topk)
    for name, x in (("threshold", threshold), ("cdf_threshold", cdf_threshold)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            raise TypeError(f"{name} must be a number, got {x!r}")
    if threshold is not None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        return allowed & (probs >= threshold)
    if not 0.0 < float(cdf_threshold) <= 1.0:
        raise ValueError(f"cdf_threshold must lie in (0, 1], got {cdf_threshold}")
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the larger blocks
    keep_sorted = before < cdf_threshold
    return allowed & torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def pooled_block_map(q: torch.Tensor, k: torch.Tensor, block_size=64, causal: bool = False,
                     softmax_scale: Optional[float] = None) -> torch.Tensor:
    """The block attention map estimated from block means, ``(B, H, Nq, Nk)`` float32:
    ``softmax_j(scale * mean(q_i) . mean(k_j) + log n_j)`` over the key blocks query block ``i`` may
    see (``n_j`` keys in block ``j``; ``causal``: bottom-right aligned, up to the diagonal block).
    Exact when every block's queries and keys are each one repeated vector; the estimate
    :func:`predict_block_mask` selects from. q ``(B, Sq, H, D)``, k ``(B, Sk, Hkv, D)``."""
    shape = check_qkv(q, k, k)
    check_causal(causal)
    grid = _Grid((shape.seq_len_q, shape.seq_len_k), _check_block_size(block_size), q.device)
    return _pooled(q, k, grid, resolve_softmax_scale(softmax_scale, shape.head_dim), causal)


def _pooled(q: torch.Tensor, k: torch.Tensor, grid: _Grid, scale: float, causal: bool) -> torch.Tensor:
    """:func:`pooled_block_map` for validated inputs on ``grid``."""
    kmean = block_means(k, grid.bk).repeat_interleave(q.shape[2] // k.shape[2], dim=1)  # (B, H, Nk, D)
    logits = scale * block_means(q, grid.bq) @ kmean.transpose(-1, -2)  # (B, H, Nq, Nk)
    logits = logits + torch.log(_block_counts(k.shape[1], grid.bk, q.device))
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
    bq, bk = _check_block_size(block_size)
    if sim_threshold is not None and (isinstance(sim_threshold, bool) or not isinstance(sim_threshold, (int, float))):
        raise TypeError(f"sim_threshold must be a number, got {sim_threshold!r}")
    if sim_threshold is not None and not -1.0 <= float(sim_threshold) <= 1.0:
        raise ValueError(f"sim_threshold must lie in [-1, 1], got {sim_threshold}")
    if not isinstance(num_sink_blocks, int) or num_sink_blocks < 0:
        raise ValueError(f"num_sink_blocks must be an int >= 0, got {num_sink_blocks!r}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    group = shape.num_heads // shape.num_kv_heads
    grid = _Grid((shape.seq_len_q, shape.seq_len_k), (bq, bk), q.device)
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
