"""Block-sparse FlashAttention-2 in Triton: forward, and a backward in three kernels.

After FlashAttention-2 (Dao, 2023) and the Triton tutorial 06-fused-attention, generalised to a
block LUT (attnops.BlockMask), GQA/MQA, any length, head dims 1..256 and flash_attn's
bottom-right causal / window predicates.

- forward, one program per (query block, b * h): walks the key blocks its LUT row lists (or the
  range the predicates leave when there is no LUT) in BLOCK_N sub-tiles; online softmax in base 2
  with softmax_scale * log2(e) folded into one multiply; predicates evaluated only on tiles that
  cross a boundary; float32 accumulation; writes out and lse (natural log, float32).
- backward: delta = rowsum(dO * O) - dlse; dq per (query block, b * h) over the LUT's key blocks;
  dk/dv per (key block, b * kv head) over the transposed LUT's query blocks *of every query head
  of the group*, so the GQA reduction happens inside one program: no atomics, no races.

Naming follows flash-linear-attention: i_* program indices, o_* offsets, m_* masks, b_* blocks.
Registered with torch.library.custom_op (+ fake + autograd): under TRITON_INTERPRET=1 triton_op /
wrap_triton failed on meta tensors, opcheck and compile (research notes), custom_op passes them.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from attnops.kernels import _arg_checks as _args
from attnops.kernels import _registration as _reg
from attnops.kernels.triton import AUTOTUNE, INTERPRET

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr,
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
def _partial_tile(n0, Sk, lo_last_row, hi_first_row, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr):
    """Whether a key tile crosses the sequence end or a window edge of some row of the query block
    (else every pair of the tile attends: nothing to mask)."""
    partial = n0 + BLOCK_N > Sk
    if HAS_LEFT:
        partial = partial | (n0 < lo_last_row)
    if HAS_RIGHT:
        partial = partial | (n0 + BLOCK_N - 1 > hi_first_row)
    return partial


@triton.jit
def _nonfinite(b_x):
    """Bool tile: NaN or +-Inf entries."""
    return (b_x != b_x) | (tl.abs(b_x.to(tl.float32)) == float("inf"))


@triton.jit
def _masked_dot(b_w, b_x, b_keep, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``dot(w, x)`` where ``w`` is 0 outside ``b_keep`` (masked pairs) and ``x`` holds NaN or Inf: a plain
    dot makes 0 * NaN = NaN of the masked pairs and spreads it to rows that never attend them. Here x's
    non-finite entries are zeroed for the dot, and the results they would reach through a kept pair
    become NaN (counted by a second dot). Called only on the rare tiles that need it."""
    b_bad = _nonfinite(b_x)
    b_out = tl.dot(b_w.to(DOT_DTYPE), tl.where(b_bad, 0.0, b_x).to(DOT_DTYPE), input_precision=PRECISION)
    b_hits = tl.dot(b_keep.to(tl.float32), b_bad.to(tl.float32), input_precision="ieee")
    return tl.where(b_hits > 0, float("nan"), b_out)


@triton.jit
def _any(b_bad):
    return tl.max(tl.max(b_bad.to(tl.int32), 1), 0) > 0


@triton.jit
def _mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """-inf outside the predicates, evaluated only on a tile that crosses the sequence end or a
    window edge (a scalar test for the others)."""
    partial = _partial_tile(n0, Sk, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if partial:
        keep = o_n[None, :] < Sk
        if HAS_LEFT:
            keep = keep & (o_n[None, :] >= o_pos[:, None] - win_left)
        if HAS_RIGHT:
            keep = keep & (o_n[None, :] <= o_pos[:, None] + win_right)
        b_s = tl.where(keep, b_s, float("-inf"))
    return b_s


@triton.jit
def _fwd_tile(b_acc, b_m, b_l, b_q, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks, stride_vs, qk_scale,
              win_left, win_right, lo_last_row, hi_first_row,
              BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < Sk
    b_kt = tl.load(p_k + o_n[None, :] * stride_ks + o_d[:, None], mask=m_n[None, :] & m_d[:, None], other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_s = _mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT,
                       HAS_RIGHT)
    # -- online softmax (base 2) --
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # a row with nothing yet: no -inf - -inf
    b_p = tl.math.exp2(b_s - b_m_use[:, None])
    b_alpha = tl.math.exp2(b_m - b_m_use)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_v = tl.load(p_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
    b_pv = tl.dot(b_p.to(DOT_DTYPE), b_v, input_precision=PRECISION)
    # Masked pairs exist only on partial tiles; a NaN/Inf value there would reach rows through them.
    if _partial_tile(n0, Sk, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT, HAS_RIGHT):
        if _any(_nonfinite(b_v)):
            b_pv = _masked_dot(b_p, b_v, b_s != float("-inf"), PRECISION, DOT_DTYPE)
    b_acc = b_acc * b_alpha[:, None] + b_pv
    return b_acc, b_m_new, b_l


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, KvNum, KvIdx,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh,
                lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                Sq, Sk, H, G, qk_scale, offset, win_left, win_right,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G  # GQA: query head h reads kv head h // (H / Hkv)
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < Sq, o_d < D
    o_pos = o_m + offset  # key position a query is aligned to (bottom-right)
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi, lo_last_row, hi_first_row = _key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M, HAS_LEFT,
                                                   HAS_RIGHT)

    if HAS_LUT:
        lut_row = m0 // LUT_BQ
        count = tl.load(KvNum + i_b * lut_nb + i_h * lut_nh + lut_row)
        p_idx = KvIdx + i_b * lut_ib + i_h * lut_ih + lut_row * lut_ir
        for i in range(0, count):
            kb = tl.load(p_idx + i)
            for j in tl.static_range(LUT_BK // BLOCK_N):
                n0 = kb * LUT_BK + j * BLOCK_N
                if (n0 < hi) & (n0 + BLOCK_N > lo):
                    b_acc, b_m, b_l = _fwd_tile(b_acc, b_m, b_l, b_q, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks,
                                                stride_vs, qk_scale, win_left, win_right, lo_last_row, hi_first_row,
                                                BLOCK_N, HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE)
    else:
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            b_acc, b_m, b_l = _fwd_tile(b_acc, b_m, b_l, b_q, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks,
                                        stride_vs, qk_scale, win_left, win_right, lo_last_row, hi_first_row,
                                        BLOCK_N, HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE)

    # -- epilogue: rows with nothing to attend to get 0 and lse = -inf --
    empty = b_l == 0.0
    b_o = tl.where(empty[:, None], 0.0, b_acc / tl.where(empty, 1.0, b_l)[:, None])
    b_lse = tl.where(empty, float("-inf"), (b_m + tl.math.log2(tl.where(empty, 1.0, b_l))) * 0.6931471805599453)
    tl.store(Out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :],
             b_o.to(Out.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(Lse + i_bh * Sq + o_m, b_lse, mask=m_m)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(O, DO, DLse, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, Sq, H,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_m < Sq)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(O + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :], mask=m, other=0.0)
    b_do = tl.load(DO + i_b * stride_db + i_h * stride_dh + o_m[:, None] * stride_ds + o_d[None, :], mask=m, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:  # d lse_i / d s_ij = P_ij: a gradient on lse enters as -dlse in delta
        b_delta -= tl.load(DLse + i_bh * Sq + o_m, mask=o_m < Sq, other=0.0)
    tl.store(Delta + i_bh * Sq + o_m, b_delta, mask=o_m < Sq)


@triton.jit
def _dq_tile(b_dq, b_q, b_do, b_l2, b_delta, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks, stride_vs, qk_scale,
             win_left, win_right, lo_last_row, hi_first_row,
             BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < Sk
    m_kd = m_n[None, :] & m_d[:, None]
    b_kt = tl.load(p_k + o_n[None, :] * stride_ks + o_d[:, None], mask=m_kd, other=0.0).to(DOT_DTYPE)
    b_vt = tl.load(p_v + o_n[None, :] * stride_vs + o_d[:, None], mask=m_kd, other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_s = _mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT,
                       HAS_RIGHT)
    b_p = tl.math.exp2(b_s - b_l2[:, None])
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    if _partial_tile(n0, Sk, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT, HAS_RIGHT):
        # masked pairs: exact zeros, even where P was NaN (a NaN lse) or dP was (NaN in V)
        b_keep = b_s != float("-inf")
        b_ds = tl.where(b_keep, b_ds, 0.0)
        b_k = tl.trans(b_kt)
        if _any(_nonfinite(b_k)):
            b_dq += _masked_dot(b_ds, b_k, b_keep, PRECISION, DOT_DTYPE)
        else:
            b_dq += tl.dot(b_ds.to(DOT_DTYPE), b_k, input_precision=PRECISION)
    else:
        b_dq += tl.dot(b_ds.to(DOT_DTYPE), tl.trans(b_kt), input_precision=PRECISION)
    return b_dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, KvNum, KvIdx,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh,
                   lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                   Sq, Sk, H, G, qk_scale, sm_scale, offset, win_left, win_right,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < Sq, o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    o_pos = o_m + offset
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :], mask=m_md, other=0.0).to(DOT_DTYPE)
    b_do = tl.load(DO + i_b * stride_db + i_h * stride_dh + o_m[:, None] * stride_ds + o_d[None, :], mask=m_md,
                   other=0.0).to(DOT_DTYPE)
    b_lse = tl.load(Lse + i_bh * Sq + o_m, mask=m_m, other=float("-inf"))
    b_l2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)  # empty rows: P = 0
    b_delta = tl.load(Delta + i_bh * Sq + o_m, mask=m_m, other=0.0)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi, lo_last_row, hi_first_row = _key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M, HAS_LEFT,
                                                   HAS_RIGHT)

    if HAS_LUT:
        lut_row = m0 // LUT_BQ
        count = tl.load(KvNum + i_b * lut_nb + i_h * lut_nh + lut_row)
        p_idx = KvIdx + i_b * lut_ib + i_h * lut_ih + lut_row * lut_ir
        for i in range(0, count):
            kb = tl.load(p_idx + i)
            for j in tl.static_range(LUT_BK // BLOCK_N):
                n0 = kb * LUT_BK + j * BLOCK_N
                if (n0 < hi) & (n0 + BLOCK_N > lo):
                    b_dq = _dq_tile(b_dq, b_q, b_do, b_l2, b_delta, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks,
                                    stride_vs, qk_scale, win_left, win_right, lo_last_row, hi_first_row, BLOCK_N,
                                    HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE)
    else:
        for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            b_dq = _dq_tile(b_dq, b_q, b_do, b_l2, b_delta, p_k, p_v, n0, o_pos, o_d, m_d, Sk, stride_ks, stride_vs,
                            qk_scale, win_left, win_right, lo_last_row, hi_first_row, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                            PRECISION, DOT_DTYPE)
    tl.store(DQ + i_b * stride_gb + i_h * stride_gh + o_m[:, None] * stride_gs + o_d[None, :],
             (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_md)


@triton.jit
def _dkdv_keep(o_m, o_n, m_m, offset, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_N, BLOCK_M) bool: key o_n[j] and query o_m[i] attend each other (query in range, windows)."""
    o_pos = o_m + offset
    keep = (o_n[:, None] >= 0) & m_m[None, :]
    if HAS_LEFT:
        keep = keep & (o_n[:, None] >= o_pos[None, :] - win_left)
    if HAS_RIGHT:
        keep = keep & (o_n[:, None] <= o_pos[None, :] + win_right)
    return keep


@triton.jit
def _dkdv_tile(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, m0, o_n, o_d, m_d, Sq, stride_qs, stride_ds,
               qk_scale, offset, win_left, win_right, k_first, k_last,
               BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < Sq
    m_md = m_m[:, None] & m_d[None, :]
    b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_md, other=0.0).to(DOT_DTYPE)
    b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_md, other=0.0).to(DOT_DTYPE)
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("-inf"))
    b_l2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
    b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    # full tile: every key in [k_first, k_last] lies inside every query row's window
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    partial = m0 + BLOCK_M > Sq
    if HAS_LEFT:
        partial = partial | (k_first < m_last + offset - win_left)
    if HAS_RIGHT:
        partial = partial | (k_last > m0 + offset + win_right)
    if partial:
        keep = _dkdv_keep(o_m, o_n, m_m, offset, win_left, win_right, HAS_LEFT, HAS_RIGHT)
        b_st = tl.where(keep, b_st, float("-inf"))
    b_pt = tl.math.exp2(b_st - b_l2[None, :])
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    if partial:
        # masked pairs: exact zeros (P^T is NaN there under a NaN lse, dP^T under NaN in V or dO), and
        # products that keep NaN/Inf rows of dO or q away from the keys those rows do not attend.
        # (keep again: a name bound inside one if-block does not reach the next in compiled Triton)
        keep = _dkdv_keep(o_m, o_n, m_m, offset, win_left, win_right, HAS_LEFT, HAS_RIGHT)
        b_pt = tl.where(keep, b_pt, 0.0)
        b_dst = tl.where(keep, b_dst, 0.0)
        if _any(_nonfinite(b_do)):
            b_dv += _masked_dot(b_pt, b_do, keep, PRECISION, DOT_DTYPE)
        else:
            b_dv += tl.dot(b_pt.to(DOT_DTYPE), b_do, input_precision=PRECISION)
        if _any(_nonfinite(b_q)):
            b_dk += _masked_dot(b_dst, b_q, keep, PRECISION, DOT_DTYPE)
        else:
            b_dk += tl.dot(b_dst.to(DOT_DTYPE), b_q, input_precision=PRECISION)
    else:
        b_dv += tl.dot(b_pt.to(DOT_DTYPE), b_do, input_precision=PRECISION)
        b_dk += tl.dot(b_dst.to(DOT_DTYPE), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, QNum, QIdx,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     stride_db, stride_ds, stride_dh, stride_gkb, stride_gks, stride_gkh, stride_gvb, stride_gvs,
                     stride_gvh,
                     lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                     Sq, Sk, H, G, Hkv, qk_scale, sm_scale, offset, win_left, win_right,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_n, i_bhk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bhk // Hkv, i_bhk % Hkv
    n0 = i_n * BLOCK_N
    o_n = n0 + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < Sk, o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    b_k = tl.load(K + i_b * stride_kb + i_hk * stride_kh + o_n[:, None] * stride_ks + o_d[None, :], mask=m_nd,
                  other=0.0).to(DOT_DTYPE)
    b_v = tl.load(V + i_b * stride_vb + i_hk * stride_vh + o_n[:, None] * stride_vs + o_d[None, :], mask=m_nd,
                  other=0.0).to(DOT_DTYPE)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # queries that may see any key of this block: [q_lo, q_hi)
    k_last = tl.minimum(n0 + BLOCK_N, Sk) - 1
    q_lo = 0
    q_hi = Sq
    if HAS_RIGHT:
        q_lo = tl.maximum(n0 - win_right - offset, 0)
    if HAS_LEFT:
        q_hi = tl.minimum(k_last + win_left - offset + 1, Sq)

    for g in range(0, G):  # the query heads of this kv head: the GQA reduction stays in registers
        i_h = i_hk * G + g
        i_bh = i_b * H + i_h
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = DO + i_b * stride_db + i_h * stride_dh
        p_lse = Lse + i_bh * Sq
        p_delta = Delta + i_bh * Sq
        if HAS_LUT:
            lut_row = n0 // LUT_BK
            count = tl.load(QNum + i_b * lut_nb + i_h * lut_nh + lut_row)
            p_idx = QIdx + i_b * lut_ib + i_h * lut_ih + lut_row * lut_ir
            for i in range(0, count):
                qb = tl.load(p_idx + i)
                for j in tl.static_range(LUT_BQ // BLOCK_M):
                    m0 = qb * LUT_BQ + j * BLOCK_M
                    if (m0 < q_hi) & (m0 + BLOCK_M > q_lo):
                        b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, m0, o_n, o_d, m_d,
                                                Sq, stride_qs, stride_ds, qk_scale, offset, win_left, win_right, n0,
                                                k_last, BLOCK_M, HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE)
        else:
            for m0 in range((q_lo // BLOCK_M) * BLOCK_M, q_hi, BLOCK_M):
                b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, m0, o_n, o_d, m_d, Sq,
                                        stride_qs, stride_ds, qk_scale, offset, win_left, win_right, n0, k_last,
                                        BLOCK_M, HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE)
    tl.store(DK + i_b * stride_gkb + i_hk * stride_gkh + o_n[:, None] * stride_gks + o_d[None, :],
             (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + i_b * stride_gvb + i_hk * stride_gvh + o_n[:, None] * stride_gvs + o_d[None, :],
             b_dv.to(DV.dtype.element_ty), mask=m_nd)


# ---------------------------------------------------------------------------------------------
# configurations: at most 6 per kernel, keyed on head dim and LUT block sizes; under the
# interpreter one fixed configuration (autotuning would time every config in Python).
# ---------------------------------------------------------------------------------------------

_FWD_CONFIGS = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 2), (64, 32, 4, 4)]
_DQ_CONFIGS = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2), (32, 64, 4, 3)]
_DKDV_CONFIGS = [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3), (32, 128, 4, 2), (64, 32, 4, 3)]
_AUTOTUNE_KEY = ["BLOCK_D", "LUT_BQ", "LUT_BK", "HAS_LUT", "HAS_LEFT", "HAS_RIGHT", "PRECISION"]


def _fit(bm: int, bn: int, args: dict) -> Tuple[int, int]:
    """Block sizes a LUT admits (a tile never straddles two LUT blocks) and that fit in shared
    memory at head dim 256."""
    if args.get("HAS_LUT"):
        bm, bn = min(bm, args["LUT_BQ"]), min(bn, args["LUT_BK"])
    if args.get("BLOCK_D", 0) >= 256:
        bm, bn = min(bm, 64), min(bn, 64)
    return bm, bn


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    out, seen = [], set()
    for c in configs:
        bm, bn = _fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args)
        key = (bm, bn, c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _tuned(kernel, table):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd_tuned = _tuned(_fwd_kernel, _FWD_CONFIGS)
_dq_tuned = _tuned(_bwd_dq_kernel, _DQ_CONFIGS)
_dkdv_tuned = _tuned(_bwd_dkdv_kernel, _DKDV_CONFIGS)
_INTERPRET_BLOCK = 64


def _launch(tuned, plain, grid_of, args, meta):
    """Autotuned on a GPU; one fixed config under the interpreter or with autotuning off."""
    if INTERPRET:
        bm, bn = _fit(_INTERPRET_BLOCK, _INTERPRET_BLOCK, meta)
        plain[grid_of({"BLOCK_M": bm, "BLOCK_N": bn})](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
    elif not AUTOTUNE:
        config = _prune(tuned.configs[:1], {}, **meta)[0]
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        plain[grid_of(config.kwargs)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=config.num_warps,
                                      num_stages=config.num_stages)
    else:
        tuned[grid_of](*args, **meta)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _strides3(t: torch.Tensor) -> List[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


_DUMMY_LUT: dict = {}


def _lut_args(counts: Optional[torch.Tensor], indices: Optional[torch.Tensor], device) -> Tuple:
    """Pointers and strides of a compressed-row LUT; broadcast (size-1) B/H dims get stride 0."""
    if counts is None:
        dummy = _DUMMY_LUT.get(device)
        if dummy is None:  # one per device: an allocation + fill per call is host time on small calls
            dummy = _DUMMY_LUT[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy, [0, 0, 0, 0, 0]
    strides = [counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if counts.shape[1] > 1 else 0,
               indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if indices.shape[1] > 1 else 0,
               indices.stride(2)]
    return counts, indices, strides


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _common_meta(q: torch.Tensor, block_q: int, block_k: int, has_lut: bool, window_left: int,
                 window_right: int) -> dict:
    # Triton's interpreter has no bfloat16 arithmetic (it multiplies the uint16 bit patterns in
    # tl.dot, triton#11584): there, bf16 operands are upcast to float32 right after loading.
    dot_dtype = tl.float32 if INTERPRET and q.dtype == torch.bfloat16 else _DOT_DTYPES[q.dtype]
    return dict(
        D=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        LUT_BQ=block_q if has_lut else 64, LUT_BK=block_k if has_lut else 64, HAS_LUT=has_lut,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, PRECISION=_precision(q.dtype), DOT_DTYPE=dot_dtype,
    )


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs: IEEE products unless the user allowed TF32 for matmuls globally.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _window(causal: bool, window_left: int, window_right: int) -> Tuple[int, int]:
    left = window_left if window_left >= 0 else -1
    right = 0 if causal else (window_right if window_right >= 0 else -1)
    return left, right


def _check(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError("the triton backend does not support float64; use backend='cpu' or 'reference'")


def _dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k, softmax_scale, causal,
         window_left, window_right, map_rows=0, map_cols=0, map_max=False):
    op = "block_sparse_attn_fwd_triton"
    _args.check_block_sparse_args(op, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                                  softmax_scale, window_left, window_right, transposed_values=False)
    if map_rows < 0 or map_cols < 0 or (map_rows > 0) != (map_cols > 0):
        raise RuntimeError(f"{op}: map_rows and map_cols must both be > 0 (a block map) or both 0, "
                           f"got ({map_rows}, {map_cols})")
    if map_rows and (block_q if kv_num_blocks is not None else 64) % map_rows:
        raise RuntimeError(f"{op}: block map: map_rows ({map_rows}) must divide the LUT's query block")
    _check(q)
    q, k, v = (_dense_last_dim(t) for t in (q, k, v))
    B, Sq, H, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse, q.new_zeros(_reg.partial_map_shape(q, k, map_rows, map_cols), dtype=torch.float32)
    left, right = _window(causal, window_left, window_right)
    counts, indices, lut = _lut_args(kv_num_blocks, kv_indices, q.device)
    meta = _common_meta(q, block_q, block_k, kv_num_blocks is not None, left, right)
    args = (q, k, v, out, lse, counts, indices, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *lut,
            Sq, Sk, H, H // Hkv, softmax_scale * LOG2E, Sk - Sq, left, right)
    _launch(_fwd_tuned, _fwd_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args, meta)
    if map_rows == 0:
        return out, lse, q.new_empty((0,), dtype=torch.float32)
    from attnops.kernels.triton.block_map import launch_block_map  # it imports this module's jit helpers

    partial = launch_block_map(q, k, lse, counts, indices, lut, meta, map_rows, map_cols, map_max, softmax_scale, left,
                               right)
    return out, lse, partial


def _bwd(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
         softmax_scale, causal, window_left, window_right):
    op = "block_sparse_attn_bwd_triton"
    _args.check_block_sparse_args(op, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                                  softmax_scale, window_left, window_right, transposed_values=True)
    _args.check_backward_args(op, dout, dlse, q, out, lse, kv_num_blocks, q_num_blocks)
    _check(q)
    q, k, v, out = (_dense_last_dim(t) for t in (q, k, v, out))
    dout = dout.to(q.dtype).contiguous()  # the gradient of .sum() arrives with stride 0
    lse = lse.contiguous()
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    left, right = _window(causal, window_left, window_right)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    dlse_c = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    _bwd_delta_kernel[(triton.cdiv(Sq, 64), B * H)](out, dout, dlse_c, delta, *_strides3(out), *_strides3(dout), Sq, H,
                                                   D=D, BLOCK_D=block_d, BLOCK_M=64, HAS_DLSE=dlse is not None)
    has_lut = kv_num_blocks is not None
    meta = _common_meta(q, block_q, block_k, has_lut, left, right)
    counts, indices, lut = _lut_args(kv_num_blocks, kv_indices, q.device)
    qk_scale = softmax_scale * LOG2E
    args = (q, k, v, dout, dq, lse, delta, counts, indices, *_strides3(q), *_strides3(k), *_strides3(v),
            *_strides3(dout), *_strides3(dq), *lut, Sq, Sk, H, H // Hkv, qk_scale, softmax_scale, Sk - Sq, left, right)
    _launch(_dq_tuned, _bwd_dq_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args, meta)
    tcounts, tindices, tlut = _lut_args(q_num_blocks, q_indices, q.device)
    args = (q, k, v, dout, dk, dv, lse, delta, tcounts, tindices, *_strides3(q), *_strides3(k), *_strides3(v),
            *_strides3(dout), *_strides3(dk), *_strides3(dv), *tlut, Sq, Sk, H, H // Hkv, Hkv, qk_scale, softmax_scale,
            Sk - Sq, left, right)
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * Hkv), args, meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# operators
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("attnops::block_sparse_attn_fwd_triton", mutates_args=())
def block_sparse_attn_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
                                 q_num_blocks: Optional[torch.Tensor], q_indices: Optional[torch.Tensor],
                                 block_q: int, block_k: int, softmax_scale: float, causal: bool, window_left: int,
                                 window_right: int, map_rows: int = 0, map_cols: int = 0,
                                 map_max: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k, softmax_scale, causal,
                window_left, window_right, map_rows, map_cols, map_max)


@torch.library.custom_op("attnops::block_sparse_attn_bwd_triton", mutates_args=())
def block_sparse_attn_bwd_triton(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
                                 q_num_blocks: Optional[torch.Tensor], q_indices: Optional[torch.Tensor],
                                 block_q: int, block_k: int, softmax_scale: float, causal: bool, window_left: int,
                                 window_right: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                softmax_scale, causal, window_left, window_right)


block_sparse_attn_fwd_triton.register_fake(_reg.block_sparse_fwd_fake)
block_sparse_attn_bwd_triton.register_fake(_reg.block_sparse_bwd_fake)
_reg.register_block_sparse_autograd("attnops::block_sparse_attn_fwd_triton", block_sparse_attn_bwd_triton,
                                    "attnops::block_sparse_attn_bwd_triton")

block_sparse_attention = _reg.block_sparse_backend(block_sparse_attn_fwd_triton)
