"""The float64 oracle of agent attention: the paper's equations with explicit score matrices."""

from __future__ import annotations

from typing import Optional

import torch


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, *, softmax_scale: float,
                    agent_bias: Optional[torch.Tensor] = None,
                    query_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(s Q A^T + B_qa) softmax(s A K^T + B_ak) V`` with explicit score matrices, in the inputs'
    dtype (the oracle: float64 inputs): q ``(B, Sq, H, D)``, k, v ``(B, Sk, Hkv, D)``, agents ``(B, n, H, D)``;
    returns ``(B, Sq, H, D)``."""
    g = q.shape[2] // k.shape[2]
    q, a = q.transpose(1, 2), agents.to(q.dtype).transpose(1, 2)
    k = k.repeat_interleave(g, dim=2).transpose(1, 2)
    v = v.repeat_interleave(g, dim=2).transpose(1, 2)
    agent_scores = softmax_scale * a @ k.transpose(-1, -2)
    if agent_bias is not None:
        agent_scores = agent_scores + agent_bias.to(q.dtype)
    agent_v = torch.softmax(agent_scores, -1) @ v
    query_scores = softmax_scale * q @ a.transpose(-1, -2)
    if query_bias is not None:
        query_scores = query_scores + query_bias.to(q.dtype)
    return (torch.softmax(query_scores, -1) @ agent_v).transpose(1, 2)
