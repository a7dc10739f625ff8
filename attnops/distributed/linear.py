"""Context-parallel linear attention by state passing (LASP-2): the sequence split across ranks.

A causal linear-attention layer is a recurrence over a ``(Dk, Dv)`` state, so rank ``r`` only needs the state
entering its segment. Each rank runs its segment from a zero state to get its own final state ``S_r`` and its
segment's total log-decay ``g_r``; one all-gather shares them; the state entering rank ``r`` is the fold
``X_{s+1} = exp(g_s) * X_s + S_s`` over the earlier ranks (per head, or per key channel with per-channel
gates); the rank then runs its segment from that state. Exact (the recurrence is linear in its state),
differentiable through the all-gather, and the communication is one state per rank whatever the length.
Non-causal, every row reads one global state, the sum of the ranks' states: a rank adds the others' to its own
(the same all-gather; the order of the rows does not matter, so any layout, and padded keys are left out).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from attnops.distributed.shard import _AllGather, _group_info, check_split, local_positions
from attnops.ops.linear import linear_attention
from attnops.ops.linear.decay import resolve_decay


def _segment_log_decay(decay, gate: Optional[torch.Tensor], q: torch.Tensor, work) -> Optional[torch.Tensor]:
    """The segment's total log-decay ``(B, H, 1 | Dk)``: the sum of its per-step log-gates."""
    B, L, H = q.shape[:3]
    total = None
    per_step = resolve_decay(decay, H, q.device)
    if per_step is not None:
        total = (per_step.to(work) * L).view(1, H, 1).expand(B, H, 1)
    if gate is not None:
        g = gate.to(work).sum(1)
        g = g.unsqueeze(-1) if gate.dim() == 3 else g
        total = g if total is None else total + g
    return total


def context_parallel_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *,
                                      causal: bool = True,
                                      feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "elu",
                                      decay: Union[None, str, torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
                                      normalize: bool = False, softmax_scale: Optional[float] = None,
                                      chunk_size: int = 64, layout: str = "contiguous",
                                      seq_len: Optional[int] = None) -> torch.Tensor:
    """:func:`attnops.linear_attention` (self-attention) over a sequence split across the ranks of ``group``.

    ``q (B, S_local, H, Dk)``, ``k (B, S_local, Hkv, Dk)``, ``v (B, S_local, Hkv, Dv)`` and ``gate`` (``(B, S_local,
    H)`` or ``(B, S_local, H, Dk)``) are this rank's shards (:func:`attnops.distributed.shard` with ``layout``).
    Causal (the default), the recurrence runs in sequence order: the shards must be ``"contiguous"`` (rank ``r``
    holds the ``r``-th slice), and padding at the end of the last rank is harmless (its state goes nowhere).
    ``causal=False``: one global state, any layout; ``seq_len``, the true global length when the shards were
    padded, keeps the padded keys out of it (no decay or gate then, as in :func:`attnops.linear_attention`).
    Other arguments as in :func:`attnops.linear_attention`. Returns this rank's rows ``(B, S_local, H, Dv)``
    (padded rows hold values :func:`attnops.distributed.unshard` drops), forward and backward.
    """
    rank, world = _group_info(group)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d shard (B, S_local, heads, dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"context-parallel attention is self-attention: q and k shards differ in length "
                         f"({q.shape[1]} vs {k.shape[1]})")
    seq_len = check_split(q.shape[1], world, layout, seq_len)
    if causal and layout != "contiguous":
        raise ValueError(f"causal linear attention runs in sequence order: shard with layout='contiguous', got "
                         f"{layout!r}")
    options = dict(feature_map=feature_map, causal=causal, decay=decay, normalize=normalize,
                   softmax_scale=softmax_scale, chunk_size=chunk_size)
    if not causal:
        return _one_global_state(q, k, v, group, rank, world, layout, seq_len, gate, options)
    # this segment from a zero state: its own contribution to every later state (validates the arguments too)
    _, final = linear_attention(q, k, v, gate=gate, output_final_state=True, **options)
    states = tuple(final) if normalize else (final,)
    work = states[0].dtype
    log_decay = _segment_log_decay(decay, gate, q, work)
    parts = [*states] + ([log_decay] if log_decay is not None else [])
    # one collective for everything (its backward is then one all-reduce, the same on every rank)
    packed = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    gathered = _AllGather.apply(packed.contiguous(), group, world)
    entering = None
    for s in range(rank):
        pieces, offset = [], 0
        for p in parts:
            n = p[0].numel()
            pieces.append(gathered[s][:, offset:offset + n].reshape(p.shape))
            offset += n
        seg_states = pieces[:len(states)]
        if entering is None:
            entering = list(seg_states)
            continue
        if log_decay is not None:
            factor = torch.exp(pieces[-1])  # (B, H, 1 | Dk): the whole segment's decay
            entering = [x * (factor.unsqueeze(-1) if x.dim() == 4 else factor) for x in entering]
        entering = [x + y for x, y in zip(entering, seg_states)]
    if entering is None:  # the first rank starts from zero
        out = linear_attention(q, k, v, gate=gate, **options)
        # The all-gather's backward is an all-reduce every rank must join: tie it into this rank's graph with an
        # empty slice (adds exactly 0, and its zero gradient runs the collective).
        return out + gathered[0][:, :0].sum().to(out.dtype)
    initial = tuple(entering) if normalize else entering[0]
    return linear_attention(q, k, v, gate=gate, initial_state=initial, **options)


def _one_global_state(q, k, v, group, rank: int, world: int, layout: str, seq_len: int, gate, options: dict):
    """Non-causal: this rank's rows against the sum of every rank's state, its own keys (less the padding)
    included through the kernel and the other ranks' states through ``initial_state``."""
    chunk = q.shape[1] // (2 if layout == "zigzag" else 1)
    # padding is the global sequence's end, so a suffix of this rank's rows (they are in ascending order)
    kept = int((local_positions(rank, world, chunk, layout) < seq_len).sum())
    k, v = k[:, :kept], v[:, :kept]
    # the state alone (no query rows); validates the arguments before the collective
    _, final = linear_attention(q[:, :0], k, v, gate=gate, output_final_state=True, **options)
    states = tuple(final) if options["normalize"] else (final,)
    packed = torch.cat([x.reshape(x.shape[0], -1) for x in states], dim=1)
    gathered = _AllGather.apply(packed.contiguous(), group, world)
    others = sum(gathered[s] for s in range(world) if s != rank) if world > 1 else torch.zeros_like(packed)
    initial, offset = [], 0
    for x in states:
        initial.append(others[:, offset:offset + x[0].numel()].reshape(x.shape))
        offset += x[0].numel()
    return linear_attention(q, k, v, initial_state=tuple(initial) if options["normalize"] else initial[0], **options)
