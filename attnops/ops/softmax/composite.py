"""The pure-PyTorch backend of the block-sparse core (``composite``): exact softmax attention in
vectorised PyTorch, for machines where the C++ extension is not built (and tensors no kernel runs).

Query rows go in chunks. A chunk forms its scores ``(B, H, C, L)`` only against the keys its
predicates can reach (``L <= Sk``: causal, window and document bounds cut the range), so memory is
``O(C * Sk)``, never ``Sq x Sk``. The softmax of a chunk's rows is exact in one step (the whole
reachable key range is in hand), in float32 (float64 for float64 inputs). The backward does not keep
probabilities: it recomputes each chunk's from the saved lse and applies FlashAttention's formulas
(``dS = P * (dP - delta)``), so training memory is the same ``O(C * Sk)``.

Every argument of the core's contract is honoured: block masks, causal / windows, document bounds,
softcap, ALiBi, sinks, additive / boolean bias (with its gradient), dropout (the kernels' hash mask,
``attnops.ops.softmax.dropout``) and the block map. Non-finite values travel only along allowed pairs,
forward and backward, as in the kernels (a NaN in ``v[j]`` reaches the rows that attend key ``j`` and the
gradients those rows feed): every product over the key or query axis goes through :func:`masked_matmul`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from attnops.core import block_map as _map
from attnops.core import dispatch
from attnops.core.contractions import masked_matmul
from attnops.core.library import lse_dtype
from attnops.core.masks import BlockMask
from attnops.core.segments import SegmentBounds
from attnops.ops.softmax.dropout import dropout_keep
from attnops.ops.softmax.library import sink_grad

# Elements of one chunk's score matrix (B * H * C * L): a handful of such tensors are alive at once.
_CHUNK_ELEMENTS = 1 << 22
_ROW_ALIGN = 64


class _Spec(NamedTuple):
    """What every chunk of one call shares."""

    block_mask: Optional[BlockMask]
    dense_blocks: Optional[torch.Tensor]  # (Bm, Hm, Nq, Nk) bool
    causal: bool
    window: Tuple[int, int]
    scale: float
    softcap: float
    alibi_slopes: Optional[torch.Tensor]
    sinks: Optional[torch.Tensor]
    attn_bias: Optional[torch.Tensor]
    dropout_p: float
    dropout_seed: Optional[int]
    key_bounds: Optional[torch.Tensor]  # (Bb, Sq, 2) int32
    alibi_offsets: Optional[torch.Tensor]  # (Sq,) int32: ALiBi's origin per query (varlen layouts); None: Sk - Sq
    max_scores: bool = False  # the forward also returns each row's largest score


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(batch: int, heads: int, seq_len_k: int, seq_len_q: int, align: int = _ROW_ALIGN,
               band: Optional[int] = None) -> int:
    """Query rows per chunk: a multiple of ``align`` whose scores fit :data:`_CHUNK_ELEMENTS`. Each row reaches
    ``seq_len_k`` keys, or with a window ``band`` keys around it, so that ``C`` rows reach ``C + band`` keys."""
    per_head = max(1, _CHUNK_ELEMENTS // max(1, batch * heads))
    if band is None or band >= seq_len_k:
        rows = per_head // max(1, seq_len_k)
    else:  # C * (C + band) <= per_head
        rows = int((math.sqrt(band * band + 4 * per_head) - band) / 2)
    rows = max(align, rows // align * align)
    return max(align, min(rows, -(-seq_len_q // align) * align))  # >= 1 row: a range step (no queries: no chunk)


def _key_range(spec: _Spec, r0: int, r1: int, seq_len_q: int, seq_len_k: int) -> Tuple[int, int]:
    """The keys rows ``[r0, r1)`` can reach under the causal / window predicates and document bounds."""
    left, right = spec.window
    if spec.causal:
        right = 0
    shift = seq_len_k - seq_len_q  # bottom-right alignment: query i sits at key position i + shift
    k0 = max(0, r0 + shift - left) if left >= 0 else 0
    k1 = min(seq_len_k, r1 - 1 + shift + right + 1) if right >= 0 else seq_len_k
    if spec.key_bounds is not None:
        bounds = spec.key_bounds[:, r0:r1]
        k0 = max(k0, int(bounds[..., 0].min()))
        k1 = min(k1, int(bounds[..., 1].max()))
    return k0, max(k0, k1)


def _allowed(spec: _Spec, r0: int, r1: int, k0: int, k1: int, seq_len_q: int, seq_len_k: int,
             device) -> torch.Tensor:
    """``(Bm, Hm, C, L)`` bool: the pairs of rows ``[r0, r1)`` x keys ``[k0, k1)`` that may attend."""
    left, right = spec.window
    if spec.causal:
        right = 0
    rows = torch.arange(r0, r1, device=device)
    keys = torch.arange(k0, k1, device=device)
    pos = (rows + seq_len_k - seq_len_q).unsqueeze(1)
    allowed = torch.ones(r1 - r0, k1 - k0, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= keys >= pos - left
    if right >= 0:
        allowed &= keys <= pos + right
    allowed = allowed.view(1, 1, r1 - r0, k1 - k0)
    if spec.dense_blocks is not None:
        bq, bk = spec.block_mask.block_size
        allowed = allowed & spec.dense_blocks[:, :, rows // bq][..., keys // bk]
    if spec.key_bounds is not None:
        bounds = spec.key_bounds[:, r0:r1].to(device=device, dtype=torch.long)
        allowed = allowed & ((keys >= bounds[..., 0:1]) & (keys < bounds[..., 1:2])).unsqueeze(1)
    return allowed


def _bias(spec: _Spec, r0: int, r1: int, k0: int, k1: int, seq_len_q: int, seq_len_k: int, dtype,
          device) -> Optional[torch.Tensor]:
    """The additive bias of the chunk, ``(Bm, Hm, C|1, L)`` in ``dtype``: ALiBi's ``-slope * |i + Sk - Sq - j|``
    (``|i + alibi_offsets[i] - j|`` with per-query offsets; slope times distance in float32, as the kernels form it)
    plus ``attn_bias``."""
    bias = None
    if spec.alibi_slopes is not None:
        shift = (seq_len_k - seq_len_q if spec.alibi_offsets is None
                 else spec.alibi_offsets[r0:r1].to(device=device, dtype=torch.long))
        pos = (torch.arange(r0, r1, device=device) + shift).unsqueeze(1)
        dist = (pos - torch.arange(k0, k1, device=device).unsqueeze(0)).abs().to(dtype)
        slopes = spec.alibi_slopes if spec.alibi_slopes.dim() == 2 else spec.alibi_slopes.unsqueeze(0)
        bias = -slopes.to(dtype)[:, :, None, None] * dist
    if spec.attn_bias is not None:
        extra = spec.attn_bias if spec.attn_bias.shape[2] == 1 else spec.attn_bias[:, :, r0:r1]
        extra = extra[..., k0:k1].to(dtype)
        bias = extra if bias is None else bias + extra
    return bias


class _Chunk(NamedTuple):
    """One chunk's softmax, recomputed in the backward."""

    probs: torch.Tensor  # (B, H, C, L), 0 where not allowed
    allowed: torch.Tensor  # (Bm, Hm, C, L)
    lse: torch.Tensor  # (B, H, C)
    tanh: Optional[torch.Tensor]  # softcap's tanh(s / cap), for its derivative
    keep: Optional[torch.Tensor]  # dropout: (B, H, C, L) bool
    keep_scale: float  # dropout: 1 / the keep rate the hash realises
    maxima: Optional[torch.Tensor] = None  # (B, H, C): each row's largest score, when the spec asks


def scores(q_chunk: torch.Tensor, k_range: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * q . k`` as ``(B, H, C, L)``: q ``(B, C, H, D)``, k ``(B, L, Hkv, D)``; query head ``h`` reads kv
    head ``h // (H / Hkv)`` (contiguous groups), without repeating the keys."""
    B, C, H, D = q_chunk.shape
    Hkv = k_range.shape[2]
    s = torch.matmul(_rows_by_kv_head(q_chunk, Hkv), k_range.permute(0, 2, 3, 1))  # (B, Hkv, G * C, L)
    return (s * scale).view(B, H, C, k_range.shape[1])


def _by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, H, C, L)`` (size-1 dims broadcast) -> ``(B, Hkv, G * C, L)``: the groups' rows stacked, the layout
    in which query heads meet their kv head."""
    B, H, C, L = x.shape
    return x.reshape(B, kv_heads, H // kv_heads * C, L)


def _rows_by_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(B, C, H, D)`` -> ``(B, Hkv, G * C, D)``."""
    B, C, H, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, kv_heads, H // kv_heads * C, D)


def contract(w: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``out[b, c, h] = sum over allowed l of w[b, h, c, l] * x[b, l, h // G]``: w ``(B, H, C, L)``, x
    ``(B, L, Hkv, D)``, allowed ``(B|1, H|1, C, L)`` -> ``(B, C, H, D)`` (:func:`masked_matmul`)."""
    B, H, C, _ = w.shape
    Hkv = x.shape[2]
    out = masked_matmul(_by_kv_head(w, Hkv), x.permute(0, 2, 1, 3), _by_kv_head(allowed.expand(w.shape), Hkv))
    return out.view(B, H, C, -1).transpose(1, 2)


def normalise(s: torch.Tensor, allowed: torch.Tensor, bias: Optional[torch.Tensor],
              sinks: Optional[torch.Tensor], with_max: bool = False) -> Tuple[torch.Tensor, ...]:
    """The softmax of scores ``s (B, H, C, L)`` (softcap applied) over the ``allowed`` pairs with an additive
    ``bias`` and ``sinks (H,)`` as one more logit per head: ``(probs (B, H, C, L), lse (B, H, C))``, probs 0 where
    not allowed; a row that sees nothing has probs 0 and lse -inf (the sink with sinks). ``with_max`` appends each
    row's largest score (bias included, sinks not; -inf for a row that sees nothing)."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s = torch.where(allowed, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
    if bias is not None:
        s = s + torch.where(allowed, bias, zero)
    lse = torch.logsumexp(s, dim=-1) if s.shape[-1] else s.new_full(s.shape[:3], float("-inf"))
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(s.dtype).view(1, -1, 1))
    # rows that see nothing have lse -inf (and only -inf scores): subtracting 0 there leaves exact zeros
    probs = torch.exp(s - torch.where(torch.isneginf(lse), zero, lse).unsqueeze(-1))
    probs = torch.where(allowed, probs, zero)  # a NaN row's lse must not leak into pairs it does not see
    if not with_max:
        return probs, lse
    return probs, lse, s.amax(dim=-1) if s.shape[-1] else s.new_full(s.shape[:3], float("-inf"))


def capped_scores(q_rows: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float):
    """``(s, tanh)``: :func:`scores` in float32 (float64 for float64), through ``softcap * tanh(s / softcap)``
    when ``softcap`` (tanh kept for the derivative; None otherwise)."""
    work = work_dtype(q_rows.dtype)
    s = scores(q_rows.to(work), keys.to(work), scale)
    if not softcap:
        return s, None
    tanh = torch.tanh(s / softcap)
    return softcap * tanh, tanh


def _softmax_chunk(spec: _Spec, q, k, r0, r1, k0, k1, seq_len_q, seq_len_k) -> _Chunk:
    s, tanh = capped_scores(q[:, r0:r1], k[:, k0:k1], spec.scale, spec.softcap)
    allowed = _allowed(spec, r0, r1, k0, k1, seq_len_q, seq_len_k, q.device)
    bias = _bias(spec, r0, r1, k0, k1, seq_len_q, seq_len_k, s.dtype, q.device)
    probs, lse, *maxima = normalise(s, allowed, bias, spec.sinks, spec.max_scores)
    keep, keep_scale = None, 1.0
    if spec.dropout_p > 0:
        B, H = q.shape[0], q.shape[2]
        keep, keep_scale = dropout_keep(spec.dropout_seed, spec.dropout_p, B, H, seq_len_q, seq_len_k,
                                        rows=torch.arange(r0, r1), device=q.device)
        keep = keep[..., k0:k1]
    return _Chunk(probs, allowed, lse, tanh, keep, keep_scale, maxima[0] if maxima else None)


def _dropped(chunk: _Chunk, x: torch.Tensor) -> torch.Tensor:
    """``x * keep * scale`` (dropout's mask on a chunk's probabilities or their gradient), x without dropout."""
    if chunk.keep is None:
        return x
    return torch.where(chunk.keep, x * chunk.keep_scale, torch.zeros((), dtype=x.dtype, device=x.device))


def _chunks(spec: _Spec, q: torch.Tensor, k: torch.Tensor, align: int):
    """``(r0, r1, k0, k1)`` per chunk of query rows."""
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    left, right = spec.window
    right = 0 if spec.causal else right
    band = None if left < 0 or right < 0 else left + right + 1  # keys one row reaches under a two-sided window
    rows = chunk_rows(B, H, Sk, Sq, align, band)
    for r0 in range(0, Sq, rows):
        r1 = min(Sq, r0 + rows)
        yield (r0, r1, *_key_range(spec, r0, r1, Sq, Sk))


def _forward(spec: _Spec, q, k, v, request: Optional[_map.MapRequest]):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    work = work_dtype(q.dtype)
    out = torch.zeros(B, Sq, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=lse_dtype(q.dtype), device=q.device)
    maxima = torch.full((B, H, Sq), float("-inf"), dtype=lse.dtype, device=q.device) if spec.max_scores else None
    partial = None
    if request is not None:  # (B, H, Nq, Nk): the tile sums (or maxima); each chunk writes whole map rows
        bq, bk = request.block_q, request.block_k
        partial = torch.zeros(B, H, -(-Sq // bq), -(-Sk // bk), dtype=lse.dtype, device=q.device)
    align = _ROW_ALIGN if request is None else max(_ROW_ALIGN, request.block_q)
    for r0, r1, k0, k1 in _chunks(spec, q, k, align):
        chunk = _softmax_chunk(spec, q, k, r0, r1, k0, k1, Sq, Sk)
        lse[:, :, r0:r1] = chunk.lse
        if maxima is not None:
            maxima[:, :, r0:r1] = chunk.maxima
        out[:, r0:r1] = contract(_dropped(chunk, chunk.probs), v[:, k0:k1].to(work), chunk.allowed).to(q.dtype)
        if partial is not None:  # pool the chunk's tiles: rows by bq, keys by bk from the key block of k0
            nq, c0 = -(-(r1 - r0) // bq), k0 // bk
            nk = -(-(k1 - c0 * bk) // bk)
            probs = torch.nn.functional.pad(chunk.probs, (k0 - c0 * bk, c0 * bk + nk * bk - k1, 0, nq * bq - (r1 - r0)))
            tiles = probs.view(B, H, nq, bq, nk, bk)
            tiles = tiles.amax(dim=(3, 5)) if request.reduce == "max" else tiles.sum(dim=(3, 5))
            partial[:, :, r0 // bq:r0 // bq + nq, c0:c0 + nk] = tiles.to(partial.dtype)
    block_map = None if partial is None else _map.finish(partial, lse, request.block_q, request)
    return out, lse, block_map, maxima


def _backward(spec: _Spec, q, k, v, out, lse, dout, dlse, bias_grad: bool):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    work = work_dtype(q.dtype)
    dq = torch.zeros(B, Sq, H, D, dtype=work, device=q.device)
    dk = torch.zeros(B, Sk, Hkv, D, dtype=work, device=q.device)
    dv = torch.zeros(B, Sk, Hkv, D, dtype=work, device=q.device)
    dbias = torch.zeros(spec.attn_bias.shape, dtype=work, device=q.device) if bias_grad else None
    delta = (dout.to(work) * out.to(work)).sum(-1).transpose(1, 2)  # (B, H, Sq)
    if dlse is not None:
        delta = delta - dlse.to(work)
    zero = torch.zeros((), dtype=work, device=q.device)
    for r0, r1, k0, k1 in _chunks(spec, q, k, _ROW_ALIGN):
        chunk = _softmax_chunk(spec, q, k, r0, r1, k0, k1, Sq, Sk)
        C = r1 - r0
        do = dout[:, r0:r1].to(work)  # (B, C, H, D)
        allowed = _by_kv_head(chunk.allowed.expand(chunk.probs.shape), Hkv)  # (B, Hkv, G * C, L)
        allowed_t = allowed.transpose(-1, -2)
        # dV += P_used^T dO (summed over each kv head's group, the stacked rows)
        dv[:, k0:k1] += masked_matmul(_by_kv_head(_dropped(chunk, chunk.probs), Hkv).transpose(-1, -2),
                                      _rows_by_kv_head(do, Hkv), allowed_t).transpose(1, 2)
        dp = _dropped(chunk, scores(do, v[:, k0:k1].to(work), 1.0))  # dO . V: (B, H, C, L)
        ds = torch.where(chunk.allowed, chunk.probs * (dp - delta[:, :, r0:r1].unsqueeze(-1)), zero)
        if dbias is not None:
            rows = slice(None) if spec.attn_bias.shape[2] == 1 else slice(r0, r1)
            dims = tuple(d for d in (0, 1, 2) if spec.attn_bias.shape[d] == 1)
            dbias[:, :, rows, k0:k1] += ds.sum(dims, keepdim=True) if dims else ds
        if chunk.tanh is not None:
            ds = ds * (1 - chunk.tanh * chunk.tanh)
        ds = _by_kv_head(ds * spec.scale, Hkv)  # (B, Hkv, G * C, L)
        dq[:, r0:r1] = masked_matmul(ds, k[:, k0:k1].to(work).permute(0, 2, 1, 3), allowed).view(
            B, H, C, D).transpose(1, 2)
        dk[:, k0:k1] += masked_matmul(ds.transpose(-1, -2), _rows_by_kv_head(q[:, r0:r1].to(work), Hkv),
                                      allowed_t).transpose(1, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, request, q, k, v, attn_bias, sinks):
        out, lse, block_map, maxima = _forward(spec, q, k, v, request)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse)
        readouts = tuple(x for x in (block_map, maxima) if x is not None)  # in the dispatcher's order
        ctx.mark_non_differentiable(*readouts)
        return (out, lse) + readouts

    @staticmethod
    def backward(ctx, dout, dlse, *_):
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        wants_bias, wants_sinks = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        dq, dk, dv, dbias = _backward(spec, q, k, v, out, lse, dout, dlse, wants_bias)
        dsinks = sink_grad(spec.sinks, dout, out, lse, dlse) if wants_sinks else None
        if dbias is not None:
            dbias = dbias.to(spec.attn_bias.dtype)
        return None, None, dq, dk, dv, dbias, dsinks


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[BlockMask],
    *,
    causal: bool,
    window_size: Tuple[int, int],
    softmax_scale: float,
    block_map: Optional[_map.MapRequest] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
    segments: Optional[SegmentBounds] = None,
    max_scores: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """The dispatcher's contract (:func:`attnops.ops.softmax.reference.block_sparse_attention`): q ``(B, Sq, H, D)``,
    k/v ``(B, Sk, Hkv, D)`` -> out ``(B, Sq, H, D)``, lse ``(B, H, Sq)``, then the block map and each row's largest
    score when asked."""
    spec = _Spec(
        block_mask=block_mask,
        dense_blocks=None if block_mask is None else block_mask.to_dense().to(q.device),
        causal=bool(causal), window=tuple(window_size), scale=float(softmax_scale), softcap=float(softcap),
        alibi_slopes=alibi_slopes, sinks=sinks, attn_bias=attn_bias, dropout_p=float(dropout_p),
        dropout_seed=int(dropout_seed.item()) if dropout_p > 0 else None,
        key_bounds=None if segments is None else segments.key_bounds,
        alibi_offsets=None if segments is None or alibi_slopes is None else segments.alibi_offsets,
        max_scores=bool(max_scores))
    return _Attention.apply(spec, block_map, q, k, v, attn_bias, sinks)


dispatch.register("block_sparse_attention", "composite", block_sparse_attention)
