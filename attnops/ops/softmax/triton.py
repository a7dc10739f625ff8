"""Block-sparse FlashAttention-2 in Triton: forward, and a backward in three kernels.

After FlashAttention-2 (Dao, 2023) and the Triton tutorial 06-fused-attention, generalised to a
block LUT (attnops.BlockMask), GQA/MQA, any length, head dims 1..512 and flash_attn's
bottom-right causal / window predicates.

- forward, one program per (query block, b * h): walks the key blocks its LUT row lists (or the
  range the predicates leave when there is no LUT) in BLOCK_N sub-tiles; online softmax in base 2
  with softmax_scale * log2(e) folded into one multiply; predicates evaluated only on tiles that
  cross a boundary; float32 accumulation; writes out and lse (natural log, float32).
- backward: delta = rowsum(dO * O) - dlse; dq per (query block, b * h) over the LUT's key blocks;
  dk/dv per (key block, b * kv head) over the transposed LUT's query blocks *of every query head
  of the group*, so the GQA reduction happens inside one program: no atomics, no races.

The walk, the predicates, the softmax step and the NaN-safe products are the shared pieces of
attnops.core.triton_common. Registered with torch.library.custom_op (+ fake + autograd) from the
family's argument list (attnops.ops.softmax.library): under TRITON_INTERPRET=1 triton_op /
wrap_triton failed on meta tensors, opcheck and compile (research notes), custom_op passes them.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from attnops.core import dispatch
from attnops.core import op_checks as _args
from attnops.core.backends import AUTOTUNE, INTERPRET
from attnops.core.triton_common import (C_LN2, C_LOG2E, LOG2E, alibi_offset_args, alibi_positions, bias_args,
                                        dot_kept, dropout_args, dropout_rows, dropout_scale, fold_sink, key_range,
                                        keys_see_queries, segment_args, segment_bounds, load_bias, lse2, lut_tile,
                                        lut_walk, mask_scores, modify_scores, partial_tile, row_results,
                                        softmax_rescale, dense_last_dim, dot_dtype, lut_args, precision,
                                        refuse_float64, score_mod_args, strides3)
from attnops.ops.softmax import library as lib
from attnops.ops.softmax.triton_map import launch_block_map


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(b_acc, b_m, b_l, b_q, p_k, p_v, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks, stride_vs, qk_scale,
              win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2,
              slope2, p_bias, o_m, m_m, bias_sq, b_drop_rows, threshold, drop_scale,
              BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
              DOT_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < Sk
    b_kt = tl.load(p_k + o_n[None, :] * stride_ks + o_d[:, None], mask=m_n[None, :] & m_d[:, None],
                   other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_s, _ = modify_scores(b_s, o_apos[:, None], o_n[None, :], cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        b_s += load_bias(p_bias, 0, 0, o_m[:, None], o_n[None, :], m_m[:, None] & m_n[None, :], 0, 0, bias_sq)
    b_s = mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi,
                      seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    b_m_new, b_m_use, b_alpha = softmax_rescale(b_m, tl.max(b_s, 1))
    b_p = tl.math.exp2(b_s - b_m_use[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if HAS_DROPOUT:  # on the normalised probabilities: l sums them before, V takes them after
        b_p = b_p * dropout_scale(b_drop_rows[:, None], o_n[None, :], threshold, drop_scale)
    b_v = tl.load(p_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                  other=0.0).to(DOT_DTYPE)
    # Masked pairs exist only on partial tiles; a NaN/Inf value there would reach rows through them.
    if partial_tile(n0, Sk, lo_last_row, hi_first_row, seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                    HAS_SEGMENTS):
        b_pv = dot_kept(b_p, b_v, b_s != float("-inf"), PRECISION, DOT_DTYPE)
    else:
        b_pv = tl.dot(b_p.to(DOT_DTYPE), b_v, input_precision=PRECISION)
    b_acc = b_acc * b_alpha[:, None] + b_pv
    return b_acc, b_m_new, b_l


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, MaxScores, KvNum, KvIdx, Slopes, Sinks, Bias, Seed, KeyBounds, AlibiOffsets,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh,
                lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                Sq, Sk, H, G, qk_scale, offset, win_left, win_right, cap2, stride_slopes_b, bias_sb, bias_sh, bias_sq,
                threshold, drop_scale, kb_sb, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_ALIBI_OFFSETS: tl.constexpr,
                HAS_MAX: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    # batch / head offsets in int64: B * S * H * D passes 2^31 at long contexts
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hk = i_h // G  # GQA: query head h reads kv head h // (H / Hkv)
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < Sq, o_d < D
    o_pos = o_m + offset  # key position a query is aligned to (bottom-right)
    o_apos = alibi_positions(AlibiOffsets, o_m, m_m, o_pos, HAS_ALIBI_OFFSETS)
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + i_b * stride_slopes_b + i_h) * C_LOG2E
    p_bias = Bias + i_b * bias_sb + i_h * bias_sh
    b_drop_rows = o_m.to(tl.uint32)
    if HAS_DROPOUT:
        b_drop_rows = dropout_rows(Seed, i_bh, o_m)

    lo, hi, lo_last_row, hi_first_row = key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M, HAS_LEFT,
                                                   HAS_RIGHT)
    b_seg_lo, b_seg_hi, seg_lo, seg_hi, seg_inner_lo, seg_inner_hi = segment_bounds(
        KeyBounds + i_b * kb_sb, o_m, m_m, m0, tl.minimum(m0 + BLOCK_M, Sq) - 1, HAS_SEGMENTS)
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, seg_lo)
        hi = tl.minimum(hi, seg_hi)
    count, p_idx, first = lut_walk(KvNum, KvIdx, i_b, i_h, m0 // LUT_BQ, lut_nb, lut_nh, lut_ib, lut_ih, lut_ir, lo,
                                    hi, HAS_LUT, LUT_BK, BLOCK_N)
    for t in range(0, count):
        n0 = lut_tile(t, p_idx, first, HAS_LUT, LUT_BK, BLOCK_N)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            b_acc, b_m, b_l = _fwd_tile(b_acc, b_m, b_l, b_q, p_k, p_v, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks,
                                        stride_vs, qk_scale, win_left, win_right, lo_last_row, hi_first_row,
                                        b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2, slope2, p_bias, o_m,
                                        m_m, bias_sq, b_drop_rows, threshold, drop_scale, BLOCK_N, HAS_LEFT,
                                        HAS_RIGHT, PRECISION, DOT_DTYPE, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                        HAS_DROPOUT, HAS_SEGMENTS)

    if HAS_MAX:  # the row's largest score (m is in base 2; -inf where the row attends nothing), sinks apart.
        # tl.max skips NaN: a NaN score shows in l (its exp2 is NaN), as does +inf - +inf, which m tells apart
        b_max = tl.where((b_l != b_l) & (b_m != float("inf")), float("nan"), b_m * C_LN2)
        tl.store(MaxScores + i_bh.to(tl.int64) * Sq + o_m, b_max, mask=m_m)
    if HAS_SINKS:  # one more logit per row, no value: the denominator grows, the accumulator is rescaled
        b_m, b_l, b_alpha = fold_sink(b_m, b_l, tl.load(Sinks + i_h).to(tl.float32) * C_LOG2E)
        b_acc = b_acc * b_alpha[:, None]
    b_inv, b_lse = row_results(b_m, b_l)  # rows with nothing to attend to: 0 and lse = -inf (or the sink)
    tl.store(Out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :],
             (b_acc * b_inv[:, None]).to(Out.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(Lse + i_bh.to(tl.int64) * Sq + o_m, b_lse, mask=m_m)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(O, DO, DLse, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, Sq, H,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_m < Sq)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(O + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :], mask=m, other=0.0)
    b_do = tl.load(DO + i_b * stride_db + i_h * stride_dh + o_m[:, None] * stride_ds + o_d[None, :], mask=m, other=0.0)
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    p_row = i_bh.to(tl.int64) * Sq + o_m
    if HAS_DLSE:  # d lse_i / d s_ij = P_ij: a gradient on lse enters as -dlse in delta
        b_delta -= tl.load(DLse + p_row, mask=o_m < Sq, other=0.0)
    tl.store(Delta + p_row, b_delta, mask=o_m < Sq)


@triton.jit
def _dq_tile(b_dq, b_q, b_do, b_l2, b_delta, p_k, p_v, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks, stride_vs, qk_scale,
             win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2,
             slope2, p_bias, p_dbias, o_m, m_m, bias_sq, b_drop_rows, threshold, drop_scale,
             BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
             DOT_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
             BIAS_GRAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    o_n = n0 + tl.arange(0, BLOCK_N)
    m_n = o_n < Sk
    m_kd = m_n[None, :] & m_d[:, None]
    b_kt = tl.load(p_k + o_n[None, :] * stride_ks + o_d[:, None], mask=m_kd, other=0.0).to(DOT_DTYPE)
    b_vt = tl.load(p_v + o_n[None, :] * stride_vs + o_d[:, None], mask=m_kd, other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_s, b_t = modify_scores(b_s, o_apos[:, None], o_n[None, :], cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        b_s += load_bias(p_bias, 0, 0, o_m[:, None], o_n[None, :], m_m[:, None] & m_n[None, :], 0, 0, bias_sq)
    b_s = mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi,
                      seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    b_p = tl.math.exp2(b_s - b_l2[:, None])
    b_dp = tl.dot(b_do, b_vt, input_precision=PRECISION)
    if HAS_DROPOUT:  # dS = P (dP Z / (1 - p) - delta)
        b_dp = b_dp * dropout_scale(b_drop_rows[:, None], o_n[None, :], threshold, drop_scale)
    b_ds = b_p * (b_dp - b_delta[:, None])
    if BIAS_GRAD:  # d loss / d bias = dS before the softcap's derivative; each pair is visited once, here
        b_kept = (b_s != float("-inf")) & m_m[:, None] & m_n[None, :]
        tl.store(p_dbias + o_m[:, None].to(tl.int64) * Sk + o_n[None, :], tl.where(b_kept, b_ds, 0.0),
                 mask=m_m[:, None] & m_n[None, :])
    if HAS_SOFTCAP:  # d cap * tanh(s / cap) / ds
        b_ds = b_ds * (1.0 - b_t * b_t)
    if partial_tile(n0, Sk, lo_last_row, hi_first_row, seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                    HAS_SEGMENTS):
        # masked pairs: exact zeros, even where P was NaN (a NaN lse) or dP was (NaN in V)
        b_keep = b_s != float("-inf")
        b_dq += dot_kept(tl.where(b_keep, b_ds, 0.0), tl.trans(b_kt), b_keep, PRECISION, DOT_DTYPE)
    else:
        b_dq += tl.dot(b_ds.to(DOT_DTYPE), tl.trans(b_kt), input_precision=PRECISION)
    return b_dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, Lse, Delta, KvNum, KvIdx, Slopes, Bias, DBias, Seed, KeyBounds, AlibiOffsets,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh,
                   lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                   Sq, Sk, H, G, qk_scale, sm_scale, offset, win_left, win_right, cap2, stride_slopes_b, bias_sb,
                   bias_sh, bias_sq, threshold, drop_scale, kb_sb,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_GRAD: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                   HAS_ALIBI_OFFSETS: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hk = i_h // G
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < Sq, o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    o_pos = o_m + offset
    o_apos = alibi_positions(AlibiOffsets, o_m, m_m, o_pos, HAS_ALIBI_OFFSETS)
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :], mask=m_md,
                  other=0.0).to(DOT_DTYPE)
    b_do = tl.load(DO + i_b * stride_db + i_h * stride_dh + o_m[:, None] * stride_ds + o_d[None, :], mask=m_md,
                   other=0.0).to(DOT_DTYPE)
    p_row = i_bh.to(tl.int64) * Sq + o_m
    b_l2 = lse2(tl.load(Lse + p_row, mask=m_m, other=float("-inf")))
    b_delta = tl.load(Delta + p_row, mask=m_m, other=0.0)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_v = V + i_b * stride_vb + i_hk * stride_vh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + i_b * stride_slopes_b + i_h) * C_LOG2E
    p_bias = Bias + i_b * bias_sb + i_h * bias_sh
    p_dbias = DBias + i_bh.to(tl.int64) * Sq * Sk  # (B, H, Sq, Sk)
    b_drop_rows = o_m.to(tl.uint32)
    if HAS_DROPOUT:
        b_drop_rows = dropout_rows(Seed, i_bh, o_m)

    lo, hi, lo_last_row, hi_first_row = key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M, HAS_LEFT,
                                                   HAS_RIGHT)
    b_seg_lo, b_seg_hi, seg_lo, seg_hi, seg_inner_lo, seg_inner_hi = segment_bounds(
        KeyBounds + i_b * kb_sb, o_m, m_m, m0, tl.minimum(m0 + BLOCK_M, Sq) - 1, HAS_SEGMENTS)
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, seg_lo)
        hi = tl.minimum(hi, seg_hi)
    count, p_idx, first = lut_walk(KvNum, KvIdx, i_b, i_h, m0 // LUT_BQ, lut_nb, lut_nh, lut_ib, lut_ih, lut_ir, lo,
                                    hi, HAS_LUT, LUT_BK, BLOCK_N)
    for t in range(0, count):
        n0 = lut_tile(t, p_idx, first, HAS_LUT, LUT_BK, BLOCK_N)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            b_dq = _dq_tile(b_dq, b_q, b_do, b_l2, b_delta, p_k, p_v, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks,
                            stride_vs, qk_scale, win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi,
                            seg_inner_lo, seg_inner_hi, cap2, slope2, p_bias, p_dbias, o_m, m_m, bias_sq, b_drop_rows,
                            threshold, drop_scale, BLOCK_N, HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE, HAS_SOFTCAP,
                            HAS_ALIBI, HAS_BIAS, BIAS_GRAD, HAS_DROPOUT, HAS_SEGMENTS)
    tl.store(DQ + i_b * stride_gb + i_h * stride_gh + o_m[:, None] * stride_gs + o_d[None, :],
             (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_md)


@triton.jit
def _dkdv_tile(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, m0, o_n, o_d, m_d, Sq, stride_qs, stride_ds,
               qk_scale, offset, win_left, win_right, k_first, k_last, b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi,
               cap2, slope2, p_bias, m_n, bias_sq, Seed, i_bh, threshold, drop_scale, AlibiOffsets,
               BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr,
               DOT_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_ALIBI_OFFSETS: tl.constexpr):
    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < Sq
    m_md = m_m[:, None] & m_d[None, :]
    b_q = tl.load(p_q + o_m[:, None] * stride_qs + o_d[None, :], mask=m_md, other=0.0).to(DOT_DTYPE)
    b_do = tl.load(p_do + o_m[:, None] * stride_ds + o_d[None, :], mask=m_md, other=0.0).to(DOT_DTYPE)
    b_l2 = lse2(tl.load(p_lse + o_m, mask=m_m, other=float("-inf")))
    b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    o_apos = alibi_positions(AlibiOffsets, o_m, m_m, o_m + offset, HAS_ALIBI_OFFSETS)
    b_st, b_tt = modify_scores(b_st, o_apos[None, :], o_n[:, None], cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:  # the transposed tile: keys along rows
        b_st += load_bias(p_bias, 0, 0, o_m[None, :], o_n[:, None], m_m[None, :] & m_n[:, None], 0, 0, bias_sq)
    # full tile: every key in [k_first, k_last] lies inside every query row's window
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    partial = m0 + BLOCK_M > Sq
    if HAS_LEFT:
        partial = partial | (k_first < m_last + offset - win_left)
    if HAS_RIGHT:
        partial = partial | (k_last > m0 + offset + win_right)
    if HAS_SEGMENTS:  # every query of the tile inside every key's query bounds
        partial = partial | (m0 < seg_inner_lo) | (m0 + BLOCK_M > seg_inner_hi)
    if partial:
        b_st = tl.where(keys_see_queries(o_m, o_n, m_m, offset, win_left, win_right, b_seg_lo, b_seg_hi, HAS_LEFT,
                                         HAS_RIGHT, HAS_SEGMENTS), b_st, float("-inf"))
    b_pt = tl.math.exp2(b_st - b_l2[None, :])
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
    b_pdt = b_pt  # what dv takes: P^T, or with dropout P^T Z^T / (1 - p)
    if HAS_DROPOUT:
        b_zt = dropout_scale(dropout_rows(Seed, i_bh, o_m)[None, :], o_n[:, None], threshold, drop_scale)
        b_pdt = b_pt * b_zt
        b_dpt = b_dpt * b_zt
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    if HAS_SOFTCAP:
        b_dst = b_dst * (1.0 - b_tt * b_tt)
    if partial:
        # masked pairs: exact zeros (P^T is NaN there under a NaN lse, dP^T under NaN in V or dO), and
        # products that keep NaN/Inf rows of dO or q away from the keys those rows do not attend.
        # (keep again: a name bound inside one if-block does not reach the next in compiled Triton)
        keep = keys_see_queries(o_m, o_n, m_m, offset, win_left, win_right, b_seg_lo, b_seg_hi, HAS_LEFT, HAS_RIGHT,
                                HAS_SEGMENTS)
        b_dv += dot_kept(tl.where(keep, b_pdt, 0.0), b_do, keep, PRECISION, DOT_DTYPE)
        b_dk += dot_kept(tl.where(keep, b_dst, 0.0), b_q, keep, PRECISION, DOT_DTYPE)
    else:
        b_dv += tl.dot(b_pdt.to(DOT_DTYPE), b_do, input_precision=PRECISION)
        b_dk += tl.dot(b_dst.to(DOT_DTYPE), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, Lse, Delta, QNum, QIdx, Slopes, Bias, Seed, QueryBounds, AlibiOffsets,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                     stride_db, stride_ds, stride_dh, stride_gkb, stride_gks, stride_gkh, stride_gvb, stride_gvs,
                     stride_gvh,
                     lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                     Sq, Sk, H, G, Hkv, qk_scale, sm_scale, offset, win_left, win_right, cap2, stride_slopes_b,
                     bias_sb, bias_sh, bias_sq, threshold, drop_scale, qb_sb,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                     HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_ALIBI_OFFSETS: tl.constexpr):
    i_n, i_bhk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bhk // Hkv).to(tl.int64), (i_bhk % Hkv).to(tl.int64)
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
    b_seg_lo, b_seg_hi, seg_lo, seg_hi, seg_inner_lo, seg_inner_hi = segment_bounds(
        QueryBounds + i_b * qb_sb, o_n, m_n, n0, k_last, HAS_SEGMENTS)
    if HAS_SEGMENTS:
        q_lo = tl.maximum(q_lo, seg_lo)
        q_hi = tl.minimum(q_hi, seg_hi)

    for g in range(0, G):  # the query heads of this kv head: the GQA reduction stays in registers
        i_h = i_hk * G + g
        i_bh = i_b * H + i_h
        p_q = Q + i_b * stride_qb + i_h * stride_qh
        p_do = DO + i_b * stride_db + i_h * stride_dh
        p_lse = Lse + i_bh * Sq
        p_delta = Delta + i_bh * Sq
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + i_b * stride_slopes_b + i_h) * C_LOG2E
        p_bias = Bias + i_b * bias_sb + i_h * bias_sh
        # the transposed LUT: the query blocks that list this key block
        count, p_idx, first = lut_walk(QNum, QIdx, i_b, i_h, n0 // LUT_BK, lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                                        q_lo, q_hi, HAS_LUT, LUT_BQ, BLOCK_M)
        for t in range(0, count):
            m0 = lut_tile(t, p_idx, first, HAS_LUT, LUT_BQ, BLOCK_M)
            if (m0 < q_hi) & (m0 + BLOCK_M > q_lo):
                b_dk, b_dv = _dkdv_tile(b_dk, b_dv, b_k, b_v, p_q, p_do, p_lse, p_delta, m0, o_n, o_d, m_d, Sq,
                                        stride_qs, stride_ds, qk_scale, offset, win_left, win_right, n0, k_last,
                                        b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2, slope2, p_bias, m_n,
                                        bias_sq, Seed, i_bh, threshold, drop_scale, AlibiOffsets, BLOCK_M,
                                        HAS_LEFT, HAS_RIGHT, PRECISION, DOT_DTYPE, HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS,
                                        HAS_DROPOUT, HAS_SEGMENTS, HAS_ALIBI_OFFSETS)
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
_AUTOTUNE_KEY = ["BLOCK_D", "LUT_BQ", "LUT_BK", "HAS_LUT", "HAS_LEFT", "HAS_RIGHT", "PRECISION", "HAS_SOFTCAP",
                 "HAS_ALIBI", "HAS_BIAS", "HAS_DROPOUT", "HAS_SEGMENTS", "HAS_ALIBI_OFFSETS"]


def _fit(bm: int, bn: int, args: dict) -> Tuple[int, int]:
    """Block sizes a LUT admits (a tile never straddles two LUT blocks) and that fit in shared
    memory at head dims 256 and 512."""
    if args.get("HAS_LUT"):
        bm, bn = min(bm, args["LUT_BQ"]), min(bn, args["LUT_BK"])
    block_d = args.get("BLOCK_D", 0)
    if block_d >= 512:
        # a 32-row tile of one operand is 64 KiB in float32 at head dim 512, and the backward kernels hold q and dO
        # (BLOCK_M rows each) beside K and V (BLOCK_N rows): 32 + 16 rows of them take 192 KiB of the 227
        return min(bm, 32), min(bn, 16)
    if block_d >= 256:
        return min(bm, 64), min(bn, 64)
    return bm, bn


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    # one stage at head dim 512: a second buffer of the tiles a loop loads (K and V, or q and dO; 64-128 KiB in
    # float32) would outgrow the 227 KiB
    stages_cap = 1 if args.get("BLOCK_D", 0) >= 512 else 8
    out, seen = [], set()
    for c in configs:
        bm, bn = _fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], args)
        stages = min(c.num_stages, stages_cap)
        key = (bm, bn, c.num_warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=c.num_warps, num_stages=stages))
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

def _common_meta(q: torch.Tensor, block_q: int, block_k: int, has_lut: bool, window_left: int,
                 window_right: int) -> dict:
    return dict(
        D=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
        LUT_BQ=block_q if has_lut else 64, LUT_BK=block_k if has_lut else 64, HAS_LUT=has_lut,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, PRECISION=precision(q.dtype),
        DOT_DTYPE=dot_dtype(q.dtype),
    )


def _window(causal: bool, window_left: int, window_right: int) -> Tuple[int, int]:
    left = window_left if window_left >= 0 else -1
    right = 0 if causal else (window_right if window_right >= 0 else -1)
    return left, right


def _fwd(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k, softmax_scale, causal,
         window_left, window_right, map_rows=0, map_cols=0, map_max=False, softcap=0.0, alibi_slopes=None, sinks=None,
         attn_bias=None, dropout_p=0.0, dropout_seed=None, key_bounds=None, query_bounds=None, alibi_offsets=None,
         return_max=False):
    op = lib.FWD_TRITON.name
    _args.check_block_sparse_args(op, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                                  softmax_scale, window_left, window_right, transposed_values=False)
    _args.check_score_mod_args(op, q, softcap, alibi_slopes, sinks)
    _args.check_attn_bias_arg(op, q, k, attn_bias)
    _args.check_dropout_args(op, q, dropout_p, dropout_seed)
    _args.check_segment_bounds(op, q, k, key_bounds, query_bounds, backward=False)
    _args.check_alibi_offsets(op, q, alibi_slopes, alibi_offsets, key_bounds, query_bounds, backward=False)
    if map_rows < 0 or map_cols < 0 or (map_rows > 0) != (map_cols > 0):
        raise RuntimeError(f"{op}: map_rows and map_cols must both be > 0 (a block map) or both 0, "
                           f"got ({map_rows}, {map_cols})")
    if map_rows and (block_q if kv_num_blocks is not None else 64) % map_rows:
        raise RuntimeError(f"{op}: block map: map_rows ({map_rows}) must divide the LUT's query block")
    refuse_float64(q)
    q, k, v = (dense_last_dim(t) for t in (q, k, v))
    B, Sq, H, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    max_scores = torch.empty((B, H, Sq) if return_max else (0,), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse, q.new_zeros(lib.partial_map_shape(q, k, map_rows, map_cols), dtype=torch.float32), max_scores
    left, right = _window(causal, window_left, window_right)
    counts, indices, lut = lut_args(kv_num_blocks, kv_indices, q.device)
    (cap2, slopes, stride_slopes_b), flags = score_mod_args(q, softcap, alibi_slopes)
    bias, bias_strides = bias_args(attn_bias, q.device)
    seed, threshold, drop_scale = dropout_args(dropout_p, dropout_seed, q.device)
    kbounds, kb_sb = segment_args(key_bounds, q.device)
    aoffsets, aflag = alibi_offset_args(alibi_offsets, q.device)
    flags.update(HAS_BIAS=attn_bias is not None, HAS_DROPOUT=threshold > 0, HAS_SEGMENTS=key_bounds is not None,
                 **aflag)
    meta = {**_common_meta(q, block_q, block_k, kv_num_blocks is not None, left, right), **flags}
    sinks_arg = sinks.contiguous() if sinks is not None else slopes
    args = (q, k, v, out, lse, max_scores if return_max else lse, counts, indices, slopes, sinks_arg, bias, seed,
            kbounds, aoffsets, *strides3(q), *strides3(k),
            *strides3(v), *strides3(out), *lut, Sq, Sk, H, H // Hkv, softmax_scale * LOG2E, Sk - Sq, left, right, cap2,
            stride_slopes_b, *bias_strides, threshold, drop_scale, kb_sb)
    _launch(_fwd_tuned, _fwd_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args,
            {**meta, "HAS_SINKS": sinks is not None, "HAS_MAX": bool(return_max)})
    if map_rows == 0:
        return out, lse, q.new_empty((0,), dtype=torch.float32), max_scores
    meta.pop("HAS_DROPOUT")  # the map is of the probabilities before dropout
    partial = launch_block_map(q, k, lse, counts, indices, lut, meta, map_rows, map_cols, map_max, softmax_scale, left,
                               right, (cap2, slopes, stride_slopes_b), (bias, bias_strides), (kbounds, kb_sb),
                               aoffsets)
    return out, lse, partial, max_scores


def _bwd(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
         softmax_scale, causal, window_left, window_right, softcap=0.0, alibi_slopes=None, attn_bias=None,
         bias_grad=False, dropout_p=0.0, dropout_seed=None, key_bounds=None, query_bounds=None, alibi_offsets=None):
    op = lib.BWD_TRITON.name
    _args.check_block_sparse_args(op, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                                  softmax_scale, window_left, window_right, transposed_values=True)
    _args.check_score_mod_args(op, q, softcap, alibi_slopes, None)
    _args.check_attn_bias_arg(op, q, k, attn_bias)
    if bias_grad and attn_bias is None:
        raise RuntimeError(f"{op}: bias_grad without an attn_bias")
    _args.check_dropout_args(op, q, dropout_p, dropout_seed)
    _args.check_segment_bounds(op, q, k, key_bounds, query_bounds, backward=True)
    _args.check_alibi_offsets(op, q, alibi_slopes, alibi_offsets, key_bounds, query_bounds, backward=True)
    _args.check_backward_args(op, dout, dlse, q, out, lse, kv_num_blocks, q_num_blocks)
    refuse_float64(q)
    q, k, v, out = (dense_last_dim(t) for t in (q, k, v, out))
    dout = dout.to(q.dtype).contiguous()  # the gradient of .sum() arrives with stride 0
    lse = lse.contiguous()
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    # d attn_bias before the reduction over its broadcast dims: zeros at the pairs no tile visits
    dbias = torch.zeros((B, H, Sq, Sk) if bias_grad else (0,), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    left, right = _window(causal, window_left, window_right)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    dlse_c = dlse.to(torch.float32).contiguous() if dlse is not None else delta
    _bwd_delta_kernel[(triton.cdiv(Sq, 64), B * H)](out, dout, dlse_c, delta, *strides3(out), *strides3(dout), Sq, H,
                                                   D=D, BLOCK_D=block_d, BLOCK_M=64, HAS_DLSE=dlse is not None)
    has_lut = kv_num_blocks is not None
    (cap2, slopes, stride_slopes_b), flags = score_mod_args(q, softcap, alibi_slopes)
    bias, bias_strides = bias_args(attn_bias, q.device)
    seed, threshold, drop_scale = dropout_args(dropout_p, dropout_seed, q.device)
    kbounds, kb_sb = segment_args(key_bounds, q.device)
    qbounds, qb_sb = segment_args(query_bounds, q.device)
    aoffsets, aflag = alibi_offset_args(alibi_offsets, q.device)
    flags.update(HAS_BIAS=attn_bias is not None, HAS_DROPOUT=threshold > 0, HAS_SEGMENTS=key_bounds is not None,
                 **aflag)
    meta = {**_common_meta(q, block_q, block_k, has_lut, left, right), **flags}
    counts, indices, lut = lut_args(kv_num_blocks, kv_indices, q.device)
    qk_scale = softmax_scale * LOG2E
    args = (q, k, v, dout, dq, lse, delta, counts, indices, slopes, bias, dbias if bias_grad else bias, seed, kbounds,
            aoffsets, *strides3(q), *strides3(k), *strides3(v), *strides3(dout), *strides3(dq), *lut, Sq, Sk, H,
            H // Hkv, qk_scale, softmax_scale, Sk - Sq, left, right, cap2, stride_slopes_b, *bias_strides, threshold,
            drop_scale, kb_sb)
    _launch(_dq_tuned, _bwd_dq_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args,
            {**meta, "BIAS_GRAD": bool(bias_grad)})
    tcounts, tindices, tlut = lut_args(q_num_blocks, q_indices, q.device)
    args = (q, k, v, dout, dk, dv, lse, delta, tcounts, tindices, slopes, bias, seed, qbounds, aoffsets, *strides3(q),
            *strides3(k), *strides3(v), *strides3(dout), *strides3(dk), *strides3(dv), *tlut, Sq, Sk, H, H // Hkv, Hkv,
            qk_scale, softmax_scale, Sk - Sq, left, right, cap2, stride_slopes_b, *bias_strides, threshold, drop_scale,
            qb_sb)
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * Hkv), args, meta)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------
# operators (the family's argument lists) and the dispatcher's entry
# ---------------------------------------------------------------------------------------------

block_sparse_attn_fwd_triton = lib.FWD_TRITON.custom_op(_fwd)
block_sparse_attn_bwd_triton = lib.BWD_TRITON.custom_op(_bwd)
lib.register(lib.FWD_TRITON, lib.BWD_TRITON, block_sparse_attn_bwd_triton)
dispatch.register("block_sparse_attention", "triton", lib.backend(lib.FWD_TRITON, block_sparse_attn_fwd_triton))
