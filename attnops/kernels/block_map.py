"""Block attention maps: the part every backend shares.

``block_map[b, h, i, j]`` is the mean, over the queries of query block ``i`` that attend to at least
one key, of the softmax probability they put on the keys of key block ``j`` (``reduce="max"``: the
largest single probability in the tile, SeerAttention's target). A row of a mean map sums to 1, or
is all 0 when no query of the block sees a key; blocks the mask drops are exactly 0.

The attention kernels write a *partial* map: sums (or maxima) of the probabilities over ``rows``
queries x ``block_k`` keys, with ``rows`` a divisor of the map's query block that fits the kernels'
query tiles (:func:`partial_rows`). :func:`finish` pools the partial rows into map rows and divides
by the number of queries that attend to something, read off the lse (``-inf`` = nothing).
:func:`decode_block_map` is the decode path's map, computed from the decode kernels' lse.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from attnops.kernels.linear_chunk import heads_first

REDUCTIONS = ("mean", "max")
# The kernels' query tile: C++ tasks and the Triton map kernel cover at most 64 queries per row
# block, so partial rows never need more.
_MAX_PARTIAL_ROWS = 64


class MapRequest(NamedTuple):
    """What a caller asks of a kernel: map block sizes (powers of two) and the reduction."""

    block_q: int
    block_k: int
    reduce: str


def partial_rows(request: MapRequest, lut_block_q: int = 0) -> int:
    """Queries per partial-map row: a power of two dividing the map's query block and the kernels'
    query tile (which never straddles two LUT rows)."""
    rows = min(request.block_q, _MAX_PARTIAL_ROWS)
    return min(rows, lut_block_q) if lut_block_q else rows


def finish(partial: torch.Tensor, lse: torch.Tensor, rows: int, request: MapRequest) -> torch.Tensor:
    """Pools ``partial (B, H, ceil(Sq/rows), Nk)`` into ``(B, H, ceil(Sq/block_q), Nk)`` float32 (float64
    for float64 inputs): sum or max over ``block_q / rows`` partial rows, then, for the mean, a
    division by the number of queries of the block with a finite (or NaN) lse."""
    B, H, _, Nk = partial.shape
    Sq = lse.shape[-1]
    nq = -(-Sq // request.block_q)
    factor = request.block_q // rows
    if factor > 1:
        pad = nq * factor - partial.shape[2]
        partial = torch.nn.functional.pad(partial, (0, 0, 0, pad)).view(B, H, nq, factor, Nk)
        partial = partial.amax(dim=3) if request.reduce == "max" else partial.sum(dim=3)
    if request.reduce == "max":
        return partial
    attends = torch.nn.functional.pad((lse != float("-inf")).to(partial.dtype), (0, nq * request.block_q - Sq))
    count = attends.view(B, H, nq, request.block_q).sum(-1, keepdim=True)
    return partial / count.clamp(min=1)


def check_request(block_size, reduce: str, default: Tuple[int, int]) -> MapRequest:
    """Validates the ops' ``block_size`` / ``reduce`` arguments (raised before any kernel runs)."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if block_size is None:
        block_q, block_k = default
    elif isinstance(block_size, int) and not isinstance(block_size, bool):
        block_q = block_k = block_size
    elif isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        block_q, block_k = block_size
    else:
        raise TypeError(f"block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, int) or isinstance(b, bool) or b < 16 or b & (b - 1):
            raise ValueError(f"block map {name} must be a power of two >= 16, got {b!r}")
    return MapRequest(block_q, block_k, reduce)


def decode_block_map(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, lse: torch.Tensor,
                     block_mask, window_left: int, request: MapRequest, softmax_scale: float,
                     chunk: int = 4096) -> torch.Tensor:
    """The block map of a decode step, from the decode kernel's ``lse (B, H, Sq_new)``.

    Decoding has at most 64 query rows, so the map is a batched ``q K^T`` over the cache in chunks
    of ``chunk`` keys: memory ``B * H * Sq_new * chunk``, never a square matrix, one extra read of K
    and none of V. The keep predicate is the decode kernels' (``attnops.decode_attention``): query
    ``i`` of sequence ``b`` sits at ``cache_seqlens[b] - Sq_new + i``, sees keys up to it (and back to
    ``pos - window_left``), in the blocks ``block_mask`` keeps.
    """
    B, Sq, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).permute(0, 2, 1, 3).reshape(B, Hkv, (H // Hkv) * Sq, D) * softmax_scale  # one kv group per row set
    lse_w = lse.to(work)
    lse_rows = torch.where(torch.isneginf(lse_w), torch.inf, lse_w).view(B, Hkv, -1, 1)  # no key: p = 0
    pos = cache_seqlens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1) - Sq + torch.arange(
        Sq, device=q.device).view(1, 1, Sq, 1)
    kept_blocks = None
    if block_mask is not None:
        kept_blocks = block_mask.to_dense().to(q.device)[:, :, torch.arange(Sq, device=q.device) // block_mask.block_size[0]]
    nk = -(-S // request.block_k)
    rows = torch.zeros(B, H, Sq, nk, dtype=work, device=q.device)
    step = max(request.block_k, chunk // request.block_k * request.block_k)
    for lo in range(0, S, step):
        hi = min(lo + step, S)
        j = torch.arange(lo, hi, device=q.device).view(1, 1, 1, -1)
        keep = j <= pos  # pos < cache_seqlens, so this also drops the unused cache
        if window_left >= 0:
            keep = keep & (j >= pos - window_left)
        if kept_blocks is not None:
            keep = keep & kept_blocks[..., j.view(-1) // block_mask.block_size[1]]
        kc = k_cache[:, lo:hi].to(work).permute(0, 2, 3, 1)  # (B, Hkv, D, n)
        p = torch.exp(torch.matmul(qg, kc) - lse_rows).view(B, H, Sq, hi - lo).masked_fill(~keep, 0.0)
        width = -(-(hi - lo) // request.block_k) * request.block_k
        p = torch.nn.functional.pad(p, (0, width - (hi - lo))).view(B, H, Sq, -1, request.block_k)
        first = lo // request.block_k
        rows[..., first:first + p.shape[3]] = p.amax(-1) if request.reduce == "max" else p.sum(-1)
    return finish(rows, lse, 1, request).to(lse.dtype)


def linear_block_map(q: torch.Tensor, k: torch.Tensor, log_gate, denominator, *, causal: bool,
                     softmax_scale: float, request: MapRequest) -> torch.Tensor:
    """The block map of linear attention, exactly, without an S x S matrix.

    ``q (B, S, H, Dk)``, ``k (B, Sk, Hkv, Dk)`` (feature maps applied), ``log_gate (B, S, H, 1 | Dk)`` or
    None, ``denominator (B, S, H)`` or None (``normalize=False``). The weight of key s for query t is
    ``p(t, s) = softmax_scale * q_t . (e^(Gamma_t - Gamma_s) * k_s)`` for ``s <= t`` (every s when not
    causal; ``Gamma`` the cumulative log-gate), divided by the denominator when normalised (rows then
    sum to 1, as softmax's do); ``block_map[b, h, i, j]`` is the mean over the queries of block i of
    their total weight on the keys of block j. -> ``(B, H, ceil(S / block_q), ceil(Sk / block_k))``.

    A key block entirely before query block i's first row t0 factors around it: ``(sum_t q_t
    e^(Gamma_t - Gamma_t0)) . e^(Gamma_t0 - Gamma_r) . (sum_s k_s e^(Gamma_r - Gamma_s))`` with r the key
    block's last row (every exponent <= 0): O(S Dk + Nq Nk Dk). Block sizes are powers of two, so with
    L = max(block_q, block_k) the key blocks that overlap query block i (its "band") lie inside i's
    span of L rows; one masked (block_q x L) product per query block covers them, pair by pair.
    """
    bq, bk = request.block_q, request.block_k
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, S, H, Dk = q.shape
    Sk = k.shape[1]
    nq, nk = -(-S // bq), -(-Sk // bk)
    L = max(bq, bk)
    n_sup = -(-max(S, Sk) // L)
    factor = softmax_scale if denominator is None else (softmax_scale / (denominator.to(wide) + 1e-6)).unsqueeze(-1)
    qh = heads_first(q.to(wide) * factor, H, S, n_sup * L - S)  # (B, H, n_sup * L, Dk), zero rows after S
    kh = heads_first(k.to(wide), H, Sk, n_sup * L - Sk)
    rows_per_block = torch.clamp(S - torch.arange(nq, device=q.device) * bq, max=bq).to(wide)
    q_blocks = qh.view(B, H, -1, bq, Dk).sum(3)[:, :, :nq]  # (B, H, Nq, Dk)
    k_blocks = kh.view(B, H, -1, bk, Dk).sum(3)[:, :, :nk]
    if not causal:
        return (q_blocks @ k_blocks.transpose(-1, -2)) / rows_per_block[:, None]
    gamma = None
    if log_gate is not None:  # global cumulative log-gates, float64 (differences of large sums)
        G = log_gate.shape[-1]
        # padding rows repeat the last sum: their (zero) queries then meet no positive exponent
        gamma = F.pad(log_gate.to(torch.float64).clamp(min=-80.0).cumsum(1).transpose(1, 2),
                      (0, 0, 0, n_sup * L - S), mode="replicate")  # (B, H, n_sup * L, G)
    t0 = torch.arange(nq, device=q.device) * bq
    off_band = torch.arange(nk, device=q.device)[None, :] < ((t0 + 1) // bk)[:, None]  # key block ends by t0
    if gamma is None:
        block_map = q_blocks @ k_blocks.transpose(-1, -2)
    else:
        r = torch.arange(nk, device=q.device) * bk + bk - 1  # each key block's last row
        g_t0, g_r = gamma[:, :, t0], gamma[:, :, r]  # (B, H, Nq | Nk, G)
        rows = torch.arange(gamma.shape[2], device=q.device)  # every (padded) row: its block's t0 / r
        q_off = qh * torch.exp((gamma - g_t0[:, :, (rows // bq).clamp(max=nq - 1)]).to(wide))
        k_off = kh * torch.exp((g_r[:, :, (rows // bk).clamp(max=nk - 1)] - gamma).to(wide))
        q_off = q_off.view(B, H, -1, bq, Dk).sum(3)[:, :, :nq]
        k_off = k_off.view(B, H, -1, bk, Dk).sum(3)[:, :, :nk]
        gap = (g_t0.unsqueeze(3) - g_r.unsqueeze(2)).masked_fill(~off_band[:, :, None], float("-inf"))
        between = torch.exp(gap.to(wide))  # (B, H, Nq, Nk, G): decay from the key block's end to t0
        if G == 1:
            block_map = (q_off @ k_off.transpose(-1, -2)) * between[..., 0]
        else:
            block_map = torch.einsum("bhid,bhijd,bhjd->bhij", q_off, between, k_off)
    block_map = block_map.masked_fill(~off_band, 0.0)
    # the band, on views: query blocks (B, H, n_sup, L/bq, bq, Dk) against their span (.., 1, L, Dk)
    qs = qh.view(B, H, n_sup, L // bq, bq, Dk)
    ks = kh.view(B, H, n_sup, 1, L, Dk)
    pos_t = torch.arange(L // bq, device=q.device)[:, None] * bq + torch.arange(bq, device=q.device)
    causal_band = pos_t[:, :, None] >= torch.arange(L, device=q.device)  # (L/bq, bq, L): s <= t
    if gamma is not None:  # relative to each span's start (float64), then rounded
        g_span = gamma.view(B, H, n_sup, L, G)
        start = torch.cat([torch.zeros_like(g_span[:, :, :1, 0]), g_span[:, :, :-1, -1]], dim=2)
        g_rel = (g_span - start.unsqueeze(3)).to(wide)
        g_rows, g_keys = g_rel.view(B, H, n_sup, L // bq, bq, 1, G), g_rel.view(B, H, n_sup, 1, 1, L, G)
    budget = max(1, (1 << 24) // max(1, B * H * L * L * (Dk if gamma is not None and G > 1 else 1)))
    band = []
    for n0 in range(0, n_sup, budget):
        n1 = min(n_sup, n0 + budget)
        q_n, k_n = qs[:, :, n0:n1], ks[:, :, n0:n1]
        if gamma is None:
            w = q_n @ k_n.transpose(-1, -2)
        else:
            expo = (g_rows[:, :, n0:n1] - g_keys[:, :, n0:n1]).masked_fill(~causal_band[..., None], float("-inf"))
            if G == 1:
                w = (q_n @ k_n.transpose(-1, -2)) * torch.exp(expo[..., 0])
            else:
                w = (q_n.unsqueeze(-2) * k_n.unsqueeze(-3) * torch.exp(expo)).sum(-1)
        w = w.masked_fill_(~causal_band, 0.0)  # (B, H, n, L/bq, bq, L)
        band.append(w.sum(4).view(B, H, n1 - n0, L // bq, L // bk, bk).sum(-1))
    band = torch.cat(band, dim=2) if len(band) > 1 else band[0]  # (B, H, n_sup, L/bq, L/bk)
    full = F.pad(block_map, (0, n_sup * (L // bk) - nk, 0, n_sup * (L // bq) - nq))
    diagonal = full.view(B, H, n_sup, L // bq, n_sup, L // bk).diagonal(dim1=2, dim2=4)  # (B, H, L/bq, L/bk, n_sup)
    diagonal.add_(band.permute(0, 1, 3, 4, 2))
    return full[:, :, :nq, :nk] / rows_per_block[:, None]


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
