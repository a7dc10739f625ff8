"""flash_attn's interface on attnops: training code written for FlashAttention switches with one import.

    from attnops.compat.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The signatures, argument order and return conventions are flash_attn 2.x's. ``dropout_p`` (pass it in
training only, as with flash_attn; the mask comes from the default generator's state), ``softcap`` and
``alibi_slopes`` (``(H,)`` or ``(B, H)``, bias ``-slope * |i + Sk - Sq - j|``) are honoured, forward and
backward. One difference: with ``causal=True`` and ALiBi, FlashAttention 2's kernel adds ``slope * j``
(the same probabilities, an lse larger by ``slope * (i + Sk - Sq)``); the lse here is that of the
documented bias. What attnops cannot compute yet is refused with a clear ``NotImplementedError`` naming
the argument, never ignored: in ``flash_attn_with_kvcache`` several new queries with ``causal=False`` together with a
window or ALiBi (its rotary embeddings, ``cache_batch_idx``, ``cache_leftpad``, paged caches, ``block_table``, and
any number of new queries are honoured).
``deterministic`` is accepted (attnops' kernels are deterministic at a fixed thread count; see README).
``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: the lse is flash_attn's, the
probabilities are never built (attnops computes block maps instead: ``attnops.attention(...,
return_block_map=True)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import shared_alibi_slopes
from attnops.core.op_checks import bad_page_message, first_bad_page
from attnops.ops.decode.chunked import chunked_decode_attention
from attnops.ops.decode.kv_cache import pack_sequences
from attnops.ops.softmax import attention, varlen_attention

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _result(out: torch.Tensor, lse: torch.Tensor, return_attn_probs: bool):
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)`` -> ``out (B, Sq, H, D)``, or ``(out, softmax_lse
    (B, H, Sq), None)`` with ``return_attn_probs``. As flash_attn's: bottom-right causal, windows
    ``(left, right)``."""
    out, lse = attention(q, k, v, causal=bool(causal), softmax_scale=softmax_scale, window_size=_window(window_size),
                         softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, return_lse=True)
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``qkv (B, S, 3, H, D)``."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q (B, Sq, H, D)``, ``kv (B, Sk, 2, Hkv, D)``."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: ``q (total_q, H, D)``, ``k, v (total_k, Hkv, D)``, ``cu_seqlens_q / _k (n + 1,)``
    int32 offsets. Each sequence attends only to its own keys (causal and windows per sequence,
    bottom-right aligned): :func:`attnops.varlen_attention` (one call, token-exact segment bounds); per-sequence
    ALiBi slopes ``(num_seqs, H)`` run one call per sequence, unless their rows are all equal (one call).
    ``out (total_q, H, D)``, ``softmax_lse (H, total_q)`` as flash_attn's (a query without keys: lse -inf,
    flash_attn 2 writes +inf).

    ``block_table (n, max_pages)`` int32: ``k, v`` are paged caches ``(num_pages, page_size, Hkv, D)``, as in
    flash_attn (vLLM's prefix-cached prefill): sequence ``i``'s keys are the first ``cu_seqlens_k[i + 1] -
    cu_seqlens_k[i]`` positions of its pages, gathered into the packed layout first (a copy of the keys in use:
    prefill is compute-bound; decoding reads pages in place, :func:`flash_attn_with_kvcache`)."""
    if block_table is not None:
        k, v = _unpage(k, v, block_table, cu_seqlens_k)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"flash_attn_varlen_func: {name} must be (total, heads, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    cq, ck = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0]), _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe {len(cq) - 1} and {len(ck) - 1} sequences")
    if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() == 2 and alibi_slopes.shape[0] != len(cq) - 1:
        raise ValueError(f"flash_attn_varlen_func: alibi_slopes {tuple(alibi_slopes.shape)} must be (H,) or "
                         f"(num sequences = {len(cq) - 1}, H)")
    alibi_slopes = shared_alibi_slopes(alibi_slopes, len(cq) - 1)  # equal rows: one packed call for them all
    if alibi_slopes is None or alibi_slopes.dim() == 1:
        cu_q = torch.tensor(cq, dtype=torch.int32, device=q.device)
        cu_k = cu_q if cq == ck else torch.tensor(ck, dtype=torch.int32, device=q.device)
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal=bool(causal),
                                    softmax_scale=softmax_scale, window_size=_window(window_size), return_lse=True,
                                    softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        return _result(out, lse, return_attn_probs)
    # per-sequence ALiBi slopes: one call per sequence
    out = q.new_empty(q.shape)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    for i in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[i], cq[i + 1]), (ck[i], ck[i + 1])
        slopes = alibi_slopes[i:i + 1] if alibi_slopes.dim() == 2 else alibi_slopes
        o, l_ = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=bool(causal),
                          softmax_scale=softmax_scale, window_size=_window(window_size), softcap=softcap,
                          alibi_slopes=slopes, dropout_p=dropout_p, return_lse=True)
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l_[0]
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``qkv (total, 3, H, D)`` with one ``cu_seqlens`` for queries and keys."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``q (total_q, H, D)``, ``kv (total_k, 2, Hkv, D)``."""
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def _unpage(k, v, block_table, cu_seqlens_k):
    """Paged ``k, v (num_pages, page, Hkv, D)`` read through ``block_table (n, max_pages)`` as the packed ``(total_k,
    Hkv, D)`` of :func:`flash_attn_varlen_func`'s sequences (``cu_seqlens_k`` counts logical positions)."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.dtype.is_floating_point:
        raise ValueError("flash_attn_varlen_func: block_table must be an int32 (num sequences, max_pages) tensor")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attn_varlen_func: with block_table, {name} must be a paged cache (num_pages, "
                             f"page_size, Hkv, D), got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_varlen_func: paged k and v differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    num_pages, page = k.shape[0], k.shape[1]
    ck = _offsets("cu_seqlens_k", cu_seqlens_k, None)
    n, capacity = block_table.shape[0], block_table.shape[1] * page
    lengths = [b - a for a, b in zip(ck, ck[1:])]
    if len(lengths) != n or max(lengths, default=0) > capacity:
        raise ValueError(f"flash_attn_varlen_func: block_table {tuple(block_table.shape)} of {page}-row pages must "
                         f"hold each of the {len(lengths)} sequences' keys (lengths {lengths})")
    counts = torch.tensor(lengths, device=k.device)
    table = block_table.to(k.device)
    at = first_bad_page(table, counts, page, num_pages)  # an index out of range would read past the pool
    if at is not None:
        raise ValueError(f"flash_attn_varlen_func: block_table names pages outside the cache's {num_pages}: "
                         f"{bad_page_message(table, counts, page, num_pages, at)}")
    return pack_sequences(k, v, torch.zeros_like(counts), counts, table)


def _window(window_size) -> tuple:
    """flash_attn's ``window_size`` as a pair of ints: its own tests pass a 2-element tensor (its binding reads ints);
    other values are checked by the ops."""
    if isinstance(window_size, torch.Tensor) and window_size.numel() == 2 and not window_size.dtype.is_floating_point:
        return tuple(int(x) for x in window_size.tolist())
    return tuple(window_size)


def _offsets(name: str, cu: torch.Tensor, total: Optional[int]):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 1-d integer tensor of n + 1 offsets")
    values = cu.tolist()
    end = values[-1] if total is None else total  # None: paged keys, whose packed length the offsets give
    if values[0] != 0 or values[-1] != end or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must rise from 0 to {end} (the packed length), got {values}")
    return values


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding against a cache, flash_attn's way: ``k, v (B, Sq_new, Hkv, D)``, when given, are written
    into ``k_cache, v_cache (B_cache, S_max, Hkv, D)`` in place at each sequence's ``cache_seqlens`` (int or
    ``(B,)``), then ``q (B, Sq_new, H, D)`` attends to the cache (bottom-right aligned). Any ``Sq_new``: a prompt
    prefilled through the cache runs as decode calls of 64 queries each, every call's lengths cut to its last
    query (:func:`attnops.ops.decode.chunked.chunked_decode_attention`: exact, the cache read in place). With
    ``causal=False`` several queries each see the whole cache (they run as heads of one new token); not with a
    window or ALiBi there, whose distances are per query (refused).

    ``rotary_cos, rotary_sin (seqlen_ro, rotary_dim / 2)``, with ``k`` and ``v``: the new keys are rotated at
    positions ``cache_seqlens + i`` before they are written (the cache holds rotated keys), and q likewise
    (with ``causal`` or a window; otherwise every query at ``cache_seqlens``, as flash_attn); the first
    ``rotary_dim`` channels, pairs ``(0, 1), (2, 3), ..`` when ``rotary_interleaved`` (GPT-J), else ``(i, i +
    rotary_dim / 2)`` (GPT-NeoX); computed in float32. ``cache_batch_idx (B,)``: the cache rows of the batch's
    sequences (their rows are gathered for the attention: a copy of those rows per call).

    ``cache_leftpad (B,)`` int32: where each sequence's keys start in the cache (left-padded prompts); the rows
    before are never attended. Positions are the cache's, as in flash_attn: the new keys are written at
    ``cache_seqlens``, rotated at ``cache_seqlens + i``, and causality, windows and ALiBi count from the cache's
    row 0. Read in place by the kernels (:func:`attnops.decode_attention`'s ``cache_leftpad``); also with
    ``block_table``, which flash_attn 2 refuses.

    ``block_table (B, max_pages)`` int32: a paged cache, ``k_cache, v_cache (num_pages, page_size, Hkv, D)`` (any
    page size; flash_attn 2 wants multiples of 256, FA3 any): the new keys are written into their pages in place
    and :func:`attnops.decode_attention` reads the pages (in place on the C++ kernels). Not with
    ``cache_batch_idx`` (flash_attn refuses that pair too)."""
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("flash_attn_with_kvcache: cache_batch_idx is not supported with block_table (a paged cache "
                         "maps sequences to pages itself)")
    B, Sq = q.shape[0], q.shape[1]
    paged = block_table is not None
    if paged and (not isinstance(block_table, torch.Tensor) or block_table.dim() != 2):
        raise ValueError("flash_attn_with_kvcache: block_table must be an int32 (B, max_pages) tensor")
    cache_len = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]  # positions per sequence
    if Sq > 1 and not causal and (_window(window_size) != (-1, -1) or alibi_slopes is not None):
        raise NotImplementedError("flash_attn_with_kvcache: several new queries with causal=False (each sees the whole "
                                  "cache) are not supported with window_size or alibi_slopes, whose distances are "
                                  "per query; pass causal=True or one query")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: pass k and v together")
    if k is not None and cache_seqlens is None:
        # flash_attn takes the whole cache as filled then and appends past its end: no defined place to write
        raise ValueError("flash_attn_with_kvcache: k and v are appended at each sequence's cache_seqlens: pass "
                         "cache_seqlens with them")
    if cache_seqlens is None:  # the whole cache
        lens = torch.full((B,), cache_len, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        lens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    rows = torch.arange(B, device=q.device) if cache_batch_idx is None else _batch_rows(cache_batch_idx, B, k_cache)
    if cache_leftpad is not None:  # its shape here, before k and v are written into the cache (the op checks values)
        if not isinstance(cache_leftpad, torch.Tensor) or cache_leftpad.dtype.is_floating_point or \
                tuple(cache_leftpad.shape) != (B,):
            raise ValueError(f"flash_attn_with_kvcache: cache_leftpad must be an int32 tensor of shape ({B},)")
        cache_leftpad = cache_leftpad.to(q.device)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: pass rotary_cos and rotary_sin together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("flash_attn_with_kvcache: rotary_cos / rotary_sin rotate the new keys: pass k and v too")
        _check_rotary(rotary_cos, rotary_sin, q.shape[-1], cache_len)
        local = _window(window_size) != (-1, -1)
        q_pos = lens.long().unsqueeze(1) + (torch.arange(Sq, device=q.device) if causal or local else 0)
        q = _rotary(q, rotary_cos, rotary_sin, q_pos.expand(B, Sq), rotary_interleaved)
        k = _rotary(k, rotary_cos, rotary_sin, lens.long().unsqueeze(1) + torch.arange(k.shape[1], device=q.device),
                    rotary_interleaved)
    if k is not None:
        n = k.shape[1]
        cols = lens.long().unsqueeze(1) + torch.arange(n, device=q.device)
        if q.device.type == "cpu" and int(cols.max()) >= cache_len:
            raise ValueError("flash_attn_with_kvcache: the new keys do not fit in the cache")
        index = (rows.unsqueeze(1), cols)
        if paged:  # position j of sequence b: row j % page of page block_table[b, j // page]
            page = k_cache.shape[1]
            pages = block_table.to(q.device).long().gather(1, (cols // page).clamp(max=block_table.shape[1] - 1))
            if q.device.type == "cpu" and n and (int(pages.min()) < 0 or int(pages.max()) >= k_cache.shape[0]):
                raise ValueError(f"flash_attn_with_kvcache: the new keys' pages in block_table are not pages of the "
                                 f"cache ({k_cache.shape[0]} pages)")
            index = (pages, cols % page)
        with torch.no_grad():
            k_cache[index] = k.to(k_cache.dtype)
            v_cache[index] = v.to(v_cache.dtype)
        lens = lens + n
    if cache_batch_idx is not None:
        k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    left = _window(window_size)[0]  # the right side is moot: a causal query, or one at the end of the cache
    out, lse = chunked_decode_attention(q, k_cache, v_cache, lens, causal=causal or Sq == 1,
                                        softmax_scale=softmax_scale, window_size=(left, -1), softcap=softcap,
                                        alibi_slopes=alibi_slopes, num_splits=num_splits, block_table=block_table,
                                        cache_leftpad=cache_leftpad)
    return (out, lse) if return_softmax_lse else out


def _batch_rows(cache_batch_idx: torch.Tensor, batch: int, k_cache: torch.Tensor) -> torch.Tensor:
    if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.dtype.is_floating_point or \
            tuple(cache_batch_idx.shape) != (batch,):
        raise ValueError(f"flash_attn_with_kvcache: cache_batch_idx must be an integer tensor of shape ({batch},)")
    rows = cache_batch_idx.to(device=k_cache.device, dtype=torch.long)
    if rows.device.type == "cpu" and batch and (int(rows.min()) < 0 or int(rows.max()) >= k_cache.shape[0]):
        raise ValueError(f"flash_attn_with_kvcache: cache_batch_idx must index the cache's {k_cache.shape[0]} rows")
    return rows


def _check_rotary(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, cache_len: int) -> None:
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"flash_attn_with_kvcache: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not 0 < 2 * cos.shape[1] <= head_dim:
        raise ValueError(f"flash_attn_with_kvcache: rotary_dim = {2 * cos.shape[1]} must lie in (0, head_dim = "
                         f"{head_dim}]")
    if cos.shape[0] < cache_len:  # flash_attn's own check: every cache position has its angle
        raise ValueError(f"flash_attn_with_kvcache: rotary_cos covers {cos.shape[0]} positions, fewer than the "
                         f"cache's {cache_len}")


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            interleaved: bool) -> torch.Tensor:
    """``x (B, S, H, D)`` with its first ``rotary_dim`` channels rotated by the angles of ``positions (B, S)``
    (flash_attn's ``apply_rotary_emb``), in float32 (float64 for float64 inputs)."""
    half = cos.shape[1]
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = (t.to(x.device, wide)[positions].unsqueeze(2) for t in (cos, sin))  # (B, S, 1, half)
    r = x[..., :2 * half].to(wide)
    x1, x2 = (r[..., 0::2], r[..., 1::2]) if interleaved else (r[..., :half], r[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)
