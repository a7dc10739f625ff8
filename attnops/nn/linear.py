"""``LinearAttention``: a linear-attention block (fla's layer shape) on :func:`attnops.linear_attention`,
with a recurrent state for decoding."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from attnops.maps.capture import map_options, record, refuse_uncaptured, wanted
from attnops.nn.heads import check_heads
from attnops.ops.linear import State, linear_attention, resolve_decay, resolve_feature_map

GATES = (False, True, "head", "channel")


class LinearAttention(nn.Module):
    """Causal linear attention ``x (B, T, embed_dim) -> (B, T, embed_dim)``.

    Args:
        embed_dim: model width; ``head_dim = embed_dim / num_heads``.
        num_heads: query heads H.
        num_kv_heads: key/value heads dividing H (default H; 1 is multi-query).
        feature_map: as :func:`attnops.linear_attention` (``"elu"``, ``"identity"``, ``"relu"``,
            ``"focused"`` or a callable).
        decay: a fixed per-head decay: ``None``, ``"retnet"``, ``"lightning"`` or ``(H,)`` log-decays
            (kept as a buffer).
        gated: data-dependent log-gates from ``x``: ``False``; ``True`` / ``"head"``: one per head and
            step (Simple-GLA, Mamba2); ``"channel"``: one per key channel (GLA). The gate is
            ``logsigmoid(W x + b) / gate_normalizer`` (GLA's 16 keeps the initial gates near 1).
        normalize: the op's denominator (off by default; the output norm stabilises instead).
        output_norm: ``"rmsnorm"`` (per head over the value dim, one weight shared by the heads, as fla)
            or ``None``.
        bias: biases on the q/k/v/out projections.

    ``forward(x, state=None, use_cache=False)``: ``state`` continues a sequence (what the previous
    call returned); with ``use_cache=True`` the result is ``(y, state)``. A short input (decoding one
    token at a time) runs the recurrent form: on CPU the chunk form shrinks to the input, on a GPU
    the Triton recurrent kernel runs when no gradient is needed. Prefill + token-by-token decoding
    equals one call over the whole sequence.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "elu",
                 decay: Union[None, str, torch.Tensor] = None, gated: Union[bool, str] = False,
                 normalize: bool = False, output_norm: Optional[str] = "rmsnorm", bias: bool = False,
                 gate_normalizer: float = 16.0, device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = check_heads(embed_dim, num_heads, num_kv_heads)
        if gated not in GATES:
            raise ValueError(f"gated must be one of {GATES}, got {gated!r}")
        if output_norm not in ("rmsnorm", None):
            raise ValueError(f"output_norm must be 'rmsnorm' or None, got {output_norm!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        if not gate_normalizer > 0:
            raise ValueError(f"gate_normalizer must be > 0, got {gate_normalizer!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.feature_map = resolve_feature_map(feature_map)
        self.normalize = normalize
        self.gated = "head" if gated is True else gated
        self.gate_normalizer = float(gate_normalizer)
        # the op's own check, on construction (on the CPU, so the values are read wherever the tensor is)
        decay = resolve_decay(decay.cpu() if isinstance(decay, torch.Tensor) else decay, num_heads)
        self.register_buffer("decay", None if decay is None else decay.to(device=device, dtype=torch.float32))
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)
        gate_width = {"head": num_heads, "channel": num_heads * self.head_dim}.get(self.gated)
        self.gate_proj = nn.Linear(embed_dim, gate_width, bias=True, device=device, dtype=dtype) if gate_width else None
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5, device=device, dtype=dtype) if output_norm else None

    def forward(self, x: torch.Tensor, state: Optional[State] = None, use_cache: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, State]]:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, T, {self.embed_dim}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        gate = None
        if self.gate_proj is not None:
            logits = self.gate_proj(x)  # log-gates accumulate over the sequence: at least float32
            gate = F.logsigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))) / self.gate_normalizer
            if self.gated == "channel":
                gate = gate.view(B, T, self.num_heads, self.head_dim)
        want_map, want_max = wanted()
        if want_max:
            raise NotImplementedError("attnops.maps.capture(max_scores=True): attnops.nn.LinearAttention has no "
                                      "softmax scores to report row maxima of")
        if want_map and state is not None:
            refuse_uncaptured("attnops.nn.LinearAttention resumed from a state (a block map covers one call's keys)")
        maps = dict(return_block_map=True, **map_options()) if want_map else {}
        out, new_state, *block_map = linear_attention(q, k, v, feature_map=self.feature_map, causal=True,
                                                      decay=self.decay, gate=gate, normalize=self.normalize,
                                                      initial_state=state, output_final_state=True, **maps)
        if want_map:
            record(self, block_map[0])
        if self.norm is not None:
            out = self.norm(out)
        y = self.out_proj(out.reshape(B, T, self.num_heads * self.head_dim))
        return (y, new_state) if use_cache else y
