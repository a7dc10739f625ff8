"""The decode operators: one argument list for the C++ / CUDA operator (``decode_attn_fwd``, with the
fused block map) and the Triton twin (``decode_attn_fwd_triton``, without), their fakes, and the
function the dispatcher calls.

    fwd(q, k_cache, v_cache, cache_seqlens, block_keep?, block_q, block_k, softmax_scale, window_left,
        num_splits, map_cols=0, map_max=False) -> (out, lse, block map per query row or empty)

Split-KV decoding: q ``(B, Sq_new, H, D)`` against caches ``(B, S_max, Hkv, D)`` holding ``cache_seqlens
(B,)`` valid keys each; causal within the new tokens, aligned to each sequence's end; ``window_left``
(-1: none); ``block_keep``: optional uint8 ``(Bm, Hm, Nq, Nk)`` kept key blocks; ``num_splits`` 0 =
automatic; ``cache_leftpad (B,)``: optional first key of each sequence. Forward only. With ``map_cols >
0`` the third output is the block map per query row, ``(B, H, Sq_new, ceil(S_max / map_cols))`` in lse's
dtype: sums (``map_max``: maxima) of the probabilities over ``map_cols`` keys, fused into the forward
(the C++ kernel; CUDA refuses it and the map is a Python pass there). """

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from attnops.core import block_map as _map
from attnops.core.library import Arg, OpDef, lse_dtype, register_forward_only
from attnops.core.masks import BlockMask
from attnops.ops.decode.kv_cache import gather_pages
from attnops.ops.decode.map import decode_block_map

_ARGS = [Arg("q", "Tensor"), Arg("k_cache", "Tensor"), Arg("v_cache", "Tensor"), Arg("cache_seqlens", "Tensor"),
         Arg("block_keep", "Tensor?"), Arg("block_q", "int"), Arg("block_k", "int"), Arg("softmax_scale", "float"),
         Arg("window_left", "int"), Arg("num_splits", "int")]
# softcap (0: off) and ALiBi slopes (B|1, H), as in the softmax core; sinks are folded into (out, lse) after
# the kernel (fold_sinks), the same for every backend.
_SCORE_MODS = [Arg("softcap", "float", "0.0"), Arg("alibi_slopes", "Tensor?", "None")]
# block_table: a paged cache's (B, max_pages) int32 page indices (k, v then (num_pages, page, Hkv, D)); the C++ and
# Triton kernels read pages in place, the CUDA one refuses them
_PAGES = [Arg("block_table", "Tensor?", "None")]
# cache_leftpad: (B,) int, flash_attn's: sequence b's keys are [cache_leftpad[b], cache_seqlens[b]) (left padding in
# the cache); positions (causal alignment, windows, ALiBi) stay those of the cache. The CUDA kernel refuses it.
_LEFTPAD = [Arg("cache_leftpad", "Tensor?", "None")]
FWD = OpDef("decode_attn_fwd", _ARGS + [Arg("map_cols", "int", "0"), Arg("map_max", "bool", "False")] + _SCORE_MODS
            + _PAGES + _LEFTPAD, "(Tensor, Tensor, Tensor)")
FWD_TRITON = OpDef("decode_attn_fwd_triton", _ARGS + _SCORE_MODS + _PAGES + _LEFTPAD, "(Tensor, Tensor)")


def fwd_fake(q, k_cache, map_cols, block_table=None, **_):
    B, Sq, H, _ = q.shape
    dtype = lse_dtype(q.dtype)
    S_max = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    block_map = q.new_empty((B, H, Sq, -(-S_max // map_cols)) if map_cols > 0 else (0,), dtype=dtype)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=dtype), block_map


def triton_fwd_fake(q, **_):
    B, Sq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=lse_dtype(q.dtype))


def block_keep(block_mask: Optional[BlockMask]) -> Tuple[Optional[torch.Tensor], int, int]:
    """Decode kernels read a mask as a dense uint8 (B, H, Nq, Nk) bitmap of kept key blocks: with one
    or two query blocks it is small, and a per-tile bitmap lookup beats a LUT search."""
    if block_mask is None:
        return None, 0, 0
    return block_mask.to_dense().to(torch.uint8), *block_mask.block_size


def backend(fwd: OpDef, fwd_op: Optional[Callable] = None, fused_map: bool = False, paged: bool = False,
            name: str = "") -> Callable:
    """The dispatcher-facing decode function of a backend whose operator is ``fwd`` (``fwd_op``: its
    callable): (out, lse), or (out, lse, block map) when ``block_map`` asks for one: fused into the
    forward where the operator computes it (``fused_map``: the C++ kernel), else a second pass from
    the lse (:func:`attnops.ops.decode.map.decode_block_map`). ``paged``: the operator reads a paged cache
    (``block_table``) in place; other backends refuse one, by ``name``."""

    def decode_attention(q, k_cache, v_cache, cache_seqlens, block_mask, *, window_size, softmax_scale,
                         num_splits=0, block_map: Optional[_map.MapRequest] = None, softcap: float = 0.0,
                         alibi_slopes: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                         block_table: Optional[torch.Tensor] = None, cache_leftpad: Optional[torch.Tensor] = None):
        keep, block_q, block_k = block_keep(block_mask)
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_keep=keep,
                    block_q=block_q, block_k=block_k, softmax_scale=float(softmax_scale), window_left=window_size[0],
                    num_splits=int(num_splits), softcap=float(softcap), alibi_slopes=alibi_slopes)
        if block_table is not None:
            if not paged:
                raise NotImplementedError(f"decode_attention: the {name} decode kernel reads contiguous caches; a "
                                          "paged cache (block_table) runs on the C++ and Triton kernels (the "
                                          "default backends) and the PyTorch fallback")
            args["block_table"] = block_table
        if cache_leftpad is not None:
            args["cache_leftpad"] = cache_leftpad
        if block_map is None:
            res = fwd.call(fwd_op, **args)
            return fold_sinks(res[0], res[1], sinks)[:2]
        if fused_map:
            out, lse, rows = fwd.call(fwd_op, **args, map_cols=block_map.block_k, map_max=block_map.reduce == "max")
            out, lse, rows = fold_sinks(out, lse, sinks, rows)
            return out, lse, _map.finish(rows, lse, 1, block_map)
        out, lse = fold_sinks(*fwd.call(fwd_op, **args)[:2], sinks)[:2]
        if block_table is not None:  # the map's pass reads keys by position: the pages gathered (a copy, per call)
            k_cache = gather_pages(k_cache, block_table)
        return out, lse, decode_block_map(q, k_cache, cache_seqlens, lse, block_mask, window_size[0], block_map,
                                          float(softmax_scale), softcap=softcap, alibi_slopes=alibi_slopes,
                                          cache_leftpad=cache_leftpad)

    return decode_attention


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: Optional[torch.Tensor],
               rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Sinks ``(H,)`` (or one per row, ``(B, H, Sq)``: the transformers adapter's per-query sinks) joined to a
    finished softmax ``out (B, Sq, H, D)``, ``lse (B, H, Sq)``: ``lse' = logaddexp(lse, sink)``, the output (and the
    per-row block map ``rows (B, H, Sq, Nk)``) scaled by ``exp(lse - lse')``; a row that saw no key keeps
    out 0 and gets lse = the sink. Exact, O(B * H * Sq * D): decoding reads the whole cache per step, this
    is a rounding error of that (and one code path for every backend). Autograd ops: gradients reach the sinks
    and, through the lse, the kernels' inputs."""
    if sinks is None:
        return out, lse, rows
    sink = sinks.to(lse.dtype)
    sink = sink.view(1, -1, 1) if sink.dim() == 1 else sink
    new_lse = torch.logaddexp(lse, sink)
    factor = torch.exp(torch.where(torch.isneginf(lse), float("-inf"), lse - new_lse))  # (B, H, Sq)
    out = (out.to(factor.dtype) * factor.transpose(1, 2).unsqueeze(-1)).to(out.dtype)
    if rows is not None:
        rows = rows * factor.unsqueeze(-1).to(rows.dtype)
    return out, new_lse, rows


FWD.define()
FWD.register_fake(fwd_fake)
register_forward_only(FWD, "decode_attention")
