"""Low-rank-key attention (Loki) in Triton: low-rank scores -> top-k -> exact attention on the chosen keys.

Score kernel, one program per (key tile, b * h, query tile) of a pass of queries: ``tl.dot`` of the
first R components of q and k, written as int64 *selection keys* ``(ordered score bits << 32) | j``:
one ``torch.topk`` over them then picks the largest scores with ties going to the later key (the
index is the low half), deterministically, as the reference and the C++ kernel do. The newest
``local`` keys get the largest key and keys out of view the smallest, so the top-k of every row is
the selection rule's. (Triton has no portable in-kernel top-k across Triton 3.2-3.9; torch.topk is
a radix select on the GPU and reads the (rows, Sk) keys once.)

Gather kernel, one program per (b, h, query, split of its chosen keys): loads the chosen K rows,
scores them in the full dimension, online softmax, gathers the V rows; the splits (decoding has only
B * H rows: split-KV as in flash-decoding) are merged by lse. Keys chosen beyond a row's view (rows that see
fewer than topk keys) are masked there. A pass holds at most ``_BUDGET`` selection keys, so the
memory is O(Sk) per query row, never Sq x Sk. Forward only.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from attnops.core import dispatch
from attnops.core import op_checks as _args
from attnops.core.triton_common import (LOG2E, row_results, softmax_rescale, dense_last_dim, dot_dtype, num_splits,
                                        precision, refuse_float64)
from attnops.ops.lowrank import library as lib

_BUDGET = 1 << 23  # selection keys per pass
_GATHER_N = 32  # chosen keys per gather step


@triton.jit
def _row_view(lens_b, Sq, o_i, causal: tl.constexpr, topk, local):
    """(end, cand_end) per query: keys [0, end) in view, [cand_end, end) the local ones."""
    if causal:
        end = tl.minimum(lens_b, lens_b - Sq + o_i + 1)
    else:
        end = lens_b + 0 * o_i
    end = tl.maximum(end, 0)
    cand_end = tl.where(end <= topk, end, tl.maximum(end - local, 0))
    return end, cand_end


@triton.jit
def _lowrank_score_kernel(QS, KS, Lens, Keys, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          Sq, Sk, H, G, i0, nq, topk, local,
                          R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_n, i_bh, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query of the pass
    m_m = o_m < nq
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < Sk
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_q = tl.load(QS + i_b * stride_qb + (i0 + o_m[:, None]) * stride_qs + i_h * stride_qh + o_r[None, :],
                  mask=m_m[:, None] & m_r[None, :], other=0.0).to(DOT_DTYPE)
    b_kt = tl.load(KS + i_b * stride_kb + o_n[None, :] * stride_ks + (i_h // G) * stride_kh + o_r[:, None],
                   mask=m_n[None, :] & m_r[:, None], other=0.0).to(DOT_DTYPE)
    b_s = tl.dot(b_q, b_kt, input_precision=PRECISION)
    b_s = tl.where(b_s != b_s, float("inf"), b_s)  # NaN ranks highest: it reaches the output
    # order-preserving int32 of the float: flip the magnitude bits of negatives
    bits = b_s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    lens_b = tl.minimum(tl.maximum(tl.load(Lens + i_b), 0), Sk)
    end, cand_end = _row_view(lens_b, Sq, i0 + o_m, CAUSAL, topk, local)
    j = o_n[None, :]
    highest = tl.full([BLOCK_M, BLOCK_N], 0x7FFFFFFF, tl.int32)  # a local key
    lowest = -highest - 1  # out of view
    ordered = tl.where(j < cand_end[:, None], ordered, tl.where(j < end[:, None], highest, lowest))
    b_key = (ordered.to(tl.int64) << 32) | j.to(tl.int64)
    tl.store(Keys + (i_bh * nq + o_m[:, None]).to(tl.int64) * Sk + j, b_key, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lowrank_gather_kernel(Q, K, V, Idx, Lens, OPart, LPart, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                           stride_kh, stride_vb, stride_vs, stride_vh,
                           Sq, Sk, H, G, i0, nq, topk, local, n_idx, chunk, n_splits, qk_scale,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    i_bh, i_m, i_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_q = i0 + i_m
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_q = tl.load(Q + i_b * stride_qb + i_q * stride_qs + i_h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
    lens_b = tl.minimum(tl.maximum(tl.load(Lens + i_b), 0), Sk)
    end, _ = _row_view(lens_b, Sq, i_q, CAUSAL, topk, local)
    p_k = K + i_b * stride_kb + (i_h // G) * stride_kh
    p_v = V + i_b * stride_vb + (i_h // G) * stride_vh
    p_idx = Idx + (i_bh * nq + i_m).to(tl.int64) * n_idx
    b_m = tl.full([1], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([1], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    x1 = tl.minimum(i_split * chunk + chunk, n_idx)
    for n0 in range(i_split * chunk, x1, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_j = tl.load(p_idx + o_n, mask=o_n < x1, other=0)
        m_j = (o_n < x1) & (b_j < end)
        b_k = tl.load(p_k + b_j[:, None].to(tl.int64) * stride_ks + o_d[None, :], mask=m_j[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        b_s = tl.sum(b_k * b_q[None, :], 1) * qk_scale
        b_s = tl.where(m_j, b_s, float("-inf"))
        b_m_new, b_m_use, b_alpha = softmax_rescale(b_m, tl.max(b_s, 0))
        b_p = tl.math.exp2(b_s - b_m_use)
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_v = tl.load(p_v + b_j[:, None].to(tl.int64) * stride_vs + o_d[None, :], mask=m_j[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, 0)
        b_m = b_m_new
    b_inv, b_lse = row_results(b_m, b_l)
    b_o = b_acc * b_inv
    part = (i_bh * nq + i_m) * n_splits + i_split  # partial (output, lse) of this split of the chosen keys
    tl.store(OPart + part.to(tl.int64) * D + o_d, b_o, mask=m_d)
    tl.store(LPart + part + tl.arange(0, 1), b_lse)


def _lowrank(q, k, v, q_score, k_score, seqlens, topk, local, causal, softmax_scale, return_indices):
    op = lib.FWD_TRITON.name
    _args.check_qkv_args(op, q, k, v)
    _args.check_window_args(op, -1, -1, softmax_scale)
    if (q_score.dim() != 4 or k_score.dim() != 4 or q_score.shape[:3] != q.shape[:3] or k_score.shape[:3] != k.shape[:3]
            or q_score.shape[3] != k_score.shape[3] or not 1 <= q_score.shape[3] <= q.shape[3]):
        raise RuntimeError(f"{op}: q_score (B, Sq, H, R) and k_score (B, Sk, Hkv, R) must fit q and k with 1 <= R <= D")
    if q_score.dtype != k_score.dtype or q_score.dtype not in (q.dtype, torch.bfloat16, torch.float16):
        raise RuntimeError(f"{op}: q_score and k_score must share a dtype: q's, bfloat16 or float16")
    if not (topk >= 1 and 0 <= local <= topk):
        raise RuntimeError(f"{op}: need topk >= 1 and 0 <= local <= topk, got topk={topk}, local={local}")
    if seqlens is not None:
        seqlens = _args.checked_lengths(op, "seqlens", seqlens, q.shape[0], k.shape[1])
    refuse_float64(q)
    q, k, v, q_score, k_score = (dense_last_dim(t) for t in (q, k, v, q_score, k_score))
    B, Sq, H, D = q.shape
    Sk, Hkv, R = k.shape[1], k.shape[2], q_score.shape[3]
    G = H // Hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    indices = torch.empty((B, H, Sq, min(Sk, topk)) if return_indices else (0,), dtype=torch.int32, device=q.device)
    if q.numel() == 0:
        return out, lse, indices
    topk = min(topk, max(Sk, 1))
    local = min(local, topk)
    lens = (torch.full((B,), Sk, dtype=torch.int32, device=q.device) if seqlens is None
            else seqlens.to(torch.int32).contiguous())
    n_idx = min(topk, Sk)
    pass_q = max(1, min(Sq, _BUDGET // max(1, B * H * Sk)))
    block_r = max(16, triton.next_power_of_2(R))
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n = 16, 64
    for i0 in range(0, Sq, pass_q):
        nq = min(pass_q, Sq - i0)
        if Sk == 0:
            idx = torch.zeros((B, H, nq, 0), dtype=torch.int32, device=q.device)
        else:
            keys = torch.empty((B, H, nq, Sk), dtype=torch.int64, device=q.device)
            _lowrank_score_kernel[(triton.cdiv(Sk, block_n), B * H, triton.cdiv(nq, block_m))](
                q_score, k_score, lens, keys, q_score.stride(0), q_score.stride(1), q_score.stride(2),
                k_score.stride(0), k_score.stride(1), k_score.stride(2), Sq, Sk, H, G, i0, nq, topk, local,
                R=R, BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                PRECISION=precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype))
            chosen = torch.topk(keys, n_idx, dim=-1, sorted=False).values
            idx = (chosen & 0xFFFFFFFF).to(torch.int32).contiguous()
        splits = num_splits(B * H * nq, n_idx, q.device)
        chunk = triton.cdiv(triton.cdiv(max(n_idx, 1), splits), _GATHER_N) * _GATHER_N
        opart = torch.empty((B, H, nq, splits, D), dtype=torch.float32, device=q.device)
        lpart = torch.empty((B, H, nq, splits), dtype=torch.float32, device=q.device)
        _lowrank_gather_kernel[(B * H, nq, splits)](
            q, k, v, idx, lens, opart, lpart, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            Sq, Sk, H, G, i0, nq, topk, local, n_idx, chunk, splits, softmax_scale * LOG2E,
            D=D, BLOCK_D=block_d, BLOCK_N=_GATHER_N, CAUSAL=causal)
        o, l = _combine(opart, lpart)
        out[:, i0:i0 + nq] = o.permute(0, 2, 1, 3).to(q.dtype)
        lse[:, :, i0:i0 + nq] = l
        if return_indices:  # the C++ kernel's form: ascending, -1 past the chosen keys
            pos = torch.arange(i0, i0 + nq, device=q.device).view(1, 1, nq, 1)
            seen = lens.long().clamp(0, Sk).view(B, 1, 1, 1)
            end = torch.minimum(seen, seen - Sq + pos + 1) if causal else seen
            marked = torch.where(idx < end.clamp(min=0), idx, Sk).sort(dim=-1).values
            indices[:, :, i0:i0 + nq] = torch.where(marked < Sk, marked, -1)
    return out, lse, indices


def _combine(opart: torch.Tensor, lpart: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges the splits' partial outputs ``(B, H, nq, splits, D)`` by their lse ``(B, H, nq, splits)``;
    rows no split saw a key for give zeros and -inf."""
    lse = torch.logsumexp(lpart, dim=-1)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    weight = torch.exp(lpart - safe.unsqueeze(-1))
    return (opart * weight.unsqueeze(-1)).sum(-2), lse


lowrank_attn_fwd_triton = lib.FWD_TRITON.custom_op(_lowrank)
lib.register(lib.FWD_TRITON)
dispatch.register("lowrank_key_attention", "triton", lib.backend(lib.FWD_TRITON, lowrank_attn_fwd_triton))
