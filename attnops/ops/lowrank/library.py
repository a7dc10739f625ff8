"""The low-rank-key (Loki) operator: one argument list for the C++ operator (``lowrank_attn_fwd``) and
its Triton twin, the fake, and the function the dispatcher calls.

    fwd(q, k, v, q_score, k_score, seqlens?, topk, local, causal, softmax_scale, return_indices=False)
        -> (out, lse, chosen keys or empty)

q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)``; ``q_score (B, Sq, H, R)`` and ``k_score (B, Sk, Hkv, R)``
the first R components of the rotated queries and keys (views with strides are fine). Query i of
sequence b sits at ``seqlens[b] - Sq + i`` (seqlens None: Sk each) and sees keys ``[0, seqlens[b])``
(causal: up to its position); it attends exactly to the newest ``local`` of them plus the
``topk - local`` older ones of highest ``q_score . k_score`` (ties to the later key). Forward only.
Returns out ``(B, Sq, H, D)``, lse ``(B, H, Sq)`` over the chosen keys, and with ``return_indices`` the
chosen keys ``(B, H, Sq, min(topk, Sk))`` int32, ascending, -1 past the last (else an empty tensor):
the block maps are computed from them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from attnops.core.block_map import MapRequest
from attnops.core.library import Arg, OpDef, lse_dtype, register_forward_only
from attnops.ops.lowrank.map import lowrank_block_map

FWD = OpDef("lowrank_attn_fwd", [Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor"), Arg("q_score", "Tensor"),
                                 Arg("k_score", "Tensor"), Arg("seqlens", "Tensor?"), Arg("topk", "int"),
                                 Arg("local", "int"), Arg("causal", "bool"), Arg("softmax_scale", "float"),
                                 Arg("return_indices", "bool", "False")], "(Tensor, Tensor, Tensor)")
FWD_TRITON = FWD.variant("lowrank_attn_fwd_triton")


def fwd_fake(q, k, topk, return_indices, **_):
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    indices = q.new_empty((B, H, Sq, min(Sk, topk)) if return_indices else (0,), dtype=torch.int32)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=lse_dtype(q.dtype)), indices


def register(fwd: OpDef) -> None:
    fwd.register_fake(fwd_fake)
    register_forward_only(fwd, "lowrank_key_attention")


def backend(fwd: OpDef, fwd_op: Optional[Callable] = None) -> Callable:
    """The dispatcher-facing low-rank-key attention of a backend whose operator is ``fwd``: (out, lse),
    or (out, lse, block map) when ``block_map`` asks for one (computed from the keys the kernel
    chose, :func:`attnops.ops.lowrank.map.lowrank_block_map`)."""

    def lowrank_key_attention(q, k, v, q_score, k_score, seqlens, *, topk, local, causal, softmax_scale,
                              block_map: Optional[MapRequest] = None):
        out, lse, indices = fwd.call(fwd_op, q=q, k=k, v=v, q_score=q_score, k_score=k_score, seqlens=seqlens,
                                     topk=int(topk), local=int(local), causal=bool(causal),
                                     softmax_scale=float(softmax_scale), return_indices=block_map is not None)
        if block_map is None:
            return out, lse
        return out, lse, lowrank_block_map(q, k, indices, lse, block_map, float(softmax_scale))

    return lowrank_key_attention


FWD.define()
register(FWD)
