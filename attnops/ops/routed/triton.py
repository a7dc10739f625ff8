"""MoBA router in Triton: pooled keys, tile gates, top-k and the block LUT, in two kernels.

The same contract as the C++ router (csrc/cpu/kernels/moba_route.cpp, oracle
``attnops.ops.routed.reference.moba_route``): per query tile of ``route_block`` rows, the tile's own
MoBA block plus the ``topk - 1`` highest gates ``mean(q[tile]) . mean(k[block])`` among the other
blocks (causal: earlier ones), expanded to the LUT's key sub-blocks, ascending.

- ``_pool_keys_kernel``, one program per (MoBA block, b * kv head): the block's mean key (float32).
- ``_route_kernel``, one program per (query tile, b * h): all gates of the tile in registers
  (``NB_POW2`` lanes), ``topk - 1`` rounds of argmax (ties to the lower index: a max, then a min over
  the indices that reach it), then the chosen blocks' sub-block ranges written at their prefix-sum
  slots, so the row comes out ascending without a sort.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnops.core import dispatch
from attnops.core.triton_common import dense_last_dim
from attnops.ops.routed import library as lib

# Gates live in one register vector per program; beyond this many MoBA blocks (4M tokens at
# block_size 512) the router would need a two-level selection.
MAX_BLOCKS = 8192


@triton.jit
def _pool_keys_kernel(K, KMean, S, NB, Hkv, D, block_size, stride_kb, stride_ks, stride_kh,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    i_j, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bh // Hkv).to(tl.int64), i_bh % Hkv
    o_d = tl.arange(0, BLOCK_D)
    lo = i_j * block_size
    hi = tl.minimum(lo + block_size, S)
    b_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_k = K + i_b * stride_kb + i_hk * stride_kh
    for r0 in range(lo, hi, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        b_k = tl.load(p_k + o_r[:, None] * stride_ks + o_d[None, :], mask=(o_r[:, None] < hi) & (o_d[None, :] < D),
                      other=0.0)
        b_sum += tl.sum(b_k.to(tl.float32), axis=0)
    tl.store(KMean + (i_bh * NB + i_j) * D + o_d, b_sum / (hi - lo).to(tl.float32), mask=o_d < D)


@triton.jit
def _route_kernel(Q, KMean, Counts, Indices, S, H, G, Hkv, NB, D, block_size, sub, num_tiles, width, rounds,
                  stride_qb, stride_qs, stride_qh,
                  CAUSAL: tl.constexpr, ROUTE: tl.constexpr, NB_POW2: tl.constexpr, D_CHUNK: tl.constexpr,
                  PAD: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    o_j = tl.arange(0, NB_POW2)
    o_r = i_t * ROUTE + tl.arange(0, ROUTE)
    m_r = o_r < S
    n_rows = (tl.minimum(i_t * ROUTE + ROUTE, S) - i_t * ROUTE).to(tl.float32)
    p_q = Q + i_b * stride_qb + i_h * stride_qh
    p_km = KMean + (i_b * Hkv + i_h // G) * NB * D

    # gates of the tile's mean query against every pooled block, D_CHUNK channels at a time
    b_g = tl.zeros([NB_POW2], dtype=tl.float32)
    for d0 in range(0, D, D_CHUNK):
        o_d = d0 + tl.arange(0, D_CHUNK)
        b_q = tl.load(p_q + o_r[:, None] * stride_qs + o_d[None, :], mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
        b_qm = tl.sum(b_q.to(tl.float32), axis=0) / n_rows
        b_km = tl.load(p_km + o_j[:, None] * D + o_d[None, :], mask=(o_j[:, None] < NB) & (o_d[None, :] < D),
                       other=0.0)
        b_g += tl.sum(b_km * b_qm[None, :], axis=1)
    b_g = tl.where(b_g != b_g, float("inf"), b_g)  # NaN ranks highest, as in torch.topk

    own = (i_t * ROUTE) // block_size
    if CAUSAL:
        m_cand = o_j < own
    else:
        m_cand = (o_j < NB) & (o_j != own)
    m_sel = o_j == own
    for _ in range(rounds):
        m_avail = m_cand & (~m_sel)
        best = tl.max(tl.where(m_avail, b_g, float("-inf")), axis=0)
        pick = tl.min(tl.where(m_avail & (b_g == best), o_j, NB_POW2), axis=0)
        m_sel = m_sel | (o_j == pick)

    # chosen block j covers LUT sub-blocks [j * sub, last]; its slots start at the prefix sum
    first = o_j * sub
    last = tl.minimum(first + sub, num_tiles) - 1
    if CAUSAL:
        last = tl.where(o_j == own, tl.minimum(last, i_t), last)  # the own block ends at the diagonal
    n_sub = tl.where(m_sel, last - first + 1, 0)
    start = tl.cumsum(n_sub, axis=0) - n_sub
    count = tl.sum(n_sub, axis=0)
    p_row = Indices + (i_bh * num_tiles + i_t) * width
    for r in range(0, sub):
        tl.store(p_row + start + r, (first + r).to(tl.int32), mask=m_sel & (r < n_sub))
    for c0 in range(0, width, PAD):
        o_c = c0 + tl.arange(0, PAD)
        tl.store(p_row + o_c, tl.zeros([PAD], dtype=tl.int32), mask=(o_c >= count) & (o_c < width))
    tl.store(Counts + i_bh * num_tiles + i_t, count.to(tl.int32))


def _route(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, causal: bool, route_block: int):
    op = lib.FWD_TRITON.name
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise RuntimeError(f"{op}: q (B, S, H, D) and k (B, S, Hkv, D) do not fit: {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise RuntimeError(f"{op}: num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]}) >= 1")
    if not q.is_floating_point() or q.dtype != k.dtype or q.device != k.device:
        raise RuntimeError(f"{op}: q and k must share a floating dtype and a device, got {q.dtype}, {k.dtype}")
    if route_block < 1 or block_size < 1 or block_size % route_block or topk < 1:
        raise RuntimeError(f"{op}: block_size must be a positive multiple of route_block, topk >= 1")
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    num_tiles, nb = -(-S // route_block), -(-S // block_size)
    if nb > MAX_BLOCKS:
        raise ValueError(f"MoBA routing in Triton handles at most {MAX_BLOCKS} blocks, got {nb}; use a larger block_size")
    width = lib.moba_lut_width(S, block_size, topk, route_block)
    counts = torch.empty((B, H, num_tiles), dtype=torch.int32, device=q.device)
    indices = torch.empty((B, H, num_tiles, width), dtype=torch.int32, device=q.device)
    if num_tiles == 0:
        return counts, indices
    q, k = dense_last_dim(q), dense_last_dim(k)
    block_d = triton.next_power_of_2(D)
    kmean = torch.empty((B, Hkv, nb, D), dtype=torch.float32, device=q.device)
    _pool_keys_kernel[(nb, B * Hkv)](k, kmean, S, nb, Hkv, D, block_size, k.stride(0), k.stride(1), k.stride(2),
                                     BLOCK_R=32, BLOCK_D=block_d)
    nb_pow2 = max(2, triton.next_power_of_2(nb))
    d_chunk = max(2, min(block_d, 4096 // nb_pow2))
    _route_kernel[(num_tiles, B * H)](
        q, kmean, counts, indices, S, H, H // Hkv, Hkv, nb, D, block_size, block_size // route_block, num_tiles,
        width, min(topk - 1, nb), q.stride(0), q.stride(1), q.stride(2),
        CAUSAL=bool(causal), ROUTE=route_block, NB_POW2=nb_pow2, D_CHUNK=d_chunk, PAD=64)
    return counts, indices


moba_route_triton = lib.FWD_TRITON.custom_op(_route)
lib.FWD_TRITON.register_fake(lib.route_fake)
dispatch.register("moba_route", "triton", lib.backend(lib.FWD_TRITON, moba_route_triton))
