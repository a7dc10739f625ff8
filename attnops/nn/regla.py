"""``ReGLA``: the refined gated linear attention layer (Lu et al. 2025) on :func:`attnops.regla_attention`, with a
recurrent state for decoding."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from attnops.maps.capture import refuse_uncaptured
from attnops.nn.heads import check_heads
from attnops.ops.regla import ReGLAState, regla_attention
from attnops.ops.regla.op import KEY_SHIFTS

NORMS = ("layernorm", "rmsnorm")


class ReGLAGates(nn.Module):
    """What ReGLA adds to an existing attention layer (a Hugging Face model's, by
    :func:`attnops.integrations.transformers.linearize`): ``gate_proj`` and ``refine_proj`` (``embed_dim -> H *
    head_dim``, with bias), the logits of the forget and refining gates per key channel, and ``norm``, the output
    normalisation per head. ``forward(x (B, T, embed_dim)) -> (gate, refine)``, each ``(B, T, H, head_dim)``."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, output_norm: str = "layernorm", device=None,
                 dtype=None):
        super().__init__()
        if output_norm not in NORMS:
            raise ValueError(f"output_norm must be one of {NORMS}, got {output_norm!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        kw = dict(bias=True, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
        self.refine_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
        norm = nn.LayerNorm if output_norm == "layernorm" else nn.RMSNorm
        self.norm = norm(head_dim, eps=1e-5, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        return self.gate_proj(x).view(shape), self.refine_proj(x).view(shape)


class ReGLA(nn.Module):
    """Causal ReGLA ``x (B, T, embed_dim) -> (B, T, embed_dim)``.

    Args:
        embed_dim: model width; ``head_dim = embed_dim / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads dividing H (default H).
        output_norm: the normalisation layer the paper puts on the output in place of a denominator,
            ``"layernorm"`` (default) or ``"rmsnorm"``, per head over the head dim, one weight shared by the heads.
        bias: biases on the q/k/v/out projections (the gate projections always have one).
        key_shift: as :func:`attnops.regla_attention`: ``"running"`` (default; causal, and decoding equals one
            call) or ``"sequence"`` (the paper's letter).

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; ``regla`` (:class:`ReGLAGates`, as a linearized
    Hugging Face layer has it): ``gate_proj`` and ``refine_proj`` (``embed_dim -> H * head_dim``), the forget gate's
    and the refining gate's logits per key channel, and ``norm``.

    ``forward(x, state=None, use_cache=False)``: ``state`` (a :class:`attnops.ops.regla.ReGLAState`) continues a
    sequence; with ``use_cache=True`` the result is ``(y, state)``. Prefill then token-by-token decoding equals one
    call over the whole sequence (with ``key_shift="sequence"``, up to a positive factor per head before the norm).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 output_norm: str = "layernorm", bias: bool = False, key_shift: str = "running", device=None,
                 dtype=None):
        super().__init__()
        num_kv_heads, head_dim = check_heads(embed_dim, num_heads, num_kv_heads)
        if key_shift not in KEY_SHIFTS:
            raise ValueError(f"key_shift must be one of {KEY_SHIFTS}, got {key_shift!r}")
        self.key_shift = key_shift
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)
        self.regla = ReGLAGates(embed_dim, num_heads, self.head_dim, output_norm, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: Optional[ReGLAState] = None, use_cache: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, ReGLAState]]:
        refuse_uncaptured("attnops.nn.ReGLA")  # its op returns no block map: a capture would miss it
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, T, {self.embed_dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        gate, refine = self.regla(x)
        out, new_state = regla_attention(q, k, v, gate, refine, key_shift=self.key_shift, initial_state=state,
                                         output_final_state=True)
        y = self.out_proj(self.regla.norm(out).reshape(B, T, H * D))
        return (y, new_state) if use_cache else y
