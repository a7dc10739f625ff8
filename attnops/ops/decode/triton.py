"""Split-KV ("flash-decoding") attention in Triton: a few new queries against a KV cache.

Split kernel, one program per (split of the cache length, b * kv head, chunk of the group's query
rows): the query rows of all query heads of a kv group (rows = group * Sq_new) form the M side of
one tl.dot, so each K/V tile is loaded once per group; it writes a partial output and lse per row.
Combine kernel, one program per (b, h, new token): merges the splits by lse. Forward only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnops.core import dispatch
from attnops.core import op_checks as _args
from attnops.core.library import register_forward_only
from attnops.core.triton_common import (C_LOG2E, LOG2E, dot_kept, modify_scores, row_results, softmax_rescale,
                                        dense_last_dim, dot_dtype, precision, refuse_float64, score_mod_args)
from attnops.core.triton_common import num_splits as auto_splits
from attnops.ops.decode import library as lib


@triton.jit
def _decode_split_kernel(Q, K, V, Lens, Starts, Keep, OPart, LPart, Slopes, Pages,
                         stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                         stride_vh, keep_sb, keep_sh, keep_sq,
                         Sq, Smax, G, Hkv, qk_scale, win_left, chunk, n_splits, cap2, stride_slopes_b, max_pages,
                         page_size,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                         KEEP_BQ: tl.constexpr, KEEP_BK: tl.constexpr, HAS_KEEP: tl.constexpr,
                         HAS_LEFT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr,
                         HAS_START: tl.constexpr):
    i_split, i_bhk, i_rc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # int64 batch / head offsets and key positions: a 128K MHA cache at B >= 5 passes 2^31 elements
    i_b, i_hk = (i_bhk // Hkv).to(tl.int64), (i_bhk % Hkv).to(tl.int64)
    rows = G * Sq
    o_r = i_rc * BLOCK_R + tl.arange(0, BLOCK_R)  # row r = g * Sq + i
    m_r = o_r < rows
    o_g, o_i = o_r // Sq, o_r % Sq
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_q = tl.load(Q + i_b * stride_qb + o_i[:, None] * stride_qs + o_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
    seqlen = tl.minimum(tl.maximum(tl.load(Lens + i_b), 0), Smax)
    o_pos = seqlen - Sq + o_i  # each new token's position in the cache
    s1 = tl.minimum((i_split + 1) * chunk, seqlen)
    s0 = i_split * chunk
    start = seqlen * 0
    if HAS_START:  # a left-padded sequence (cache_leftpad): its tiles before the first key are skipped whole
        start = tl.minimum(tl.maximum(tl.load(Starts + i_b), 0), seqlen)
        s0 = tl.maximum(s0, start // BLOCK_N * BLOCK_N)  # tile-aligned: a tile stays inside one mask block
    if PAGED:  # pages: key n of sequence b is row n % page_size of page Pages[b, n // page_size]
        p_k = K + i_hk * stride_kh
        p_v = V + i_hk * stride_vh
    else:
        p_k = K + i_b * stride_kb + i_hk * stride_kh
        p_v = V + i_b * stride_vb + i_hk * stride_vh
    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    b_slope2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_ALIBI:  # rows of one program belong to different query heads
        b_slope2 = tl.load(Slopes + i_b * stride_slopes_b + o_h, mask=m_r, other=0.0) * C_LOG2E
    for n0 in range(s0, s1, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < s1
        if PAGED:
            o_page = tl.load(Pages + i_b * max_pages + o_n // page_size, mask=m_n, other=0).to(tl.int64)
            o_kr, o_vr = o_page * stride_kb + (o_n % page_size) * stride_ks, o_page * stride_vb + (o_n % page_size) * \
                stride_vs
        else:
            o_kr, o_vr = o_n * stride_ks, o_n * stride_vs
        b_kt = tl.load(p_k + o_kr[None, :] + o_d[:, None], mask=m_n[None, :] & m_d[:, None], other=0.0).to(DOT_DTYPE)
        b_s = tl.dot(b_q, b_kt, input_precision=PRECISION) * qk_scale
        b_s, _ = modify_scores(b_s, o_pos[:, None], o_n[None, :], cap2, b_slope2[:, None], HAS_SOFTCAP, HAS_ALIBI)
        keep = m_r[:, None] & m_n[None, :] & (o_n[None, :] <= o_pos[:, None])
        if HAS_LEFT:
            keep = keep & (o_n[None, :] >= o_pos[:, None] - win_left)
        if HAS_START:
            keep = keep & (o_n[None, :] >= start)
        if HAS_KEEP:  # the tile lies inside one mask key block
            b_keep = tl.load(Keep + i_b * keep_sb + o_h * keep_sh + (o_i // KEEP_BQ) * keep_sq + n0 // KEEP_BK,
                             mask=m_r, other=0)
            keep = keep & (b_keep[:, None] != 0)
        b_s = tl.where(keep, b_s, float("-inf"))
        b_m_new, b_m_use, b_alpha = softmax_rescale(b_m, tl.max(b_s, 1))
        b_p = tl.math.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(p_v + o_vr[:, None] + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0).to(DOT_DTYPE)
        # rows of one tile see different keys: NaN/Inf values must reach only the rows that attend them
        b_acc = b_acc * b_alpha[:, None] + dot_kept(b_p, b_v, keep, PRECISION, DOT_DTYPE)
        b_m = b_m_new
    b_inv, b_lse = row_results(b_m, b_l)
    b_o = b_acc * b_inv[:, None]
    part = i_bhk.to(tl.int64) * n_splits + i_split
    tl.store(OPart + (part * rows + o_r[:, None]) * D + o_d[None, :], b_o, mask=m_r[:, None] & m_d[None, :])
    tl.store(LPart + part * rows + o_r, b_lse, mask=m_r)


@triton.jit
def _decode_combine_kernel(OPart, LPart, Out, Lse, stride_ob, stride_os, stride_oh, Sq, H, G, n_splits,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    i_x = tl.program_id(0)  # (b, h, i)
    i_b, i_h, i_i = (i_x // (H * Sq)).to(tl.int64), (i_x // Sq) % H, i_x % Sq
    rows = G * Sq
    r = (i_h % G) * Sq + i_i
    base = (i_b * (H // G) + i_h // G) * n_splits
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < n_splits
    b_lse = tl.load(LPart + (base + o_s) * rows + r, mask=m_s, other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_out = Out + i_b * stride_ob + i_i * stride_os + i_h * stride_oh + o_d
    if b_max == float("-inf"):  # no split saw a key
        tl.store(p_out, tl.zeros([BLOCK_D], dtype=tl.float32).to(Out.dtype.element_ty), mask=m_d)
        tl.store(Lse + (i_b * H + i_h) * Sq + i_i, float("-inf"))
    else:
        b_w = tl.math.exp(b_lse - b_max)
        b_o = tl.load(OPart + ((base + o_s[:, None]) * rows + r) * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :],
                      other=0.0)
        total = tl.sum(b_w, 0)
        b_out = tl.sum(b_o * b_w[:, None], 0) / total
        tl.store(p_out, b_out.to(Out.dtype.element_ty), mask=m_d)
        tl.store(Lse + (i_b * H + i_h) * Sq + i_i, b_max + tl.math.log(total))


_BLOCK_N = 64


def _decode(q, k_cache, v_cache, cache_seqlens, block_keep, block_q, block_k, softmax_scale, window_left,
            num_splits, softcap=0.0, alibi_slopes=None, block_table=None, cache_leftpad=None):
    op = lib.FWD_TRITON.name
    Smax = _args.check_decode_args(op, q, k_cache, v_cache, block_keep, block_q, block_k, softmax_scale, window_left,
                                   num_splits, block_table)
    _args.check_score_mod_args(op, q, softcap, alibi_slopes, None)
    lens = _args.checked_lengths(op, "cache_seqlens", cache_seqlens, q.shape[0], Smax).contiguous()
    starts = None if cache_leftpad is None else _args.checked_lengths(op, "cache_leftpad", cache_leftpad, q.shape[0],
                                                                      Smax).contiguous()
    paged = block_table is not None
    if paged:  # an index out of range would read past the page pool
        block_table = block_table.contiguous()
        _args.check_pages_in_use(op, block_table, lens, k_cache.shape[1], k_cache.shape[0])
    window_left = min(window_left, Smax)  # wider than the cache: unbounded
    refuse_float64(q)
    q, k_cache, v_cache = (dense_last_dim(t) for t in (q, k_cache, v_cache))
    B, Sq, H, D = q.shape
    Hkv = k_cache.shape[2]
    G, rows = H // Hkv, (H // Hkv) * Sq
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(D))
    # head dim 512: 32-row tiles and one stage keep q, the K and V tiles and the accumulator within shared memory
    wide = block_d >= 512
    block_r = max(16, min(32 if wide else 64, triton.next_power_of_2(rows)))
    row_chunks = triton.cdiv(rows, block_r)
    has_keep = block_keep is not None
    block_n = _BLOCK_N // 2 if wide else _BLOCK_N
    block_n = min(block_n, block_k) if has_keep else block_n  # a tile never straddles two mask blocks
    splits = num_splits or auto_splits(B * Hkv * row_chunks, Smax, q.device)
    splits = max(1, min(splits, triton.cdiv(max(Smax, 1), block_n)))
    chunk = triton.cdiv(triton.cdiv(Smax, splits), block_n) * block_n
    opart = torch.empty((B * Hkv * splits, rows, D), dtype=torch.float32, device=q.device)
    lpart = torch.empty((B * Hkv * splits, rows), dtype=torch.float32, device=q.device)
    if has_keep:
        keep = block_keep.to(torch.uint8).contiguous()
        keep_strides = (keep.stride(0) if keep.shape[0] > 1 else 0, keep.stride(1) if keep.shape[1] > 1 else 0,
                        keep.stride(2))
    else:
        keep, keep_strides = lens, (0, 0, 0)
    (cap2, slopes, stride_slopes_b), flags = score_mod_args(q, softcap, alibi_slopes)
    _decode_split_kernel[(splits, B * Hkv, row_chunks)](
        q, k_cache, v_cache, lens, lens if starts is None else starts, keep, opart, lpart, slopes,
        block_table if paged else lens, q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *keep_strides, Sq, Smax, G, Hkv,
        softmax_scale * LOG2E, window_left, chunk, splits, cap2, stride_slopes_b, block_table.shape[1] if paged else 0,
        k_cache.shape[1],
        D=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n, KEEP_BQ=block_q if has_keep else 1,
        KEEP_BK=block_k if has_keep else 1, HAS_KEEP=has_keep, HAS_LEFT=window_left >= 0,
        PRECISION=precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype), PAGED=paged, HAS_START=starts is not None,
        **flags,
        **({"num_stages": 1} if wide else {}))
    _decode_combine_kernel[(B * H * Sq,)](
        opart, lpart, out, lse, out.stride(0), out.stride(1), out.stride(2), Sq, H, G, splits,
        D=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out, lse


decode_attn_fwd_triton = lib.FWD_TRITON.custom_op(_decode)
lib.FWD_TRITON.register_fake(lib.triton_fwd_fake)
register_forward_only(lib.FWD_TRITON, "decode_attention")
dispatch.register("decode_attention", "triton", lib.backend(lib.FWD_TRITON, decode_attn_fwd_triton, paged=True))
