"""Mixture-of-Head attention on the exact softmax core, computing only the chosen (token, head) pairs.

The chosen rows of every (batch, kv head) are packed in the order (batch, kv head, token, head of the group)
into one sequence of queries; the keys of the same (batch, kv head) are one stretch of a packed key sequence.
:func:`attnops.ops.softmax.bounded.bounded_attention` gives each packed row its own key interval, the causal /
window predicates folded in at the row's original position: rows are nondecreasing in position within a
stretch and the stretches follow each other, so the bounds are monotone, as the kernels need. The kernels
then visit only the key tiles the packed rows see: the work is that of the chosen rows (plus the partial
tiles at stretch boundaries), never N x N, and the keys are not repeated per query head.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core.checks import (autocast_inputs, check_causal, check_qkv, clamp_window, refuse_unsupported_ad,
                                 resolve_softmax_scale)
from attnops.core.masks import check_window_size
from attnops.ops.softmax.bounded import bounded_attention


def moh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_weights: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Mixture-of-Head attention: ``out[b, t, h] = head_weights[b, t, h] * attention_h(q[b, t, h], K, V)``,
    computed only where ``head_weights != 0`` (elsewhere exactly 0). The module sums the heads through its
    output projection, which is MoH's weighted sum ``sum_h g_h H_h W_o^h``.

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        head_weights: ``(B, Sq, H)``: each token's weight per head (floating, differentiable; the gates of
            :func:`learned_head_gates` or the 0 / 1 of :func:`query_norm_heads`), or a bool mask of chosen
            heads (weight 1). A zero weight means the pair is not computed.
        causal, window_size: as in :func:`attnops.attention` (bottom-right aligned), at each token's
            position.
        softmax_scale: default ``D ** -0.5``.
        backend: the softmax core's backend (as in :func:`attnops.attention`).

    Returns:
        ``(B, Sq, H, D)`` in q's dtype. Gradients flow to q, k, v and floating ``head_weights``.
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("moh_attention", q, k, v)
    causal = check_causal(causal)
    left, right = clamp_window(check_window_size(window_size), shape.seq_len_q, shape.seq_len_k)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    weights = _check_head_weights(head_weights, shape, q.device)
    B, Sq, H, _ = q.shape
    Sk, Hkv = shape.seq_len_k, shape.num_kv_heads
    group = H // Hkv

    # packed rows in (batch, kv head, token, head of the group) order
    chosen = (weights != 0).view(B, Sq, Hkv, group).permute(0, 2, 1, 3)
    b, kh, t, g = chosen.nonzero(as_tuple=True)
    h = kh * group + g
    stretch = (b * Hkv + kh) * Sk  # where this row's keys start in the packed key sequence
    pos = t + (Sk - Sq)  # the key position the row is aligned to
    lo = (pos - left).clamp(0, Sk) if left >= 0 else torch.zeros_like(pos)
    if causal:
        right = 0
    hi = (pos + right + 1).clamp(0, Sk) if right >= 0 else torch.full_like(pos, Sk)
    hi = torch.maximum(hi, lo)
    total_k = B * Hkv * Sk
    qp = q[b, t, h].unsqueeze(0).unsqueeze(2)  # (1, n, 1, D)
    kp = k.permute(0, 2, 1, 3).reshape(1, total_k, 1, k.shape[-1])
    vp = v.permute(0, 2, 1, 3).reshape(1, total_k, 1, v.shape[-1])
    out, _lse = bounded_attention(qp, kp, vp, torch.stack([stretch + lo, stretch + hi], dim=-1), softmax_scale=scale,
                                  api="moh_attention", backend=backend)
    rows = out[0, :, 0] * weights[b, t, h].to(out.dtype).unsqueeze(-1)
    return out.new_zeros(B, Sq, H, v.shape[-1]).index_put((b, t, h), rows)


def _check_head_weights(head_weights, shape, device) -> torch.Tensor:
    expected = (shape.batch, shape.seq_len_q, shape.num_heads)
    if not isinstance(head_weights, torch.Tensor):
        raise TypeError(f"head_weights must be a tensor of shape (B, Sq, H) = {expected}, got "
                        f"{type(head_weights).__name__}")
    if tuple(head_weights.shape) != expected:
        raise ValueError(f"head_weights must be (B, Sq, H) = {expected}, got {tuple(head_weights.shape)}")
    if head_weights.device != torch.device(device):
        raise ValueError(f"head_weights is on {head_weights.device}, q on {device}")
    if not (head_weights.dtype.is_floating_point or head_weights.dtype == torch.bool):
        raise TypeError(f"head_weights must be floating (weights) or bool (chosen heads), got {head_weights.dtype}")
    return head_weights
