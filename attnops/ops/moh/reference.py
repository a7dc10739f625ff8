"""Float64 oracle of Mixture-of-Head attention: every head's exact attention, weighted per (token, head)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def moh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_weights: torch.Tensor, *,
                  causal: bool = False, softmax_scale: Optional[float] = None,
                  window_size: Tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """``out[b, t, h] = head_weights[b, t, h] * softmax(scale q_t K_h^T + mask) V_h``; q ``(B, Sq, H, D)``,
    k, v ``(B, Sk, Hkv, D)``, head_weights ``(B, Sq, H)``; O(N^2) memory, a test oracle. Masks are
    bottom-right aligned as in :func:`attnops.attention`; a row with no key gets zeros, as does every pair of
    weight 0 (even where its attention would be NaN: it is not computed)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    kh = k.repeat_interleave(H // Hkv, dim=2)
    vh = v.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    left, right = window_size
    keep = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0 and not causal:
        keep &= j <= i + right
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, dim=-1), torch.zeros_like(s))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vh)
    w = head_weights.to(out.dtype)[..., None]
    return torch.where(w != 0, out * w, torch.zeros_like(out))
