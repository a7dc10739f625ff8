"""Context-parallel softmax attention: the sequence split across the ranks of a process group.

Every rank holds the shards ``(B, S_local, H|Hkv, D)`` of q, k and v (:func:`attnops.distributed.shard`). For
each rank ``s`` whose keys some local query can see, the rank attends its queries to ``s``'s keys with the
block-sparse core (token-exact: the causal / window predicates become per-query key intervals in ``s``'s
local coordinates, the global block mask is sliced to the pair's blocks) and merges the partial results by
their log-sum-exp, in float32. The backward re-fetches the same key shards, runs the core's backward with the
merged output and lse (FlashAttention's identity: each partial's gradient is exact given the global
softmax) and sends each remote shard's dk / dv back to its owner.

Communication is point to point (``torch.distributed.batch_isend_irecv``, gloo on CPU, NCCL on GPU): every
rank computes, from the global mask, which rank needs which shard, and a shard that nobody needs is neither
computed nor sent (a causal mask skips the upper half of the ring's steps, a window narrower than a shard
moves at most the neighbours' shards). The next step's shards are in flight while the current one is
computed. Sent bytes are counted in :data:`STATS` (tests and the benchmark read them).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from attnops.core import backends
from attnops.core.checks import check_causal, check_qkv, resolve_softmax_scale
from attnops.core.masks import BlockMask, check_window_size
from attnops.core.results import AttentionOutput
from attnops.core.segments import transpose_bounds
from attnops.distributed.shard import _group_info, check_split, local_positions
from attnops.ops.softmax import library as lib
from attnops.ops.softmax.merge import merge_partials

# Bytes this process sent through context-parallel attention (forward and backward), and the ring steps it
# skipped because no query needed the shard: reset with STATS.clear().
STATS: Dict[str, int] = {}


def _count(key: str, n: int) -> None:
    STATS[key] = STATS.get(key, 0) + n


class _Pair(NamedTuple):
    """What the core needs to attend this rank's queries to one rank's keys."""

    key_bounds: torch.Tensor  # (1, S_local, 2) int32: each local query's keys in the remote shard's coordinates
    query_bounds: torch.Tensor  # (1, S_local, 2)
    mask: Optional[BlockMask]  # the global block mask on this pair's blocks (None: dense)


class _Plan(NamedTuple):
    world: int
    rank: int
    pairs: Dict[int, _Pair]  # remote rank -> its pair, for the ranks whose keys this rank's queries need
    senders: List[int]  # ranks whose shards this rank needs (keys of pairs), sorted
    receivers: List[int]  # ranks that need this rank's shard


def _intervals(gq: torch.Tensor, gk: torch.Tensor, seq_len: int, causal: bool,
               window: Tuple[int, int]) -> torch.Tensor:
    """``(S_local_q, 2)``: each query's visible keys ``[lo, hi)`` among ``gk`` (global positions, ascending).
    Self-attention: query ``i`` sees keys ``[i - left, i + right]`` (causal: right = 0) below ``seq_len``;
    padded queries (``>= seq_len``) see nothing (an empty interval at the end keeps the bounds monotone)."""
    left, right = window
    if causal:
        right = 0
    lo = gq - left if left >= 0 else torch.zeros_like(gq)
    hi = torch.clamp(gq + right + 1, max=seq_len) if right >= 0 else torch.full_like(gq, seq_len)
    lo_local = torch.searchsorted(gk, lo.clamp(min=0))
    hi_local = torch.searchsorted(gk, hi)
    padded = gq >= seq_len
    end = torch.full_like(lo_local, gk.numel())
    lo_local = torch.where(padded, end, torch.minimum(lo_local, hi_local))
    hi_local = torch.where(padded, end, hi_local)
    return torch.stack([lo_local, hi_local], dim=-1)


def _pair(gq: torch.Tensor, gk: torch.Tensor, seq_len: int, causal: bool, window: Tuple[int, int],
          block_mask: Optional[BlockMask], dense: Optional[torch.Tensor] = None, build: bool = True):
    """The pair's bounds and sub-mask, or None when no query sees any key of the shard (``build=False``: True
    instead of the pair, for the pairs of other ranks, whose need is all a plan wants). ``dense``: the mask's
    block bitmap when the caller has it (a plan slices it for every pair)."""
    bounds = _intervals(gq, gk, seq_len, causal, window)
    lo, hi = bounds[:, 0], bounds[:, 1]
    if not bool((hi > lo).any()):
        return None
    if not build and block_mask is None:
        return True
    mask = None
    if block_mask is not None:
        bq, bk = block_mask.block_size
        if dense is None:
            dense = block_mask.to_dense().to(gq.device)  # (Bm, Hm, Nq, Nk) over the true length
        nq, nk = dense.shape[-2:]
        q_blocks, k_blocks = gq[::bq] // bq, gk[::bk] // bk  # the global block of each local block
        sub = dense[:, :, q_blocks.clamp(max=nq - 1)][..., k_blocks.clamp(max=nk - 1)]
        sub = sub & (q_blocks < nq).view(-1, 1) & (k_blocks < nk).view(1, -1)
        # blocks the intervals cannot reach carry no work: a pair with none left is skipped
        first = lo.view(-1, bq).min(1).values.view(-1, 1)  # per local query block: the keys any row reaches
        last = hi.view(-1, bq).max(1).values.view(-1, 1)
        k_of = torch.arange(len(k_blocks), device=gq.device).view(1, -1)
        reach = (last > first) & (k_of >= first // bk) & (k_of <= (last - 1) // bk)
        sub = sub & reach
        if not bool(sub.any()):
            return None
        if not build:
            return True
        S_q, S_k = gq.numel(), gk.numel()
        mask = BlockMask.from_dense(sub, (S_q, S_k), (bq, bk))
    key_bounds = bounds.to(torch.int32).unsqueeze(0).contiguous()
    return _Pair(key_bounds, transpose_bounds(key_bounds, gk.numel()), mask)


def _plan(rank: int, world: int, local_len: int, seq_len: int, layout: str, causal: bool, window: Tuple[int, int],
          block_mask: Optional[BlockMask], device) -> _Plan:
    """Every rank computes the whole need matrix (cheap, deterministic), so sends and receives match."""
    chunk = local_len // (2 if layout == "zigzag" else 1)
    positions = [local_positions(r, world, chunk, layout, device) for r in range(world)]
    dense = None if block_mask is None else block_mask.to_dense().to(device)
    needs = {}
    for r in range(world):
        for s in range(world):
            p = _pair(positions[r], positions[s], seq_len, causal, window, block_mask, dense, build=r == rank)
            if p is not None:
                needs[(r, s)] = p
    pairs = {s: needs[(rank, s)] for s in range(world) if (rank, s) in needs}
    receivers = [r for r in range(world) if r != rank and (r, rank) in needs]
    return _Plan(world, rank, pairs, sorted(s for s in pairs if s != rank), receivers)


def _ops(device: torch.device):
    """The core's forward and backward operators for tensors on ``device``."""
    if device.type == "cpu":
        if not backends.EXTENSION:
            raise RuntimeError(f"attnops.context_parallel_attention needs the C++ kernels on CPU: "
                               f"{backends.EXTENSION_REASON}")
        return lib.FWD.op, lib.BWD.op
    if device.type == "cuda":
        if not backends.TRITON:
            raise RuntimeError(f"attnops.context_parallel_attention needs Triton on CUDA: {backends.TRITON_REASON}")
        from attnops.ops.softmax import triton  # noqa: F401  (registers the Triton operators)

        return lib.FWD_TRITON.op, lib.BWD_TRITON.op
    raise RuntimeError(f"attnops.context_parallel_attention: no kernels for {device} tensors")


def _peer(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


class _Exchange:
    """One step's point-to-point transfers, in flight until :meth:`wait`: sends of ``send`` to ``to`` and
    receives (shaped like ``like``) from ``frm``."""

    def __init__(self, group, send, to: List[int], frm: List[int], like, tag: int):
        ops, self.received = [], {}
        for peer in to:
            for i, t in enumerate(send):
                ops.append(dist.P2POp(dist.isend, t, _peer(group, peer), group, tag + i))
                _count("bytes_sent", t.numel() * t.element_size())
        for peer in frm:
            self.received[peer] = tuple(torch.empty_like(t) for t in like)
            ops += [dist.P2POp(dist.irecv, t, _peer(group, peer), group, tag + i)
                    for i, t in enumerate(self.received[peer])]
        self._requests = dist.batch_isend_irecv(ops) if ops else []
        self._keep = send  # the sent tensors stay alive until the transfer completes

    def wait(self) -> Dict[int, Tuple[torch.Tensor, ...]]:
        for req in self._requests:
            req.wait()
        return self.received


def _steps(plan: _Plan) -> List[Tuple[List[int], List[int]]]:
    """Per ring offset t = 1..W-1: (ranks this rank sends its shard to, ranks it receives shards from). An
    offset where a rank neither sends nor receives costs it nothing; sends and receives pair up because
    every rank computed the same need matrix."""
    W, r = plan.world, plan.rank
    steps = []
    for t in range(1, W):
        to, frm = (r + t) % W, (r - t) % W
        steps.append(([to] if to in plan.receivers else [], [frm] if frm in plan.senders else []))
    return steps


def _prefetched(plan: _Plan, group, k, v):
    """The key shards this rank needs, one ring offset at a time: the next offset's transfers are posted
    before the current shards are handed out (communication overlaps the computation on them)."""
    steps = _steps(plan)
    pending = _Exchange(group, (k, v), *steps[0], (k, v), tag=_tag(0, 0)) if steps else None
    for i in range(len(steps)):
        current = pending
        if i + 1 < len(steps):
            pending = _Exchange(group, (k, v), *steps[i + 1], (k, v), tag=_tag(i + 1, 0))
        yield i, steps[i], current.wait()


def _tag(step: int, kind: int) -> int:
    """Distinct tags per step and kind (0: key shards, 1: returned dk / dv), two tensors each."""
    return 4 * step + 2 * kind


def _lut(pair: _Pair) -> dict:
    mask = pair.mask
    if mask is None:
        return dict(kv_num_blocks=None, kv_indices=None, q_num_blocks=None, q_indices=None, block_q=0, block_k=0)
    return dict(kv_num_blocks=mask.kv_num_blocks, kv_indices=mask.kv_indices, q_num_blocks=mask.q_num_blocks,
                q_indices=mask.q_indices, block_q=mask.block_size[0], block_k=mask.block_size[1])


def _bounds(pair: _Pair) -> dict:
    # the pair's predicates live in its key bounds: the core's own causal / window stay off
    return dict(causal=False, window_left=-1, window_right=-1, key_bounds=pair.key_bounds,
                query_bounds=pair.query_bounds)


def _work(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, group, scale: float):
        fwd, _ = _ops(q.device)
        k, v, work = k.contiguous(), v.contiguous(), _work(q.dtype)

        def attend(pair, ks, vs):
            out, lse, *_ = lib.FWD.call(fwd, q=q, k=ks, v=vs, **_lut(pair), softmax_scale=scale, **_bounds(pair))
            return out, lse

        acc = None
        if plan.rank in plan.pairs:
            acc = merge_partials(acc, *attend(plan.pairs[plan.rank], k, v), work)
        for _, _, got in _prefetched(plan, group, k, v):
            for s, (ks, vs) in got.items():
                acc = merge_partials(acc, *attend(plan.pairs[s], ks, vs), work)
        if acc is None:  # no local query sees any key (all padding, or an empty mask)
            B, S, H, _ = q.shape
            acc = (torch.zeros(q.shape, dtype=work, device=q.device),
                   torch.full((B, H, S), float("-inf"), dtype=work, device=q.device))
        out, lse = acc[0].to(q.dtype), acc[1]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.scale = plan, group, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, scale = ctx.plan, ctx.group, ctx.scale
        _, bwd = _ops(q.device)
        dout, work = dout.contiguous(), _work(q.dtype)
        dq = torch.zeros(q.shape, dtype=work, device=q.device)
        dk = torch.zeros(k.shape, dtype=work, device=q.device)
        dv = torch.zeros(v.shape, dtype=work, device=q.device)

        def grads(pair, ks, vs):
            # each partial's gradient is exact given the merged out and lse (P = exp(s - lse), delta = dO . O)
            return lib.BWD.call(bwd, dout=dout, dlse=dlse, q=q, k=ks, v=vs, out=out, lse=lse, **_lut(pair),
                                softmax_scale=scale, **_bounds(pair))[:3]

        if plan.rank in plan.pairs:
            gq, gk, gv = grads(plan.pairs[plan.rank], k, v)
            dq += gq
            dk += gk
            dv += gv
        returns = []
        for step, (to, frm), got in _prefetched(plan, group, k, v):
            back = ()
            for s, (ks, vs) in got.items():
                gq, gk, gv = grads(plan.pairs[s], ks, vs)
                dq += gq
                back = (gk.to(work).contiguous(), gv.to(work).contiguous())
            # a remote shard's dk / dv go back to its owner: this step's transfers, reversed
            returns.append(_Exchange(group, back, frm, to, (dk, dv), tag=_tag(step, 1)))
        for exchange in returns:
            for gk, gv in exchange.wait().values():
                dk += gk
                dv += gv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _Args(NamedTuple):
    rank: int
    world: int
    local: int
    seq_len: int
    causal: bool
    window: Tuple[int, int]
    scale: float


def _checked(q, k, v, group, causal, softmax_scale, window_size, block_mask, layout, seq_len) -> _Args:
    """The arguments of a context-parallel call, validated before any transfer."""
    rank, world = _group_info(group)
    shape = check_qkv(q, k, v)
    if shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"context-parallel attention is self-attention: q and k shards differ in length "
                         f"({shape.seq_len_q} vs {shape.seq_len_k})")
    local = shape.seq_len_q
    seq_len = check_split(local, world, layout, seq_len)
    causal = check_causal(causal)
    window = check_window_size(window_size)
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be an attnops.BlockMask, got {type(block_mask).__name__}")
        if tuple(block_mask.seq_lengths) != (seq_len, seq_len):
            raise ValueError(f"block_mask covers {tuple(block_mask.seq_lengths)}, the global sequence is {seq_len}")
        if causal and not block_mask.causal:
            raise ValueError("causal=True with a non-causal block mask: build the mask causal")
        chunk = local // (2 if layout == "zigzag" else 1)
        bq, bk = block_mask.block_size
        if chunk % bq or chunk % bk:
            raise ValueError(f"each shard chunk ({chunk} rows) must be a multiple of the mask's block size "
                             f"{block_mask.block_size}: shard with multiple={max(bq, bk)}")
        causal, window = block_mask.causal, block_mask.window_size
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    return _Args(rank, world, local, seq_len, causal, window, scale)


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                           softmax_scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
                           block_mask: Optional[BlockMask] = None, layout: str = "zigzag",
                           seq_len: Optional[int] = None) -> torch.Tensor:
    """The all-gather-KV baseline (forward only; what torch's Flex context parallel does): every rank gathers
    every key shard, then attends its queries to the whole sequence. Same arguments and result as
    :func:`context_parallel_attention`; it moves ``W - 1`` shards to every rank whatever the mask."""
    rank, world, local, seq_len, causal, window, scale = _checked(q, k, v, group, causal, softmax_scale, window_size,
                                                                  block_mask, layout, seq_len)
    fwd, _ = _ops(q.device)
    gathered = []
    for t in (k, v):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        _count("bytes_sent", (world - 1) * t.numel() * t.element_size())
        gathered.append(torch.cat(parts, dim=1))  # rank order: positions below say where each row sits
    chunk = local // (2 if layout == "zigzag" else 1)
    gk_unsorted = torch.cat([local_positions(r, world, chunk, layout, q.device) for r in range(world)])
    order = torch.argsort(gk_unsorted)
    k_all, v_all = (t[:, order].contiguous() for t in gathered)
    gq = local_positions(rank, world, chunk, layout, q.device)
    pair = _pair(gq, gk_unsorted[order], seq_len, causal, window, block_mask)
    if pair is None:
        return torch.zeros_like(q)
    out, *_ = lib.FWD.call(fwd, q=q, k=k_all, v=v_all, **_lut(pair), softmax_scale=scale, **_bounds(pair))
    return out


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                               softmax_scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
                               block_mask: Optional[BlockMask] = None, return_lse: bool = False,
                               layout: str = "zigzag", seq_len: Optional[int] = None):
    """Exact softmax self-attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's shard ``(B, S_local, H, D)`` of the global queries (:func:`attnops.distributed.shard`
            with the same ``layout``); every rank's shard has the same length.
        k, v: this rank's shards ``(B, S_local, Hkv, D)``, ``H % Hkv == 0``.
        group: the process group (None: the default group).
        causal, window_size, softmax_scale: as in :func:`attnops.attention`, over global positions.
        block_mask: the global ``BlockMask`` (any constructor, MoBA's routed mask included), as in
            :func:`attnops.block_sparse_attention`: its own ``causal`` / ``window_size`` apply. Each chunk
            (``S_local`` / 2 for zigzag) must be a multiple of its block size (``shard(..., multiple=)``).
        return_lse: also return the lse ``(B, H, S_local)`` of the local rows (float32).
        layout: ``"zigzag"`` or ``"contiguous"``, as the shards were made.
        seq_len: the true global length when the shards were padded (default ``S_local * W``): padded keys
            are never attended and padded rows give zeros.

    Returns ``(B, S_local, H, D)`` (and the lse): this rank's rows of ``attnops.attention`` /
    ``block_sparse_attention`` on the whole sequence, forward and backward (dk, dv reach the ranks that own
    the keys).
    """
    args = _checked(q, k, v, group, causal, softmax_scale, window_size, block_mask, layout, seq_len)
    rank, world, local, seq_len, causal, window, scale = args
    plan = _plan(rank, world, local, seq_len, layout, causal, window, block_mask, q.device)
    STATS["steps_skipped"] = STATS.get("steps_skipped", 0) + (world - 1 - len(plan.senders))
    out, lse = _ContextParallel.apply(q, k, v, plan, group, scale)
    return AttentionOutput(out, lse) if return_lse else out
