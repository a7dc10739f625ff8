"""Argument checks of the operators registered in Python (the Triton kernels): the mirror of
csrc/checks.h. Users and torch.compile call ``torch.ops.attnops.*_triton`` directly, past the Python
ops' friendly checks, so each operator checks what its kernel will trust (shapes, dtypes, block
sizes, LUT and length values) and raises ``RuntimeError`` rather than read out of bounds. Values are
read from CPU tensors only (the interpreter); on a GPU a read would synchronise the stream, and the
kernels clamp LUT entries and lengths instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

MAX_HEAD_DIM = 512
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"{op}: {message}")


def check_qkv_args(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_batch: bool = True) -> None:
    """q (B, Sq, H, D), k and v (B, Sk, Hkv, D) of one floating dtype on one device, H % Hkv == 0 (``same_batch``
    False: k and v are the pages of a paged cache, their first dim counts pages)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        _fail(op, f"q, k, v must be 4-d (B, S, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        _fail(op, f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if (same_batch and q.shape[0] != k.shape[0]) or q.shape[3] != k.shape[3]:
        _fail(op, f"q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch or head dim")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        _fail(op, f"num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]}) >= 1")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        _fail(op, f"head dim {q.shape[3]} is not in [1, {MAX_HEAD_DIM}]")
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == v.dtype:
        _fail(op, f"q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        _fail(op, "q, k, v must be on one device")


def check_window_args(op: str, left: int, right: int, softmax_scale: float) -> None:
    if left < -1 or right < -1:
        _fail(op, f"window entries must be >= -1 (-1: unbounded), got ({left}, {right})")
    if not math.isfinite(float(softmax_scale)):
        _fail(op, f"softmax_scale must be finite, got {softmax_scale}")


def check_lut_args(op: str, what: str, counts: Optional[torch.Tensor], indices: Optional[torch.Tensor], B: int,
                   H: int, row_len: int, col_len: int, row_block: int, col_block: int, check_values: bool = True) -> None:
    """A compressed-row LUT (attnops.BlockMask) over ``ceil(row_len / row_block)`` rows and
    ``ceil(col_len / col_block)`` column blocks, as csrc/checks.h ``check_lut_args``."""
    if (counts is None) != (indices is None):
        _fail(op, f"{what}: counts and indices come together")
    if counts is None:
        return
    if row_block < 1 or col_block < 1:
        _fail(op, f"{what}: block sizes must be >= 1, got ({row_block}, {col_block})")
    if counts.dtype != torch.int32 or indices.dtype != torch.int32:
        _fail(op, f"{what} tensors must be int32")
    rows, cols = -(-row_len // row_block), -(-col_len // col_block)
    if counts.dim() != 3 or indices.dim() != 4 or indices.shape[:3] != counts.shape:
        _fail(op, f"{what}: counts must be (B, H, N) and indices (B, H, N, W), got {tuple(counts.shape)} and "
                  f"{tuple(indices.shape)}")
    if counts.shape[0] not in (1, B) or counts.shape[1] not in (1, H):
        _fail(op, f"{what}: batch/heads {tuple(counts.shape[:2])} must be 1 or ({B}, {H})")
    if counts.shape[2] != rows:
        _fail(op, f"{what} has {counts.shape[2]} rows, {row_len} positions at block {row_block} need {rows}")
    if not check_values or counts.numel() == 0 or counts.device.type != "cpu":
        return
    width = indices.shape[3]
    if bool((counts < 0).any()) or bool((counts > min(width, cols)).any()):
        _fail(op, f"{what}: counts must lie in [0, min(width {width}, blocks {cols})]")
    valid = torch.arange(width) < counts.unsqueeze(-1)
    if bool(((indices < 0) | (indices >= cols))[valid].any()):
        _fail(op, f"{what}: block indices out of range [0, {cols})")
    if width > 1 and bool((indices[..., 1:] <= indices[..., :-1])[valid[..., 1:]].any()):
        _fail(op, f"{what}: block indices must be strictly ascending")


def check_block_sparse_args(op: str, q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q: int,
                            block_k: int, softmax_scale: float, window_left: int, window_right: int,
                            transposed_values: bool) -> None:
    check_qkv_args(op, q, k, v)
    check_window_args(op, window_left, window_right, softmax_scale)
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    check_lut_args(op, "block LUT (kv_num_blocks, kv_indices)", kv_num_blocks, kv_indices, B, H, Sq, Sk, block_q,
                   block_k)
    check_lut_args(op, "transposed block LUT (q_num_blocks, q_indices)", q_num_blocks, q_indices, B, H, Sk, Sq,
                   block_k, block_q, transposed_values)
    if kv_num_blocks is None and q_num_blocks is not None:
        _fail(op, "a transposed block LUT without the block LUT")


def check_score_mod_args(op: str, q, softcap: float, alibi_slopes, sinks) -> None:
    """As csrc/checks.h: softcap finite and >= 0 (0: off); alibi_slopes floating (H,) or (B, H); sinks
    floating (H,); both on q's device."""
    if not (math.isfinite(float(softcap)) and softcap >= 0):
        _fail(op, f"softcap must be finite and >= 0 (0: off), got {softcap}")
    B, H = q.shape[0], q.shape[2]
    if alibi_slopes is not None:
        if not alibi_slopes.is_floating_point():
            _fail(op, f"alibi_slopes must be floating point, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
            _fail(op, f"alibi_slopes must be (H,) = ({H},) or (B, H) = ({B}, {H}), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            _fail(op, "alibi_slopes must be on q's device")
    if sinks is not None:
        if not sinks.is_floating_point():
            _fail(op, f"sinks must be floating point, got {sinks.dtype}")
        if tuple(sinks.shape) != (H,):
            _fail(op, f"sinks must be (H,) = ({H},), got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            _fail(op, "sinks must be on q's device")


def check_attn_bias_arg(op: str, q, k, attn_bias) -> None:
    """As csrc/checks.h: a floating (B|1, H|1, Sq|1, Sk) tensor on q's device."""
    if attn_bias is None:
        return
    if not attn_bias.is_floating_point():
        _fail(op, f"attn_bias must be floating point, got {attn_bias.dtype}")
    B, Sq, H, Sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    s = tuple(attn_bias.shape)
    if len(s) != 4 or s[0] not in (1, B) or s[1] not in (1, H) or s[2] not in (1, Sq) or s[3] != Sk:
        _fail(op, f"attn_bias must be (B|1, H|1, Sq|1, Sk) = ({B}|1, {H}|1, {Sq}|1, {Sk}), got {s}")
    if attn_bias.device != q.device:
        _fail(op, "attn_bias must be on q's device")


def check_dropout_args(op: str, q, dropout_p: float, dropout_seed) -> None:
    """As csrc/checks.h: dropout_p in [0, 1); when > 0, dropout_seed is one int64 on q's device."""
    if not 0.0 <= dropout_p < 1.0:
        _fail(op, f"dropout_p must lie in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return
    if dropout_seed is None:
        _fail(op, "dropout_p > 0 needs a dropout_seed")
    if dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1:
        _fail(op, f"dropout_seed must be one int64, got {dropout_seed.dtype} {tuple(dropout_seed.shape)}")
    if dropout_seed.device != q.device:
        _fail(op, "dropout_seed must be on q's device")


def check_bounds_arg(op: str, what: str, q, bounds, B: int, rows: int, cols: int) -> None:
    """As csrc/checks.h ``check_bounds_arg``: contiguous int32 ``(B|1, rows, 2)`` on q's device; on CPU
    ``0 <= lo <= hi <= cols`` and both columns nondecreasing along the rows."""
    if bounds is None:
        return
    if bounds.dtype != torch.int32 or not bounds.is_contiguous():
        _fail(op, f"{what} must be a contiguous int32 tensor")
    if bounds.dim() != 3 or bounds.shape[0] not in (1, B) or bounds.shape[1] != rows or bounds.shape[2] != 2:
        _fail(op, f"{what} must be (B|1, {rows}, 2) with B = {B}, got {tuple(bounds.shape)}")
    if bounds.device != q.device:
        _fail(op, f"{what} must be on q's device")
    if bounds.device.type != "cpu" or bounds.numel() == 0:
        return
    lo, hi = bounds[..., 0], bounds[..., 1]
    if bool((lo < 0).any()) or bool((lo > hi).any()) or bool((hi > cols).any()):
        _fail(op, f"{what}: every row's [lo, hi) must satisfy 0 <= lo <= hi <= {cols}")
    if bool((lo[:, 1:] < lo[:, :-1]).any()) or bool((hi[:, 1:] < hi[:, :-1]).any()):
        _fail(op, f"{what}: bounds must be nondecreasing along the rows")


def check_segment_bounds(op: str, q, k, key_bounds, query_bounds, backward: bool) -> None:
    """key_bounds (per query) and query_bounds (per key) come together; the forward reads only key_bounds."""
    if key_bounds is None and query_bounds is not None:
        _fail(op, "query_bounds without key_bounds")
    if backward and (key_bounds is None) != (query_bounds is None):
        _fail(op, "the backward needs both key_bounds and query_bounds")
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    check_bounds_arg(op, "key_bounds", q, key_bounds, B, Sq, Sk)
    if backward:
        check_bounds_arg(op, "query_bounds", q, query_bounds, B, Sk, Sq)


def check_alibi_offsets(op: str, q, alibi_slopes, alibi_offsets, key_bounds, query_bounds, backward: bool) -> None:
    """ALiBi's per-query offsets (varlen layouts): int32 ``(Sq,)``, with ALiBi and with segment bounds of batch 1
    (every allowed pair then lies in one sequence, whose rows share one offset)."""
    if alibi_offsets is None:
        return
    if alibi_slopes is None:
        _fail(op, "alibi_offsets without alibi_slopes")
    t = alibi_offsets
    if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != q.shape[1] or not t.is_contiguous():
        _fail(op, f"alibi_offsets must be a contiguous int32 (Sq,) = ({q.shape[1]},) tensor, got "
                  f"{t.dtype} {tuple(t.shape)}")
    if t.device != q.device:
        _fail(op, "alibi_offsets must be on q's device")
    shared = key_bounds is not None and key_bounds.shape[0] == 1
    if backward:
        shared = shared and query_bounds is not None and query_bounds.shape[0] == 1
    if not shared:
        _fail(op, "alibi_offsets needs segment bounds shared by the batch rows (key_bounds"
                  f"{' and query_bounds' if backward else ''} of batch 1)")


def check_backward_args(op: str, dout, dlse, q, out, lse, kv_num_blocks, q_num_blocks) -> None:
    if (kv_num_blocks is None) != (q_num_blocks is None):
        _fail(op, "the backward needs both the block LUT and its transpose")
    if dout.shape != q.shape or out.shape != q.shape:
        _fail(op, f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if out.dtype != q.dtype or not dout.is_floating_point():
        _fail(op, "out must have q's dtype and dout be floating point")
    B, Sq, H, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse.shape != (B, H, Sq) or lse.dtype != lse_dtype:
        _fail(op, f"lse must be {(B, H, Sq)} in {lse_dtype}, got {tuple(lse.shape)} in {lse.dtype}")
    if dlse is not None and (dlse.shape != (B, H, Sq) or not dlse.is_floating_point()):
        _fail(op, f"dlse must be a floating {(B, H, Sq)} tensor, got {tuple(dlse.shape)}")


def checked_lengths(op: str, what: str, lens: torch.Tensor, batch: int, max_len: int) -> torch.Tensor:
    """An integer ``(B,)`` tensor of lengths in ``[0, max_len]``, as int32: checked in its own dtype
    before narrowing (``2**32 + 5`` must not become 5); GPU tensors are clamped instead of read."""
    if lens.dtype.is_floating_point or lens.dtype.is_complex or lens.dtype == torch.bool:
        _fail(op, f"{what} must be an integer tensor, got {lens.dtype}")
    if lens.shape != (batch,):
        _fail(op, f"{what} must be (B,) = ({batch},), got {tuple(lens.shape)}")
    if lens.device.type != "cpu":
        return lens.clamp(0, max_len).to(torch.int32)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > max_len):
        _fail(op, f"{what} must lie in [0, {max_len}], got [{int(lens.min())}, {int(lens.max())}]")
    return lens.to(torch.int32)


def check_decode_args(op: str, q, k, v, block_keep, block_q: int, block_k: int, softmax_scale: float,
                      window_left: int, num_splits: int, block_table=None) -> int:
    """Returns the caches' logical length: k's, or ``max_pages * page_size`` of a paged cache (``block_table (B,
    max_pages)`` int32; k, v ``(num_pages, page_size, Hkv, D)``), as csrc/checks.h."""
    paged = block_table is not None
    check_qkv_args(op, q, k, v, same_batch=not paged)
    check_window_args(op, window_left, -1, softmax_scale)
    if num_splits < 0:
        _fail(op, f"num_splits must be >= 0 (0: automatic), got {num_splits}")
    smax = k.shape[1]
    if paged:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
            _fail(op, f"block_table must be an int32 (B, max_pages) tensor with B = {q.shape[0]}, got "
                      f"{block_table.dtype} {tuple(block_table.shape)}")
        if block_table.device != q.device:
            _fail(op, "block_table must be on q's device")
        if k.shape[1] < 1:
            _fail(op, f"a paged cache needs pages of at least one row, got {tuple(k.shape)}")
        smax = block_table.shape[1] * k.shape[1]
    if block_keep is None:
        return smax
    if block_keep.dtype not in (torch.uint8, torch.bool):
        _fail(op, f"block_keep must be uint8 or bool, got {block_keep.dtype}")
    if block_q < 1 or block_k < 1:
        _fail(op, f"block sizes must be >= 1 with block_keep, got ({block_q}, {block_k})")
    nq, nk = -(-q.shape[1] // block_q), -(-smax // block_k)
    if (block_keep.dim() != 4 or block_keep.shape[0] not in (1, q.shape[0]) or block_keep.shape[1] not in (1, q.shape[2])
            or block_keep.shape[2] < nq or block_keep.shape[3] < nk):
        _fail(op, f"block_keep must be (B|1, H|1, >= {nq}, >= {nk}), got {tuple(block_keep.shape)}")
    if block_keep.device != q.device:
        _fail(op, "block_keep must be on q's device")
    return smax


def first_bad_page(block_table: torch.Tensor, lens: torch.Tensor, page: int, num_pages: int):
    """``(b, j)`` of the first entry of a paged cache's table that the lengths reach (the first ``ceil(len_b /
    page)`` of row b) and that is not a page of the cache, or None. A host read: callers check CPU tensors only (a
    GPU check would read the table back every step); entries past a length are never read, as in flash_attn."""
    if block_table.numel():
        lo, hi = torch.stack(torch.aminmax(block_table)).tolist()
        if lo >= 0 and hi < num_pages:  # every entry a page (PagedKVCache's tables): one reduction, not six
            return None
    used = (lens.to(torch.long) + page - 1) // page
    cols = torch.arange(block_table.shape[1], device=block_table.device).view(1, -1)
    bad = (cols < used.view(-1, 1)) & ((block_table < 0) | (block_table >= num_pages))
    if not bool(bad.any()):
        return None
    return tuple(int(x) for x in bad.nonzero()[0])


def bad_page_message(block_table: torch.Tensor, lens: torch.Tensor, page: int, num_pages: int, at) -> str:
    b, j = at
    return (f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of the cache ({num_pages} pages); "
            f"sequence {b} holds {int(lens[b])} keys in pages of {page}")


def check_pages_in_use(op: str, block_table: torch.Tensor, lens: torch.Tensor, page: int, num_pages: int) -> None:
    """:func:`first_bad_page` as the registered operators' RuntimeError (CPU tensors)."""
    if block_table.device.type == "cpu":
        at = first_bad_page(block_table, lens, page, num_pages)
        if at is not None:
            _fail(op, bad_page_message(block_table, lens, page, num_pages, at))
