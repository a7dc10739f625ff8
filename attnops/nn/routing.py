"""``RoutingAttention``: the Routing Transformer's attention layer (Roy et al. 2021) over
:func:`attnops.routing_attention`, owning its centroids and their online k-means."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.clustered import routing_attention, update_centroids


def check_routing_args(num_clusters, decay) -> None:
    """``num_clusters`` an int >= 1, ``decay`` (the k-means moving average) a number in [0, 1): ValueError otherwise."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")


class RoutingAttention(nn.Module):
    """Self-attention where each query attends the keys of its own cluster (centroids shared by queries and keys,
    one set per kv head), with the q / k / v / output projections.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: query heads H; ``num_kv_heads`` key / value heads dividing it (default H).
        num_clusters: centroids per kv head (the paper uses about ``sqrt(N)``).
        causal: a decoder block (default True).
        decay: the k-means moving average (the paper's lambda, 0.999).
        bias: biases of the projections.

    ``forward(x)``: ``x (B, S, dim)`` -> ``(B, S, dim)``. In training each call then moves the centroids
    (a buffer, saved with the model) toward the unit queries and keys assigned to them (:func:`update_centroids`);
    gradients reach the projections through the attention, never the centroids.
    """

    def __init__(self, dim: int, num_heads: int, num_clusters: int, num_kv_heads: Optional[int] = None,
                 causal: bool = True, decay: float = 0.999, bias: bool = False):
        super().__init__()
        num_kv_heads, head_dim = check_heads(dim, num_heads, num_kv_heads)
        check_routing_args(num_clusters, decay)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.num_clusters, self.causal, self.decay = num_clusters, causal, float(decay)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("centroids", nn.functional.normalize(torch.randn(num_kv_heads, num_clusters, head_dim),
                                                                  dim=-1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"num_clusters={self.num_clusters}, causal={self.causal}, decay={self.decay}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_uncaptured("attnops.nn.RoutingAttention")  # its op returns no block map: a capture would miss it
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"RoutingAttention expects x (B, S, {self.dim}), got {tuple(x.shape)}")
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        out = routing_attention(q, k, v, self.centroids.to(q.dtype), causal=self.causal)
        if self.training:
            update_centroids(self.centroids, q.detach(), k.detach(), self.decay)
        return self.out_proj(out.reshape(B, S, self.dim))
