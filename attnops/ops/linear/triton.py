"""Linear attention in Triton: the chunkwise-parallel form (forward and backward) and the recurrent
form (decoding), after flash-linear-attention's chunk_h / chunk_o split.

Per query head, with gamma the inclusive cumulative log-gate inside a chunk of C rows (computed once
per chunk by the launcher, in float64, rounded to float32) and h_n the state entering chunk n:

- forward, state kernel, one program per (value block, key block, b * h): walks the chunks in
  order, stores h_n, then ``h = e^gamma_last * h + (k * e^(gamma_last - gamma))^T v``;
- forward, output kernel, one program per (value block, chunk, b * h):
  ``o = scale * ((q * e^gamma) h_n + (mask(q k^T) * D) v)``, D the intra-chunk decay;
- backward, state-gradient kernel (the reverse walk): ``lam_n = e^gamma_last * lam_{n+1} +
  scale * (q * e^gamma)^T do``, storing the gradient of each chunk's outgoing state;
- backward, per chunk: dq, dk, dv from h_n, lam_{n+1} and the intra-chunk products, dk/dv per
  query head (the launcher sums them over the group: deterministic, no atomics);
- the log-gates' gradient needs no kernel: ``dGamma_t = q_t * dq_t - k_t * dk_t`` (the cumulative
  gate enters the query side with + and the key side with -), plus ``sum_v(dS_final * S_final)``
  at the last step, and ``dg_t = sum_{u >= t} dGamma_u``: one reverse cumsum in float64.

Gates: none, one per head (exponents built as masked differences, never positive), or one per key
channel. A per-channel intra-chunk score does not factor into one tl.dot; with those the chunk is
16 rows and the diagonal block is summed column by column, exactly. Every exponent is <= 0.
Names follow fla: i_* program indices, o_* offsets, m_* masks, b_* blocks.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from attnops.core import dispatch
from attnops.core.triton_common import dot_dtype
from attnops.ops.linear import library as lib
from attnops.ops.linear.chunk import MIN_LOG_GATE, compute_dtype, linear_attention as _composite
from attnops.ops.linear.library import chunk_rows

RECURRENT_MAX_LEN = 16  # up to this many new tokens without gradients: the recurrent kernel


@triton.jit
def _gate_rows(Gm, GS, i_b, i_h, t0, o_t, m_t, o_k, m_k, S, H, GW, GATE: tl.constexpr):
    """gamma of the chunk's rows (``[C, 1]`` per head, ``[C, BK]`` per channel) and of its last valid
    row (a scalar per head, ``[1, BK]`` per channel), each as float32 hi + lo parts (planes ``GS``
    apart): a difference of two cumulative gates is then exact to float32 rounding of the difference,
    not of the sums (-50 after a few strong gates)."""
    p = Gm + (i_b * S * H + i_h) * GW
    last = tl.minimum(t0 + o_t.shape[0], S) - 1
    if GATE == 2:
        rows = o_t[:, None] * H * GW + o_k[None, :]
        m_rows = m_t[:, None] & m_k[None, :]
        b_g = tl.load(p + rows, mask=m_rows, other=0.0)
        b_gl = tl.load(p + GS + rows, mask=m_rows, other=0.0)
        b_last = tl.load(p + last * H * GW + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_lastl = tl.load(p + GS + last * H * GW + o_k[None, :], mask=m_k[None, :], other=0.0)
    else:
        b_g = tl.load(p + o_t[:, None] * H * GW, mask=m_t[:, None], other=0.0)
        b_gl = tl.load(p + GS + o_t[:, None] * H * GW, mask=m_t[:, None], other=0.0)
        b_last = tl.load(p + last * H * GW)
        b_lastl = tl.load(p + GS + last * H * GW)
    return b_g, b_gl, b_last, b_lastl


@triton.jit
def _decay_state(b_h, b_last, GATE: tl.constexpr):
    """The state ``[BK, BV]`` times the chunk's total decay (per key channel: one per row)."""
    # if / else, not an early return: the compiler type-checks the statements after a return too, and
    # the per-head product of a [BK, BV] state with a [1, BK] decay fails to compile when BK != BV
    if GATE == 2:
        b_h = b_h * tl.trans(tl.exp(b_last))
    else:
        b_h = b_h * tl.exp(b_last)
    return b_h


@triton.jit
def _state_block(Init, i_bh, i_k, i_v, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_INIT: tl.constexpr):
    """The ``[BK, BV]`` state block of a program: key/value offsets and masks, its offsets inside one
    ``(Dk, Dv)`` state, and its initial value (``Init`` of this b * h, else zeros)."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * DV + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        b_h = tl.load(Init + i_bh * DK * DV + p_state, mask=m_kv, other=0.0)
    return o_k, o_v, m_k, m_v, m_kv, p_state, b_h


@triton.jit
def _state_fwd_kernel(K, V, Gm, GS, H0, Hs, HT, S, N, H, G, GW,
                      C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, HAS_H0: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    o_k, o_v, m_k, m_v, m_kv, p_state, b_h = _state_block(H0, i_bh, i_k, i_v, DK, DV, BK, BV, HAS_H0)
    p_k = K + (i_b * S * Hkv + i_h // G) * DK
    p_v = V + (i_b * S * Hkv + i_h // G) * DV
    for n in range(N):
        tl.store(Hs + (i_bh * N + n) * DK * DV + p_state, b_h, mask=m_kv)
        o_t = n * C + tl.arange(0, C)
        m_t = o_t < S
        b_k = tl.load(p_k + o_t[:, None] * Hkv * DK + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(p_v + o_t[:, None] * Hkv * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if GATE != 0:
            b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
            b_k = b_k.to(tl.float32) * tl.exp((b_last - b_g) + (b_lastl - b_gl))
            b_h = _decay_state(b_h, b_last, GATE)
        b_h += tl.dot(tl.trans(b_k.to(DOT_DTYPE)), b_v.to(DOT_DTYPE))
    tl.store(HT + i_bh * DK * DV + p_state, b_h, mask=m_kv)


@triton.jit
def _channel_scores(b_q, b_k, b_g, b_gl, C: tl.constexpr):
    """``A_ij = sum_d q_id k_jd e^(g_id - g_jd)`` for ``i >= j`` (else 0), one column per step."""
    b_a = tl.zeros([C, C], dtype=tl.float32)
    o_c = tl.arange(0, C)
    for j in range(C):
        pick = (o_c == j)[:, None]
        b_kj = tl.sum(tl.where(pick, b_k, 0.0), axis=0)  # row j
        b_gj = tl.sum(tl.where(pick, b_g, 0.0), axis=0)
        b_gjl = tl.sum(tl.where(pick, b_gl, 0.0), axis=0)
        expo = tl.where((o_c >= j)[:, None], (b_g - b_gj[None, :]) + (b_gl - b_gjl[None, :]), float("-inf"))
        col = tl.sum(b_q * b_kj[None, :] * tl.exp(expo), axis=1)
        b_a = tl.where((o_c == j)[None, :], col[:, None], b_a)
    return b_a


@triton.jit
def _out_fwd_kernel(Q, K, V, Gm, GS, Hs, O, S, N, H, G, GW, scale,
                    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    GATE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    o_t = n * C + tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < S, o_k < DK, o_v < DV
    b_q = tl.load(Q + (i_b * S * H + i_h) * DK + o_t[:, None] * H * DK + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_k = tl.load(K + (i_b * S * Hkv + i_h // G) * DK + o_t[:, None] * Hkv * DK + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_v = tl.load(V + (i_b * S * Hkv + i_h // G) * DV + o_t[:, None] * Hkv * DV + o_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.0).to(DOT_DTYPE)
    b_h = tl.load(Hs + (i_bh * N + n) * DK * DV + o_k[:, None] * DV + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0.0)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    if GATE == 2:
        b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
        b_a = _channel_scores(b_q, b_k, b_g, b_gl, C)
        b_qi = b_q * tl.exp(b_g)
    else:
        b_a = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE)))
        if GATE == 1:
            b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
            b_a = b_a * tl.exp(tl.where(causal, (b_g - tl.trans(b_g)) + (b_gl - tl.trans(b_gl)), float("-inf")))
            b_qi = b_q * tl.exp(b_g)
        else:
            b_qi = b_q
    # A NaN key makes its whole column NaN (0 * NaN above the diagonal too), a NaN / inf value its row of v: neither
    # may reach the chunk's earlier rows (the recurrence never lets step j reach a query before it). The product
    # runs on v with its non-finite entries zeroed; the rows at or after the first one in a column get NaN.
    b_a = tl.where(causal, b_a, 0.0)
    bad = (b_v != b_v) | (tl.abs(b_v.to(tl.float32)) == float("inf"))
    first_bad = tl.min(tl.where(bad, tl.arange(0, C)[:, None], C), axis=0)  # [BV]: C where the column is finite
    b_intra = tl.dot(b_a.to(DOT_DTYPE), tl.where(bad, 0.0, b_v).to(DOT_DTYPE))
    b_intra = tl.where(tl.arange(0, C)[:, None] >= first_bad[None, :], float("nan"), b_intra)
    b_o = tl.dot(b_qi.to(DOT_DTYPE), b_h.to(DOT_DTYPE)) + b_intra
    tl.store(O + (i_b * S * H + i_h) * DV + o_t[:, None] * H * DV + o_v[None, :], b_o * scale,
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _state_bwd_kernel(Q, Gm, GS, DO, DHT, DHs, DH0, S, N, H, GW, scale,
                      C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, HAS_DHT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    i_v, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v, m_k, m_v, m_kv, p_state, b_dh = _state_block(DHT, i_bh, i_k, i_v, DK, DV, BK, BV, HAS_DHT)
    for n_rev in range(N):
        n = N - 1 - n_rev
        tl.store(DHs + (i_bh * N + n) * DK * DV + p_state, b_dh, mask=m_kv)  # gradient of h_{n+1}
        o_t = n * C + tl.arange(0, C)
        m_t = o_t < S
        b_q = tl.load(Q + (i_b * S * H + i_h) * DK + o_t[:, None] * H * DK + o_k[None, :],
                      mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_do = tl.load(DO + (i_b * S * H + i_h) * DV + o_t[:, None] * H * DV + o_v[None, :],
                       mask=m_t[:, None] & m_v[None, :], other=0.0)
        if GATE != 0:
            b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
            b_q = b_q * tl.exp(b_g)
            b_dh = _decay_state(b_dh, b_last, GATE)
        b_dh += tl.dot(tl.trans((b_q * scale).to(DOT_DTYPE)), b_do.to(DOT_DTYPE))
    tl.store(DH0 + i_bh * DK * DV + p_state, b_dh, mask=m_kv)


@triton.jit
def _qkv_bwd_kernel(Q, K, V, Gm, GS, Hs, DHs, DO, DQ, DK_, DV_, S, N, H, G, GW, scale,
                    C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    GATE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    o_t = n * C + tl.arange(0, C)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_t, m_k, m_v = o_t < S, o_k < DK, o_v < DV
    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    b_q = tl.load(Q + (i_b * S * H + i_h) * DK + o_t[:, None] * H * DK + o_k[None, :], mask=m_tk,
                  other=0.0).to(tl.float32)
    b_k = tl.load(K + (i_b * S * Hkv + i_h // G) * DK + o_t[:, None] * Hkv * DK + o_k[None, :], mask=m_tk,
                  other=0.0).to(tl.float32)
    b_v = tl.load(V + (i_b * S * Hkv + i_h // G) * DV + o_t[:, None] * Hkv * DV + o_v[None, :], mask=m_tv,
                  other=0.0).to(tl.float32)
    b_do = tl.load(DO + (i_b * S * H + i_h) * DV + o_t[:, None] * H * DV + o_v[None, :], mask=m_tv, other=0.0)
    p_state = (i_bh * N + n) * DK * DV + o_k[:, None] * DV + o_v[None, :]
    b_h = tl.load(Hs + p_state, mask=m_k[:, None] & m_v[None, :], other=0.0)
    b_lam = tl.load(DHs + p_state, mask=m_k[:, None] & m_v[None, :], other=0.0)
    o_c = tl.arange(0, C)
    causal = o_c[:, None] >= o_c[None, :]
    # dA_ij = scale * do_i . v_j (i >= j): the upstream gradient of every intra-chunk score
    b_da = tl.where(causal, tl.dot(b_do.to(DOT_DTYPE), tl.trans(b_v.to(DOT_DTYPE))), 0.0) * scale
    b_dq_inter = tl.dot(b_do.to(DOT_DTYPE), tl.trans(b_h.to(DOT_DTYPE))) * scale  # [C, BK]
    b_dk_inter = tl.dot(b_v.to(DOT_DTYPE), tl.trans(b_lam.to(DOT_DTYPE)))  # [C, BK]
    if GATE == 2:
        b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
        b_a = _channel_scores(b_q, b_k, b_g, b_gl, C) * scale
        b_dq = b_dq_inter * tl.exp(b_g)
        b_dk = b_dk_inter * tl.exp((b_last - b_g) + (b_lastl - b_gl))
        for j in range(C):
            pick = (o_c == j)[:, None]
            b_kj = tl.sum(tl.where(pick, b_k, 0.0), axis=0)
            b_gj = tl.sum(tl.where(pick, b_g, 0.0), axis=0)
            b_gjl = tl.sum(tl.where(pick, b_gl, 0.0), axis=0)
            b_daj = tl.sum(tl.where((o_c == j)[None, :], b_da, 0.0), axis=1)  # column j: dA_ij over i
            w = tl.exp(tl.where((o_c >= j)[:, None], (b_g - b_gj[None, :]) + (b_gl - b_gjl[None, :]),
                                float("-inf")))  # [C, BK], i >= j
            b_dq += b_daj[:, None] * b_kj[None, :] * w
            row = tl.sum(b_daj[:, None] * b_q * w, axis=0)
            b_dk = tl.where(pick, b_dk + row[None, :], b_dk)
        b_kbar = b_k * tl.exp((b_last - b_g) + (b_lastl - b_gl))
    else:
        b_a = tl.dot(b_q.to(DOT_DTYPE), tl.trans(b_k.to(DOT_DTYPE))) * scale
        if GATE == 1:
            b_g, b_gl, b_last, b_lastl = _gate_rows(Gm, GS, i_b, i_h, n * C, o_t, m_t, o_k, m_k, S, H, GW, GATE)
            b_w = tl.exp(tl.where(causal, (b_g - tl.trans(b_g)) + (b_gl - tl.trans(b_gl)), float("-inf")))
            b_a = b_a * b_w
            b_dsw = b_da * b_w
            b_dq = b_dq_inter * tl.exp(b_g) + tl.dot(b_dsw.to(DOT_DTYPE), b_k.to(DOT_DTYPE))
            b_dk = (b_dk_inter * tl.exp((b_last - b_g) + (b_lastl - b_gl))
                    + tl.dot(tl.trans(b_dsw).to(DOT_DTYPE), b_q.to(DOT_DTYPE)))
            b_kbar = b_k * tl.exp((b_last - b_g) + (b_lastl - b_gl))
        else:
            b_a = tl.where(causal, b_a, 0.0)
            b_dq = b_dq_inter + tl.dot(b_da.to(DOT_DTYPE), b_k.to(DOT_DTYPE))
            b_dk = b_dk_inter + tl.dot(tl.trans(b_da).to(DOT_DTYPE), b_q.to(DOT_DTYPE))
            b_kbar = b_k
    b_dv = tl.dot(tl.trans(b_a).to(DOT_DTYPE), b_do.to(DOT_DTYPE)) + tl.dot(b_kbar.to(DOT_DTYPE), b_lam.to(DOT_DTYPE))
    p_qk = (i_b * S * H + i_h) * DK + o_t[:, None] * H * DK + o_k[None, :]
    tl.store(DQ + p_qk, b_dq, mask=m_tk)
    tl.store(DK_ + p_qk, b_dk, mask=m_tk)
    tl.store(DV_ + (i_b * S * H + i_h) * DV + o_t[:, None] * H * DV + o_v[None, :], b_dv, mask=m_tv)


@triton.jit
def _recurrent_fwd_kernel(Q, K, V, Gm, H0, O, HT, S, H, G, GW, scale,
                          DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          GATE: tl.constexpr, HAS_H0: tl.constexpr):
    """One program per (value block, b * h): the state ``[BK, BV]`` in registers, token by token."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    Hkv = H // G
    o_k, o_v, m_k, m_v, m_kv, p_state, b_h = _state_block(H0, i_bh, 0, i_v, DK, DV, BK, BV, HAS_H0)
    for t in range(S):
        b_q = tl.load(Q + ((i_b * S + t) * H + i_h) * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(K + ((i_b * S + t) * Hkv + i_h // G) * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(V + ((i_b * S + t) * Hkv + i_h // G) * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        if GATE == 2:
            b_g = tl.load(Gm + ((i_b * S + t) * H + i_h) * GW + o_k, mask=m_k, other=0.0)
            b_h = b_h * tl.exp(b_g)[:, None]
        elif GATE == 1:
            b_h = b_h * tl.exp(tl.load(Gm + ((i_b * S + t) * H + i_h) * GW))
        b_h += b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_q[:, None] * b_h, axis=0) * scale
        tl.store(O + ((i_b * S + t) * H + i_h) * DV + o_v, b_o, mask=m_v)
    tl.store(HT + i_bh * DK * DV + p_state, b_h, mask=m_kv)


# ---------------------------------------------------------------------------------------------
# launchers (registered operators)
# ---------------------------------------------------------------------------------------------

def _meta(q: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor]) -> dict:
    return dict(DK=q.shape[-1], DV=v.shape[-1], BK=max(16, triton.next_power_of_2(q.shape[-1])),
                BV=max(16, triton.next_power_of_2(v.shape[-1])), GATE=lib.gate_kind(g), DOT_DTYPE=dot_dtype(q.dtype))


def _local_cumsum(g: Optional[torch.Tensor], C: int, like: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Inclusive cumulative log-gates inside each chunk of C steps, summed in float64 and split into
    float32 hi and lo planes ``(2, B, S, H, GW)``, and the plane stride (the kernels take
    differences of these); a dummy without gates."""
    if g is None:
        return like.new_empty(2, dtype=torch.float32), 1
    B, S, H, GW = g.shape
    pad = -S % C
    g64 = torch.nn.functional.pad(g.to(torch.float64).clamp(min=MIN_LOG_GATE), (0, 0, 0, 0, 0, pad))
    gamma = g64.view(B, (S + pad) // C, C, H, GW).cumsum(2).view(B, S + pad, H, GW)[:, :S]
    hi = gamma.float()
    return torch.stack([hi, (gamma - hi.double()).float()]), B * S * H * GW


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], h0: Optional[torch.Tensor],
         softmax_scale: float, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out ``(B, S, H, Dv)`` float32, final state ``(B, H, Dk, Dv)``, the states entering each chunk
    ``(B, H, N, Dk, Dv)`` (kept for the backward)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    meta = _meta(q, v, g)
    C = chunk_rows(S, chunk_size, meta["GATE"])
    N = triton.cdiv(S, C)
    gm, gs = _local_cumsum(g, C, q)
    GW = g.shape[-1] if g is not None else 1
    G = H // k.shape[2]
    hs = q.new_empty(B, H, N, Dk, Dv, dtype=torch.float32)
    ht = q.new_empty(B, H, Dk, Dv, dtype=torch.float32)
    out = q.new_empty(B, S, H, Dv, dtype=torch.float32)
    h0c = h0.float().contiguous() if h0 is not None else ht
    bk, bv = min(meta["BK"], 64), min(meta["BV"], 64)
    _state_fwd_kernel[(triton.cdiv(Dv, bv), triton.cdiv(Dk, bk), B * H)](
        k, v, gm, gs, h0c, hs, ht, S, N, H, G, GW, C=C, DK=Dk, DV=Dv, BK=bk, BV=bv, GATE=meta["GATE"],
        HAS_H0=h0 is not None, DOT_DTYPE=meta["DOT_DTYPE"])
    _out_fwd_kernel[(triton.cdiv(Dv, bv), N, B * H)](
        q, k, v, gm, gs, hs, out, S, N, H, G, GW, softmax_scale, C=C, DK=Dk, DV=Dv, BK=meta["BK"], BV=bv,
        GATE=meta["GATE"], DOT_DTYPE=meta["DOT_DTYPE"])
    return out, ht, hs


def _bwd(dout: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         g: Optional[torch.Tensor], final: torch.Tensor, hs: torch.Tensor, softmax_scale: float, chunk_size: int
         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (inputs' shapes, float32), dg (g's shape, float32; empty without g), dh0 ``(B, H, Dk, Dv)``."""
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.float().contiguous()
    B, S, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    meta = _meta(q, v, g)
    C = chunk_rows(S, chunk_size, meta["GATE"])
    N = hs.shape[2]
    gm, gs = _local_cumsum(g, C, q)
    GW = g.shape[-1] if g is not None else 1
    dhs = torch.empty_like(hs)
    dh0 = q.new_empty(B, H, Dk, Dv, dtype=torch.float32)
    dht = dfinal.float().contiguous() if dfinal is not None else dh0
    bk, bv = min(meta["BK"], 64), min(meta["BV"], 64)
    _state_bwd_kernel[(triton.cdiv(Dv, bv), triton.cdiv(Dk, bk), B * H)](
        q, gm, gs, dout, dht, dhs, dh0, S, N, H, GW, softmax_scale, C=C, DK=Dk, DV=Dv, BK=bk, BV=bv,
        GATE=meta["GATE"], HAS_DHT=dfinal is not None, DOT_DTYPE=meta["DOT_DTYPE"])
    dq = q.new_empty(B, S, H, Dk, dtype=torch.float32)
    dk_h = q.new_empty(B, S, H, Dk, dtype=torch.float32)  # per query head, summed over the group below
    dv_h = q.new_empty(B, S, H, Dv, dtype=torch.float32)
    _qkv_bwd_kernel[(N, B * H)](q, k, v, gm, gs, hs, dhs, dout, dq, dk_h, dv_h, S, N, H, G, GW, softmax_scale, C=C,
                                DK=Dk, DV=Dv, BK=meta["BK"], BV=meta["BV"], GATE=meta["GATE"],
                                DOT_DTYPE=meta["DOT_DTYPE"])
    dg = q.new_empty(0, dtype=torch.float32)
    if g is not None:
        k_h = k.float().repeat_interleave(G, dim=2) if G > 1 else k.float()
        d_gamma = (q.double() * dq - k_h.double() * dk_h)  # (B, S, H, Dk)
        if dfinal is not None:  # the final state carries every gate: sum_v dS_final * S_final at the last step
            d_gamma[:, -1] += (dfinal.double() * final.double()).sum(-1)
        if GW == 1:
            d_gamma = d_gamma.sum(-1, keepdim=True)
        dg = d_gamma.flip(1).cumsum(1).flip(1)
        dg = torch.where(g >= MIN_LOG_GATE, dg, 0.0).float()  # the clamp's gradient
    dk = dk_h.view(B, S, Hkv, G, Dk).sum(3) if G > 1 else dk_h
    dv = dv_h.view(B, S, Hkv, G, Dv).sum(3) if G > 1 else dv_h
    return dq, dk, dv, dg, dh0


def _recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor], h0: Optional[torch.Tensor],
               softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decoding, forward only): -> out ``(B, S, H, Dv)`` float32, final state."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    meta = _meta(q, v, g)
    gm = g.float().clamp(min=MIN_LOG_GATE).contiguous() if g is not None else q.new_empty(0, dtype=torch.float32)
    ht = q.new_empty(B, H, Dk, Dv, dtype=torch.float32)
    out = q.new_empty(B, S, H, Dv, dtype=torch.float32)
    bv = min(meta["BV"], 64)
    _recurrent_fwd_kernel[(triton.cdiv(Dv, bv), B * H)](
        q, k, v, gm, h0.float().contiguous() if h0 is not None else ht, out, ht, S, H, H // k.shape[2],
        g.shape[-1] if g is not None else 1, softmax_scale, DK=Dk, DV=Dv, BK=meta["BK"], BV=bv,
        GATE=meta["GATE"], HAS_H0=h0 is not None)
    return out, ht


linear_attn_fwd_triton = lib.FWD.custom_op(_fwd)
linear_attn_bwd_triton = lib.BWD.custom_op(_bwd)
linear_attn_recurrent_triton = lib.RECURRENT.custom_op(_recurrent)
lib.register(linear_attn_bwd_triton)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], *, feature_map: Callable[[torch.Tensor], torch.Tensor],
                     causal: bool, softmax_scale: float, chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The backend function (signature of ``reference.linear_attention``). Non-causal linear
    attention is two GEMMs (``k^T v``, then ``q S``), which the composite form already is. The
    feature map runs before the kernels (PyTorch ops: any callable)."""
    if not causal:
        return _composite(q, k, v, log_gate, initial_state, feature_map=feature_map, causal=False,
                          softmax_scale=softmax_scale, chunk_size=chunk_size)
    if q.dtype == torch.float64:
        raise TypeError("the Triton linear-attention kernels take float16, bfloat16 and float32; float64 runs on "
                        "the composite backend")
    if q.shape[1] == 0:  # nothing to attend: the state passes through
        return _composite(q, k, v, log_gate, initial_state, feature_map=feature_map, causal=True,
                          softmax_scale=softmax_scale, chunk_size=chunk_size)
    q, k = feature_map(q), feature_map(k)
    g = None if log_gate is None else log_gate.float().contiguous()
    h0 = None if initial_state is None else initial_state.float()
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, g, h0))
    if q.shape[1] <= RECURRENT_MAX_LEN and not grads:
        out, final = linear_attn_recurrent_triton(q, k, v, g, h0, softmax_scale)
    else:
        out, final, _ = linear_attn_fwd_triton(q, k, v, g, h0, softmax_scale, chunk_size)
    return out.to(compute_dtype(q.dtype)), final


dispatch.register("linear_attention", "triton", linear_attention)
