"""Flowformer's flow attention on the linear-attention core.

Queries are sinks and keys sources of a flow network; with ``phi = sigmoid``, the incoming flow of sink i is
``I_i = phi(q_i) . sum_j phi(k_j)`` and the outgoing flow of source j is ``O_j = phi(k_j) . sum_i phi(q_i)``.
Conservation refines them (``I^_i = phi(q_i) . sum_j phi(k_j) / O_j``, ``O^_j = phi(k_j) . sum_i phi(q_i) / I_i``),
sources compete (a softmax over ``O^``, times their count, weights the values) and sinks are allocated
(``sigmoid(I^)`` gates the output):

    out_i = sigmoid(I^_i) * (phi(q_i) / I_i) . sum_j phi(k_j) (v_j * competition_j)

The last product is linear attention without normalisation (:func:`attnops.linear_attention`, identity feature
map, scale 1): O(N D Dv), never N x N. The causal form replaces every sum over sources or sinks by a prefix
sum and rescales by the position's count, as the authors' causal code does. This follows thuml/Flowformer:
``Flow_Attention`` in Flow_Attention.py for the non-causal form, and ``Flowformer_attention`` in
Flowformer_RL/decision_transformer/models/flowformer_attention.py for the causal one (Flow_Attention.py's
``Flow_Attention_Causal`` divides the (B, H, L, 1) incoming flow by a (1, 1, L) count, a broadcast that only
runs when L equals the head dim; the RL file's ``normal[..., None]`` is the evident intent). The sources'
clamp is ``source_clamp`` (1.0 in Flow_Attention.py, 10.0 in the RL file).
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import check_qkv
from attnops.ops.linear import linear_attention


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1)


def flow_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-6,
    source_clamp: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Flowformer's flow attention: q ``(B, Sq, H, D)``, k ``(B, Sk, Hkv, D)``, v ``(B, Sk, Hkv, Dv)`` (the
    projections, before the sigmoid feature map the op applies) -> ``(B, Sq, H, Dv)``.

    Args:
        causal: prefix flows (``Sq == Sk``), as the authors' causal code; else every query sees every key
            (``Sk`` may differ: cross-attention).
        eps: the authors' 1e-6, added to the features and sums in each flow.
        source_clamp: the conserved source flow is clamped to ``[-c, c]`` before the competition.
        backend: the linear-attention core's backend (as in :func:`attnops.linear_attention`).

    Forward and backward through autograd and the core; NaN in, NaN out.
    """
    shape = check_qkv(q, k, k)
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[:3] != k.shape[:3] or v.dtype != k.dtype \
            or v.device != k.device:
        raise ValueError(f"v must be (B, Sk, Hkv, Dv) = {tuple(k.shape[:3])} + (Dv,) in k's dtype and device, got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal and shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"causal flow attention needs Sq == Sk, got {shape.seq_len_q} and {shape.seq_len_k}")
    for name, value in (("eps", eps), ("source_clamp", source_clamp)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    group = shape.num_heads // shape.num_kv_heads
    phi_q = torch.sigmoid(q).transpose(1, 2)  # (B, H, L, D): the sinks
    phi_k = torch.sigmoid(k.repeat_interleave(group, dim=2)).transpose(1, 2)  # (B, H, S, D): the sources
    values = v.repeat_interleave(group, dim=2)
    L, S = shape.seq_len_q, shape.seq_len_k
    if causal:
        count = torch.arange(1, L + 1, device=q.device, dtype=phi_q.dtype).view(1, 1, L)
        incoming = count / _dot(phi_q + eps, phi_k.cumsum(2) + eps)
        outgoing = count / _dot(phi_k + eps, phi_q.cumsum(2) + eps)
        conserved_sink = _dot(phi_q + eps, (phi_k * outgoing.unsqueeze(-1)).cumsum(2) + eps) / count
        conserved_source = _dot(phi_k + eps, (phi_q * incoming.unsqueeze(-1)).cumsum(2) + eps) / count
        source = torch.exp(conserved_source.clamp(-source_clamp, source_clamp))
        competition = source / source.cumsum(-1) * count
        allocation = torch.sigmoid(conserved_sink)
        sinks = phi_q * (incoming / count).unsqueeze(-1)
    else:
        incoming = 1.0 / _dot(phi_q + eps, phi_k.sum(2, keepdim=True) + eps)
        outgoing = 1.0 / _dot(phi_k + eps, phi_q.sum(2, keepdim=True) + eps)
        conserved_sink = _dot(phi_q + eps, (phi_k * outgoing.unsqueeze(-1)).sum(2, keepdim=True) + eps)
        conserved_source = _dot(phi_k + eps, (phi_q * incoming.unsqueeze(-1)).sum(2, keepdim=True) + eps)
        competition = torch.softmax(conserved_source.clamp(-source_clamp, source_clamp), dim=-1) * float(S)
        allocation = torch.sigmoid(conserved_sink * (float(L) / float(S)))
        sinks = phi_q * incoming.unsqueeze(-1)
    out = linear_attention(sinks.transpose(1, 2), phi_k.transpose(1, 2),
                           values * competition.transpose(1, 2).unsqueeze(-1), feature_map="identity",
                           causal=causal, normalize=False, softmax_scale=1.0, backend=backend)
    return out * allocation.transpose(1, 2).unsqueeze(-1)
