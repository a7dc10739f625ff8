"""The float64 oracle of Aaren: the definition, causal softmax attention of one query at every position."""

from __future__ import annotations

import torch


def aaren(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float) -> torch.Tensor:
    """``o_t = softmax_{i <= t}(scale q . k_i) . v``: q ``(H, D)``, k ``(B, S, Hkv, D)``, v ``(B, S, Hkv, Dv)``
    -> ``(B, S, H, Dv)``, with the explicit ``S x S`` score matrix, in the inputs' dtype."""
    H = q.shape[0]
    g = H // k.shape[2]
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("hd,bshd->bhs", q, kk) * softmax_scale  # (B, H, S)
    S = s.shape[-1]
    scores = s.unsqueeze(-2).expand(*s.shape[:2], S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, vv)
