"""Multi-query / grouped-query attention block with KV-cache decoding."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnops.kv_cache import KVCache
from attnops.ops.attention import attention
from attnops.ops.decode import MAX_NEW_TOKENS, decode_attention


class MultiQueryAttention(nn.Module):
    """Causal self-attention with ``num_kv_heads`` shared key/value heads (1: multi-query; between
    1 and ``num_heads``: grouped-query), for training and for generation with a KV cache.

    Args:
        embed_dim: model width E; ``head_dim = E / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads, dividing H (default 1).
        bias: biases on the projections.

    ``forward(x)``, ``x (B, T, E)``: training / full-sequence forward through the block-sparse core
    (causal, differentiable). ``forward(x, cache=cache)``: appends the new tokens' keys and values to
    ``cache`` (from :meth:`make_cache`) and attends over it with :func:`attnops.decode_attention`
    (up to 64 new tokens; a longer prompt goes through :func:`attnops.attention` on the cached
    prefix, which needs all sequences at the same length).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int = 1, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.k_proj.weight
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if cache is None:
            out = attention(q, k, v, causal=True)
        else:
            k_cache, v_cache, lens = cache.append(k, v)
            if T <= MAX_NEW_TOKENS:
                out = decode_attention(q, k_cache, v_cache, lens)
            else:
                if int(lens.min()) != int(lens.max()):
                    raise ValueError("a prompt longer than 64 tokens needs all cached sequences at one length")
                out = attention(q, k_cache, v_cache, causal=True)  # bottom-right: the prompt ends the cache
        return self.out_proj(out.reshape(B, T, self.num_heads * self.head_dim))
