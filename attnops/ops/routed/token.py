"""Token-routed MoBA, as the paper defines it and MoonshotAI/MoBA's ``moba_attn_varlen_naive`` computes it: every
query token picks its own ``topk`` key blocks.

Routing (per sequence, exactly the official steps): block means of the keys (``k[block].mean(0)`` in k's dtype),
gates ``q . mean`` in float32 (``einsum("shd,nhd->hsn")``), the own block +inf, under ``causal`` the own and later
blocks of a row -inf before that, then ``torch.topk(k=min(topk, blocks), sorted=False)``: the chosen set is the
official one, ties included. Chosen +-inf entries are the own block (run by the self pass) and fillers (later
blocks, fully masked by causality), so neither becomes a pair; a NaN gate stays chosen (its keys reach the row).

Attention without an N x N tensor and without a kernel of its own, as MoBA's ``moba_efficient`` runs it on
flash-attention's varlen form:

- self pass: every token against its own block (causal: up to itself), one call of the softmax core with per-row
  key bounds;
- pair pass: every (token, head, chosen earlier block) pair as one packed query row against that block's keys,
  rows ordered by (kv head, block) so their bounds are monotone, one call;
- merge: the partial results combine by their log-sum-exp (``out = sum_i exp(lse_i - lse) out_i``), which is one
  softmax over the union, in float32; gradients flow through both passes' outputs and lse.

Work: ``S (block / 2 + (topk - 1) block)`` scores per head, like tile routing, plus O(pairs x D) gathers.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from attnops.ops.softmax.bounded import bounded_attention
from attnops.ops.softmax.merge import merge_rows


class TokenRoutes(NamedTuple):
    """The chosen (token, head, block) pairs outside each token's own block, and the block table.

    ``token, head, block (P,)`` int64 (global token and block indices); ``block_start, block_end (C,)`` each block's
    key range in the packed token order; ``own_block (T,)`` each token's block."""

    token: torch.Tensor
    head: torch.Tensor
    block: torch.Tensor
    block_start: torch.Tensor
    block_end: torch.Tensor
    own_block: torch.Tensor


def route_tokens(q: torch.Tensor, k: torch.Tensor, seq_bounds: List[int], block_size: int, topk: int,
                 causal: bool) -> TokenRoutes:
    """``q (T, H, D)``, ``k (T, Hkv, D)`` of packed sequences ``seq_bounds`` (``[0, ..., T]``, Python ints)."""
    H, Hkv = q.shape[1], k.shape[1]
    dev = q.device
    tokens, heads, blocks, starts, ends, owns = [], [], [], [], [], []
    first_block = 0
    with torch.no_grad():
        for a, b in zip(seq_bounds[:-1], seq_bounds[1:]):
            L = b - a
            if L == 0:
                continue
            n = -(-L // block_size)
            block_starts = [a + i * block_size for i in range(n)]
            means = torch.cat([k[s:min(s + block_size, b)].mean(dim=0, keepdim=True) for s in block_starts])
            means = means.repeat_interleave(H // Hkv, dim=1)  # (n, H, D): query head h routes on kv head h // group
            gate = torch.einsum("shd,nhd->hsn", q[a:b].float(), means.float())  # (H, L, n), unscaled as theirs
            row_block = torch.arange(L, device=dev) // block_size
            col = torch.arange(n, device=dev)
            if causal:
                gate.masked_fill_(col.view(1, -1) >= row_block.view(-1, 1), float("-inf"))
            gate.masked_fill_(col.view(1, -1) == row_block.view(-1, 1), float("inf"))
            index = torch.topk(gate, k=min(topk, n), dim=-1, largest=True, sorted=False).indices  # (H, L, kk)
            value = gate.gather(-1, index)
            h, s, slot = (~torch.isinf(value)).nonzero(as_tuple=True)
            tokens.append(a + s)
            heads.append(h)
            blocks.append(first_block + index[h, s, slot])
            starts.append(torch.tensor(block_starts, device=dev))
            ends.append((starts[-1] + block_size).clamp(max=b))
            owns.append(first_block + row_block)
            first_block += n
    if not starts:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return TokenRoutes(empty, empty, empty, empty, empty, empty)
    return TokenRoutes(*(torch.cat(x) for x in (tokens, heads, blocks, starts, ends, owns)))


def moba_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_bounds: List[int], *,
                         block_size: int, topk: int, causal: bool, softmax_scale: float, backend: Optional[str],
                         softcap: float = 0.0, sinks: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-routed MoBA over packed sequences: ``q (T, H, D)``, ``k, v (T, Hkv, D)`` -> ``out (T, H, Dv)`` in q's
    dtype and ``lse (H, T)`` (float32; float64 for float64 inputs). The sinks join the self pass (one logit per
    row of the merged softmax); softcap and dropout act on every score, as in one softmax."""
    T, H, _ = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    routes = route_tokens(q, k, seq_bounds, block_size, topk, causal)
    extra = dict(softmax_scale=softmax_scale, api="moba_attention", backend=backend, softcap=softcap,
                 dropout_p=dropout_p, generator=generator)

    own_start = routes.block_start[routes.own_block]
    pos = torch.arange(T, device=q.device)
    own_end = pos + 1 if causal else routes.block_end[routes.own_block]
    out_self, lse_self = bounded_attention(q[None], k[None], v[None], torch.stack([own_start, own_end], -1),
                                           sinks=sinks, **extra)

    # pairs ordered by (kv head, block): each run of rows shares one key interval, and the intervals increase
    kv_head = routes.head // group
    order = torch.argsort(kv_head * max(int(routes.block_start.numel()), 1) + routes.block, stable=True)
    token, head, block, kv_head = routes.token[order], routes.head[order], routes.block[order], kv_head[order]
    stretch = kv_head * T  # the kv head's keys in the packed (Hkv * T) key sequence
    bounds = torch.stack([stretch + routes.block_start[block], stretch + routes.block_end[block]], -1)
    kp = k.transpose(0, 1).reshape(1, Hkv * T, 1, k.shape[-1])
    vp = v.transpose(0, 1).reshape(1, Hkv * T, 1, v.shape[-1])
    row = token * H + head
    q_rows = q.reshape(T * H, q.shape[-1]).index_select(0, row)  # its backward is one index_add
    out_pair, lse_pair = bounded_attention(q_rows[None, :, None], kp, vp, bounds, **extra)

    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_s = lse_self[0].transpose(0, 1).reshape(T * H)  # row t * H + h
    out, lse = merge_rows(out_self[0].reshape(T * H, -1), lse_s, out_pair[0, :, 0], lse_pair[0, 0], row, work)
    return out.view(T, H, -1).to(q.dtype), lse.view(T, H).transpose(0, 1)
