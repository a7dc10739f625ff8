"""Plain PyTorch math for every attnops op: the oracle the kernels are tested against.

Each function has the signature of the backend functions it checks (see ``attnops.dispatch``) and
computes in the dtype of its inputs, so tests run it twice: in float64 (the truth) and in the
kernel's dtype (the yardstick of the DESIGN.md accuracy rule). It may allocate N x N; it runs only
in tests or when ``backend="reference"`` is asked for. Differentiable through autograd.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.kernels._registration import moba_lut_width
from attnops.kernels.block_map import MapRequest
from attnops.masks import BlockMask, _compress

AVAILABLE = True
UNAVAILABLE_REASON = ""


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_mask(
    seq_len_q: int,
    seq_len_k: int,
    block_mask: Optional[BlockMask] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    device=None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``(B, H, R, Sk)`` bool (B, H possibly 1): which (query, key) pairs may attend, for the query
    rows ``rows`` (default: all ``Sq``).

    Causal and window predicates are aligned to the bottom-right corner: query ``i`` sits at key
    position ``i + Sk - Sq`` and sees keys in ``[pos - left, pos + right]`` (``causal``: right = 0;
    -1: unbounded).
    """
    left, right = window_size
    if causal:
        right = 0
    if rows is None:
        rows = torch.arange(seq_len_q, device=device)
    rows = rows.to(device)
    pos = rows.unsqueeze(1) + (seq_len_k - seq_len_q)
    key = torch.arange(seq_len_k, device=device).unsqueeze(0)
    allowed = torch.ones(rows.numel(), seq_len_k, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= key >= pos - left
    if right >= 0:
        allowed &= key <= pos + right
    allowed = allowed.view(1, 1, rows.numel(), seq_len_k)
    if block_mask is not None:
        bq, bk = block_mask.block_size
        blocks = block_mask.to_dense().to(device)[:, :, rows // bq]  # (B, H, R, Nk)
        allowed = allowed & blocks.repeat_interleave(bk, dim=3)[..., :seq_len_k]
    return allowed


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[BlockMask],
    *,
    causal: bool,
    window_size: Tuple[int, int],
    softmax_scale: float,
    block_map: Optional[MapRequest] = None,
) -> Tuple[torch.Tensor, ...]:
    """Exact softmax attention restricted to ``block_mask`` (None: all blocks) and the token
    predicates. q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)`` -> out ``(B, Sq, H, D)``,
    lse ``(B, H, Sq)``, and with ``block_map`` the block attention map pooled from the full
    probability matrix (:func:`pool_block_map`). Rows with nothing to attend to give 0 and lse = -inf."""
    allowed = token_mask(q.shape[1], k.shape[1], block_mask, causal, window_size, device=q.device)
    out, lse, probs = masked_attention(q, k, v, allowed, softmax_scale, return_probs=True)
    if block_map is None:
        return out, lse
    return out, lse, pool_block_map(probs, lse, block_map)


def pool_block_map(probs: torch.Tensor, lse: torch.Tensor, request: MapRequest) -> torch.Tensor:
    """The block attention map from the full ``probs (B, H, Sq, Sk)``, by its definition
    (attnops.kernels.block_map): per tile the summed (or max) probability; for the mean, the sum over
    the tile divided by the number of the block's queries that attend to a key (lse > -inf)."""
    B, H, Sq, Sk = probs.shape
    bq, bk = request.block_q, request.block_k
    nq, nk = -(-Sq // bq), -(-Sk // bk)
    tiles = torch.nn.functional.pad(probs, (0, nk * bk - Sk, 0, nq * bq - Sq)).view(B, H, nq, bq, nk, bk)
    if request.reduce == "max":
        return tiles.amax(dim=(3, 5))
    attends = torch.nn.functional.pad((~torch.isneginf(lse)).to(probs.dtype), (0, nq * bq - Sq))
    count = attends.view(B, H, nq, bq).sum(-1).clamp(min=1)
    return tiles.sum(dim=(3, 5)) / count.unsqueeze(-1)


def block_sparse_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[BlockMask],
    rows: Optional[torch.Tensor],
    *,
    causal: bool,
    window_size: Tuple[int, int],
    softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_sparse_attention` for the query rows ``rows`` only (their true positions kept):
    out ``(B, R, H, D)``, lse ``(B, H, R)``. Lets the benchmark harness check long sequences
    without a full Sq x Sk matrix."""
    Sq, Sk = q.shape[1], k.shape[1]
    if rows is not None:
        q = q[:, rows.to(q.device)]
    allowed = token_mask(Sq, Sk, block_mask, causal, window_size, device=q.device, rows=rows)
    return masked_attention(q, k, v, allowed, softmax_scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     softmax_scale: float, return_probs: bool = False) -> Tuple[torch.Tensor, ...]:
    """Softmax attention where ``allowed (B|1, H|1, Sq, Sk)`` says which pairs may attend; GQA by
    contiguous head groups. Rows with nothing allowed give 0 and lse = -inf. ``return_probs`` adds
    the probability matrix ``(B, H, Sq, Sk)``.

    Non-finite values travel only along allowed pairs, forward and backward (the kernels' convention):
    a NaN in ``v[j]`` reaches the rows that attend key ``j`` and no other, a NaN in ``q[i]`` reaches
    the gradients of the keys row ``i`` attends, and so on. Plain einsums would spread them through
    the masked zeros (``0 * NaN = NaN``) to every row."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, dim=2)  # query head h reads kv head h // group
    vv = v.repeat_interleave(group, dim=2)
    allowed = allowed.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    scores = _MaskedScores.apply(q, kk, allowed, softmax_scale)  # (B, H, Sq, Sk), -inf where not allowed
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq); -inf for empty rows
    # Empty rows hold only -inf scores, so subtracting 0 there gives exact zeros without the
    # NaN of (-inf) - (-inf), which a torch.where afterwards would still leak into gradients.
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    out = _MaskedContract.apply(probs, vv, allowed)
    if return_probs:
        return out, lse.to(_lse_dtype(q.dtype)), probs
    return out, lse.to(_lse_dtype(q.dtype))


def _masked_contract(w: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``out[b, m, h] = sum over n with allowed[b, h, m, n] of w[b, h, m, n] * x[b, n, h]``:
    w ``(B, H, M, N)``, x ``(B, N, H, D)``, allowed ``(B, H, M, N)`` -> ``(B, M, H, D)``. Pairs that are not
    allowed contribute nothing even where ``x`` is NaN or infinite: the finite part is one einsum over
    ``x`` with its non-finite entries zeroed; those entries are added back on allowed pairs only."""
    wm = torch.where(allowed, w, torch.zeros((), dtype=w.dtype, device=w.device))
    finite = torch.isfinite(x)
    out = torch.einsum("bhmn,bnhd->bmhd", wm, torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    if not bool(finite.all()):
        b, n, h, d = torch.nonzero(~finite, as_tuple=True)  # E non-finite entries of x
        M = w.shape[2]
        contrib = torch.where(allowed[b, h, :, n], w[b, h, :, n] * x[b, n, h, d].unsqueeze(1),
                              torch.zeros((), dtype=out.dtype, device=out.device))  # (E, M)
        m = torch.arange(M, device=x.device).expand(b.numel(), M)
        out.index_put_((b.unsqueeze(1).expand_as(m), m, h.unsqueeze(1).expand_as(m), d.unsqueeze(1).expand_as(m)),
                       contrib, accumulate=True)
    return out


class _MaskedContract(torch.autograd.Function):
    """:func:`_masked_contract` with a backward under the same convention: ``dw`` is ``g . x`` on allowed
    pairs (0 elsewhere, whatever g or x hold), ``dx`` the masked contraction of ``w^T`` with ``g``."""

    @staticmethod
    def forward(ctx, w, x, allowed):
        ctx.save_for_backward(w, x, allowed)
        return _masked_contract(w, x, allowed)

    @staticmethod
    def backward(ctx, g):
        w, x, allowed = ctx.saved_tensors
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        dw = torch.where(allowed, torch.einsum("bmhd,bnhd->bhmn", g, x), zero) if ctx.needs_input_grad[0] else None
        dx = _MaskedContract.apply(w.transpose(-1, -2), g, allowed.transpose(-1, -2)) \
            if ctx.needs_input_grad[1] else None
        return dw, dx, None


class _MaskedScores(torch.autograd.Function):
    """``scale * q . k`` on allowed pairs, -inf elsewhere: q ``(B, Sq, H, D)``, k ``(B, Sk, H, D)`` ->
    ``(B, H, Sq, Sk)``. Backward: ``dq = scale * dS k`` and ``dk = scale * dS^T q`` over allowed pairs only
    (a NaN in a key a row never attends does not reach that row's dq)."""

    @staticmethod
    def forward(ctx, q, k, allowed, scale):
        ctx.save_for_backward(q, k, allowed)
        ctx.scale = scale
        return (torch.einsum("bqhd,bkhd->bhqk", q, k) * scale).masked_fill(~allowed, float("-inf"))

    @staticmethod
    def backward(ctx, ds):
        q, k, allowed = ctx.saved_tensors
        ds = ds * ctx.scale
        dq = _MaskedContract.apply(ds, k, allowed) if ctx.needs_input_grad[0] else None
        dk = _MaskedContract.apply(ds.transpose(-1, -2), q, allowed.transpose(-1, -2)) \
            if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def decode_token_mask(cache_seqlens: torch.Tensor, num_new: int, max_len: int, block_mask: Optional[BlockMask],
                      window_size: Tuple[int, int], device=None) -> torch.Tensor:
    """``(B, H|1, Sq_new, S_max)`` bool for decoding: new query i of sequence b sits at position
    ``seqlen_b - Sq_new + i`` and sees the cache keys ``[pos - left, pos]`` below ``seqlen_b``."""
    left = window_size[0]
    lens = cache_seqlens.to(device=device, dtype=torch.long).view(-1, 1, 1, 1)
    i = torch.arange(num_new, device=device).view(1, 1, -1, 1)
    j = torch.arange(max_len, device=device).view(1, 1, 1, -1)
    pos = lens - num_new + i
    allowed = (j < lens) & (j <= pos)
    if left >= 0:
        allowed &= j >= pos - left
    if block_mask is not None:
        bq, bk = block_mask.block_size
        blocks = block_mask.to_dense().to(device)  # (B|1, H|1, Nq, Nk)
        allowed = allowed & blocks.repeat_interleave(bq, dim=2)[:, :, :num_new].repeat_interleave(bk, dim=3)[
            ..., :max_len]
    return allowed


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_mask: Optional[BlockMask],
    *,
    window_size: Tuple[int, int],
    softmax_scale: float,
    num_splits: int = 0,
    block_map: Optional[MapRequest] = None,
) -> Tuple[torch.Tensor, ...]:
    """Attention of ``q (B, Sq_new, H, D)`` against the first ``cache_seqlens[b]`` keys of
    ``k_cache, v_cache (B, S_max, Hkv, D)``, causal within the new tokens (see
    :func:`decode_token_mask`), and with ``block_map`` the pooled block map over the cache.
    ``num_splits`` is a kernel knob the reference ignores."""
    allowed = decode_token_mask(cache_seqlens, q.shape[1], k_cache.shape[1], block_mask, window_size, q.device)
    out, lse, probs = masked_attention(q, k_cache, v_cache, allowed, softmax_scale, return_probs=True)
    if block_map is None:
        return out, lse
    return out, lse, pool_block_map(probs, lse, block_map)


# ---- block-routed attention (MoBA) ------------------------------------------------------------------

def _group_means(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x (B, S, H, D)`` -> ``(B, ceil(S / rows), H, D)``: the mean of each group of ``rows``
    positions (a partial last group averages what it has)."""
    B, S, H, D = x.shape
    n = -(-S // rows)
    sums = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * rows - S)).view(B, n, rows, H, D).sum(2)
    counts = torch.clamp(S - torch.arange(n, device=x.device) * rows, max=rows).to(x.dtype)
    return sums / counts.view(1, n, 1, 1)


def moba_selection(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   route_rows: int = 1) -> torch.Tensor:
    """``(B, H, R, NB)`` bool: the MoBA blocks (``block_size`` keys, ``NB = ceil(S / block_size)``)
    that each group of ``route_rows`` query rows attends, ``R = ceil(S / route_rows)``.

    MoBA (Lu et al. 2025): the gate of a query against key block j is ``q . mean(k[block j])``; the
    query's own block is always chosen; under ``causal`` later blocks never are; the other
    ``topk - 1`` blocks are the highest gates among the remaining candidates. ``route_rows=1`` is
    the paper's token-level routing; a group routes with its mean query (the kernels' query-tile
    routing is ``route_rows=64``). Ties go to the lower block index, NaN gates rank highest."""
    B, S, H, D = q.shape
    kmean = _group_means(k, block_size).repeat_interleave(H // k.shape[2], dim=2)  # (B, NB, H, D)
    gates = torch.einsum("brhd,bnhd->bhrn", _group_means(q, route_rows), kmean)
    gates = torch.where(torch.isnan(gates), float("inf"), gates)
    R, NB = gates.shape[-2:]
    own = (torch.arange(R, device=q.device) * route_rows // block_size).unsqueeze(1)  # (R, 1)
    j = torch.arange(NB, device=q.device)
    cand = (j < own) if causal else (j != own)  # (R, NB)
    gi, gj = gates.unsqueeze(-1), gates.unsqueeze(-2)  # i: the competitor, j: the ranked block
    beats = cand.unsqueeze(-1) & ((gi > gj) | ((gi == gj) & (j.view(-1, 1) < j.view(1, -1))))
    rank = beats.sum(-2)  # (B, H, R, NB): candidates that outrank block j
    return (cand & (rank < topk - 1)) | (j == own)


def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
               route_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The router backends' contract: the query-tile selection of :func:`moba_selection` as a block
    LUT at ``(route_block, route_block)`` granularity, ``(kv_num_blocks (B, H, Nt), kv_indices
    (B, H, Nt, W))`` int32, ascending, zero-padded to the router's width."""
    S = q.shape[1]
    chosen = moba_selection(q, k, block_size=block_size, topk=topk, causal=causal, route_rows=route_block)
    tiles = chosen.shape[2]
    blocks = chosen.repeat_interleave(block_size // route_block, dim=-1)[..., :tiles]  # (B, H, Nt, Nt)
    if causal:
        t = torch.arange(tiles, device=q.device)
        blocks = blocks & (t.view(1, -1) <= t.view(-1, 1))  # the own block ends at the tile's diagonal
    counts, indices = _compress(blocks)
    width = moba_lut_width(S, block_size, topk, route_block)
    return counts, torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))[..., :width].contiguous()


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   softmax_scale: float, route_rows: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention by its definition: each query attends, with one softmax, to the keys of the
    blocks :func:`moba_selection` chose for it (causal inside its own block). ``route_rows=1``:
    the paper's token-level routing; ``route_rows=64``: what the kernels compute. Builds S x S."""
    S = q.shape[1]
    chosen = moba_selection(q, k, block_size=block_size, topk=topk, causal=causal, route_rows=route_rows)
    rows = torch.arange(S, device=q.device)
    allowed = chosen[:, :, rows // route_rows].repeat_interleave(block_size, dim=-1)[..., :S]
    if causal:
        allowed = allowed & (rows.view(1, -1) <= rows.view(-1, 1))
    return masked_attention(q, k, v, allowed, softmax_scale)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], *, feature_map, causal: bool, softmax_scale: float,
                     chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linear attention token by token (the definition): ``S_t = exp(g_t) * S_{t-1} + phi(k_t) v_t^T``,
    ``o_t = softmax_scale * phi(q_t)^T S_t``; non-causal: one state over the whole sequence. Shapes as
    ``attnops.kernels.linear_chunk.linear_attention`` (normalisation's ones column in ``v``);
    computes in the inputs' dtype, state included. ``chunk_size`` is unused."""
    q, k = feature_map(q), feature_map(k)
    B, S, H, Dk = q.shape
    group = H // k.shape[2]
    q = q * softmax_scale
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    if not causal:
        state = state + torch.einsum("bshk,bshv->bhkv", k, v)
        return torch.einsum("bshk,bhkv->bshv", q, state), state
    outs = []
    for t in range(S):
        if log_gate is not None:
            state = torch.exp(log_gate[:, t].to(q.dtype)).unsqueeze(-1) * state  # (B, H, 1 | Dk, 1)
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    out = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return out, state


def linear_block_map(q: torch.Tensor, k: torch.Tensor, log_gate: Optional[torch.Tensor], *, feature_map,
                     causal: bool, normalize: bool, softmax_scale: float, request: MapRequest) -> torch.Tensor:
    """The block map of linear attention from its full ``(S, Sk)`` weight matrix (the definition of
    ``attnops.kernels.block_map.linear_block_map``, computed independently): weights
    ``softmax_scale * phi(q_t) . (prod of the gates after s up to t) * phi(k_s)``, ``s <= t`` when causal,
    each row divided by its sum (+ 1e-6) when normalised; pooled as sums over key blocks, means over
    query blocks."""
    q, k = feature_map(q) * softmax_scale, feature_map(k)
    B, S, H, Dk = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    Sk = k.shape[1]
    if log_gate is None:
        w = torch.einsum("bthd,bshd->bhts", q, k)
    else:
        gamma = log_gate.to(q.dtype).clamp(min=-80.0).cumsum(1)  # (B, S, H, G)
        diff = gamma.unsqueeze(2) - gamma.unsqueeze(1)  # (B, t, s, H, G)
        diff = diff.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None, :, :, None, None],
                                float("-inf"))
        w = torch.einsum("bthd,bshd,btshd->bhts", q, k, torch.exp(diff).expand(B, S, S, H, Dk))
    if causal:
        w = w.masked_fill(~torch.ones(S, Sk, dtype=torch.bool, device=q.device).tril(), 0.0)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-6)
    bq, bk = request.block_q, request.block_k
    nq, nk = -(-S // bq), -(-Sk // bk)
    w = torch.nn.functional.pad(w, (0, nk * bk - Sk, 0, nq * bq - S))
    sums = w.view(B, H, nq, bq, nk, bk).sum((3, 5))
    rows = torch.clamp(S - torch.arange(nq, device=q.device) * bq, max=bq).to(w.dtype)
    return sums / rows[:, None]


# ---- low-rank keys (Loki) ---------------------------------------------------------------------------

def lowrank_selection(q_score: torch.Tensor, k_score: torch.Tensor, seqlens: Optional[torch.Tensor], *, topk: int,
                      local: int, causal: bool) -> torch.Tensor:
    """``(B, H, Sq, Sk)`` bool: the keys each query attends to under Loki's selection.

    ``q_score (B, Sq, H, R)``, ``k_score (B, Sk, Hkv, R)``: the first R components of the rotated
    queries and keys. Query ``i`` of sequence ``b`` sits at ``pos = len_b - Sq + i`` (``len_b``:
    ``seqlens[b]``, default Sk) and may see the keys ``j < len_b`` (causal: also ``j <= pos``).
    It attends to the newest ``local`` of them (causal only) and, of the rest, to the
    ``topk - local`` with the highest approximate score ``q_score . k_score``; ties go to the later
    key, NaN scores rank highest (so NaN reaches the output). With ``topk`` or fewer keys in
    view, all of them: ``topk >= Sk`` is dense attention."""
    B, Sq, H, _ = q_score.shape
    Sk, Hkv = k_score.shape[1], k_score.shape[2]
    device = q_score.device
    scores = torch.einsum("bqhr,bkhr->bhqk", q_score, k_score.repeat_interleave(H // Hkv, dim=2))
    scores = torch.nan_to_num(scores, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    lens = (torch.full((B,), Sk, device=device) if seqlens is None else seqlens.to(device)).long().view(B, 1, 1, 1)
    j = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
    pos = lens - Sq + torch.arange(Sq, device=device).view(1, 1, Sq, 1) if causal else lens - 1
    valid = (j < lens) & (j <= pos)
    is_local = valid & (j > pos - local)
    candidate = (valid & ~is_local).expand(B, H, Sq, Sk)
    # rank the candidates by (candidate first, score descending, later key first): stable sorts of
    # the key-reversed row, the last sort by the most significant criterion
    flipped, cand = scores.flip(-1), candidate.flip(-1)
    by_score = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
    by_cand = torch.sort(cand.gather(-1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    ranked = by_score.gather(-1, by_cand)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(Sk, device=device).expand_as(ranked))
    budget = topk - is_local.sum(-1, keepdim=True)
    return (cand & (rank < budget)).flip(-1) | is_local


def lowrank_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_score: torch.Tensor,
                          k_score: torch.Tensor, seqlens: Optional[torch.Tensor], *, topk: int, local: int,
                          causal: bool, softmax_scale: float,
                          block_map: Optional[MapRequest] = None) -> Tuple[torch.Tensor, ...]:
    """Loki: exact softmax attention of ``q (B, Sq, H, D)`` over the keys of ``k, v (B, Sk, Hkv, D)``
    that :func:`lowrank_selection` picks from the low-rank scores. Returns out ``(B, Sq, H, D)`` and
    lse ``(B, H, Sq)`` over the chosen keys, and with ``block_map`` the pooled block map."""
    allowed = lowrank_selection(q_score, k_score, seqlens, topk=topk, local=local, causal=causal)
    out, lse, probs = masked_attention(q, k, v, allowed, softmax_scale, return_probs=True)
    if block_map is None:
        return out, lse
    return out, lse, pool_block_map(probs, lse, block_map)
