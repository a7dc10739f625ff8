"""torch.library glue shared by the backends of the block-sparse core (C++ and Triton): fake (meta)
implementations, the autograd formula (the backward is an operator of its own), and the backend
function the dispatcher calls. Both backends' operators take the same arguments:

    fwd(q, k, v, kv_num_blocks?, kv_indices?, q_num_blocks?, q_indices?, block_q, block_k,
        softmax_scale, causal, window_left, window_right, map_rows=0, map_cols=0, map_max=False)
        -> (out, lse, partial block map or an empty tensor)
    bwd(dout, dlse?, q, k, v, out, lse, <the LUT and scalars above>) -> (dq, dk, dv)

and the MoBA router ``moba_route(q, k, block_size, topk, causal, route_block) -> (kv_num_blocks,
kv_indices)`` (forward only: routing is a hard choice, no gradient flows through it).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from attnops.kernels import block_map as _map
from attnops.masks import BlockMask


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_sparse_fwd_fake(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                          softmax_scale, causal, window_left, window_right, map_rows=0, map_cols=0, map_max=False):
    B, Sq, H, _ = q.shape
    dtype = lse_dtype(q.dtype)
    partial = q.new_empty(partial_map_shape(q, k, map_rows, map_cols), dtype=dtype)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=dtype), partial


def partial_map_shape(q: torch.Tensor, k: torch.Tensor, map_rows: int, map_cols: int) -> Tuple[int, ...]:
    """The forward's third output: (B, H, ceil(Sq / map_rows), ceil(Sk / map_cols)), or (0,) without a map."""
    if map_rows <= 0:
        return (0,)
    return (q.shape[0], q.shape[2], -(-q.shape[1] // map_rows), -(-k.shape[1] // map_cols))


def block_sparse_bwd_fake(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                          block_q, block_k, softmax_scale, causal, window_left, window_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_block_sparse_autograd(fwd_name: str, bwd_op: Callable, bwd_name: str) -> None:
    """Autograd of ``fwd_name`` through ``bwd_op``; ``bwd_name`` refuses double backward."""

    def setup_context(ctx, inputs, output):
        q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices = inputs[:7]
        ctx.params = inputs[7:13]  # block_q, block_k, softmax_scale, causal, window_left, window_right
        out, lse, partial_map = output
        ctx.mark_non_differentiable(partial_map)  # a readout, like an argmax
        ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices)

    def backward(ctx, dout, dlse, dmap):
        q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices = ctx.saved_tensors
        if kv_num_blocks is not None and q_num_blocks is None:
            raise RuntimeError("attnops: the forward ran without the transposed block LUT; cannot differentiate")
        dq, dk, dv = bwd_op(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                            *ctx.params)
        return (dq, dk, dv) + (None,) * 13

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("attnops: double backward through attention is not supported")

    torch.library.register_autograd(bwd_name, no_double_backward, setup_context=lambda ctx, inputs, output: None)


def block_sparse_backend(fwd_op: Callable) -> Callable:
    """The dispatcher-facing function of a backend whose forward operator is ``fwd_op``."""

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
    ) -> Tuple[torch.Tensor, ...]:
        """(out, lse), or (out, lse, map) when ``block_map`` asks for the block attention map."""
        if block_mask is None:
            lut = (None, None, None, None)
            block_q = block_k = 0
        else:
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            transposed = (block_mask.q_num_blocks, block_mask.q_indices) if needs_grad else (None, None)
            lut = (block_mask.kv_num_blocks, block_mask.kv_indices, *transposed)
            block_q, block_k = block_mask.block_size
        args = (q, k, v, *lut, block_q, block_k, float(softmax_scale), bool(causal), window_size[0], window_size[1])
        if block_map is None:
            out, lse, _ = fwd_op(*args)
            return out, lse
        rows = _map.partial_rows(block_map, block_q)
        out, lse, partial = fwd_op(*args, rows, block_map.block_k, block_map.reduce == "max")
        return out, lse, _map.finish(partial, lse, rows, block_map)

    return block_sparse_attention


# ---- decode ---------------------------------------------------------------------------------------

def decode_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_keep, block_q, block_k, softmax_scale, window_left,
                    num_splits, map_cols=0, map_max=False):
    B, Sq, H, _ = q.shape
    dtype = lse_dtype(q.dtype)
    block_map = q.new_empty((B, H, Sq, -(-k_cache.shape[1] // map_cols)) if map_cols > 0 else (0,), dtype=dtype)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=dtype), block_map


def decode_triton_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_keep, block_q, block_k, softmax_scale,
                           window_left, num_splits):
    B, Sq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=lse_dtype(q.dtype))


def register_forward_only(op_name: str, public_name: str) -> None:
    """Backward through a forward-only operator is a clear error, not silently wrong."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"attnops.{public_name} is forward-only (inference); "
                                  "train with attnops.attention / block_sparse_attention")

    torch.library.register_autograd(op_name, backward, setup_context=lambda ctx, inputs, output: None)


def block_keep(block_mask: Optional[BlockMask]) -> Tuple[Optional[torch.Tensor], int, int]:
    """Decode kernels read a mask as a dense uint8 (B, H, Nq, Nk) bitmap of kept key blocks: with one
    or two query blocks it is small, and a per-tile bitmap lookup beats a LUT search."""
    if block_mask is None:
        return None, 0, 0
    return block_mask.to_dense().to(torch.uint8), *block_mask.block_size


def decode_backend(fwd_op: Callable, fused_map: bool = False) -> Callable:
    """The dispatcher-facing decode function of a backend whose operator is ``fwd_op``: (out, lse),
    or (out, lse, block map) when ``block_map`` asks for one: fused into the forward where the
    operator computes it (``fused_map``: the C++ kernel), else a second pass from the lse
    (:func:`attnops.kernels.block_map.decode_block_map`)."""

    def decode_attention(q, k_cache, v_cache, cache_seqlens, block_mask, *, window_size, softmax_scale,
                         num_splits=0, block_map: Optional[_map.MapRequest] = None):
        keep, block_q, block_k = block_keep(block_mask)
        args = (q, k_cache, v_cache, cache_seqlens, keep, block_q, block_k, float(softmax_scale), window_size[0],
                int(num_splits))
        if block_map is None:
            res = fwd_op(*args)
            return res[0], res[1]
        if fused_map:
            out, lse, rows = fwd_op(*args, block_map.block_k, block_map.reduce == "max")
            return out, lse, _map.finish(rows, lse, 1, block_map)
        out, lse = fwd_op(*args)[:2]
        return out, lse, _map.decode_block_map(q, k_cache, cache_seqlens, lse, block_mask, window_size[0], block_map,
                                               float(softmax_scale))

    return decode_attention


# ---- MoBA router ----------------------------------------------------------------------------------

def moba_lut_width(seq_len: int, block_size: int, topk: int, route_block: int) -> int:
    """Entries per LUT row the router writes: ``topk`` MoBA blocks of ``block_size / route_block``
    sub-blocks each, at most every sub-block, at least 1."""
    tiles, blocks = -(-seq_len // route_block), -(-seq_len // block_size)
    return max(1, min(min(topk, blocks) * (block_size // route_block), tiles))


def moba_route_fake(q, k, block_size, topk, causal, route_block):
    B, S, H, _ = q.shape
    tiles = -(-S // route_block)
    width = moba_lut_width(S, block_size, topk, route_block)
    return q.new_empty((B, H, tiles), dtype=torch.int32), q.new_empty((B, H, tiles, width), dtype=torch.int32)


def moba_route_backend(route_op: Callable) -> Callable:
    """The dispatcher-facing router of a backend whose operator is ``route_op``."""

    def moba_route(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool,
                   route_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return route_op(q, k, int(block_size), int(topk), bool(causal), int(route_block))

    return moba_route


# ---- low-rank keys (Loki) ---------------------------------------------------------------------------

def lowrank_fwd_fake(q, k, v, q_score, k_score, seqlens, topk, local, causal, softmax_scale, return_indices=False):
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    indices = q.new_empty((B, H, Sq, min(Sk, topk)) if return_indices else (0,), dtype=torch.int32)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=lse_dtype(q.dtype)), indices


def lowrank_backend(fwd_op: Callable) -> Callable:
    """The dispatcher-facing low-rank-key attention of a backend whose operator is ``fwd_op``:
    (out, lse), or (out, lse, block map) when ``block_map`` asks for one (computed from the keys
    the kernel chose, :func:`attnops.kernels.block_map.lowrank_block_map`)."""

    def lowrank_key_attention(q, k, v, q_score, k_score, seqlens, *, topk, local, causal, softmax_scale,
                              block_map: Optional[_map.MapRequest] = None):
        out, lse, indices = fwd_op(q, k, v, q_score, k_score, seqlens, int(topk), int(local), bool(causal),
                                   float(softmax_scale), block_map is not None)
        if block_map is None:
            return out, lse
        return out, lse, _map.lowrank_block_map(q, k, indices, lse, block_map, float(softmax_scale))

    return lowrank_key_attention
