"""The head routers of the MoH authors' code (SkyworkAI/MoH), as functions of their logits.

- MoH-ViT / MoH-DiT (MoH-ViT/attention.py, ``MoHAttention.forward``): learned gates. ``Hs`` shared heads (the first
  ones) are always active with weights ``Hs * softmax(W_s x)``; each token picks ``top_k`` of the ``Hr`` routed
  heads by ``softmax(W_r x)``, whose chosen gates are renormalised to sum to 1 and scaled by ``top_k``; with both
  kinds, ``2 * softmax(W_h x)`` = ``(a1, a2)`` weighs the shared and the routed gates. The load-balance loss is
  ``Hr^2 * mean_i(P_i f_i)`` with ``P_i`` the mean routed gate of head i and ``f_i`` the fraction of tokens that
  chose it.
- MoH-LLaMA3 (MoH-LLaMA3/Inference_code/modeling_llama.py, ``LlamaAttention.forward``): no parameters. A token's
  routed heads are the ``top_k`` whose queries have the largest L2 norm (normalised by their standard deviation
  over the routed heads, then a softmax, as the authors rank them); shared heads always; weights 0 / 1. RoPE is
  a rotation per head, so the norms are the same before and after it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class MoHGates(NamedTuple):
    """``weights (B, S, H)``: the per-(token, head) weights, 0 where a head is not chosen (shared heads first);
    ``load_balance_loss``: a 0-d tensor (0 without routed heads); ``routed_mask (B, S, Hr)``: the chosen
    routed heads."""

    weights: torch.Tensor
    load_balance_loss: torch.Tensor
    routed_mask: torch.Tensor


def _check_top_k(top_k, num_routed: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_routed:
        raise ValueError(f"top_k must be an int in [1, {num_routed}] (the routed heads), got {top_k!r}")


def learned_head_gates(routed_logits: Optional[torch.Tensor], top_k: int, *,
                       shared_logits: Optional[torch.Tensor] = None,
                       mix_logits: Optional[torch.Tensor] = None) -> MoHGates:
    """MoH's learned two-stage gates from the router logits of each token.

    Args:
        routed_logits: ``(B, S, Hr)`` = ``W_r x`` for the routed heads (None: every head is shared).
        top_k: routed heads per token, in ``[1, Hr]``.
        shared_logits: ``(B, S, Hs)`` = ``W_s x`` for the shared heads (None: no shared head).
        mix_logits: ``(B, S, 2)`` = ``W_h x``, the shared / routed balance; needed when both kinds exist.

    Returns:
        :class:`MoHGates`; ``weights`` has ``Hs + Hr`` heads, the shared ones first.
    """
    if routed_logits is None and shared_logits is None:
        raise ValueError("learned_head_gates needs routed_logits, shared_logits or both")
    ref = routed_logits if routed_logits is not None else shared_logits
    if ref.dim() != 3:
        raise ValueError(f"router logits must be (B, S, heads), got {tuple(ref.shape)}")
    lead = tuple(ref.shape[:2])
    for name, t, last in (("shared_logits", shared_logits, None), ("mix_logits", mix_logits, 2)):
        if t is not None and (t.dim() != 3 or tuple(t.shape[:2]) != lead or (last and t.shape[-1] != last)):
            raise ValueError(f"{name} must be (B, S, {last or 'Hs'}) with (B, S) = {lead}, got {tuple(t.shape)}")
    if routed_logits is None:
        num_shared = shared_logits.shape[-1]
        weights = torch.softmax(shared_logits, dim=-1) * num_shared
        empty = torch.zeros(*lead, 0, dtype=torch.bool, device=ref.device)
        return MoHGates(weights, weights.new_zeros(()), empty)
    num_routed = routed_logits.shape[-1]
    _check_top_k(top_k, num_routed)
    gates = torch.softmax(routed_logits, dim=-1)
    index = torch.topk(gates, k=top_k, dim=-1).indices  # ties: torch.topk's order, as the authors'
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter(-1, index, True)
    flat_gates, flat_mask = gates.reshape(-1, num_routed), mask.reshape(-1, num_routed).to(gates.dtype)
    loss = (flat_gates.mean(0) * flat_mask.mean(0)).mean() * num_routed * num_routed
    routed = gates * mask
    routed = routed / routed.sum(-1, keepdim=True).clamp(min=torch.finfo(routed.dtype).eps) * top_k
    if shared_logits is None:
        return MoHGates(routed, loss, mask)
    if mix_logits is None:
        raise ValueError("mix_logits (B, S, 2) is needed with both shared and routed heads")
    shared = torch.softmax(shared_logits, dim=-1) * shared_logits.shape[-1]
    mix = torch.softmax(mix_logits, dim=-1) * 2
    weights = torch.cat([shared * mix[..., :1], routed * mix[..., 1:]], dim=-1)
    return MoHGates(weights, loss, mask)


def query_norm_heads(q: torch.Tensor, num_shared_heads: int, top_k: int) -> torch.Tensor:
    """MoH-LLaMA3's parameter-free routing: ``q (B, S, H, D)`` -> 0 / 1 weights ``(B, S, H)`` in q's dtype: the
    first ``num_shared_heads`` heads always, and per token the ``top_k`` of the other heads with the largest
    query norm (ranked as the authors rank them: ``softmax(norm / std(norm))``, in q's dtype)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, S, H, D), got {tuple(q.shape)}")
    H = q.shape[2]
    if isinstance(num_shared_heads, bool) or not isinstance(num_shared_heads, int) or not 0 <= num_shared_heads < H:
        raise ValueError(f"num_shared_heads must be an int in [0, {H - 1}] (at least one head is routed), got "
                         f"{num_shared_heads!r}")
    _check_top_k(top_k, H - num_shared_heads)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(q[:, :, num_shared_heads:], dim=-1)
        gates = torch.softmax(norms / norms.std(dim=-1, keepdim=True), dim=-1)
        index = torch.topk(gates, k=top_k, dim=-1).indices
        routed = torch.zeros_like(norms).scatter(-1, index, 1.0)
        return torch.cat([torch.ones_like(norms[..., :num_shared_heads]), routed], dim=-1)
