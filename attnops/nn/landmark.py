"""``LandmarkAttention``: Landmark attention (Mohtashami and Jaggi 2023) as a causal self-attention layer that owns
its landmark token: a learned vector inserted after every ``block_size - 1`` tokens (the authors insert a landmark
token into the data every ``mem_freq`` tokens), attended with :func:`attnops.landmark_attention`, dropped from the
output, so the layer maps ``(B, S, dim)`` to ``(B, S, dim)`` and trains the landmark with the model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.landmark import landmark_attention


class LandmarkAttention(nn.Module):
    """Causal Landmark attention over ``x (B, S, dim)``.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: query heads; num_kv_heads: key / value heads dividing it (default num_heads).
        block_size: tokens per block including its landmark (the authors' ``mem_freq + 1``), >= 2.
        topk: earlier blocks each query retrieves by its landmark scores (None: all, the training form).
        bias: biases of the projections.

    No positional encoding of its own (add it to ``x``, or subclass ``_qkv``). ``forward(x)`` -> ``(B, S, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 64, topk: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, bias: bool = True):
        super().__init__()
        num_kv_heads, head_dim = check_heads(dim, num_heads, num_kv_heads)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.topk = block_size, topk
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.landmark = nn.Parameter(torch.randn(dim) * dim ** -0.5)

    def with_landmarks(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, dim)`` -> ``(B, S + S // (block_size - 1), dim)``: the landmark after every ``block_size - 1``
        tokens (so position ``j`` holds a landmark when ``j % block_size == block_size - 1``)."""
        B, S, C = x.shape
        n = self.block_size - 1
        full = S // n
        blocks = x[:, :full * n].reshape(B, full, n, C)
        marks = self.landmark.to(x.dtype).expand(B, full, 1, C)
        return torch.cat([torch.cat([blocks, marks], dim=2).reshape(B, full * self.block_size, C), x[:, full * n:]],
                         dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_uncaptured("attnops.nn.LandmarkAttention")  # its op returns no block map: a capture would miss it
        if x.dim() != 3:
            raise ValueError(f"LandmarkAttention takes (B, S, dim), got {tuple(x.shape)}")
        B, S, _ = x.shape
        seq = self.with_landmarks(x)
        T = seq.shape[1]
        q = self.q_proj(seq).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(seq).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(seq).view(B, T, self.num_kv_heads, self.head_dim)
        out = landmark_attention(q, k, v, block_size=self.block_size, topk=self.topk).reshape(B, T, -1)
        tokens = torch.arange(T, device=x.device) % self.block_size != self.block_size - 1
        return self.out_proj(out[:, tokens])
