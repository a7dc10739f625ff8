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

import math

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
                     softmax_scale: float, request: MapRequest, feature_map=None,
                     chunk_elements: int = 1 << 21) -> torch.Tensor:
    """The block map of linear attention, exactly, without an S x S matrix.

    ``q (B, S, H, Dk)``, ``k (B, Sk, Hkv, Dk)``, ``feature_map`` applied here (None: already applied),
    ``log_gate (B, S, H, 1 | Dk)`` or None, ``denominator (B, S, H)`` or None (``normalize=False``).
    The weight of key s for query t is ``p(t, s) = softmax_scale * q_t . (e^(Gamma_t - Gamma_s) * k_s)``
    for ``s <= t`` (every s when not causal; ``Gamma`` the cumulative log-gate), divided by the
    denominator when normalised (rows then sum to 1, as softmax's do); ``block_map[b, h, i, j]`` is
    the mean over the queries of block i of their total weight on the keys of block j.
    -> ``(B, H, ceil(S / block_q), ceil(Sk / block_k))``.

    Everything is built from sums over sub-blocks of 16 rows, taken relative to each sub-block's first
    (queries) or last (keys) row. A key block entirely before query block i's first row t0 factors
    around it: ``(sum_t q_t e^(Gamma_t - Gamma_t0)) . e^(Gamma_t0 - Gamma_r) . (sum_s k_s e^(Gamma_r -
    Gamma_s))`` with r the key block's last row (every exponent <= 0), the block sums assembled from
    the sub-block sums; the band of key blocks that overlap query block i lies inside i's span of
    L = max(block_q, block_k) rows (:func:`_linear_band`). The rows are processed in chunks of about
    ``chunk_elements`` per tensor (the feature map applied per chunk): no temporary of the full
    sequence, whose allocation would cost page faults on every call.
    """
    bq, bk = request.block_q, request.block_k
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, S, H, _ = q.shape
    Sk = k.shape[1]
    phi = feature_map if feature_map is not None else (lambda x: x)
    Dk = phi(q[:1, :1]).shape[-1]  # the feature map's width
    nq, nk = -(-S // bq), -(-Sk // bk)
    L = max(bq, bk)
    c = min(_SUB, L)
    channel = log_gate is not None and log_gate.shape[-1] > 1
    rows_per_block = torch.clamp(S - torch.arange(nq, device=q.device) * bq, max=bq).to(wide)
    step = max(1, chunk_elements // max(1, H * L * Dk)) * L  # rows per chunk, whole spans

    def heads(x, r0, r1, pad_to, divide_by=None):
        """Rows [r0, r1) of x, feature-mapped, heads first, zero rows up to ``pad_to`` rows; divided by
        ``divide_by`` rows (the denominator: queries of a normalised map)."""
        xh = heads_first(phi(x[:, r0:r1]).to(wide), H, r1 - r0, pad_to - (r1 - r0))
        if divide_by is not None:
            xh[:, :, :r1 - r0] *= (1.0 / (divide_by[:, r0:r1].to(wide) + 1e-6)).transpose(1, 2).unsqueeze(-1)
        return xh

    if not causal:  # two block sums
        q_blocks = _block_sums(heads, q, S, bq, step, denominator)
        k_blocks = _block_sums(heads, k, Sk, bk, step, None)
        return (q_blocks @ k_blocks.transpose(-1, -2)) * softmax_scale / rows_per_block[:, None]
    n_sup = -(-S // L)
    subs, bands = [], []
    carry = None  # the cumulative gate before the chunk
    for r0 in range(0, S, step):
        r1 = min(r0 + step, S)
        n = -(-(r1 - r0) // L)
        # the denominator divides the query rows; the scale is applied to the map at the end
        qh, kh = heads(q, r0, r1, n * L, denominator), heads(k, r0, r1, n * L)
        g = None
        if log_gate is not None:  # global cumulative log-gates, float64 (differences of large sums)
            lg = log_gate[:, r0:r1].to(torch.float64).clamp(min=-80.0).cumsum(1)
            lg = lg if carry is None else lg + carry
            carry = lg[:, -1:]
            # padding rows repeat the last sum: their (zero) queries then meet no positive exponent
            g = F.pad(lg.transpose(1, 2), (0, 0, 0, n * L - (r1 - r0)), mode="replicate").view(B, H, n, L // c, c, -1)
        qs, ks = qh.view(B, H, n, L // c, c, Dk), kh.view(B, H, n, L // c, c, Dk)
        first = last = g_span = None
        if g is not None:
            first, last = g[:, :, :, :, 0], g[:, :, :, :, -1]  # global, float64: the off-band factors
            # The band and the sub-block sums only take differences inside a span: relative to the
            # span's first row they are exact in the compute dtype, which halves their passes.
            g_span = (g - g[:, :, :, :1, :1]).to(wide)
        q_sub, k_sub = _sub_sums(qs, ks, g_span)
        subs.append((q_sub, k_sub, first, last))
        if channel:
            # the steps' own gates, for the token recurrence inside the sub-blocks (padding: gate 1)
            steps = heads_first(log_gate[:, r0:r1].clamp(min=-80.0), H, r1 - r0, n * L - (r1 - r0))
            steps = torch.exp(steps.to(wide)).view(B, H, n, L // c, c, -1)
            bands.append(_channel_band(qs, ks, q_sub, k_sub, g_span, steps, bq, bk))
        else:
            bands.append(_linear_band(qs, ks, q_sub, k_sub, g_span, bq, bk))
    q_sub, k_sub = (torch.cat([x[i] for x in subs], dim=2).flatten(2, 3) for i in (0, 1))  # (B, H, n_sub, Dk)
    band = torch.cat(bands, dim=2)  # (B, H, n_sup, L/bq, L/bk)
    t0 = torch.arange(nq, device=q.device) * bq
    n_off = torch.clamp((t0 + 1) // bk, max=nk)  # key blocks that end by t0
    if log_gate is None:
        q_off = q_sub.view(B, H, -1, bq // c, Dk).sum(3)[:, :, :nq]
        k_off = k_sub.view(B, H, -1, bk // c, Dk).sum(3)[:, :, :nk]
        g_t0 = g_r = None
    else:
        first, last = (torch.cat([x[i] for x in subs], dim=2).flatten(2, 3) for i in (2, 3))  # (B, H, n_sub, G)
        G = first.shape[-1]
        # the map blocks' sums from the sub-block sums, relative to the block's first row t0 / last row r
        fq, lk = first.view(B, H, -1, bq // c, G), last.view(B, H, -1, bk // c, G)
        g_t0, g_r = fq[:, :, :nq, 0], lk[:, :, :nk, -1]  # (B, H, Nq | Nk, G)
        q_off = (q_sub.view(B, H, -1, bq // c, Dk)[:, :, :nq]
                 * torch.exp((fq[:, :, :nq] - g_t0.unsqueeze(3)).to(wide))).sum(3)
        k_off = (k_sub.view(B, H, -1, bk // c, Dk)[:, :, :nk]
                 * torch.exp((g_r.unsqueeze(3) - lk[:, :, :nk]).to(wide))).sum(3)
    block_map = _off_band(q_off, k_off, g_t0, g_r, n_off, wide)
    full = F.pad(block_map, (0, n_sup * (L // bk) - nk, 0, n_sup * (L // bq) - nq))
    diagonal = full.view(B, H, n_sup, L // bq, n_sup, L // bk).diagonal(dim1=2, dim2=4)  # (B, H, L/bq, L/bk, n_sup)
    diagonal.add_(band.permute(0, 1, 3, 4, 2))
    return full[:, :, :nq, :nk] * softmax_scale / rows_per_block[:, None]


def map_from_chunk_sums(sums, seq_len: int, chunk: int, softmax_scale: float) -> torch.Tensor:
    """The causal linear-attention block map at the chunk's granularity, exactly, from the chunk
    forward's own intermediates (``linear_chunk.ChunkSums``: a readout that costs the forward a few
    reductions, where :func:`linear_block_map` recomputes the feature maps and every sum).

    The diagonal block is the chunk's intra-chunk weight. Key chunk j < i factors around the chunk
    boundaries: ``q_sum[i] . e^(L_(i-1) - L_j) . k_sum[j]``, ``L`` the cumulative chunk log-gates (every
    exponent <= 0; per-channel gates through :func:`_channel_off_band`). -> ``(B, H, N, N)``, the mean
    over each block's queries; blocks after the query's own are exactly 0."""
    band, q_sum, k_sum, log_decay = sums
    B, H, N, _ = q_sum.shape
    wide = q_sum.dtype
    idx = torch.arange(N, device=q_sum.device)
    L = L_prev = None
    if log_decay is not None:
        L = log_decay.cumsum(2)  # (B, H, N, G), float64: differences of long sums
        L_prev = F.pad(L, (0, 0, 1, 0))[:, :, :N]  # the gate sum entering each chunk
    block_map = _off_band(q_sum, k_sum, L_prev, L, idx, wide) * softmax_scale  # key chunks j < i
    block_map.diagonal(dim1=2, dim2=3).add_(band)
    rows = torch.clamp(seq_len - idx * chunk, max=chunk).to(wide)
    return block_map / rows[:, None]


def _block_sums(heads, x: torch.Tensor, length: int, block: int, step: int, denominator) -> torch.Tensor:
    """``(B, H, ceil(length / block), Dk)``: sums of the (feature-mapped) rows of x per block, in
    chunks of ``step`` rows (a multiple of ``block``)."""
    sums = []
    for r0 in range(0, length, step):
        r1 = min(r0 + step, length)
        n = -(-(r1 - r0) // block)
        xh = heads(x, r0, r1, n * block, denominator)
        sums.append(xh.view(*xh.shape[:2], n, block, xh.shape[-1]).sum(3))
    return torch.cat(sums, dim=2)


def _sub_sums(qs: torch.Tensor, ks: torch.Tensor, g):
    """Sums of the sub-blocks ``qs, ks (B, H, n, L/c, c, Dk)`` relative to each sub-block's first row
    (queries: ``e^(Gamma_t - Gamma_first)``) and last row (keys: ``e^(Gamma_last - Gamma_s)``), exponents
    <= 0, from ``g (B, H, n, L/c, c, G)`` cumulative gates (any offset per span) in the compute dtype;
    plain sums without gates. Returns ``(q_sub, k_sub)``, each ``(B, H, n, L/c, Dk)``."""
    if g is None:
        return qs.sum(4), ks.sum(4)
    first, last = g[:, :, :, :, :1], g[:, :, :, :, -1:]
    if g.shape[-1] == 1:  # (1 x c) @ (c x Dk): no full-size temporary
        q_sub = (torch.exp(g - first).transpose(-1, -2) @ qs).squeeze(-2)
        k_sub = (torch.exp(last - g).transpose(-1, -2) @ ks).squeeze(-2)
    else:
        q_sub = (qs * torch.exp(g - first)).sum(4)
        k_sub = (ks * torch.exp(last - g)).sum(4)
    return q_sub, k_sub


def _off_band(q_off: torch.Tensor, k_off: torch.Tensor, g_t0, g_r, n_off: torch.Tensor,
              wide: torch.dtype) -> torch.Tensor:
    """``sum_d q_off[i, d] e^(g_t0[i, d] - g_r[j, d]) k_off[j, d]`` for the key blocks ``j < n_off[i]``,
    exactly 0 elsewhere: ``q_off (B, H, Nq, Dk)``, ``k_off (B, H, Nk, Dk)``, gates ``(B, H, Nq | Nk, 1 | Dk)``
    (float64, global) or None (no gates: plain products) -> ``(B, H, Nq, Nk)``."""
    kept = torch.arange(k_off.shape[2], device=q_off.device)[None, :] < n_off[:, None]
    if g_t0 is None:
        block_map = q_off @ k_off.transpose(-1, -2)
    elif g_t0.shape[-1] == 1:
        gap = (g_t0[..., 0].unsqueeze(3) - g_r[..., 0].unsqueeze(2)).masked_fill(~kept, float("-inf"))
        block_map = (q_off @ k_off.transpose(-1, -2)) * torch.exp(gap.to(wide))  # decay from block j's end to t0
    else:
        block_map = _channel_off_band(q_off, k_off, g_t0, g_r, n_off, wide)
    return block_map.masked_fill(~kept, 0.0)


def _channel_off_band(q_off: torch.Tensor, k_off: torch.Tensor, g_t0: torch.Tensor, g_r: torch.Tensor,
                      n_off: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """Off-band map weights with per-channel gates, ``sum_d q_off[i, d] e^(g_t0[i, d] - g_r[j, d])
    k_off[j, d]`` for the key blocks ``j < n_off[i]`` (those that end by query block i's first row),
    else 0: ``q_off, g_t0 (B, H, Nq, G)``, ``k_off, g_r (B, H, Nk, G)`` (gates float64, global) ->
    ``(B, H, Nq, Nk)``.

    An (Nq, Nk, G) tensor of decays (the direct form: 3-8x the forward's time at 16K) is avoided:
    key blocks go in groups of M ~ sqrt(Nk). A group that ends by t0 factors around its last row R,
    ``(q_off e^(g_t0 - R)) . (k_off e^(R - g_r))``, every exponent <= 0: one factor per (query block,
    group), one per key block, and a batched GEMM. The fewer than M blocks of the group that holds t0
    are summed directly. Exponentials: O(Nq sqrt(Nk) G)."""
    B, H, Nq, G = q_off.shape
    Nk = k_off.shape[2]
    M = math.isqrt(max(Nk - 1, 0)) + 1
    Ng = -(-Nk // M)
    pad = Ng * M - Nk
    g_r_groups = F.pad(g_r, (0, 0, 0, pad), mode="replicate").view(B, H, Ng, M, G)  # padding: the last block
    R = g_r_groups[:, :, :, -1]  # (B, H, Ng, G): the gate at each group's last row
    k_f = F.pad(k_off, (0, 0, 0, pad)).view(B, H, Ng, M, G) * torch.exp((R.unsqueeze(3) - g_r_groups).to(wide))
    whole = n_off // M  # per query block: the groups that end by its first row
    earlier = torch.arange(Ng, device=q_off.device)[None, :] < whole[:, None]  # (Nq, Ng)
    expo = (g_t0.unsqueeze(3) - R.unsqueeze(2)).masked_fill(~earlier[:, :, None], float("-inf"))
    q_f = q_off.unsqueeze(3) * torch.exp(expo.to(wide))  # (B, H, Nq, Ng, G)
    out = torch.einsum("bhiqd,bhqmd->bhiqm", q_f, k_f).reshape(B, H, Nq, Ng * M)[..., :Nk].contiguous()
    # the rest of the off-band blocks, in the group that holds t0: [whole * M, n_off)
    j = whole[:, None] * M + torch.arange(M, device=q_off.device)[None, :]  # (Nq, M)
    valid = j < n_off[:, None]
    j = j.clamp(max=Nk - 1)
    expo = (g_t0.unsqueeze(3) - g_r[:, :, j]).masked_fill(~valid[:, :, None], float("-inf"))  # (B, H, Nq, M, G)
    direct = (q_off.unsqueeze(3) * torch.exp(expo.to(wide)) * k_off[:, :, j]).sum(-1).masked_fill(~valid, 0.0)
    flat = (torch.arange(Nq, device=q_off.device)[:, None] * Nk + j).view(1, 1, -1).expand(B, H, -1)
    return out.view(B, H, Nq * Nk).scatter_add_(2, flat, direct.view(B, H, -1)).view(B, H, Nq, Nk)


_SUB = 16  # rows per sub-block of the band (the smallest map block)


def _linear_band(qs: torch.Tensor, ks: torch.Tensor, q_sub: torch.Tensor, k_sub: torch.Tensor, g, bq: int,
                 bk: int) -> torch.Tensor:
    """The band of :func:`linear_block_map` without gates or with one per head: per span of ``L`` rows
    cut into sub-blocks of 16 (``qs, ks (B, H, n, L/16, 16, Dk)``, their sums ``q_sub, k_sub (B, H, n,
    L/16, Dk)`` relative to each sub-block's first / last row, ``g (B, H, n, L/16, 16, 1)`` cumulative
    gates in the compute dtype (any offset per span) or None), the weight of every (query block, key
    block) pair of the span, ``(B, H, n, L / bq, L / bk)``. A key
    sub-block before the query sub-block factors around the query sub-block's first row ``a0`` and
    the key sub-block's last row ``e`` (``q_sub . e^(G_a0 - G_e) . k_sub``, every exponent <= 0); only
    the 16 x 16 diagonal sub-blocks are summed pair by pair: O(S (16 + L / 16) Dk), not O(S L Dk)."""
    B, H, n, nc, c, Dk = qs.shape
    before = torch.arange(nc, device=qs.device)[None, :] < torch.arange(nc, device=qs.device)[:, None]  # b < a
    lower = torch.arange(c, device=qs.device)[None, :] <= torch.arange(c, device=qs.device)[:, None]  # s <= t
    if g is None:
        pair = (q_sub @ k_sub.transpose(-1, -2)).masked_fill(~before, 0.0)  # (B, H, n, nc, nc)
        diag = (qs @ ks.transpose(-1, -2)).masked_fill(~lower, 0.0).sum((4, 5))
    else:  # one gate per head (per-channel gates: _channel_band)
        first, last = g[:, :, :, :, 0], g[:, :, :, :, -1]  # (B, H, n, nc, 1)
        gap = (first.unsqueeze(4) - last.unsqueeze(3)).masked_fill(~before[..., None], float("-inf"))
        pair = (q_sub @ k_sub.transpose(-1, -2)) * torch.exp(gap[..., 0])  # (B, H, n, nc(a), nc(b))
        expo = (g.unsqueeze(5) - g.unsqueeze(4))[..., 0].masked_fill(~lower, float("-inf"))  # (.., nc, c(t), c(s))
        diag = ((qs @ ks.transpose(-1, -2)) * torch.exp(expo)).sum((4, 5))
    pair = pair + torch.diag_embed(diag)
    # pool the sub-blocks into the map's blocks of the span
    return pair.view(B, H, n, -1, bq // c, nc * c // bk, bk // c).sum((4, 6))


def _channel_band(qs: torch.Tensor, ks: torch.Tensor, q_sub: torch.Tensor, k_sub: torch.Tensor, g: torch.Tensor,
                  steps: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """The band of :func:`linear_block_map` with one gate per key channel, ``(B, H, n, L / bq, L / bk)``,
    from ``qs, ks (B, H, n, L/c, c, Dk)``, their sub-block sums ``q_sub, k_sub`` (relative to each
    sub-block's first / last row), ``g (B, H, n, L/c, c, Dk)`` cumulative gates (any offset per span)
    and ``steps`` the steps' own decays ``e^(gate_t)``, all in the compute dtype.

    Two short recurrences replace the (c, c, Dk) and (L/c, L/c, Dk) decay tensors of the pairwise
    form (which cost 1.7-2.1x the forward): inside each sub-block the token recurrence
    ``h_t = e^(gate_t) h_(t-1) + k_t`` gives the diagonal sub-blocks (c steps over every sub-block at
    once); across the sub-blocks of a span one state per key block of the span,
    ``state <- e^(G_first(a+1) - G_first(a)) state + e^(G_first(a+1) - G_last(a)) k_sub[a]``, gives
    the earlier sub-blocks (every exponent <= 0, L/c steps)."""
    B, H, n, nc, c, Dk = qs.shape
    h = ks[:, :, :, :, 0]
    diag = (qs[:, :, :, :, 0] * h).sum(-1)  # (B, H, n, nc)
    for t in range(1, c):
        h = torch.addcmul(ks[:, :, :, :, t], h, steps[:, :, :, :, t])
        diag = diag + (qs[:, :, :, :, t] * h).sum(-1)
    per_key = bk // c  # sub-blocks per key block
    first, last = g[:, :, :, :, 0], g[:, :, :, :, -1]  # (B, H, n, nc, Dk)
    state = qs.new_zeros(B, H, n, nc // per_key, Dk)
    pair = []
    for a in range(nc):
        if a:
            state = state * torch.exp(first[:, :, :, a] - first[:, :, :, a - 1]).unsqueeze(3)
            entering = torch.exp(first[:, :, :, a] - last[:, :, :, a - 1]) * k_sub[:, :, :, a - 1]
            state[:, :, :, (a - 1) // per_key] += entering
        pair.append((state * q_sub[:, :, :, a].unsqueeze(3)).sum(-1))  # (B, H, n, L / bk)
    pair = torch.stack(pair, dim=3)  # (B, H, n, nc, L / bk)
    own = torch.arange(nc, device=qs.device)
    pair[:, :, :, own, own // per_key] += diag
    return pair.view(B, H, n, nc // (bq // c), bq // c, -1).sum(4)


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
