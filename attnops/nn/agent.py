"""``AgentAttention``: the authors' vision Agent Attention block (Han et al. 2024, LeapLabTHU/Agent-Attention,
agent_transformer/models/agent_deit.py ``AgentAttention``) over :func:`attnops.agent_attention`, with their
parameters under their names, so a state dict of their DeiT models loads as it is.

Its pieces around the two softmax products: agents pooled from the patch queries on the image grid
(``AdaptiveAvgPool2d``), the learned position biases of both products (7 x 7 tables interpolated bilinearly to
the grid, plus per-row and per-column terms, and one bias for the class token), and a depthwise 3 x 3
convolution of the patch values added to the patch outputs (their ``dwc``, which restores the feature diversity
that the low-rank agent product lacks).
"""

from __future__ import annotations

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.agent import agent_attention


class AgentAttention(nn.Module):
    """Agent attention for a ViT/DeiT block: a class token followed by a ``window x window`` grid of patches.

    Args:
        dim: model width; ``head_dim = dim / num_heads``.
        num_heads: heads.
        qkv_bias: bias of the q / k / v projection.
        attn_drop: must be 0 (dropout on the agent probabilities is not implemented; the authors' default).
        proj_drop: dropout after the output projection.
        agent_num: agents, a square (pooled to ``sqrt(agent_num) x sqrt(agent_num)`` bins).
        window: the patch grid's side; a call takes ``1 + window^2`` tokens.

    ``forward(x)``: ``x (B, 1 + window^2, dim)`` -> ``(B, 1 + window^2, dim)``. Memory is linear in the tokens (the
    two products have ``agent_num`` columns or rows).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, agent_num: int = 49, window: int = 14):
        super().__init__()
        check_heads(dim, num_heads, None)
        if attn_drop != 0.0:
            raise NotImplementedError("AgentAttention: attn_drop (dropout on the agent probabilities) is not "
                                      "implemented; use 0 (the authors' default) or proj_drop")
        pool = int(agent_num ** 0.5) if isinstance(agent_num, int) and not isinstance(agent_num, bool) else 0
        if pool < 1 or pool * pool != agent_num:
            raise ValueError(f"agent_num must be a square int >= 1 (agents pool to a square grid), got {agent_num!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < pool:
            raise ValueError(f"window must be an int >= sqrt(agent_num) = {pool}, got {window!r}")
        self.dim, self.num_heads, self.agent_num, self.window = dim, num_heads, agent_num, window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=(3, 3), padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, window, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, window))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, window, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, window, agent_num))
        self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
        self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, self.ac_bias,
                  self.ca_bias):
            nn.init.trunc_normal_(p, std=0.02)
        self.pool = nn.AdaptiveAvgPool2d(output_size=(pool, pool))

    def biases(self):
        """``(agent_bias (1, H, n, 1 + w^2), query_bias (1, H, 1 + w^2, n))``: the agents' bias on the keys and
        the queries' bias on the agents (the class token's column / row first)."""
        H, n, w = self.num_heads, self.agent_num, self.window
        grid = (w, w)
        an = nn.functional.interpolate(self.an_bias, size=grid, mode="bilinear").reshape(1, H, n, w * w)
        an = an + (self.ah_bias + self.aw_bias).reshape(1, H, n, w * w)
        na = nn.functional.interpolate(self.na_bias, size=grid, mode="bilinear").reshape(1, H, n, w * w)
        na = na.transpose(-1, -2) + (self.ha_bias + self.wa_bias).reshape(1, H, w * w, n)
        return torch.cat([self.ac_bias, an], dim=-1), torch.cat([self.ca_bias, na], dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_uncaptured("attnops.nn.AgentAttention")  # its op returns no block map: a capture would miss it
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] != 1 + self.window ** 2:
            raise ValueError(f"AgentAttention takes (B, 1 + window^2, dim) = (B, {1 + self.window ** 2}, {self.dim}) "
                             f"(a class token and the patch grid), got {tuple(x.shape)}")
        B, N, C = x.shape
        H, w = self.num_heads, self.window
        q, k, v = self.qkv(x).reshape(B, N, 3, H, C // H).unbind(2)  # (B, N, H, D) each
        patches = q[:, 1:].reshape(B, w, w, C).permute(0, 3, 1, 2)
        agents = self.pool(patches).reshape(B, C, self.agent_num).transpose(1, 2).reshape(B, self.agent_num, H, -1)
        agent_bias, query_bias = self.biases()
        out = agent_attention(q, k, v, agents=agents, agent_bias=agent_bias.to(q.dtype),
                              query_bias=query_bias.to(q.dtype), softmax_scale=self.scale).reshape(B, N, C)
        local = self.dwc(v[:, 1:].reshape(B, w, w, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N - 1, C)
        out = torch.cat([out[:, :1], out[:, 1:] + local], dim=1)
        return self.proj_drop(self.proj(out))
