"""The float64 oracle of linear attention: the recurrence token by token, and the block map from the
full weight matrix."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import MapRequest


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: Optional[torch.Tensor],
                     initial_state: Optional[torch.Tensor], *, feature_map, causal: bool, softmax_scale: float,
                     chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Linear attention token by token (the definition): ``S_t = exp(g_t) * S_{t-1} + phi(k_t) v_t^T``,
    ``o_t = softmax_scale * phi(q_t)^T S_t``; non-causal: one state over the whole sequence. Shapes as
    ``attnops.ops.linear.chunk.linear_attention`` (normalisation's ones column in ``v``);
    computes in the inputs' dtype, state included. ``chunk_size`` is unused."""
    q, k = feature_map(q), feature_map(k)
    B, S, H, Dk = q.shape
    group = H // k.shape[2]
    q = q * softmax_scale
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    if not causal:
        state = state + torch.einsum("bshk,bshv->bhkv", k, v)
        return torch.einsum("bshk,bhkv->bshv", q, state), state
    outs = []
    for t in range(S):
        if log_gate is not None:
            state = torch.exp(log_gate[:, t].to(q.dtype)).unsqueeze(-1) * state  # (B, H, 1 | Dk, 1)
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    out = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1])
    return out, state


def linear_block_map(q: torch.Tensor, k: torch.Tensor, log_gate: Optional[torch.Tensor], *, feature_map,
                     causal: bool, normalize: bool, softmax_scale: float, request: MapRequest) -> torch.Tensor:
    """The block map of linear attention from its full ``(S, Sk)`` weight matrix (the definition of
    ``attnops.ops.linear.map.linear_block_map``, computed independently): weights
    ``softmax_scale * phi(q_t) . (prod of the gates after s up to t) * phi(k_s)``, ``s <= t`` when causal,
    each row divided by its sum (+ 1e-6) when normalised; pooled as sums over key blocks, means over
    query blocks."""
    q, k = feature_map(q) * softmax_scale, feature_map(k)
    B, S, H, Dk = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    Sk = k.shape[1]
    if log_gate is None:
        w = torch.einsum("bthd,bshd->bhts", q, k)
    else:
        gamma = log_gate.to(q.dtype).clamp(min=-80.0).cumsum(1)  # (B, S, H, G)
        diff = gamma.unsqueeze(2) - gamma.unsqueeze(1)  # (B, t, s, H, G)
        diff = diff.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None, :, :, None, None],
                                float("-inf"))
        w = torch.einsum("bthd,bshd,btshd->bhts", q, k, torch.exp(diff).expand(B, S, S, H, Dk))
    if causal:
        w = w.masked_fill(~torch.ones(S, Sk, dtype=torch.bool, device=q.device).tril(), 0.0)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-6)
    bq, bk = request.block_q, request.block_k
    nq, nk = -(-S // bq), -(-Sk // bk)
    w = torch.nn.functional.pad(w, (0, nk * bk - Sk, 0, nq * bq - S))
    sums = w.view(B, H, nq, bq, nk, bk).sum((3, 5))
    rows = torch.clamp(S - torch.arange(nq, device=q.device) * bq, max=bq).to(w.dtype)
    return sums / rows[:, None]


dispatch.register("linear_attention", "reference", linear_attention)
