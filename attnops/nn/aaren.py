"""``Aaren``: attention as a many-to-many RNN (Feng et al. 2024), a layer over :func:`attnops.aaren`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.aaren import AarenState, aaren


class Aaren(nn.Module):
    """Aaren layer: ``y_t = W_o [softmax_{i <= t}(q_h . k_i / sqrt(D)) v_i]_h`` with a learned query ``q_h``
    per head and ``k = x W_k``, ``v = x W_v`` (the paper's module: the query is a parameter, not a function of
    the input, which is what makes the prefix outputs an RNN).

    Args:
        dim: model width; ``num_heads`` divides it (``head_dim = dim / num_heads``).
        num_kv_heads: kv heads (default ``num_heads``): query head ``h`` reads kv head ``h // (H / Hkv)``.
        bias: biases of the k, v and output projections.

    ``forward(x, state=None)`` takes ``x (B, S, dim)`` and the :class:`AarenState` after the tokens before ``x``
    (None: a new sequence) and returns ``(y (B, S, dim), state)``: a prompt in one call, then one token at a
    time in O(1) each, the same outputs as the whole sequence at once.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, bias: bool = True):
        super().__init__()
        num_kv_heads, head_dim = check_heads(dim, num_heads, num_kv_heads)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) * self.head_dim ** -0.5)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"

    def forward(self, x: torch.Tensor, state: Optional[AarenState] = None) -> Tuple[torch.Tensor, AarenState]:
        refuse_uncaptured("attnops.nn.Aaren")  # its op returns no block map: a capture would miss it
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"Aaren expects x (B, S, {self.dim}), got {tuple(x.shape)}")
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        out, state = aaren(self.query.to(k.dtype), k, v, initial_state=state, output_final_state=True)
        return self.out_proj(out.reshape(B, S, self.dim)), state
