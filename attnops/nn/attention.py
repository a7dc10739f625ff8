"""A modern attention block for new models: GQA/MQA, optional QK-norm and rotary embeddings, any
attnops family through its spec."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from attnops.maps.capture import attend
from attnops.nn.rotary import Rotary
from attnops.nn.specs import AttentionSpec, Dense, resolve_spec


class Attention(nn.Module):
    """Self-attention ``x (B, T, dim) -> (B, T, dim)`` with ``num_kv_heads`` key/value heads.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads dividing H (default H; 1 is multi-query).
        attention: an attnops spec (default ``Dense(causal=True)``).
        qk_norm: RMS-normalise q and k per head before attention (as OLMo-2 / Qwen3).
        rope: ``None`` (no positions), a float theta (e.g. ``10000.0``), or a :class:`Rotary`.
        bias: biases on the projections.

    ``forward(x, positions=None)``: ``positions (T,)`` or ``(B, T)`` feed the rotary embedding
    (default ``0..T-1``).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 attention: Optional[AttentionSpec] = None, qk_norm: bool = False,
                 rope: Union[None, float, Rotary] = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads}), divisible into "
                             "heads")
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        attention = resolve_spec(attention, Dense(causal=True))
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

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        out, _ = attend(self, self.attention, *self._qkv(x, positions))
        return self._output(out)

    def _qkv(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """``x (B, T, dim)`` -> q ``(B, T, H, D)``, k, v ``(B, T, Hkv, D)``, normalised and rotated."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, {self.dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``(B, T, H, D)`` -> ``(B, T, dim)``."""
        B, T = out.shape[:2]
        return self.out_proj(out.reshape(B, T, self.num_heads * self.head_dim))
