"""A modern attention block for new models: GQA/MQA, optional QK-norm and rotary embeddings, any
attnops family through its spec, KV-cache decoding (optionally with low-rank keys, Loki)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from attnops.core.checks import QKVShape
from attnops.ops.decode import MAX_NEW_TOKENS, KVCache, PagedKVCache, decode_attention
from attnops.ops.decode.chunked import chunked_decode_attention
from attnops.ops.decode.kv_cache import gather_pages, new_token_counts
from attnops.ops.lowrank import KeyProjection, check_lowrank_args
from attnops.ops.softmax import attention as dense_attention
from attnops.maps.capture import attend, refuse_uncaptured
from attnops.nn.rotary import Rotary
from attnops.distributed import context_parallel_attention, context_parallel_linear_attention, local_positions
from attnops.nn.specs import (AttentionSpec, BlockSparseSpec, LinearAttentionSpec, LowRankKeySpec, SoftmaxSpec,
                              resolve_spec)


class LowRankDecoding(NamedTuple):
    """What a module's cached steps use for low-rank keys: the basis and the op's knobs."""

    projection: KeyProjection
    rank: int
    topk: Union[int, float]  # a float: Loki's fraction of the keys, resolved per step
    local: int


class Attention(nn.Module):
    """Self-attention ``x (B, T, dim) -> (B, T, dim)`` with ``num_kv_heads`` key/value heads.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads dividing H (default H; 1 is multi-query).
        attention: an attnops spec (default ``SoftmaxSpec()``): which attention runs.
        causal: whether the block is causal (default True: a decoder block). Applied to whatever spec
            is passed (a spec's own ``causal=True`` adds to it); ``causal=False`` makes an encoder
            block, which has no cached steps.
        qk_norm: RMS-normalise q and k per head before attention (as OLMo-2 / Qwen3).
        rope: ``None`` (no positions), a float theta (e.g. ``10000.0``), or a :class:`Rotary`.
        bias: biases on the projections.
        lowrank, rank, topk, local: low-rank-key (Loki) decoding for the cached steps, as
            :meth:`set_lowrank` (a :class:`LowRankKeySpec` spec implies its own).
        context_parallel_group: a ``torch.distributed`` group: ``x`` is then this rank's shard of the
            sequence (:func:`attnops.distributed.shard` with ``context_parallel_layout``) and attention runs
            across the ranks (:func:`attnops.distributed.context_parallel_attention`); rotary positions are
            the rows' global positions. The ``SoftmaxSpec`` (causal, window), a ``BlockSparseSpec`` with a
            global ``block_mask`` and the ``LinearAttentionSpec``
            (:func:`attnops.distributed.context_parallel_linear_attention`) run this way; no cached steps.
        context_parallel_layout: ``"zigzag"`` (default) or ``"contiguous"`` (which a causal
            ``LinearAttentionSpec`` needs: its recurrence runs in sequence order).

    ``forward(x, positions=None)``: ``positions (T,)`` or ``(B, T)`` feed the rotary embedding
    (default ``0..T-1``). ``forward(x, cache=cache)`` (``cache`` from :meth:`make_cache`): appends
    the new tokens' keys and values to the cache and attends over it (positions continue each
    sequence's length): up to 64 new tokens through :func:`attnops.decode_attention`, a longer
    prompt through causal :func:`attnops.attention` (a cache whose sequences differ in length, as a ragged
    ``KVCache.append(..., lengths=)`` leaves it: each sequence's keys packed, causal at its own length; forward
    only). The cache is a :class:`attnops.KVCache` or a :class:`attnops.PagedKVCache` (``make_cache(...,
    page_size=)``; not with low-rank decoding, whose score plane is contiguous). Cached steps run with the
    ``SoftmaxSpec`` (its sliding window included) and ``LowRankKeySpec`` specs.
    ``forward(x, cache=cache, lengths=lengths)``: continuous batching, sequence ``b`` takes only the **last**
    ``lengths[b]`` rows of ``x[b]`` (left padding: ``KVCache.append``'s ``lengths``), so one call can feed a new
    prompt to a slot freed by ``cache.release(b)`` while the other slots take one token (or none: 0). The rows
    before are padding: they are not cached, no real row attends to them, and their outputs are meaningless
    (finite) values for the caller to drop. With a backward needed, lengths below ``T`` are refused past the
    64-token decode limit.
    The cache holds values, not autograd history:
    a backward through a cached prompt reaches that prompt's own keys and values, not those of
    earlier steps (Transformer-XL's stop-gradient memory); decoding steps are forward-only.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 attention: Optional[AttentionSpec] = None, qk_norm: bool = False,
                 rope: Union[None, float, Rotary] = None, bias: bool = False, device=None, dtype=None,
                 lowrank: Optional[KeyProjection] = None, rank: Optional[int] = None, topk: Optional[int] = None,
                 local: int = 0, causal: bool = True, context_parallel_group=None,
                 context_parallel_layout: str = "zigzag"):
        super().__init__()
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.causal = causal
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}), divisible into "
                             "heads")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        attention = resolve_spec(attention, SoftmaxSpec())
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.attention = attention
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, dim, **kw)
        norm_kw = dict(eps=1e-6, device=device, dtype=dtype)
        self.q_norm = nn.RMSNorm(self.head_dim, **norm_kw) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, **norm_kw) if qk_norm else None
        if rope is None or isinstance(rope, Rotary):
            self.rope = rope
        elif isinstance(rope, (int, float)) and not isinstance(rope, bool):
            self.rope = Rotary(self.head_dim, float(rope))
        else:
            raise TypeError(f"rope must be None, a theta (float) or a Rotary, got {rope!r}")
        if self.rope is not None and self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope head_dim {self.rope.head_dim} != attention head_dim {self.head_dim}")
        self.lowrank: Optional[LowRankDecoding] = None
        if lowrank is not None or rank is not None or topk is not None:
            self.set_lowrank(lowrank, rank, topk, local)
        elif isinstance(attention, LowRankKeySpec) and attention.projection is not None:
            self.set_lowrank(attention.projection, attention.rank, attention.topk, attention.local)

    def set_lowrank(self, projection: Optional[KeyProjection], rank: Optional[int] = None,
                    topk: Optional[int] = None, local: int = 0) -> None:
        """Low-rank-key (Loki) decoding for the cached steps: the cache holds keys in
        ``projection``'s basis and each new query attends to its ``topk`` keys of highest
        ``rank``-dim score (newest ``local`` always among them). ``None`` turns it off. Caches made
        before hold keys in the old basis: start new ones."""
        if projection is None:
            self.lowrank = None
            return
        if rank is None or topk is None:
            raise ValueError("set_lowrank takes rank= and topk= with the projection")
        shape = QKVShape(1, 1, 1, self.num_heads, self.num_kv_heads, self.head_dim)
        rank, topk = check_lowrank_args(projection, rank, topk, local, shape, prefix="lowrank: ")  # a fraction stays
        self.lowrank = LowRankDecoding(projection.to(self.k_proj.weight.device), rank, topk, local)

    def make_cache(self, batch: int, max_len: int, page_size: Optional[int] = None,
                   num_pages: Optional[int] = None) -> Union[KVCache, PagedKVCache]:
        """A cache for :meth:`forward`; with low-rank decoding on, with the score plane of its rank
        (bfloat16 for float32 caches: half the bytes of the scoring pass, the scores only rank keys).
        ``page_size``: a :class:`attnops.PagedKVCache` instead, each sequence up to ``max_len`` tokens, with
        ``num_pages`` pages in the pool (default: enough for ``batch`` sequences of ``max_len``; fewer for a pool
        shared by sequences that are rarely all long, or that :meth:`attnops.PagedKVCache.fork` shares)."""
        w = self.k_proj.weight
        if num_pages is not None and page_size is None:
            raise ValueError("num_pages sizes a paged cache's pool: pass page_size= with it")
        if page_size is not None:
            if self.lowrank is not None:
                raise NotImplementedError("low-rank decoding reads a contiguous cache (its score plane): "
                                          "make_cache without page_size")
            if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
                raise TypeError(f"page_size must be an int >= 1, got {page_size!r}")
            per_seq = -(-max_len // page_size)
            num_pages = batch * per_seq if num_pages is None else num_pages
            if isinstance(num_pages, int) and not isinstance(num_pages, bool) and num_pages < per_seq:
                raise ValueError(f"num_pages={num_pages} pages of {page_size} tokens cannot hold one sequence of "
                                 f"max_len={max_len} ({per_seq} pages)")
            return PagedKVCache(batch, num_pages, page_size, self.num_kv_heads, self.head_dim, dtype=w.dtype,
                                device=w.device, max_pages_per_seq=per_seq)
        plane = torch.bfloat16 if w.dtype == torch.float32 else None
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=w.dtype, device=w.device,
                       score_dim=self.lowrank.rank if self.lowrank is not None else 0, score_dtype=plane)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Union[None, KVCache, PagedKVCache] = None, seq_len: Optional[int] = None,
                lengths=None) -> torch.Tensor:
        """``seq_len``: with context parallelism, the true global length when the shards were padded.
        ``lengths``: with ``cache``, ``(B,)`` ints in ``[0, T]``, each sequence's new tokens (the last rows of
        ``x[b]``)."""
        if lengths is not None and cache is None:
            raise ValueError("lengths counts a cached step's new tokens per sequence: pass cache= with it")
        if self.context_parallel_group is not None:
            if cache is not None:
                raise NotImplementedError("context-parallel attention has no cached steps (decode on one rank)")
            return self._context_parallel(x, positions, seq_len)
        if seq_len is not None:
            raise ValueError("seq_len is the global length of a context-parallel sequence: this block has no "
                             "context_parallel_group")
        if cache is not None:
            return self._cached_step(x, positions, cache, lengths)
        out, _ = attend(self, self.attention, *self._qkv(x, positions), causal=self.causal)
        return self._output(out)

    def _context_parallel(self, x: torch.Tensor, positions: Optional[torch.Tensor], seq_len: Optional[int]):
        refuse_uncaptured("context-parallel attention (attnops.nn.Attention with context_parallel_group)")
        group, layout = self.context_parallel_group, self.context_parallel_layout
        spec = self.attention
        options, run = {}, context_parallel_attention
        if isinstance(spec, SoftmaxSpec):
            options = dict(causal=self.causal or spec.causal, window_size=spec.window)
        elif isinstance(spec, BlockSparseSpec) and spec.block_mask is not None:
            mask = spec.block_mask
            if self.causal and not mask.causal:
                raise ValueError("this block is causal but its block mask is not: build the mask causal")
            options = dict(block_mask=mask)
        elif isinstance(spec, LinearAttentionSpec):  # state passing; causal needs the contiguous layout
            options = dict(causal=self.causal or spec.causal, feature_map=spec.feature_map, normalize=spec.normalize,
                           decay=spec.decay)
            run = context_parallel_linear_attention
        else:
            raise NotImplementedError(f"context parallelism runs the SoftmaxSpec, a BlockSparseSpec with a global "
                                      f"block_mask and the LinearAttentionSpec, not {spec!r}")
        if positions is None and self.rope is not None:
            world = torch.distributed.get_world_size(group)
            rank = torch.distributed.get_rank(group)
            chunk = x.shape[1] // (2 if layout == "zigzag" else 1)
            positions = local_positions(rank, world, chunk, layout, device=x.device)
        q, k, v = self._qkv(x, positions)
        out = run(q, k, v, group, layout=layout, seq_len=seq_len, **options)
        return self._output(out)

    def _cached_step(self, x: torch.Tensor, positions: Optional[torch.Tensor],
                     cache: Union[KVCache, PagedKVCache], lengths=None) -> torch.Tensor:
        if not self.causal and not getattr(self.attention, "causal", False):
            raise NotImplementedError("cached decoding is causal: this block was built with causal=False")
        refuse_uncaptured("a cached step of attnops.nn.Attention")
        if not isinstance(self.attention, (SoftmaxSpec, LowRankKeySpec)):
            raise NotImplementedError(f"cached decoding runs the SoftmaxSpec and LowRankKeySpec specs, not "
                                      f"{self.attention!r}")
        # a sliding window (the SoftmaxSpec's): its left side; the right one is moot in a causal step
        left = self.attention.window[0] if isinstance(self.attention, SoftmaxSpec) else -1
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        paged = isinstance(cache, PagedKVCache)
        if paged and self.lowrank is not None:
            raise NotImplementedError("low-rank decoding reads a contiguous cache (its score plane), not a "
                                      "PagedKVCache")
        if not paged and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or a PagedKVCache (make_cache), got {type(cache).__name__}")
        if x.shape[0] != cache.batch:  # row b of x is sequence b of the cache (an idle slot: lengths 0)
            raise ValueError(f"x holds {x.shape[0]} sequences, the cache {cache.batch}: pass a row for every slot "
                             "(lengths= with 0 for the idle ones)")
        T = x.shape[1]
        # before any work: a refused call leaves the cache as it was
        counts = None if lengths is None else new_token_counts(lengths, T, x.shape[0])
        uneven = counts is not None and any(c != T for c in counts)
        host = cache.host_seqlens  # before the append
        if positions is None and self.rope is not None:
            # sequence b's first new token (row T - lengths[b]) continues it; padding rows take position 0 on
            first = host.long() - (0 if counts is None else T - torch.tensor(counts))
            positions = (first.unsqueeze(1) + torch.arange(T)).clamp(min=0).to(x.device)
        q, k, v = self._qkv(x, positions)
        lowrank = self.lowrank
        if lowrank is not None:
            k = lowrank.projection.rotate(k)  # the cache holds keys in the basis: no per-step projection
        cached, ragged = int(host.max()), int(host.min()) != int(host.max()) or uneven
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if T > MAX_NEW_TOKENS and ragged and needs_grad:  # before the append: a refused call leaves the cache as it was
            raise NotImplementedError(
                f"a backward through a prompt of more than {MAX_NEW_TOKENS} tokens needs all cached sequences at one "
                "length and every row of x new (no lengths below T: the prompt's keys must reach attention as one "
                "tensor); run it under torch.no_grad() or bring the sequences to one length")
        # The cache is state: it holds values, not autograd history (Transformer-XL's stop-gradient
        # memory); writing tensors that require grad into it would chain every step's graph onto it.
        k_cache, v_cache, lens, *table = cache.append(k.detach(), v.detach(), lengths=counts if uneven else None)
        pages = dict(block_table=table[0]) if paged else {}
        if T <= MAX_NEW_TOKENS:
            kw = dict(pages)
            if lowrank is not None:
                plane = cache.score_view() if cache.score_dim >= lowrank.rank else None
                kw = dict(lowrank=lowrank.projection, rank=lowrank.rank, topk=lowrank.topk, local=lowrank.local,
                          k_score=plane)
            if left >= 0:
                kw["window_size"] = (left, 0)
            out = decode_attention(q, k_cache, v_cache, lens, **kw)
        else:
            if lowrank is not None:  # exact prefill, in the cache's basis
                q = lowrank.projection.rotate(q)
            window = (left, 0) if left >= 0 else (-1, -1)
            if ragged or (paged and not needs_grad):
                # each sequence's keys packed (read from its pages), causal at its own length (bottom-right: the
                # prompt ends it)
                out, _ = chunked_decode_attention(q, k_cache, v_cache, lens, window_size=window, **pages)
            else:
                if paged:  # the cached prefix (one length), contiguous: a copy
                    k_cache = gather_pages(k_cache, pages["block_table"])[:, :cached]
                    v_cache = gather_pages(v_cache, pages["block_table"])[:, :cached]
                if needs_grad:
                    # this step's own keys and values, so that a backward through the prompt reaches them
                    k_cache = torch.cat((k_cache[:, :cached], k), 1)
                    v_cache = torch.cat((v_cache[:, :cached], v), 1)
                out = dense_attention(q, k_cache, v_cache, causal=True,  # bottom-right: the prompt ends the cache
                                      window_size=window)
        return self._output(out)

    def _qkv(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """``x (B, T, dim)`` -> q ``(B, T, H, D)``, k, v ``(B, T, Hkv, D)``, normalised and rotated."""
        q, k, v = self._project(x)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def _project(self, x: torch.Tensor):
        """:meth:`_qkv` before the rotary embedding (low-rank calibration records ``rotary="pre"`` keys
        here)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``(B, T, H, D)`` -> ``(B, T, dim)``."""
        B, T = out.shape[:2]
        return self.out_proj(out.reshape(B, T, self.num_heads * self.head_dim))
