"""Any number of new queries against a KV cache, through :func:`attnops.decode_attention` (which takes up to
``MAX_NEW_TOKENS``): a prompt prefilled into a cache that already holds ragged sequences (flash_attn's
``flash_attn_with_kvcache`` with a long ``q``), and non-causal queries (each sees the whole cache).

Causal, more than ``MAX_NEW_TOKENS`` queries: where every sequence has the same length (no pages, no left padding),
the cache's first ``L`` rows are one ``(B, L)`` key tensor and the queries end it: :func:`attnops.attention` (causal,
bottom-right) on a view. Ragged, left-padded or paged caches: each sequence's keys gathered into
:func:`attnops.varlen_attention`'s packed layout (a copy of the keys in use, O(S) beside the attention's O(Sq * S)),
causal per sequence, bottom-right: the decode positions. Both run 1.3-1.5x faster than decode calls on the C++ kernels
(README); ALiBi slopes shared by the batch (``(H,)``) go along (varlen measures each sequence's distances from its own
bottom-right corner), as do ``(B, H)`` slopes whose rows are equal. Per-sequence slopes that differ on such a cache
(one packed batch has one set of slopes), or an explicit ``backend``: chunks of ``MAX_NEW_TOKENS`` queries, each a
decode call whose lengths are cut to its last query's position (``cache_seqlens - (Sq - c1)``), so that query ``i``
still sits at ``cache_seqlens - Sq + i`` and sees keys up to it. Non-causal: every query sees every key below
``cache_seqlens``, which is what one query at the end sees; the queries are folded into the head axis (query ``i`` of
head ``h`` becomes a head of ``h``'s kv group) and run as one new token. Exact either way, no ``Sq x S`` tensor.
Forward only, like decoding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core.checks import shared_alibi_slopes
from attnops.ops.decode.kv_cache import pack_sequences
from attnops.ops.decode.op import MAX_NEW_TOKENS, decode_attention
from attnops.ops.softmax.op import attention
from attnops.ops.softmax.varlen import varlen_attention


def chunked_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cache_seqlens: torch.Tensor, *, causal: bool = True,
                             cache_leftpad: Optional[torch.Tensor] = None,
                             **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``q (B, Sq, H, D)``, any ``Sq >= 1``, against caches ``(B, S_max, Hkv, D)`` (or pages with ``block_table``)
    holding ``cache_seqlens (B,)`` keys each -> ``out (B, Sq, H, D)``, ``lse (B, H, Sq)``. ``kwargs``: those of
    :func:`attnops.decode_attention` that apply to every query alike (``softmax_scale``, ``softcap``,
    ``num_splits``, ``block_table``, ``sinks``, ``backend``; causal only: ``window_size``, ``alibi_slopes``).
    ``causal=False`` refuses windows and ALiBi, whose distances differ per query (a folded query sits at the
    end)."""
    B, Sq, H, D = q.shape
    if not causal and Sq > 1:
        if tuple(kwargs.get("window_size", (-1, -1))) != (-1, -1) or kwargs.get("alibi_slopes") is not None:
            raise NotImplementedError("decoding several non-causal queries (each sees the whole cache) does not take "
                                      "window_size or alibi_slopes: their distances are per query")
        return _folded(q, k_cache, v_cache, cache_seqlens, cache_leftpad, kwargs)
    if Sq > MAX_NEW_TOKENS and kwargs.get("backend") is None and cache_seqlens.numel():
        lo, hi = torch.aminmax(cache_seqlens)  # a host read: one per prompt, not per decoded token
        if int(lo) == int(hi) > 0 and cache_leftpad is None and kwargs.get("block_table") is None:
            return _dense(q, k_cache[:, :int(hi)], v_cache[:, :int(hi)], kwargs)
        slopes = shared_alibi_slopes(kwargs.get("alibi_slopes"), B)
        if slopes is None or slopes.dim() == 1 or slopes.shape[0] == 1:  # varlen's packed batch takes (H,) slopes
            return _packed(q, k_cache, v_cache, cache_seqlens, cache_leftpad, {**kwargs, "alibi_slopes": slopes})
    if Sq <= MAX_NEW_TOKENS:
        return decode_attention(q, k_cache, v_cache, cache_seqlens, cache_leftpad=cache_leftpad, return_lse=True,
                                **kwargs)
    outs, lses = [], []
    lens = cache_seqlens.to(torch.int64)
    for c0 in range(0, Sq, MAX_NEW_TOKENS):
        c1 = min(Sq, c0 + MAX_NEW_TOKENS)
        # the chunk's last query sits at cache_seqlens - (Sq - c1) - 1; keys past it are causal-masked anyway
        cut = (lens - (Sq - c1)).clamp(min=0)
        pads = None if cache_leftpad is None else torch.minimum(cache_leftpad.to(torch.int64), cut)
        out, lse = decode_attention(q[:, c0:c1], k_cache, v_cache, cut.to(cache_seqlens.dtype),
                                    cache_leftpad=pads, return_lse=True, **kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def _prefill_options(kwargs) -> dict:
    """The decode arguments as the prefill ops take them: causal, the window's left side (the right one is moot)."""
    left = tuple(kwargs.get("window_size", (-1, -1)))[0]
    return dict(causal=True, softmax_scale=kwargs.get("softmax_scale"), softcap=kwargs.get("softcap", 0.0),
                window_size=(left, 0) if left >= 0 else (-1, -1), sinks=kwargs.get("sinks"), return_lse=True)


def _dense(q, k, v, kwargs):
    return attention(q, k, v, alibi_slopes=kwargs.get("alibi_slopes"), **_prefill_options(kwargs))


def _packed(q, k_cache, v_cache, cache_seqlens, cache_leftpad, kwargs):
    """Sequence ``b``'s keys, cache positions ``[cache_leftpad[b], cache_seqlens[b])`` (from its pages with a
    ``block_table``), packed one sequence after another, and its ``Sq`` queries likewise: varlen attention, causal
    per sequence (query ``i`` sees packed keys ``<= i + n_b - Sq``: cache positions ``<= cache_seqlens - Sq + i``)."""
    B, Sq, H, D = q.shape
    device = q.device
    lens = cache_seqlens.to(device=device, dtype=torch.long)
    starts = torch.zeros_like(lens) if cache_leftpad is None else cache_leftpad.to(device=device, dtype=torch.long)
    counts = (lens - starts).clamp(min=0)
    keys, values = pack_sequences(k_cache, v_cache, starts, counts, kwargs.get("block_table"))
    cu_k = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, device=device, dtype=torch.int32)
    out, lse = varlen_attention(q.reshape(B * Sq, H, D), keys, values, cu_q, cu_k, Sq, int(counts.max()),
                                alibi_slopes=kwargs.get("alibi_slopes"), **_prefill_options(kwargs))
    return out.view(B, Sq, H, D), lse.view(H, B, Sq).transpose(0, 1)


def _folded(q, k_cache, v_cache, cache_seqlens, cache_leftpad, kwargs):
    """Non-causal: query ``i`` of head ``h = hk * G + g`` runs as head ``(hk * G + g) * n + i`` of one new token (kv
    group ``hk`` kept), ``n`` queries per call so that a call holds at most ``MAX_NEW_TOKENS`` rows per head."""
    B, Sq, H, D = q.shape
    outs, lses = [], []
    kwargs = dict(kwargs)
    sinks = kwargs.pop("sinks", None)
    for c0 in range(0, Sq, MAX_NEW_TOKENS):
        c1 = min(Sq, c0 + MAX_NEW_TOKENS)
        n = c1 - c0
        folded = q[:, c0:c1].permute(0, 2, 1, 3).reshape(B, 1, H * n, D)  # (B, 1, H * n, D): head-major
        head_sinks = None if sinks is None else sinks.repeat_interleave(n)
        out, lse = decode_attention(folded, k_cache, v_cache, cache_seqlens, cache_leftpad=cache_leftpad,
                                    sinks=head_sinks, return_lse=True, **kwargs)
        outs.append(out.view(B, H, n, D).transpose(1, 2))
        lses.append(lse.view(B, H, n))
    return torch.cat(outs, 1), torch.cat(lses, 2)
