"""Incremental decoding against a KV cache: split-KV ("flash-decoding") attention.

Multi-query / grouped-query attention pays off here (Shazeer 2019): the kernels read each K/V
element once per kv head for all the query heads of its group, so one shared K/V head cuts the
bytes read per generated token by H.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import check_request
from attnops.core.checks import (QKVShape, check_block_mask, check_flag, check_qkv, check_qkv_tensors,
                                 check_score_mods, clamp_window, refuse_unsupported_ad, resolve_softmax_scale)
from attnops.core.masks import BlockMask, check_window_size
from attnops.core.op_checks import bad_page_message, first_bad_page
from attnops.core.results import MAP_ARGS_DOC, Result, pack
from attnops.ops.lowrank.op import check_lowrank_args, lowrank_decode
from attnops.ops.lowrank.projection import KeyProjection

MAX_NEW_TOKENS = 64


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    block_mask: Optional[BlockMask] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    num_splits: int = 0,
    block_table: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    lowrank: Optional[KeyProjection] = None,
    rank: Optional[int] = None,
    topk: Optional[int] = None,
    local: int = 0,
    k_score: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    block_size=None,
) -> Result:
    r"""Attention of a few new queries against a KV cache (forward only).

    Args:
        q: ``(B, Sq_new, H, D)``, ``1 <= Sq_new <= 64`` new tokens per sequence.
        k_cache, v_cache: ``(B, S_max, Hkv, D)``, ``H % Hkv == 0``; the new tokens' keys/values are
            already in the cache (``attnops.KVCache.append``).
        cache_seqlens: ``(B,)`` integer, valid cache length of each sequence, new tokens included,
            in ``[0, S_max]`` (ragged batches allowed).
        softmax_scale: defaults to ``D ** -0.5``.
        block_mask: optional ``BlockMask`` over the ``(Sq_new, S_max)`` plane: key blocks of the cache
            each head may read (routed and low-rank decoding); batch/head dims 1 or B/H.
        window_size: ``(left, right)``; decoding is causal, so ``right`` must be -1 or 0.
        softcap, alibi_slopes, sinks: score modifiers as in :func:`attnops.attention` (ALiBi's distance is
            from each new token's position in the cache). Forward only, like the op; not with ``lowrank``.
        return_lse: also return lse ``(B, H, Sq_new)``.
        {map_args} The map covers the cache ``(Sq_new, S_max)`` plane; default block: the block mask's,
            else 64. The C++ kernel sums the probabilities per map block with the forward (each
            split relative to its own lse, merged with the splits); the Triton and CUDA kernels'
            maps are one chunked pass over K from the lse (``attnops.ops.decode.map.decode_block_map``).
        num_splits: how many chunks the cache length is split into, processed in parallel and
            merged by lse; 0 chooses from the problem size and the device.
        block_table: a paged cache (flash_attn's ``block_table``, vLLM's block tables): ``k_cache, v_cache`` are
            ``(num_pages, page_size, Hkv, D)``, any ``page_size >= 1``, and ``block_table (B, max_pages)`` int32
            holds each sequence's pages in order, so that key ``j`` of sequence ``b`` is row ``j % page_size`` of
            page ``block_table[b, j // page_size]``; ``S_max = max_pages * page_size``. The C++ and Triton kernels
            read the pages in place; the PyTorch fallback (``backend="composite"``) and the reference gather them;
            the CUDA kernel (``backend="cuda"``) refuses them. Entries past a sequence's length are never
            read; those it uses must be pages of the cache (checked on CPU tensors). Not with low-rank decoding.
        cache_leftpad: ``(B,)`` integer, flash_attn's left padding in the cache: sequence ``b``'s keys are
            ``[cache_leftpad[b], cache_seqlens[b])``, the cache rows before them padding that is never attended
            (a batch of left-padded prompts prefilled into one cache). Positions stay the cache's: query ``i`` is
            still at ``cache_seqlens[b] - Sq_new + i`` for causality, windows and ALiBi, as in flash_attn. In
            ``[0, cache_seqlens[b]]`` (checked on CPU tensors; clamped on GPUs). The C++ and Triton kernels skip
            the padded tiles; the CUDA kernel refuses it. Not with low-rank decoding.
        lowrank, rank, topk, local: low-rank-key decoding (Loki, :func:`attnops.lowrank_key_attention`):
            ``k_cache`` holds the keys in the basis of the :class:`~attnops.lowrank.KeyProjection`
            ``lowrank`` (``lowrank.rotate(k)`` before the append, so the cache is never projected
            per step); q is given as usual and rotated here. Each query attends exactly to its
            ``topk`` keys of highest ``rank``-dim score, the newest ``local`` always among them. Not
            combined with ``block_mask`` or ``window_size``; block maps are those of the chosen keys.
            Loki's fractions as in :func:`attnops.lowrank_key_attention`; a fractional ``topk`` is of
            the longest sequence's keys, ``max(cache_seqlens)`` (Loki's padded batch length; one
            host read of ``cache_seqlens``).
        k_score: optional ``(B, S_max, Hkv, R)``, ``R >= rank``: a contiguous copy of the cached keys'
            first ``R`` components (``KVCache(score_dim=R)`` keeps one), read by the scoring pass in
            place of ``k_cache[..., :rank]``, whose rows lie ``D`` apart (strided reads: a 32K MHA
            step took ~1.4x longer in place than from a float32 plane). In the cache's dtype, or in
            bfloat16 / float16 (the scores only rank keys; the new queries are rounded to it too).
        backend: as in :func:`attnops.attention`.

    Causality: new query ``i`` of sequence ``b`` sits at position ``cache_seqlens[b] - Sq_new + i``
    and sees the keys at positions ``<= pos`` (and ``>= pos - left`` with a window). A query that
    sees nothing (``cache_seqlens[b] == 0``) gets zeros and ``lse = -inf``.

    Example::

        >>> cache = attnops.KVCache(batch=1, max_len=4096, num_kv_heads=1, head_dim=64)
        >>> k_view, v_view, lens = cache.append(k_new, v_new)      # (1, 1, 1, 64) each
        >>> out = attnops.decode_attention(q_new, k_view, v_view, lens)   # q_new (1, 1, 8, 64)
    """
    shape = check_qkv(q, k_cache, v_cache) if block_table is None else _check_paged(q, k_cache, v_cache, block_table)
    refuse_unsupported_ad("decode_attention", q, k_cache, v_cache)
    if not 1 <= shape.seq_len_q <= MAX_NEW_TOKENS:
        raise ValueError(f"decode_attention takes 1..{MAX_NEW_TOKENS} new tokens, got {shape.seq_len_q}; "
                         "use attnops.attention for prefill")
    _check_seqlens(cache_seqlens, shape, q.device)
    if cache_leftpad is not None:
        _check_leftpad(cache_leftpad, cache_seqlens, shape, q.device)
    if block_table is not None and q.device.type == "cpu":
        _check_pages_in_use(block_table, cache_seqlens, k_cache.shape[1], k_cache.shape[0])
    left, right = clamp_window(check_window_size(window_size), shape.seq_len_q, shape.seq_len_k)
    check_flag("return_lse", return_lse)
    check_flag("return_block_map", return_block_map)
    if right > 0:
        raise ValueError(f"decode_attention is causal: window_size right must be -1 or 0, got {right}")
    if block_mask is not None:
        check_block_mask(block_mask, shape, q.device)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: automatic), got {num_splits!r}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    mods = check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)
    if lowrank is not None or rank is not None or topk is not None:
        if block_table is not None:
            raise NotImplementedError("low-rank decoding reads a contiguous cache: block_table (a paged cache) is "
                                      "not supported with lowrank=")
        if cache_leftpad is not None:
            raise NotImplementedError("low-rank decoding reads each sequence from its first cache row: "
                                      "cache_leftpad is not supported with lowrank=")
        if softcap or alibi_slopes is not None or sinks is not None:
            raise NotImplementedError("low-rank decoding does not take softcap, alibi_slopes or sinks")
        if lowrank is None or rank is None or topk is None:
            raise ValueError("low-rank decoding takes lowrank= (a KeyProjection), rank= and topk= together")
        if block_mask is not None or left >= 0:
            raise ValueError("low-rank decoding does not combine with block_mask or window_size")
        num_keys = int(cache_seqlens.max()) if isinstance(topk, float) else None  # Loki: the batch's key length
        rank, topk = check_lowrank_args(lowrank, rank, topk, local, shape, True, num_keys=num_keys)
        if k_score is not None:
            _check_score_plane(k_score, k_cache, rank)
        request = check_request(map_block_size, reduce, (64, 64), block_size) if return_block_map else None
        res = lowrank_decode(q, k_cache, v_cache, cache_seqlens, lowrank, rank=rank, topk=topk, local=local,
                             softmax_scale=scale, k_score=k_score, backend=backend, block_map=request)
        return pack(res[0], res[1], res[2] if request is not None else None, return_lse)
    if k_score is not None:
        raise ValueError("k_score is the score plane of low-rank decoding: pass lowrank=, rank= and topk= with it")
    request = None
    if return_block_map:
        request = check_request(map_block_size, reduce, block_mask.block_size if block_mask is not None else (64, 64),
                                block_size)
    impl = dispatch.resolve("decode_attention", q.device, backend, api="decode_attention")
    cache = {n: t for n, t in (("block_table", block_table), ("cache_leftpad", cache_leftpad)) if t is not None}
    res = impl(q, k_cache, v_cache, cache_seqlens, block_mask, window_size=(left, 0), softmax_scale=scale,
               num_splits=num_splits, block_map=request, **mods, **cache)
    return pack(res[0], res[1], res[2] if request is not None else None, return_lse)


decode_attention.__doc__ = decode_attention.__doc__.replace("{map_args}", MAP_ARGS_DOC)


def _check_paged(q, k_cache, v_cache, block_table) -> QKVShape:
    """The shapes of a paged call: q ``(B, Sq, H, D)``, pages ``(num_pages, page_size, Hkv, D)``, ``block_table
    (B, max_pages)`` int32; the logical cache length is ``max_pages * page_size``."""
    check_qkv_tensors(q, k_cache, v_cache)
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a tensor, got {type(block_table).__name__}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be an int32 (B, max_pages) tensor with B = {q.shape[0]}, got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
    if k_cache.shape[0] < 1 or k_cache.shape[1] < 1:
        raise ValueError(f"a paged cache is (num_pages >= 1, page_size >= 1, Hkv, D), got {tuple(k_cache.shape)}")
    # the per-sequence view the kernels attend: pages in place of sequences, the shape checks of the contiguous call
    logical = (q.shape[0], block_table.shape[1] * k_cache.shape[1], *k_cache.shape[2:])
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    return check_qkv(q, k_cache.new_empty(()).expand(logical), v_cache.new_empty(()).expand(logical))


def _check_pages_in_use(block_table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int,
                        num_pages: int) -> None:
    at = first_bad_page(block_table, cache_seqlens, page_size, num_pages)
    if at is not None:
        raise ValueError(bad_page_message(block_table, cache_seqlens, page_size, num_pages, at))


def _check_score_plane(k_score, k_cache: torch.Tensor, rank: int) -> None:
    if not isinstance(k_score, torch.Tensor):
        raise TypeError(f"k_score must be a tensor, got {type(k_score).__name__}")
    if k_score.dim() != 4 or k_score.shape[:3] != k_cache.shape[:3] or not rank <= k_score.shape[3] <= k_cache.shape[3]:
        raise ValueError(f"k_score must be (B, S_max, Hkv, R) = {tuple(k_cache.shape[:3])} + (R,) with rank={rank} "
                         f"<= R <= D, got {tuple(k_score.shape)}")
    if k_score.dtype not in (k_cache.dtype, torch.bfloat16, torch.float16) or k_score.device != k_cache.device:
        raise ValueError(f"k_score must be on k_cache's device ({k_cache.device}) in its dtype ({k_cache.dtype}), "
                         f"bfloat16 or float16, got ({k_score.dtype}, {k_score.device})")


def _check_per_sequence(name: str, t, shape: QKVShape, device: torch.device) -> None:
    """``t`` is a ``(B,)`` integer tensor on q's device (``cache_seqlens``, ``cache_leftpad``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.shape != (shape.batch,):
        raise ValueError(f"{name} must have shape ({shape.batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_seqlens(cache_seqlens, shape: QKVShape, device: torch.device) -> None:
    _check_per_sequence("cache_seqlens", cache_seqlens, shape, device)
    # Reading the values would synchronise a GPU stream on every step: they are checked on the CPU
    # (and meta) only; the CUDA/Triton kernels clamp them to [0, S_max].
    if dispatch.device_type(device) == "cpu" and cache_seqlens.numel():
        lo, hi = _bounds(cache_seqlens)
        if lo < 0 or hi > shape.seq_len_k:
            raise ValueError(f"cache_seqlens must lie in [0, S_max={shape.seq_len_k}], got [{lo}, {hi}]")


def _check_leftpad(cache_leftpad, cache_seqlens: torch.Tensor, shape: QKVShape, device: torch.device) -> None:
    _check_per_sequence("cache_leftpad", cache_leftpad, shape, device)
    # GPU values are not read (no sync per step): clamped there
    if dispatch.device_type(device) == "cpu" and cache_leftpad.numel():
        bad = (cache_leftpad.long() < 0) | (cache_leftpad.long() > cache_seqlens.long())
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens[b]] (a sequence starts before it ends): "
                             f"sequence {b} has cache_leftpad {int(cache_leftpad[b])} and cache_seqlens "
                             f"{int(cache_seqlens[b])}")


def _bounds(lengths: torch.Tensor) -> Tuple[int, int]:
    """``(min, max)`` of a CPU integer tensor: one host copy for a batch's worth (0.6 us at B = 1, where two
    reductions took 2.8 us of a ~30 us decoding step), one reduction beyond."""
    if lengths.numel() <= 256:
        values = lengths.tolist()
        return min(values), max(values)
    lo, hi = torch.aminmax(lengths)
    return int(lo), int(hi)
