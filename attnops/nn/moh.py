"""``MoHAttention``: Mixture-of-Head attention (Jin et al. 2024) with learned head gates, over
:func:`attnops.moh_attention`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.moh import learned_head_gates, moh_attention


class MoHAttention(nn.Module):
    """Self-attention where every token routes to ``top_k`` of the routed heads, plus ``num_shared_heads``
    always-active heads, and sums the heads with learned weights (the authors' MoH-ViT / MoH-DiT attention,
    SkyworkAI/MoH MoH-ViT/attention.py; gates as :func:`attnops.ops.moh.learned_head_gates`). Only the chosen
    (token, head) pairs run attention.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: heads H, the shared ones first.
        num_shared_heads: ``Hs`` in ``[0, H]``; ``H`` means no routing (every head, softmax weights).
        top_k: routed heads per token, in ``[1, H - Hs]`` (ignored when ``Hs == H``).
        num_kv_heads: key / value heads dividing H (default H).
        causal: a decoder block (default True); ``False`` is the authors' vision block.
        bias: biases of the q / k / v and output projections (the router has none, as the authors').

    ``forward(x)``: ``x (B, S, dim)`` -> ``(B, S, dim)``. After each call ``load_balance_loss`` holds the
    router's load-balance loss of that call (0-d, differentiable; add ``beta *`` it to the training loss, as the
    authors' training adds their ``LOAD_BALANCING_LOSSES``) and ``active_fraction`` the fraction of (token,
    head) pairs computed.
    """

    def __init__(self, dim: int, num_heads: int, num_shared_heads: int, top_k: int,
                 num_kv_heads: Optional[int] = None, causal: bool = True, bias: bool = True):
        super().__init__()
        num_kv_heads, head_dim = check_heads(dim, num_heads, num_kv_heads)
        if isinstance(num_shared_heads, bool) or not isinstance(num_shared_heads, int) or \
                not 0 <= num_shared_heads <= num_heads:
            raise ValueError(f"num_shared_heads must be an int in [0, {num_heads}], got {num_shared_heads!r}")
        num_routed = num_heads - num_shared_heads
        if num_routed and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_routed):
            raise ValueError(f"top_k must be an int in [1, {num_routed}] (the routed heads), got {top_k!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.num_shared_heads, self.top_k, self.causal = num_shared_heads, top_k, causal
        self.head_dim = head_dim
        kv = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv, bias=bias)
        self.v_proj = nn.Linear(dim, kv, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        # the authors' wg (routed), wg_1 (shared; none for a single shared head, whose softmax is 1), wg_0 (mix)
        self.routed_gate = nn.Linear(dim, num_routed, bias=False) if num_routed else None
        self.shared_gate = nn.Linear(dim, num_shared_heads, bias=False) if num_shared_heads > 1 else None
        self.mix_gate = nn.Linear(dim, 2, bias=False) if num_routed and num_shared_heads else None
        self.load_balance_loss: Optional[torch.Tensor] = None
        self.active_fraction: Optional[float] = None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"num_shared_heads={self.num_shared_heads}, top_k={self.top_k}, causal={self.causal}")

    def gates(self, x: torch.Tensor):
        """The :class:`attnops.ops.moh.MoHGates` of ``x (B, S, dim)``."""
        shared = None
        if self.num_shared_heads:
            shared = self.shared_gate(x) if self.shared_gate is not None else x.new_zeros(*x.shape[:2], 1)
        return learned_head_gates(self.routed_gate(x) if self.routed_gate is not None else None, self.top_k,
                                  shared_logits=shared, mix_logits=self.mix_gate(x) if self.mix_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_uncaptured("attnops.nn.MoHAttention")  # its op returns no block map: a capture would miss it
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoHAttention expects x (B, S, {self.dim}), got {tuple(x.shape)}")
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        gates = self.gates(x)
        self.load_balance_loss = gates.load_balance_loss
        self.active_fraction = float((gates.weights != 0).float().mean()) if gates.weights.numel() else 0.0
        out = moh_attention(q, k, v, gates.weights, causal=self.causal)
        return self.out_proj(out.reshape(B, S, self.dim))
