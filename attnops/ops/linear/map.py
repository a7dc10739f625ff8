"""Linear attention's block maps, exact and never S x S (DESIGN.md, linear attention): read off the
chunk forward at the chunk's granularity (:func:`map_from_chunk_sums`), else block sums factored at
block edges plus the diagonal band (:func:`linear_block_map`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnops.core.block_map import MapRequest
from attnops.ops.linear.chunk import heads_first


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
