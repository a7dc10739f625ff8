"""Block attention map in Triton: a second pass over the forward's key tiles, from its lse.

One program per (partial-map row of BLOCK_M queries, b * h) walks the same key blocks as the
forward (LUT row or predicate range) in BLOCK_N tiles that each lie inside one map key block,
recomputes S = Q K^T, and reduces P = exp2(S - lse2) over the tile to one number (sum, or max).
Tiles arrive in ascending key order, so the program keeps the running value of the current map
block in a register and stores it when the block changes; the columns in between are stored as
zeros, so every element of the row is written exactly once (no read-modify-write, no atomics).

The C++ kernel fuses the map into the forward instead (csrc/cpu/kernels/block_sparse_attention.cpp): on a
GPU the forward keeps its registers for the output, and the extra Q K^T pass is the simpler
trade (DESIGN.md, block maps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnops.core.triton_common import (C_LOG2E, LOG2E, alibi_positions, key_range, load_bias, lse2, lut_tile,
                                        lut_walk, mask_scores, modify_scores, segment_bounds)

_ZERO_SPAN = 64  # columns zero-filled per store


@triton.jit
def _store_zeros(p_row, j0, j1, ZERO_SPAN: tl.constexpr):
    """Zeros into the columns [j0, j1) of a partial-map row."""
    o = tl.arange(0, ZERO_SPAN)
    for z in range(j0, j1, ZERO_SPAN):
        tl.store(p_row + z + o, tl.zeros([ZERO_SPAN], dtype=tl.float32), mask=z + o < j1)


@triton.jit
def _map_tile(b_q, b_l2, p_k, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks, qk_scale, win_left, win_right, lo_last_row,
              hi_first_row, b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2, slope2, p_bias, o_m, m_m, bias_sq,
              BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MAP_MAX: tl.constexpr,
              PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    o_n = n0 + tl.arange(0, BLOCK_N)
    b_kt = tl.load(p_k + o_n[None, :] * stride_ks + o_d[:, None], mask=(o_n < Sk)[None, :] & m_d[:, None],
                   other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
    b_s, _ = modify_scores(b_s, o_apos[:, None], o_n[None, :], cap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_BIAS:
        b_s += load_bias(p_bias, 0, 0, o_m[:, None], o_n[None, :], m_m[:, None] & (o_n < Sk)[None, :], 0, 0, bias_sq)
    b_s = mask_scores(b_s, n0, o_n, o_pos, Sk, win_left, win_right, lo_last_row, hi_first_row, b_seg_lo, b_seg_hi,
                      seg_inner_lo, seg_inner_hi, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SEGMENTS)
    b_p = tl.math.exp2(b_s - b_l2[:, None])
    total = tl.sum(tl.sum(b_p, 1), 0)
    if MAP_MAX:
        # tl.max drops NaN; the sum keeps it (NaN in, NaN out)
        peak = tl.max(tl.max(b_p, 1), 0)
        return tl.where(total != total, total, peak)
    return total


@triton.jit
def _map_step(value, current, p_row, n0, v, MAP_BK: tl.constexpr, MAP_MAX: tl.constexpr, ZERO_SPAN: tl.constexpr):
    """Folds a tile's value v into the running value of map block `current`, flushing on a change."""
    jm = n0 // MAP_BK
    if jm != current:
        if current >= 0:
            tl.store(p_row + current, value)
        _store_zeros(p_row, current + 1, jm, ZERO_SPAN)
        value = v
    elif MAP_MAX:
        value = tl.where(v != v, v, tl.maximum(value, v))
    else:
        value = value + v
    return value, jm


@triton.jit
def _block_map_kernel(Q, K, Lse, Part, KvNum, KvIdx, Slopes, Bias, KeyBounds, AlibiOffsets,
                      stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                      lut_nb, lut_nh, lut_ib, lut_ih, lut_ir,
                      Sq, Sk, H, G, NQ_PART, NK_MAP, qk_scale, offset, win_left, win_right, cap2, stride_slopes_b,
                      bias_sb, bias_sh, bias_sq, kb_sb,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      MAP_BK: tl.constexpr, LUT_BQ: tl.constexpr, LUT_BK: tl.constexpr, HAS_LUT: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MAP_MAX: tl.constexpr,
                      PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, ZERO_SPAN: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_SEGMENTS: tl.constexpr, HAS_ALIBI_OFFSETS: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_hk = i_h // G
    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < Sq, o_d < D
    o_pos = o_m + offset
    o_apos = alibi_positions(AlibiOffsets, o_m, m_m, o_pos, HAS_ALIBI_OFFSETS)
    b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
    b_l2 = lse2(tl.load(Lse + i_bh.to(tl.int64) * Sq + o_m, mask=m_m, other=float("-inf")))  # no key: P = 0
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    p_row = Part + (i_bh.to(tl.int64) * NQ_PART + i_m) * NK_MAP
    lo, hi, lo_last_row, hi_first_row = key_range(m0, Sq, Sk, offset, win_left, win_right, BLOCK_M, HAS_LEFT,
                                                   HAS_RIGHT)
    b_seg_lo, b_seg_hi, seg_lo, seg_hi, seg_inner_lo, seg_inner_hi = segment_bounds(
        KeyBounds + i_b * kb_sb, o_m, m_m, m0, tl.minimum(m0 + BLOCK_M, Sq) - 1, HAS_SEGMENTS)
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, seg_lo)
        hi = tl.minimum(hi, seg_hi)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + i_b * stride_slopes_b + i_h) * C_LOG2E
    p_bias = Bias + i_b * bias_sb + i_h * bias_sh
    value = 0.0
    current = -1
    count, p_idx, first = lut_walk(KvNum, KvIdx, i_b, i_h, m0 // LUT_BQ, lut_nb, lut_nh, lut_ib, lut_ih, lut_ir, lo,
                                    hi, HAS_LUT, LUT_BK, BLOCK_N)
    for t in range(0, count):
        n0 = lut_tile(t, p_idx, first, HAS_LUT, LUT_BK, BLOCK_N)
        if (n0 < hi) & (n0 + BLOCK_N > lo):
            v = _map_tile(b_q, b_l2, p_k, n0, o_pos, o_apos, o_d, m_d, Sk, stride_ks, qk_scale, win_left, win_right,
                          lo_last_row, hi_first_row, b_seg_lo, b_seg_hi, seg_inner_lo, seg_inner_hi, cap2, slope2,
                          p_bias, o_m, m_m, bias_sq, BLOCK_N, HAS_LEFT, HAS_RIGHT, MAP_MAX, PRECISION, DOT_DTYPE,
                          HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, HAS_SEGMENTS)
            value, current = _map_step(value, current, p_row, n0, v, MAP_BK, MAP_MAX, ZERO_SPAN)
    if current >= 0:
        tl.store(p_row + current, value)
    _store_zeros(p_row, current + 1, NK_MAP, ZERO_SPAN)


def launch_block_map(q, k, lse, counts, indices, lut_strides, meta: dict, map_rows: int, map_cols: int,
                     map_max: bool, softmax_scale: float, window_left: int, window_right: int,
                     score_mods: tuple, bias: tuple, segments: tuple, alibi_offsets: torch.Tensor) -> torch.Tensor:
    """Partial block map ``(B, H, ceil(Sq/map_rows), ceil(Sk/map_cols))`` float32 of one forward call,
    from its ``lse`` (sink-inclusive); ``meta`` is the forward's (head dim, LUT, predicates, precision,
    score modifiers) and ``score_mods`` its ``(cap2, slopes, stride_slopes_b)``, ``bias`` its
    ``(Bias, (sb, sh, sq))``, ``segments`` its ``(KeyBounds, stride_b)``, ``alibi_offsets`` its per-query ALiBi
    offsets (or the dummy; ``meta["HAS_ALIBI_OFFSETS"]`` tells)."""
    cap2, slopes, stride_slopes_b = score_mods
    bias_t, bias_strides = bias
    key_bounds, kb_sb = segments
    B, Sq, H, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    nq, nk = triton.cdiv(Sq, map_rows), triton.cdiv(Sk, map_cols)
    partial = torch.empty((B, H, nq, nk), dtype=torch.float32, device=q.device)
    # A tile must sit inside one map block and one LUT block; dot operands need >= 16.
    # (at head dim 512, 16-key tiles in one stage: the q tile of map_rows rows is the larger operand there)
    wide = meta["BLOCK_D"] >= 512
    block_n = min(16 if wide else 64, map_cols, meta["LUT_BK"] if meta["HAS_LUT"] else 64)
    _block_map_kernel[(nq, B * H)](
        q, k, lse, partial, counts, indices, slopes, bias_t, key_bounds, alibi_offsets, q.stride(0), q.stride(1),
        q.stride(2), k.stride(0), k.stride(1), k.stride(2), *lut_strides, Sq, Sk, H, H // Hkv, nq, nk,
        softmax_scale * LOG2E, Sk - Sq, window_left, window_right, cap2, stride_slopes_b, *bias_strides, kb_sb, **meta,
        BLOCK_M=map_rows, BLOCK_N=block_n, MAP_BK=map_cols, MAP_MAX=map_max, ZERO_SPAN=_ZERO_SPAN,
        **({"num_stages": 1} if wide else {}))
    return partial
