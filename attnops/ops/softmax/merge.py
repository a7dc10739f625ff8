"""Two partial softmax attentions over disjoint key sets -> the softmax over their union, by log-sum-exp.

Shared by the ops that attend in pieces (HyperAttention's sorted blocks + sampled columns, context parallelism's
ring steps). Differentiable: gradients flow through both outputs and both lse.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def merge_partials(acc: Optional[Tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor, lse: torch.Tensor,
                   work: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``acc = (out (B, S, H, Dv), lse (B, H, S))`` or None, merged with ``out, lse`` of the same shapes -> the
    merged pair in ``work`` (float32; float64 for float64). Rows empty on both sides stay 0 / -inf, never NaN."""
    out, lse = out.to(work), lse.to(work)
    if acc is None:
        return out, lse
    acc_out, acc_lse = acc
    acc_out, acc_lse = acc_out.to(work), acc_lse.to(work)
    both_empty = torch.isneginf(acc_lse) & torch.isneginf(lse)
    # acc's share of the union, sigmoid(lse_a - lse_b); out = lerp(out_b, out_a, share): one pass over the outputs
    zero = torch.zeros_like(lse)
    share = torch.sigmoid(torch.where(both_empty, zero, acc_lse - lse))
    share = torch.where(both_empty, zero, share).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    # both-empty rows stay -inf, without a NaN gradient through logaddexp
    new = torch.logaddexp(torch.where(both_empty, zero, acc_lse), torch.where(both_empty, zero, lse))
    return torch.lerp(out, acc_out, share), torch.where(both_empty, acc_lse, new)


def merge_weights(lse_self: torch.Tensor, lse_pair: torch.Tensor,
                  row: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The log-weights of :func:`merge_rows` (``lse_self (R,)``, ``lse_pair (P,)``, same float dtype) -> the merged
    ``lse (R,)`` and each partial's share: ``own (R,) = exp(lse_self - lse)``, ``scale (P,) = exp(lse_pair -
    lse[row])``. Each row needs one finite log-weight among its partials (the callers' self partial always has a
    key): a row with none gets lse -inf and NaN shares."""
    with torch.no_grad():  # a shift for range only: it cancels in lse
        m = lse_self.clone().scatter_reduce_(0, row, lse_pair, reduce="amax")
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = torch.exp(lse_self - m).index_add(0, row, torch.exp(lse_pair - m[row]))
    lse = m + torch.log(total)
    return lse, torch.exp(lse_self - lse), torch.exp(lse_pair - lse[row])


def merge_rows(out_self: torch.Tensor, lse_self: torch.Tensor, out_pair: torch.Tensor, lse_pair: torch.Tensor,
               row: torch.Tensor, work: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows with one partial softmax each (``out_self (R, Dv)``, ``lse_self (R,)``) and any number of further
    partials (``out_pair (P, Dv)`` with log-weights ``lse_pair (P,)``, each added to row ``row[p]``) -> ``(out (R,
    Dv), lse (R,))`` in ``work``: ``out = sum_i exp(lse_i - lse) out_i`` over a row's partials. A pair's log-weight
    is its own lse for a piece of one softmax (token-routed MoBA), or any logit that weighs a normalised output
    (Landmark attention's landmark score). Differentiable in every input but ``row``; without autograd (no grad
    mode, or no input requiring one) ``out_self`` and ``out_pair`` are scaled in place (in ``work`` they are the
    callers' buffers, which they must not read again)."""
    lse, own, scale = merge_weights(lse_self.to(work), lse_pair.to(work), row)
    own, scale = own.unsqueeze(-1), scale.unsqueeze(-1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out_self, lse_self, out_pair, lse_pair)):
        out, contribution = out_self.to(work) * own, out_pair.to(work) * scale
    else:  # no graph: scale the partials' own buffers (fresh allocations cost their first-touch page faults)
        out, contribution = out_self.to(work).mul_(own), out_pair.to(work).mul_(scale)
    # in place: the product's backward does not read its result, so no copy of the (R, Dv) output is made
    return out.index_add_(0, row, contribution), lse
