"""The float64 oracle of ReGLA: the paper's equations, one step at a time (no chunking, no log space).

    g_t = sigmoid(gate_t), r_t = sigmoid(refine_t), F_t = (1 - r_t) g_t^2 + r_t (1 - (1 - g_t)^2)
    phi_q(q_t) = exp(q_t - max_j q_{t,j}),  phi_k(k_t) = exp(k_t - max_{s,j} k_{s,j})
    S_t = diag(F_t) S_{t-1} + phi_k(k_t)^T v_t,  o_t = scale * phi_q(q_t) S_t

``key_shift="running"`` takes the keys' max over s <= t instead and, when it grows, multiplies the state by
``exp(m_{t-1} - m_t)`` before the step (op.py's decision).

Runs in q's dtype, the gates' logits cast to it (float64 for the oracle; the kernel's dtype for the accuracy rule's baseline).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.ops.regla.op import variance_reduction_scale


def regla_reference(q, k, v, gate, refine, *, softmax_scale: Optional[float] = None, key_shift: str = "running",
                    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """q ``(B, S, H, D)``, k ``(B, S, Hkv, D)``, v ``(B, S, Hkv, Dv)``, gate / refine logits ``(B, S, H, D)``
    -> ``(out (B, S, H, Dv), (state (B, H, D, Dv), key_max (B, Hkv)))``. ``initial_state``: ``(state, key_max)``,
    the state rescaled to the new shift ``max(key_max, this call's max)``."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    scale = variance_reduction_scale(D) if softmax_scale is None else softmax_scale
    g, r = torch.sigmoid(gate.to(q.dtype)), torch.sigmoid(refine.to(q.dtype))
    forget = (1 - r) * g ** 2 + r * (1 - (1 - g) ** 2)
    phi_q = torch.exp(q - q.amax(dim=-1, keepdim=True))
    state = q.new_zeros(B, H, D, v.shape[-1])
    vv = v.repeat_interleave(group, dim=2)
    if key_shift == "sequence":
        key_max = k.amax(dim=(1, 3))
        if initial_state is not None:
            prev, prev_max = initial_state
            key_max = torch.maximum(key_max, prev_max.to(q.dtype))
            state = prev.to(q.dtype) * torch.exp(prev_max.to(q.dtype) - key_max).repeat_interleave(group, 1)[..., None, None]
        shifts = [key_max] * S
    else:
        key_max = k[:, 0].amax(dim=-1) if initial_state is None else initial_state[1].to(q.dtype)
        if initial_state is not None:
            state = initial_state[0].to(q.dtype)
        shifts = []
        for t in range(S):
            new_max = torch.maximum(key_max, k[:, t].amax(dim=-1))
            shifts.append((new_max, torch.exp(key_max - new_max)))
            key_max = new_max
    outs = []
    for t in range(S):
        if key_shift == "sequence":
            shift = shifts[t]
        else:
            shift, rescale = shifts[t]
            state = state * rescale.repeat_interleave(group, 1)[..., None, None]
        phi_k = torch.exp(k[:, t] - shift[..., None]).repeat_interleave(group, dim=1)  # (B, H, D)
        state = forget[:, t, :, :, None] * state + phi_k[..., None] * vv[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", phi_q[:, t], state))
    return torch.stack(outs, dim=1), (state, key_max)
