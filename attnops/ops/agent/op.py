"""Agent attention as two calls of the exact softmax core (forward and backward through it).

With agents ``A (n rows)`` per head, the paper's generalized linear attention is

    V_A = softmax(scale * A K^T + B_ak) V        (agent aggregation: n x N scores)
    O   = softmax(scale * Q A^T + B_qa) V_A      (agent broadcast:   N x n scores)

so no N x N score matrix exists: both products are ``attnops.attention`` calls with ``n`` keys or ``n``
queries, and the biases are its ``attn_bias``. The authors' code (LeapLabTHU/Agent-Attention,
agent_transformer/models/agent_deit.py, ``AgentAttention.forward``) pools the agents from the queries
with ``AdaptiveAvgPool2d`` over the image grid; for sequences this pools with ``adaptive_avg_pool1d``
(bins ``[floor(i N / n), ceil((i + 1) N / n))``), and any other agents can be passed. The paper is a vision
method and the authors' code is non-causal; so is this op (a causal call is refused).
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import check_qkv, resolve_softmax_scale
from attnops.ops.softmax import attention


def agent_tokens(q: torch.Tensor, num_agents: int) -> torch.Tensor:
    """``q (B, S, H, D)`` -> ``(B, n, H, D)``: the mean query of each of ``n`` adaptive bins of the
    sequence (``torch.nn.functional.adaptive_avg_pool1d``'s bins), differentiable."""
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"num_agents must be an int >= 1, got {num_agents!r}")
    B, S, H, D = q.shape
    if num_agents > S:
        raise ValueError(f"num_agents ({num_agents}) must not exceed the sequence length ({S})")
    pooled = torch.nn.functional.adaptive_avg_pool1d(q.permute(0, 2, 3, 1).reshape(B, H * D, S), num_agents)
    return pooled.reshape(B, H, D, num_agents).permute(0, 3, 1, 2)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_agents: Optional[int] = None,
    agents: Optional[torch.Tensor] = None,
    agent_bias: Optional[torch.Tensor] = None,
    query_bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Agent attention: ``softmax(s Q A^T + B_qa) softmax(s A K^T + B_ak) V``, exact, forward and backward.

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        num_agents: ``n``: the agents are the queries pooled into ``n`` bins (:func:`agent_tokens`).
        agents: ``(B, n, H, D)`` agent tokens instead (exactly one of the two).
        agent_bias: the agents' bias on the keys (the paper's position bias), broadcastable to
            ``(B, H, n, Sk)``, with its gradient.
        query_bias: the queries' bias on the agents, broadcastable to ``(B, H, Sq, n)``, with its gradient.
        softmax_scale: both softmaxes' scale, default ``D ** -0.5`` (the authors' ``head_dim ** -0.5``).
        causal: must be False: agent attention mixes every position into every agent.
        backend: as in :func:`attnops.attention`.

    Returns ``(B, Sq, H, D)``. Memory ``O((Sq + Sk) n)`` for the scores, never ``Sq x Sk``.
    """
    shape = check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal:
        raise ValueError("agent attention is non-causal (every agent pools the whole sequence; the paper and the "
                         "authors' code have no causal form)")
    if (num_agents is None) == (agents is None):
        raise ValueError("give exactly one of num_agents= and agents=")
    if agents is None:
        agents = agent_tokens(q, num_agents)
    elif (not isinstance(agents, torch.Tensor) or agents.dim() != 4 or agents.shape[0] != shape.batch
          or agents.shape[2:] != q.shape[2:]):
        raise ValueError(f"agents must be (B, n, H, D) = ({shape.batch}, n, {shape.num_heads}, {shape.head_dim}), "
                         f"got {tuple(agents.shape) if isinstance(agents, torch.Tensor) else type(agents).__name__}")
    agents = agents.to(q.dtype)
    n = agents.shape[1]
    _check_bias("agent_bias", agent_bias, (shape.batch, shape.num_heads, n, shape.seq_len_k))
    _check_bias("query_bias", query_bias, (shape.batch, shape.num_heads, shape.seq_len_q, n))
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    # Half-precision inputs: the aggregation runs in float32 (k and v upcast, O(Sk D)), because its output is
    # an input of the second softmax product: in bf16 the two roundings of P compound past the accuracy rule.
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    agent_v = attention(agents.to(work), k.to(work), v.to(work), softmax_scale=scale, attn_bias=agent_bias,
                        backend=backend)
    return attention(q, agents, agent_v.to(q.dtype), softmax_scale=scale, attn_bias=query_bias, backend=backend)


def _check_bias(name: str, bias: Optional[torch.Tensor], full) -> None:
    """The two biases are ``attn_bias`` of the two calls; checked here so that errors name them."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not (bias.is_floating_point() or bias.dtype == torch.bool):
        raise TypeError(f"{name} must be a floating (additive) or bool (mask) tensor, got {type(bias).__name__}")
    if bias.dim() > 4 or any(s not in (1, f) for s, f in zip(bias.shape[::-1], full[::-1])):
        raise ValueError(f"{name} must broadcast to (B, H, rows, cols) = {tuple(full)} with every dim full or 1, "
                         f"got {tuple(bias.shape)}")
