"""Float64 oracle of Routing Transformer attention: softmax attention under the mask "same cluster" (and causal)."""

from __future__ import annotations

from typing import Optional

import torch

from attnops.ops.softmax.reference import masked_attention


def routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_cluster: torch.Tensor,
                      k_cluster: torch.Tensor, *, causal: bool = True,
                      softmax_scale: Optional[float] = None) -> torch.Tensor:
    """``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)``, ``q_cluster (B, Sq, H)``, ``k_cluster (B, Sk, Hkv)``: query
    ``i`` of head ``h`` attends the keys ``j`` of kv head ``h // (H / Hkv)`` with ``k_cluster == q_cluster`` (and
    ``j <= i + Sk - Sq`` under ``causal``); a query with no such key gets zeros. O(N^2) memory."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    kc = k_cluster.repeat_interleave(H // Hkv, dim=2)  # (B, Sk, H)
    allowed = q_cluster.permute(0, 2, 1).unsqueeze(-1) == kc.permute(0, 2, 1).unsqueeze(-2)  # (B, H, Sq, Sk)
    if causal:
        allowed = allowed & (torch.arange(Sk).view(1, -1) <= torch.arange(Sq).view(-1, 1) + Sk - Sq)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    return masked_attention(q, k, v, allowed, scale)[0]
