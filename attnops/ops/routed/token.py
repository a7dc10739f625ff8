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
  rows ordered by (kv head, block) so their bounds are monotone, one call with the kv heads as its batch (k and v
  read in place);
- merge: the partial results combine by their log-sum-exp (``out = sum_i exp(lse_i - lse) out_i``), which is one
  softmax over the union, in float32; gradients flow through both passes' outputs and lse.

Heads are independent: a long sequence routes, runs its pair pass and merges per group of kv heads
(``_GROUP_PAIR_BYTES`` of pair rows), so the pairs' temporaries are a group's, not every head's at once. Without
autograd or dropout the self pass runs once over every head and the groups merge into its output in place;
otherwise each group runs its own self pass (whose backward then packs a group's panels, not every head's).

On CPU the per-row choice, the pairs' order and the no-autograd merge are C++ helpers (``moba_token_select``,
``moba_token_pairs``, ``moba_token_merge``) equal to the torch steps they replace (the merge bit for bit); other
devices run the torch steps.

Work: ``S (block / 2 + (topk - 1) block)`` scores per head, like tile routing, plus O(pairs x D) gathers.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.ops.softmax.bounded import bounded_attention
from attnops.ops.softmax.merge import merge_rows, merge_weights


class TokenChoice(NamedTuple):
    """Each (head, token)'s chosen blocks besides its own, and the block table.

    ``chosen (H, T, W)`` integer: global block indices, ``-1`` for none (anywhere in a row); ``block_start,
    block_end (C,)`` int64, each block's key range in the packed token order (the blocks tile the tokens)."""

    chosen: torch.Tensor
    block_start: torch.Tensor
    block_end: torch.Tensor


class TokenRoutes(NamedTuple):
    """The chosen (token, head, block) pairs outside each token's own block, and the block table.

    ``token, head, block (P,)`` int64 (global token and block indices), ordered by (head, token); ``block_start,
    block_end (C,)`` each block's key range in the packed token order; ``own_block (T,)`` each token's block."""

    token: torch.Tensor
    head: torch.Tensor
    block: torch.Tensor
    block_start: torch.Tensor
    block_end: torch.Tensor
    own_block: torch.Tensor


def choose_blocks(q: torch.Tensor, k: torch.Tensor, seq_bounds: List[int], block_size: int, topk: int,
                  causal: bool, scratch: Optional["Scratch"] = None) -> TokenChoice:
    """``q (T, H, D)``, ``k (T, Hkv, D)`` of packed sequences ``seq_bounds`` (``[0, ..., T]``, Python ints);
    ``scratch``: where the gates go (a call's head groups reuse it)."""
    H, Hkv = q.shape[1], k.shape[1]
    dev = q.device
    chosen, starts, ends = [], [], []
    first_block = 0
    with torch.no_grad():
        for a, b in zip(seq_bounds[:-1], seq_bounds[1:]):
            L = b - a
            if L == 0:
                continue
            n = -(-L // block_size)
            means = block_means(k[a:b], block_size)
            means = means.repeat_interleave(H // Hkv, dim=1)  # (n, H, D): query head h routes on kv head h // group
            gate = block_gates(q[a:b], means, scratch)
            picks = select_token_blocks(gate, block_size, topk, causal)  # (H, L, W), -1 after each row's blocks
            chosen.append(picks if first_block == 0 else torch.where(picks >= 0, picks + first_block, picks))
            starts.append(torch.arange(a, b, block_size, device=dev))
            ends.append((starts[-1] + block_size).clamp(max=b))
            first_block += n
    if not starts:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return TokenChoice(torch.zeros(H, 0, 0, dtype=torch.int64, device=dev), empty, empty)
    if len(chosen) > 1:  # sequences with fewer blocks than topk choose fewer: pad every row to the widest
        width = max(c.shape[-1] for c in chosen)
        chosen = [torch.nn.functional.pad(c, (0, width - c.shape[-1]), value=-1) for c in chosen]
    return TokenChoice(torch.cat(chosen, dim=1), torch.cat(starts), torch.cat(ends))


def route_tokens(q: torch.Tensor, k: torch.Tensor, seq_bounds: List[int], block_size: int, topk: int,
                 causal: bool) -> TokenRoutes:
    """:func:`choose_blocks` as a list of pairs (and each token's block, which only its readers need)."""
    choice = choose_blocks(q, k, seq_bounds, block_size, topk, causal)
    head, token, slot = (choice.chosen >= 0).nonzero(as_tuple=True)
    starts, ends = choice.block_start, choice.block_end
    own_block = torch.repeat_interleave(torch.arange(starts.numel(), device=starts.device), ends - starts)
    return TokenRoutes(token, head, choice.chosen[head, token, slot].long(), starts, ends, own_block)


class Scratch:
    """Float buffers that a call's head groups reuse (the gates, q widened to float32): 16 MiB of gates per group at
    32K tokens and two heads, allocated afresh, were mapped and faulted in every time (glibc hands buffers this
    large back to the system when they are freed): in a bf16 call at 32K, the gates' GEMMs took 2.5 ms a head into
    fresh buffers and 1.4 ms into reused ones."""

    def __init__(self):
        self._buffers = {}

    def take(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` tensor (uninitialised) over the buffer ``name``, which grows as needed."""
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


# The most elements of k one call of block_means reduces: torch's mean of bf16 / fp16 widens its input to float32
# first, and at 32K tokens x 2 heads x 64 that copy (16 MiB, mapped afresh and out of cache) took most of the
# routing's block means (15.7 -> 4.2 ms a call over 4 groups in chunks of 8 blocks).
_MEANS_CHUNK = 1 << 19


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """``k (L, Hkv, D)`` of one sequence -> ``(ceil(L / block_size), Hkv, D)``, each block's mean in k's dtype: the
    official ``k[block].mean(dim=0)`` per block, bit for bit (tests/routed/test_moba_token.py holds torch to that):
    each block's columns are summed alone, so a reduction over several full blocks at once (a chunk of
    ``_MEANS_CHUNK`` elements) and one over the tail give the same values as a call per block."""
    full = k.shape[0] // block_size
    per = max(1, _MEANS_CHUNK // max(1, block_size * k[0].numel()))  # full blocks per call
    means = [k[b0 * block_size:min(full, b0 + per) * block_size].view(-1, block_size, *k.shape[1:]).mean(dim=1)
             for b0 in range(0, full, per)]
    if k.shape[0] % block_size:
        means.append(k[full * block_size:].mean(dim=0, keepdim=True))
    return torch.cat(means)


def _cpu_helpers(t: torch.Tensor) -> bool:
    """Whether the C++ helpers (csrc/cpu/kernels/moba_route.cpp: selection, pair order, merge) serve ``t``: a CPU
    tensor, the extension built, and no torch.compile tracing (their outputs' sizes depend on the data)."""
    return t.device.type == "cpu" and dispatch.is_available("cpu") and not torch.compiler.is_compiling()


def block_gates(q: torch.Tensor, means: torch.Tensor, scratch: Optional["Scratch"] = None) -> torch.Tensor:
    """``q (L, H, D)`` and block means ``(n, H, D)`` -> the official gates ``einsum("shd,nhd->hsn")`` in float32,
    ``(H, L, n)``, unscaled as theirs (in ``scratch`` when given: valid until its next use). Head by head as 2-d
    GEMMs: the same products bit for bit (tests/routed/test_moba_token.py), ~1.5x faster than einsum's batched
    form, which also copies q into (H, L, D) order (bfloat16 at 32K, where a group holds two heads: gates 72 -> 37
    ms a call by the stage timers)."""
    L, H, D = q.shape
    scratch = scratch or Scratch()
    gates = scratch.take("gates", (H, L, means.shape[0]), torch.float32, q.device)
    # q in another dtype: each head is widened into one float32 buffer, reused by the next head (a fresh
    # q[:, h].float() per head was 8 MiB at 32K, mapped and faulted in afresh each time); the same values
    widened = None if q.dtype == torch.float32 else scratch.take("widened", (L, D), torch.float32, q.device)
    for h in range(H):
        q_h = q[:, h] if widened is None else widened.copy_(q[:, h])
        torch.mm(q_h, means[:, h].float().t(), out=gates[h])
    return gates


def select_token_blocks(gate: torch.Tensor, block_size: int, topk: int, causal: bool) -> torch.Tensor:
    """``gate (H, L, n)`` float32, one sequence's ``q . block means`` (unmasked) -> ``(H, L, W)`` integer: each row's
    chosen blocks other than its own (which the self pass attends), ``-1`` for none; exactly ``torch.topk``'s
    choice over the official masked gates. On CPU the C++ selection (``moba_token_select``, int32) picks the rows
    whose choice is unambiguous (no tie at the cut, every candidate finite) and ``torch.topk`` the rest; elsewhere
    ``torch.topk`` every row (int64)."""
    kk = min(topk, gate.shape[-1])
    if kk >= 2 and _cpu_helpers(gate):
        select = dispatch.resolve("moba_token_select", gate.device, "cpu")
        chosen, ambiguous = select(gate, block_size=block_size, topk=topk, causal=causal, width=kk)
        h, s = ambiguous.nonzero(as_tuple=True)
        if h.numel():
            chosen[h, s] = _topk_blocks(gate[h, s], s // block_size, kk, causal).to(chosen.dtype)
        return chosen
    row_block = torch.arange(gate.shape[1], device=gate.device) // block_size
    return _topk_blocks(gate, row_block, kk, causal)


def _topk_blocks(gate: torch.Tensor, row_block: torch.Tensor, kk: int, causal: bool) -> torch.Tensor:
    """The official steps on gate rows ``(..., R, n)`` of blocks ``row_block (R,)``: own block +inf, under causal
    the own and later blocks -inf before that, ``torch.topk(kk, sorted=False)``; the chosen +-inf entries (the own
    block, fillers) -> -1. A NaN gate ranks highest and stays chosen (its keys reach the row)."""
    gate = gate.clone()
    col = torch.arange(gate.shape[-1], device=gate.device)
    if causal:
        gate.masked_fill_(col >= row_block.unsqueeze(-1), float("-inf"))
    gate.masked_fill_(col == row_block.unsqueeze(-1), float("inf"))
    value, index = torch.topk(gate, k=kk, dim=-1, largest=True, sorted=False)
    return torch.where(torch.isinf(value), torch.full_like(index, -1), index)


# The most bytes of packed pair rows one pass over a group of kv heads gathers. Heads are independent, so a long
# sequence runs its pair passes per group of kv heads: every temporary of a group (gates, packed K / V panels, pair
# rows, partial outputs) stays below glibc's largest mmap threshold (32 MiB) and is reused from the heap by the next
# group, instead of being mapped and faulted in afresh (at 32K tokens, H = 8, D = 64 the one-pass form allocated
# ~660 MB a call: on the VM the README measures it ran 516 ms with glibc told to keep memory in the heap, 665-1040
# ms without).
_GROUP_PAIR_BYTES = 16 << 20


def moba_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_bounds: List[int], *,
                         block_size: int, topk: int, causal: bool, softmax_scale: float, backend: Optional[str],
                         softcap: float = 0.0, sinks: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                         generator: Optional[torch.Generator] = None,
                         max_scores: bool = False) -> Tuple[torch.Tensor, ...]:
    """Token-routed MoBA over packed sequences: ``q (T, H, D)``, ``k, v (T, Hkv, D)`` -> ``out (T, H, Dv)`` in q's
    dtype and ``lse (H, T)`` (float32; float64 for float64 inputs), and with ``max_scores`` each row's largest score
    over its chosen keys ``(H, T)`` in lse's dtype (the self pass's and its pairs' maxima, their max). The sinks join
    the self pass (one logit per row of the merged softmax); softcap and dropout act on every score, as in one
    softmax."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    extra = dict(softmax_scale=softmax_scale, api="moba_attention", backend=backend, softcap=softcap,
                 dropout_p=dropout_p, generator=generator, max_scores=max_scores)
    own_bounds = _own_block_bounds(seq_bounds, block_size, causal, q.device)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    pair_rows = T * group * max(topk - 1, 1)  # one kv head's pair rows, at most
    pair_bytes = pair_rows * max(D, v.shape[-1]) * q.element_size()
    step = max(1, _GROUP_PAIR_BYTES // max(pair_bytes, 1))
    # (first kv head, q / k / v views) per group, from one split each: with autograd, split's backward concatenates
    # the groups' gradients once, where a slice per use builds a zero-filled gradient of the whole tensor per slice
    # and adds them (48 full-size fills and adds at 32K, H = 8: ~60% of the backward's time)
    kv_groups = list(zip(range(0, Hkv, step), q.split(step * group, 1), k.split(step, 1), v.split(step, 1)))

    def self_pass(qg, kg, vg, heads: slice) -> Tuple[torch.Tensor, ...]:  # (T, Hg, Dv), (Hg, T)[, (Hg, T)]
        res = bounded_attention(qg[None], kg[None], vg[None], own_bounds,
                                sinks=None if sinks is None else sinks[heads], **extra)
        return tuple(t[0] for t in res)

    scratch = Scratch()

    def pair_pass(qg, kg, vg, rows: Optional[torch.Tensor] = None):
        return _pair_pass(qg, kg, vg, seq_bounds, block_size=block_size, topk=topk, causal=causal, extra=extra,
                          rows=rows, scratch=scratch)

    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    if not graph and dropout_p == 0:
        # no graph: the self pass runs once over every head, and every group merges into its (T, H, Dv) output
        # in place, so no per-group output and no concatenation; the groups gather their pair rows into
        # one shared buffer (a fresh one each would be faulted in afresh: glibc returns buffers this large to the
        # system when they are freed). Not with dropout: each call draws its mask's seed from the generator, and
        # the calls below draw them in the same order with or without autograd (same seed, same masks).
        # The output is in work, or for the C++ merge as the self pass gave it (bf16 / fp16 rows merge in float32
        # and round once: no full-size widening and narrowing copies).
        own_out, lse, *maxima = self_pass(q, k, v, slice(0, H))
        out = own_out.contiguous() if _cpu_helpers(q) else own_out.to(work).contiguous()
        lse, maxima = lse.to(work).contiguous(), [m.to(work).contiguous() for m in maxima]
        rows = q.new_empty(pair_rows * min(step, Hkv), D)
        for h0, qg, kg, vg in kv_groups:
            heads = slice(h0 * group, h0 * group + qg.shape[1])
            out_pair, lse_pair, *max_pair, row = pair_pass(qg, kg, vg, rows)
            _merge_into(out, lse, heads, out_pair, lse_pair, row)
            if maxima:
                maxima[0][heads] = _max_into(maxima[0][heads], max_pair[0], row)
        return (out.to(q.dtype), lse, *maxima)
    # with autograd every group runs its own self pass too: the backward of one over every head would pack every
    # head's panels and gradient partials at once (at 32K, H = 8: +27% on forward + backward)
    outs, lses, maxes = [], [], []
    for h0, qg, kg, vg in kv_groups:
        own_out, own_lse, *own_max = self_pass(qg, kg, vg, slice(h0 * group, h0 * group + qg.shape[1]))
        rows = own_out.shape[0] * own_out.shape[1]
        out_pair, lse_pair, *max_pair, row = pair_pass(qg, kg, vg)
        out, lse = merge_rows(own_out.reshape(rows, -1), own_lse.transpose(0, 1).reshape(rows), out_pair, lse_pair,
                              row, work)
        outs.append(out.view(T, -1, out.shape[-1]))
        lses.append(lse.view(T, -1).transpose(0, 1))
        if own_max:
            maxes.append(_max_into(own_max[0].detach(), max_pair[0], row))
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, dim=1), torch.cat(lses))
    return (out.to(q.dtype), lse) + ((torch.cat(maxes),) if maxes else ())


def _own_block_bounds(seq_bounds: List[int], block_size: int, causal: bool, device: torch.device) -> torch.Tensor:
    """``(T, 2)`` int64: each token's keys in its own block, ``[block start, token + 1)`` under causal, else the
    whole block (cut at the sequence's end)."""
    starts = torch.tensor(seq_bounds[:-1], device=device)
    lengths = torch.tensor(seq_bounds[1:], device=device) - starts
    seq_start = torch.repeat_interleave(starts, lengths)
    pos = torch.arange(seq_bounds[-1] - seq_bounds[0], device=device) + seq_bounds[0]
    lo = seq_start + (pos - seq_start) // block_size * block_size
    hi = pos + 1 if causal else torch.minimum(lo + block_size, torch.repeat_interleave(starts + lengths, lengths))
    return torch.stack([lo, hi], -1)


def _pair_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_bounds: List[int], *, block_size: int,
               topk: int, causal: bool, extra: dict, rows: Optional[torch.Tensor] = None,
               scratch: Optional[Scratch] = None) -> Tuple[torch.Tensor, ...]:
    """Routing and the pair pass over heads ``q (T, Hg, D)`` / kv heads ``k, v (T, Hkv_g, D)`` (head slices:
    strided views) -> ``out (P, Dv)`` and ``lse (P,)`` of the chosen (token, head, block) pairs outside the own
    blocks, their maxima ``(P,)`` when ``extra`` asks for ``max_scores``, and ``row (P,)``, each pair's row
    ``t * Hg + h`` (padding pairs: row 0 with an empty interval, out 0, lse and max -inf, which add nothing).
    ``rows``: without autograd, a buffer of at least ``P x D`` (every row choosing ``topk - 1`` blocks) that the
    gathered query rows go into; ``scratch``: the call's buffers for the routing's gates."""
    T, H, _ = q.shape
    Hkv = k.shape[1]
    # pairs ordered by (kv head, block): each run of rows shares one key interval, and the intervals increase. The
    # kv heads are the batch of the pair pass (rows padded to the longest head's count with empty intervals at the
    # end), so k and v are read in place through a (Hkv, T, 1, D) view instead of copied into one key sequence.
    row, bounds = _order_pairs(choose_blocks(q, k, seq_bounds, block_size, topk, causal, scratch), H // Hkv, T)
    width = row.shape[1]
    row = row.view(Hkv * width)
    flat, stride = _rows_of(q)
    at = row if stride == H else row // H * stride + row % H
    if rows is None:
        q_rows = flat.index_select(0, at)  # backward: index_add
    else:
        q_rows = torch.index_select(flat, 0, at, out=rows[:at.numel()])
    out, lse, *maxima = bounded_attention(q_rows.view(Hkv, width, 1, q.shape[-1]), k.transpose(0, 1).unsqueeze(2),
                                          v.transpose(0, 1).unsqueeze(2), bounds.view(Hkv, width, 2), **extra)
    return (out.reshape(Hkv * width, out.shape[-1]), lse.reshape(Hkv * width), *(m.reshape(-1) for m in maxima), row)


def _order_pairs(choice: TokenChoice, group: int, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chosen pairs of ``H`` heads as the pair pass's rows: ``row (Hkv, width)`` int64 (``t * H + h``) and
    ``bounds (Hkv, width, 2)`` (the chosen block's key range), each kv head's pairs ordered by block, then by
    (head, token); ``width`` is the largest kv head's pair count, the others padded with row 0 and ``[T, T)``. On CPU
    one C++ counting sort (``moba_token_pairs``), elsewhere a stable argsort: the same order."""
    chosen = choice.chosen
    H = chosen.shape[0]
    Hkv = H // group
    if _cpu_helpers(chosen):
        pairs = dispatch.resolve("moba_token_pairs", chosen.device, "cpu")
        return pairs(chosen.int(), block_start=choice.block_start, block_end=choice.block_end, group=group)
    head, token, slot = (chosen >= 0).nonzero(as_tuple=True)
    block = chosen[head, token, slot].long()
    kv_head = head // group
    order = torch.argsort(kv_head * max(int(choice.block_start.numel()), 1) + block, stable=True)
    token, head, block, kv_head = token[order], head[order], block[order], kv_head[order]
    per_head = torch.bincount(kv_head, minlength=Hkv)
    width = int(per_head.max()) if kv_head.numel() else 0
    slot = kv_head * width + torch.arange(kv_head.numel(), device=chosen.device) - (per_head.cumsum(0) - per_head)[kv_head]
    row = torch.zeros(Hkv * width, dtype=torch.int64, device=chosen.device).index_put_((slot,), token * H + head)
    bounds = torch.full((Hkv * width, 2), T, dtype=torch.int64, device=chosen.device)
    bounds.index_put_((slot,), torch.stack([choice.block_start[block], choice.block_end[block]], -1))
    return row.view(Hkv, width), bounds.view(Hkv, width, 2)


def _merge_into(out: torch.Tensor, lse: torch.Tensor, heads: slice, out_pair: torch.Tensor, lse_pair: torch.Tensor,
                row: torch.Tensor) -> None:
    """Without autograd: ``out (T, H, Dv)`` (contiguous) and ``lse (H, T)``, in the work dtype, hold every row's
    self-pass partial; the rows of ``heads`` become their merge (:func:`merge_weights`) with a group's pairs
    (:func:`_pair_pass`: rows ``t * Hg + h`` within the group), in place. The C++ merge also takes ``out`` in
    bfloat16 / float16 (the self pass's output as it came): the same float32 merge, rounded once."""
    T, H, Dv = out.shape
    Hg = heads.stop - heads.start
    new, own, scale = merge_weights(lse[heads].transpose(0, 1).reshape(T * Hg), lse_pair.to(lse.dtype), row)
    if _cpu_helpers(out):
        # the steps below in one C++ pass, the same roundings in the same order (bit for bit, tested)
        merge = dispatch.resolve("moba_token_merge", out.device, "cpu")
        merge(out, own=own, out_pair=out_pair, scale=scale, row=row, head_start=heads.start, heads=Hg)
    else:
        out[:, heads].mul_(own.view(T, Hg, 1))
        at = row + (row // Hg) * (H - Hg) + heads.start  # the pair's row of out viewed as (T * H, Dv)
        out.view(T * H, Dv).index_add_(0, at, out_pair.to(out.dtype).mul_(scale.unsqueeze(-1)))
    lse[heads] = new.view(T, Hg).transpose(0, 1)


def _max_into(own: torch.Tensor, pair_max: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """A head group's row maxima ``(Hg, T)`` (the self pass's) with its pairs' (``(P,)`` at rows ``t * Hg + h``) folded
    in: the largest over every chosen key. NaN wins (NaN in, NaN out); padding pairs hold -inf."""
    Hg, T = own.shape
    flat = own.transpose(0, 1).reshape(T * Hg)
    pair_max = pair_max.detach().to(flat.dtype)
    flat = flat.scatter_reduce(0, row, pair_max, reduce="amax", include_self=True)
    flat = flat.index_fill(0, row[torch.isnan(pair_max)], float("nan"))  # whatever amax does with NaN
    return flat.view(T, Hg).transpose(0, 1)


def _rows_of(q: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``q (T, H, D)`` as ``(rows (R, D), stride)`` with ``rows[t * stride + h] = q[t, h]``: q's own storage when q
    is a head slice of a contiguous ``(T, H', D)`` (a head group of the caller's q) and no gradient reaches it, else
    a contiguous copy (whose backward is a plain copy, where as_strided's would build q's whole storage)."""
    T, H, D = q.shape
    if q.is_contiguous() or (torch.is_grad_enabled() and q.requires_grad):
        return q.reshape(T * H, D), H
    if q.stride(2) == 1 and q.stride(1) == D and q.stride(0) % D == 0 and T:
        stride = q.stride(0) // D
        return q.as_strided(((T - 1) * stride + H, D), (D, 1)), stride
    return q.reshape(T * H, D), H
