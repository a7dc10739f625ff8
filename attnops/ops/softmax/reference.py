"""The float64 oracle of the softmax core: exact softmax attention over a token mask, built N x N.

The kernels are tested against these functions (never against themselves); each has the signature of
the backend functions it checks (``attnops.core.dispatch``) and computes in the dtype of its inputs, so
tests run it twice: in float64 (the truth) and in the kernel's dtype (the yardstick of the DESIGN.md
accuracy rule). It runs only in tests or when ``backend="reference"`` is asked for. Differentiable
through autograd. The other families' oracles build on :func:`masked_attention`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import MapRequest
from attnops.core.library import lse_dtype
from attnops.core.masks import BlockMask
from attnops.core.segments import SegmentBounds
from attnops.ops.softmax.dropout import dropout_keep  # noqa: F401  (the mask's definition; tests read it here)


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


def alibi_bias(slopes: torch.Tensor, seq_len_q: int, seq_len_k: int, rows: Optional[torch.Tensor] = None,
               device=None, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ALiBi's additive bias ``-slope * |i + Sk - Sq - j|`` (flash_attn's form), ``(B|1, H, R, Sk)`` for the
    query rows ``rows`` (default all); ``slopes (H,)`` or ``(B, H)``; ``offsets (Sq,)``: each query's own
    ``Sk - Sq`` (packed varlen layouts, :class:`attnops.core.segments.SegmentBounds`)."""
    if rows is None:
        rows = torch.arange(seq_len_q, device=device)
    rows = rows.to(device)
    shift = seq_len_k - seq_len_q if offsets is None else offsets.to(device=device, dtype=torch.long)[rows]
    pos = (rows + shift).unsqueeze(1)
    dist = (pos - torch.arange(seq_len_k, device=device).unsqueeze(0)).abs()  # (R, Sk)
    s = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    return -s.to(device)[:, :, None, None] * dist.to(s.dtype)


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
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    segments: Optional[SegmentBounds] = None,
    max_scores: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Exact softmax attention restricted to ``block_mask`` (None: all blocks), the token
    predicates and the ``segments`` (document bounds). q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)`` -> out ``(B, Sq, H, D)``,
    lse ``(B, H, Sq)``, and with ``block_map`` the block attention map pooled from the full
    probability matrix (:func:`pool_block_map`), and with ``max_scores`` each row's largest score ``(B, H, Sq)``
    (last). Rows with nothing to attend to give 0 and lse = -inf (``sinks``: lse = the sink), max -inf. Score
    modifiers in FlashAttention's order (:func:`masked_attention`)."""
    allowed = token_mask(q.shape[1], k.shape[1], block_mask, causal, window_size, device=q.device)
    if segments is not None:
        allowed = allowed & segments.token_mask(k.shape[1]).to(q.device)
    # the bias in float64 (slopes are float32 data; the kernels form slope * distance in float32 from them)
    offsets = None if segments is None else segments.alibi_offsets
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes.double(), q.shape[1], k.shape[1], device=q.device,
                                                        offsets=offsets)
    if attn_bias is not None:  # float (B|1, H|1, Sq|1, Sk): the op turned a bool mask into 0 / -inf
        bias = attn_bias if bias is None else bias.to(attn_bias.dtype) + attn_bias
    dropout = None
    if dropout_p > 0:
        dropout = dropout_keep(int(dropout_seed.item()), dropout_p, q.shape[0], q.shape[2], q.shape[1], k.shape[1],
                               device=q.device)
    out, lse, probs, *maxima = masked_attention(q, k, v, allowed, softmax_scale, return_probs=True, softcap=softcap,
                                                bias=bias, sinks=sinks, dropout=dropout, return_max=max_scores)
    result = (out, lse) if block_map is None else (out, lse, pool_block_map(probs, lse, block_map))
    return result + tuple(maxima)


def pool_block_map(probs: torch.Tensor, lse: torch.Tensor, request: MapRequest) -> torch.Tensor:
    """The block attention map from the full ``probs (B, H, Sq, Sk)``, by its definition
    (attnops.core.block_map): per tile the summed (or max) probability; for the mean, the sum over
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
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_sparse_attention` for the query rows ``rows`` only (their true positions kept):
    out ``(B, R, H, D)``, lse ``(B, H, R)``. Lets the benchmark harness check long sequences
    without a full Sq x Sk matrix."""
    Sq, Sk = q.shape[1], k.shape[1]
    if rows is not None:
        q = q[:, rows.to(q.device)]
    allowed = token_mask(Sq, Sk, block_mask, causal, window_size, device=q.device, rows=rows)
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes.double(), Sq, Sk, rows=rows, device=q.device)
    if attn_bias is not None:  # float (B|1, H|1, Sq|1, Sk)
        rows_bias = attn_bias if attn_bias.shape[2] == 1 or rows is None else attn_bias[:, :, rows.to(q.device)]
        rows_bias = rows_bias.to(q.device)
        bias = rows_bias if bias is None else bias + rows_bias
    dropout = None
    if dropout_p > 0:
        dropout = dropout_keep(int(dropout_seed.item()), dropout_p, q.shape[0], q.shape[2], Sq, Sk, rows=rows,
                               device=q.device)
    return masked_attention(q, k, v, allowed, softmax_scale, softcap=softcap, bias=bias, sinks=sinks, dropout=dropout)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     softmax_scale: float, return_probs: bool = False, *, softcap: float = 0.0,
                     bias: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                     dropout: Optional[Tuple[torch.Tensor, float]] = None,
                     return_max: bool = False) -> Tuple[torch.Tensor, ...]:
    """Softmax attention where ``allowed (B|1, H|1, Sq, Sk)`` says which pairs may attend; GQA by
    contiguous head groups. Rows with nothing allowed give 0 and lse = -inf. ``return_probs`` adds
    the probability matrix ``(B, H, Sq, Sk)``, then ``return_max`` each row's largest score ``(B, H, Sq)``
    in lse's dtype (after the softcap and the bias, over the allowed pairs; sinks not included; -inf where
    nothing is allowed).

    Score modifiers, in FlashAttention's order: ``s = scale * q . k``, ``softcap``: ``cap * tanh(s / cap)``,
    the mask, then ``bias`` (additive, e.g. ALiBi's, not capped), then the softmax with ``sinks (H,)`` as one
    more logit per head (lse includes it; a row that sees no key gets out 0 and lse = the sink), then
    ``dropout = (keep (B|1, H, Sq, Sk) bool, scale)`` on the probabilities (``P * keep * scale`` multiplies V;
    lse and the returned probabilities are those before dropout).

    Non-finite values travel only along allowed pairs, forward and backward (the kernels' convention):
    a NaN in ``v[j]`` reaches the rows that attend key ``j`` and no other, a NaN in ``q[i]`` reaches
    the gradients of the keys row ``i`` attends, and so on. Plain einsums would spread them through
    the masked zeros (``0 * NaN = NaN``) to every row."""
    group = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(group, dim=2)  # query head h reads kv head h // group
    vv = v.repeat_interleave(group, dim=2)
    allowed = allowed.expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    scores = _MaskedScores.apply(q, kk, allowed, softmax_scale)  # (B, H, Sq, Sk), -inf where not allowed
    neg_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    if softcap:
        scores = torch.where(allowed, softcap * torch.tanh(scores / softcap), neg_inf)
    if bias is not None:
        scores = scores + torch.where(allowed, bias.to(scores.dtype), torch.zeros((), dtype=scores.dtype,
                                                                                  device=scores.device))
    # A row whose scores are all -inf (a -inf bias can empty rows the predicates allow): its lse is -inf by
    # definition, computed on zeros so that logsumexp's backward (exp(-inf - -inf)) leaves no NaN.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    safe = torch.where(empty, torch.zeros((), dtype=scores.dtype, device=scores.device), scores)
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
    else:
        lse = torch.where(empty.squeeze(-1), neg_inf, torch.logsumexp(safe, dim=-1))  # (B, H, Sq)
    # Empty rows hold only -inf scores, so subtracting 0 there gives exact zeros without the
    # NaN of (-inf) - (-inf), which a torch.where afterwards would still leak into gradients.
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    kept = probs if dropout is None else torch.where(dropout[0], probs * dropout[1], torch.zeros((), dtype=probs.dtype,
                                                                                               device=probs.device))
    out = _MaskedContract.apply(kept, vv, allowed)
    result = (out, lse.to(lse_dtype(q.dtype))) + ((probs,) if return_probs else ())
    if return_max:
        maxima = scores.amax(dim=-1) if scores.shape[-1] else scores.new_full(scores.shape[:3], float("-inf"))
        result += (maxima.detach().to(lse_dtype(q.dtype)),)
    return result


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


dispatch.register("block_sparse_attention", "reference", block_sparse_attention)
