"""What the families' Triton kernels share: constants, the dtype and precision rules of their dots,
launcher utilities, and the jit pieces every attention kernel is made of (the walk over a block LUT,
the causal / window predicates, the online-softmax step, the empty-row epilogue, the products that keep
NaN in its rows). Imported only where Triton is available.

Naming follows flash-linear-attention: i_* program indices, o_* offsets, m_* masks, b_* blocks, p_*
pointers.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from attnops.core.backends import INTERPRET

LOG2E = 1.4426950408889634  # host-side floats
LN2 = 0.6931471805599453
# The kernels' copies: compiled Triton reads a module global only when it is a constexpr (the
# interpreter does not check; tests/core/test_triton_globals.py does).
C_LOG2E = tl.constexpr(LOG2E)
C_LN2 = tl.constexpr(LN2)

DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ---- launcher utilities ------------------------------------------------------------------------------

def refuse_float64(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError("the triton backend does not support float64; use backend='cpu' or 'reference'")


def dot_dtype(dtype: torch.dtype):
    """The dtype the kernels' tl.dot operands are cast to. Triton's interpreter has no bfloat16
    arithmetic (it multiplies the uint16 bit patterns in tl.dot, triton#11584): there, bf16 operands
    are upcast to float32 right after loading (a no-op on GPUs)."""
    return tl.float32 if INTERPRET and dtype == torch.bfloat16 else DOT_DTYPES[dtype]


def precision(dtype: torch.dtype) -> str:
    """float32 inputs: IEEE products unless the user allowed TF32 for matmuls globally."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dim with stride 1; any other layout is taken as strides (no copy)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def strides3(t: torch.Tensor) -> List[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


_DUMMY_LUT: dict = {}


def lut_args(counts: Optional[torch.Tensor], indices: Optional[torch.Tensor], device) -> Tuple:
    """Pointers and strides of a compressed-row LUT (:func:`lut_walk`'s ``lut_*``); broadcast (size-1)
    B/H dims get stride 0."""
    if counts is None:
        dummy = _DUMMY_LUT.get(device)
        if dummy is None:  # one per device: an allocation + fill per call is host time on small calls
            dummy = _DUMMY_LUT[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, [0, 0, 0, 0, 0]
    strides = [counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if counts.shape[1] > 1 else 0,
               indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if indices.shape[1] > 1 else 0,
               indices.stride(2)]
    return counts, indices, strides


def num_splits(programs: int, keys: int, device: torch.device) -> int:
    """How many parts split-KV kernels cut ``keys`` keys into when ``programs`` programs run per part:
    about two waves of programs on the GPU, at least 256 keys per part; two under the interpreter
    (so that tests exercise the merge)."""
    if INTERPRET or device.type != "cuda":
        return 2
    target = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, max(programs, 1))
    return max(1, min(target, triton.cdiv(max(keys, 1), 256)))


# ---- the walk over a block LUT -------------------------------------------------------------------------

@triton.jit
def lut_walk(Num, Idx, i_b, i_h, row, lut_nb, lut_nh, lut_ib, lut_ih, lut_ir, lo, hi, HAS_LUT: tl.constexpr,
              LUT_B: tl.constexpr, BLOCK: tl.constexpr):
    """The tiles of BLOCK columns that one row block visits, as ``(count, p_idx, first)`` for
    :func:`lut_tile`: with a LUT the column blocks its row lists (``Num``/``Idx`` with strides
    ``lut_nb, lut_nh`` (counts) and ``lut_ib, lut_ih, lut_ir`` (indices); broadcast dims stride 0), each
    cut into LUT_B // BLOCK tiles; without one, the tiles covering ``[lo, hi)``. One walk for the
    forward, dq, dk/dv (the transposed LUT) and block-map kernels."""
    p_idx = Idx + i_b * lut_ib + i_h * lut_ih + row * lut_ir
    if HAS_LUT:
        count = tl.maximum(tl.load(Num + i_b * lut_nb + i_h * lut_nh + row), 0) * (LUT_B // BLOCK)
        first = 0
    else:
        first = (lo // BLOCK) * BLOCK
        count = tl.cdiv(hi - first, BLOCK)
    return count, p_idx, first


@triton.jit
def lut_tile(t, p_idx, first, HAS_LUT: tl.constexpr, LUT_B: tl.constexpr, BLOCK: tl.constexpr):
    """First column of the t-th tile of a :func:`lut_walk` (a tile never straddles two LUT blocks)."""
    if HAS_LUT:
        start = tl.load(p_idx + t // (LUT_B // BLOCK)) * LUT_B + (t % (LUT_B // BLOCK)) * BLOCK
    else:
        start = first + t * BLOCK
    return start


# ---- causal / window predicates (bottom-right aligned: query i sits at key position i + Sk - Sq) ----

@triton.jit
def key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr,
               HAS_RIGHT: tl.constexpr):
    """Keys any row of the query block [m0, m0 + BLOCK_M) may see, [lo, hi), and the edges beyond
    which a key tile is inside every row's window: lo_last_row (left) and hi_first_row (right)."""
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    lo = 0
    hi = Sk
    if HAS_LEFT:
        lo = tl.maximum(m0 + offset - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(m_last + offset + win_right + 1, Sk)
    return lo, hi, m_last + offset - win_left, m0 + offset + win_right


@triton.jit
def segment_bounds(Bounds, o_r, m_r, r0, r_last, HAS_SEGMENTS: tl.constexpr):
    """Token-exact segment bounds (attnops.core.segments) of the rows ``o_r`` (``Bounds``: this batch's
    ``(rows, 2)`` int32, nondecreasing): each row's ``[b_lo, b_hi)``, the columns any row sees ``[lo, hi)``
    (first row's lo, last row's hi) and the edges inside which a tile is inside every row's bounds
    (``inner_lo`` = the last row's lo, ``inner_hi`` = the first row's hi). Rows past the end: empty."""
    b_lo = o_r * 0
    b_hi = o_r * 0
    lo = 0
    hi = 0
    inner_lo = 0
    inner_hi = 0
    if HAS_SEGMENTS:
        b_lo = tl.load(Bounds + o_r * 2, mask=m_r, other=0)
        b_hi = tl.load(Bounds + o_r * 2 + 1, mask=m_r, other=0)
        lo = tl.load(Bounds + r0 * 2)
        inner_hi = tl.load(Bounds + r0 * 2 + 1)
        inner_lo = tl.load(Bounds + r_last * 2)
        hi = tl.load(Bounds + r_last * 2 + 1)
    return b_lo, b_hi, lo, hi, inner_lo, inner_hi


@triton.jit
def partial_tile(n0, Sk, lo_last_row, hi_first_row, seg_inner_lo, seg_inner_hi, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """Whether a key tile crosses the sequence end, a window edge or a segment edge of some row of the
    query block (else every pair of the tile attends: nothing to mask)."""
    partial = n0 + BLOCK_N > Sk
    if HAS_LEFT:
        partial = partial | (n0 < lo_last_row)
    if HAS_RIGHT:
        partial = partial | (n0 + BLOCK_N - 1 > hi_first_row)
    if HAS_SEGMENTS:
        partial = partial | (n0 < seg_inner_lo) | (n0 + BLOCK_N > seg_inner_hi)
    return partial


@triton.jit
def alibi_positions(AlibiOffsets, o_m, m_m, o_pos, HAS_ALIBI_OFFSETS: tl.constexpr):
    """ALiBi's distance origin of the query rows ``o_m``: ``o_pos`` (``o_m + Sk - Sq``), or with per-query offsets
    (varlen layouts whose sequences differ in ``Lk - Lq``) ``o_m + offsets[o_m]``."""
    b_pos = o_pos
    if HAS_ALIBI_OFFSETS:
        b_pos = o_m + tl.load(AlibiOffsets + o_m, mask=m_m, other=0)
    return b_pos


@triton.jit
def mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi,
                seg_inner_lo, seg_inner_hi, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr):
    """-inf outside the predicates and segment bounds, evaluated only on a tile that crosses the sequence
    end, a window edge or a segment edge (a scalar test for the others)."""
    if partial_tile(n0, Sk, lo_last_row, hi_first_row, seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                    HAS_SEGMENTS):
        keep = o_n[None, :] < Sk
        if HAS_LEFT:
            keep = keep & (o_n[None, :] >= o_pos[:, None] - win_left)
        if HAS_RIGHT:
            keep = keep & (o_n[None, :] <= o_pos[:, None] + win_right)
        if HAS_SEGMENTS:
            keep = keep & (o_n[None, :] >= b_seg_lo[:, None]) & (o_n[None, :] < b_seg_hi[:, None])
        b_s = tl.where(keep, b_s, float("-inf"))
    return b_s


@triton.jit
def keys_see_queries(o_m, o_n, m_m, offset, win_left, win_right, b_seg_lo, b_seg_hi, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """(keys, queries) bool: key o_n[j] and query o_m[i] attend each other (query in range, windows, the
    keys' query bounds ``[b_seg_lo, b_seg_hi)``): the transposed predicate of the dk/dv kernels."""
    o_pos = o_m + offset
    keep = (o_n[:, None] >= 0) & m_m[None, :]
    if HAS_LEFT:
        keep = keep & (o_n[:, None] >= o_pos[None, :] - win_left)
    if HAS_RIGHT:
        keep = keep & (o_n[:, None] <= o_pos[None, :] + win_right)
    if HAS_SEGMENTS:
        keep = keep & (o_m[None, :] >= b_seg_lo[:, None]) & (o_m[None, :] < b_seg_hi[:, None])
    return keep


# ---- online softmax (base 2: softmax_scale * log2(e) is folded into the scores) ------------------------

@triton.jit
def softmax_rescale(b_m, b_m_tile):
    """One online-softmax step on the row statistics: the new running max, the max to subtract from the
    tile's scores (0 for rows with nothing yet: no -inf - -inf), and the factor by which the row's
    earlier sum and accumulator shrink."""
    b_m_new = tl.maximum(b_m, b_m_tile)
    b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    return b_m_new, b_m_use, tl.math.exp2(b_m - b_m_use)


@triton.jit
def row_results(b_m, b_l):
    """Epilogue: ``1 / l`` (0 for rows that attended nothing, so their output is exact zeros) and the
    natural-log lse (-inf there)."""
    empty = b_l == 0.0
    b_inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, b_l))
    b_lse = tl.where(empty, float("-inf"), (b_m + tl.math.log2(tl.where(empty, 1.0, b_l))) * C_LN2)
    return b_inv, b_lse


@triton.jit
def lse2(b_lse):
    """A saved lse in base 2 for the backward's P = exp2(s - lse2); rows that attended nothing give
    +inf, so their P is exactly 0."""
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse * C_LOG2E)


# ---- score modifiers (conventions.md: softcap, mask, ALiBi, softmax with sinks), in base 2 -------------

@triton.jit
def tanh(x):
    """``1 - 2 / (e^{2x} + 1)`` (the interpreter has no tanh); the exponent is capped where tanh is 1 in
    float32 already, NaN stays NaN."""
    e = x * (2.0 * C_LOG2E)
    return 1.0 - 2.0 / (tl.math.exp2(tl.where(e > 126.0, 126.0, e)) + 1.0)


@triton.jit
def modify_scores(b_s, b_qpos, b_kpos, cap2, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Softcap ``cap2 * tanh(s / cap2)`` and ALiBi's ``-slope2 * |qpos - kpos|`` on base-2 scores (``cap2``,
    ``slope2``: the cap and slope times log2(e); ``b_qpos``/``b_kpos`` broadcast to the tile, query
    positions already aligned bottom-right). Returns the scores and tanh (the softcap's derivative is
    ``1 - tanh^2``; 0 without a cap). The mask comes after; it leaves the masked pairs -inf either way."""
    b_t = tl.zeros_like(b_s)
    if HAS_SOFTCAP:
        b_t = tanh(b_s * (1.0 / cap2))  # one division per tile: a division per score is a MUFU op
        b_s = cap2 * b_t
    if HAS_ALIBI:
        b_s = b_s - slope2 * tl.abs(b_qpos - b_kpos).to(tl.float32)
    return b_s, b_t


@triton.jit
def fold_sink(b_m, b_l, sink2):
    """The row's sink (base 2) joins its softmax: sink-inclusive ``(m, l)`` and the factor rescaling the
    accumulator. A row that saw no key gets ``l = 1`` relative to ``m = sink``: lse = the sink, output 0."""
    empty = b_l == 0.0
    b_m_new = tl.maximum(b_m, sink2)
    b_m_new = tl.where(b_m != b_m, b_m, b_m_new)  # NaN scores stay NaN
    b_alpha = tl.where(empty, 0.0, tl.math.exp2(b_m - b_m_new))
    b_l_new = tl.where(empty, 1.0, b_l * b_alpha + tl.math.exp2(sink2 - b_m_new))
    return tl.where(empty, sink2, b_m_new), b_l_new, b_alpha


@triton.jit
def load_bias(Bias, i_b, i_h, o_q, o_k, m_qk, bias_sb, bias_sh, bias_sq):
    """An attn_bias tile in base 2: ``bias[b, h, o_q, o_k] * log2(e)`` (broadcast dims have stride 0), 0 where
    ``m_qk`` is False. ``o_q`` / ``o_k`` broadcast to the tile (either orientation)."""
    p = Bias + i_b * bias_sb + i_h * bias_sh + o_q.to(tl.int64) * bias_sq + o_k
    return tl.load(p, mask=m_qk, other=0.0).to(tl.float32) * C_LOG2E


def bias_args(attn_bias: Optional[torch.Tensor], device) -> Tuple:
    """``(Bias, (sb, sh, sq))`` of an attn_bias ``(B|1, H|1, Sq|1, Sk)`` (keys contiguous; broadcast dims
    stride 0), or a dummy."""
    if attn_bias is None:
        return lut_args(None, None, device)[0], (0, 0, 0)
    if attn_bias.stride(3) != 1:
        attn_bias = attn_bias.contiguous()
    return attn_bias, tuple(attn_bias.stride(d) if attn_bias.shape[d] > 1 else 0 for d in range(3))


def alibi_offset_args(alibi_offsets: Optional[torch.Tensor], device) -> Tuple:
    """``(AlibiOffsets, {"HAS_ALIBI_OFFSETS": ...})``: ALiBi's per-query offsets int32 ``(Sq,)``, or a dummy."""
    if alibi_offsets is None:
        return lut_args(None, None, device)[0], {"HAS_ALIBI_OFFSETS": False}
    return alibi_offsets.contiguous(), {"HAS_ALIBI_OFFSETS": True}


def segment_args(bounds: Optional[torch.Tensor], device) -> Tuple:
    """``(Bounds, stride_b)`` of segment bounds ``(Bb, rows, 2)`` int32 (Bb = 1 broadcasts: stride 0), or a
    dummy."""
    if bounds is None:
        return lut_args(None, None, device)[0], 0
    bounds = bounds.contiguous()
    return bounds, bounds.stride(0) if bounds.shape[0] > 1 else 0


def score_mod_args(q: torch.Tensor, softcap: float, alibi_slopes: Optional[torch.Tensor]):
    """Kernel arguments ``(cap2, Slopes, slopes_stride_b)`` and constexprs of :func:`modify_scores`."""
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else None
    stride_b = q.shape[2] if slopes is not None and slopes.dim() == 2 else 0
    flags = dict(HAS_SOFTCAP=softcap > 0, HAS_ALIBI=slopes is not None)
    dummy = lut_args(None, None, q.device)[0]
    return (softcap * LOG2E if softcap > 0 else 1.0, slopes if slopes is not None else dummy, stride_b), flags


# ---- dropout: the mask of csrc/cpu/dropout.h, regenerated from the seed in every pass -----------------

@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finaliser (uint32 arithmetic)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_rows(Seed, i_bh, o_q):
    """The hash's row keys (uint32) of the queries ``o_q`` of query head ``i_bh = b * H + h``; ``Seed``
    points at the call's int64 seed."""
    seed = tl.load(Seed)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    head = fmix32(seed_lo ^ fmix32(seed_hi + i_bh.to(tl.uint32) * 0x9E3779B9))
    return fmix32(head + o_q.to(tl.uint32) * 0x7FEB352D)


@triton.jit
def dropout_scale(b_rows, o_k, threshold, drop_scale):
    """``drop_scale`` where the pair (row key, key ``o_k``) is kept, 0 where it is dropped (broadcast to the
    tile, either orientation)."""
    bits = fmix32(b_rows + o_k.to(tl.uint32) * 0x846CA68B)
    return tl.where((bits >> 8) >= threshold.to(tl.uint32), drop_scale, 0.0)


def dropout_args(dropout_p: float, dropout_seed: Optional[torch.Tensor], device) -> Tuple:
    """Kernel arguments ``(Seed, threshold, scale)`` of :func:`dropout_scale` (a dummy seed when off)."""
    if dropout_p <= 0:
        return lut_args(None, None, device)[0], 0, 1.0
    threshold = round(dropout_p * 2 ** 24)
    return dropout_seed, threshold, 2 ** 24 / (2 ** 24 - threshold)


# ---- products that keep NaN / Inf in the rows that attend them ----------------------------------------

@triton.jit
def nonfinite(b_x):
    """Bool tile: NaN or +-Inf entries."""
    return (b_x != b_x) | (tl.abs(b_x.to(tl.float32)) == float("inf"))


@triton.jit
def any_true(b_bad):
    return tl.max(tl.max(b_bad.to(tl.int32), 1), 0) > 0


@triton.jit
def masked_dot(b_w, b_x, b_keep, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``dot(w, x)`` where ``w`` is 0 outside ``b_keep`` (masked pairs) and ``x`` holds NaN or Inf: a plain
    dot makes 0 * NaN = NaN of the masked pairs and spreads it to rows that never attend them. Here x's
    non-finite entries are zeroed for the dot, and the results they would reach through a kept pair
    become NaN (counted by a second dot). Called only on the rare tiles that need it."""
    b_bad = nonfinite(b_x)
    b_out = tl.dot(b_w.to(DOT_DTYPE), tl.where(b_bad, 0.0, b_x).to(DOT_DTYPE), input_precision=PRECISION)
    b_hits = tl.dot(b_keep.to(tl.float32), b_bad.to(tl.float32), input_precision="ieee")
    return tl.where(b_hits > 0, float("nan"), b_out)


@triton.jit
def dot_kept(b_w, b_x, b_keep, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``dot(w, x)`` on a tile with masked pairs (``b_keep``): the plain dot, or :func:`masked_dot` when
    ``x`` holds a non-finite value."""
    if any_true(nonfinite(b_x)):
        b_out = masked_dot(b_w, b_x, b_keep, PRECISION, DOT_DTYPE)
    else:
        b_out = tl.dot(b_w.to(DOT_DTYPE), b_x.to(DOT_DTYPE), input_precision=PRECISION)
    return b_out
