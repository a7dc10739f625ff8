"""MoBA (Mixture of Block Attention, Lu et al. 2025): a router picks the key blocks each query attends; the
attention itself is the exact softmax core. Token routing (the paper's, default) picks per query token and runs
as packed (token, block) pairs (attnops.ops.routed.token); tile routing picks per (batch, head, 64-row query
tile), as a ``BlockMask`` for one block-sparse call.

Routing is a hard choice: no gradient flows through it; gradients reach q, k and v through the
blocks chosen. The router never allocates anything larger than ``B x H x Nq x Nk`` blocks.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core import dispatch
from attnops.core.checks import (QKVShape, autocast_inputs, check_attn_bias, check_causal, check_dropout_p, check_flag,
                                 check_qkv, check_score_mods, check_tensor, refuse_unsupported_ad,
                                 resolve_softmax_scale)
from attnops.core.masks import BlockMask
from attnops.core.results import MAP_ARGS_DOC, MAX_SCORES_DOC, Result, pack
from attnops.core.segments import check_cu_seqlens
from attnops.ops.routed.token import moba_token_attention
from attnops.ops.softmax.op import block_sparse_attention

# Routing granularity of the MoBA kernels: query tiles of this many rows, and the key sub-block of
# the LUT. MoBA blocks are multiples of it.
MOBA_KERNEL_BLOCK = 64


ROUTINGS = ("token", "tile")


def check_moba_args(block_size, topk, prefix: str = "", routing: str = "tile") -> None:
    """MoBA's ``routing`` (``"token"`` or ``"tile"``), block size (any int >= 1 for token routing, a multiple of the
    kernel block for tile routing) and ``topk`` (>= 1); shared with the ``attnops.nn.MoBASpec`` spec, whose
    ``prefix`` names it in the message."""
    if routing not in ROUTINGS:
        raise ValueError(f"{prefix}routing must be one of {ROUTINGS}, got {routing!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{prefix}block_size must be an int >= 1, got {block_size!r}")
    if routing == "tile" and (block_size < MOBA_KERNEL_BLOCK or block_size % MOBA_KERNEL_BLOCK):
        raise ValueError(f"{prefix}block_size must be a multiple of the kernel block, i.e. a multiple of "
                         f"{MOBA_KERNEL_BLOCK}, with routing='tile' (token routing takes any size), got {block_size!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{prefix}topk must be an int >= 1 (it counts the query's own block), got {topk!r}")


def _check_moba(shape: QKVShape, block_size, topk, causal, routing: str = "tile") -> None:
    check_causal(causal)
    if shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"moba_attention is self-attention over one sequence: q and k lengths differ "
                         f"({shape.seq_len_q} vs {shape.seq_len_k})")
    check_moba_args(block_size, topk, routing=routing)


def _routed_mask(q: torch.Tensor, k: torch.Tensor, seq_len: int, block_size: int, topk: int, causal: bool,
                 backend: Optional[str], api: str = "moba_attention") -> BlockMask:
    """The router's ``BlockMask`` for validated inputs."""
    route = dispatch.resolve("moba_route", q.device, backend, api=api)
    with torch.no_grad():
        counts, indices = route(q.detach(), k.detach(), block_size=block_size, topk=topk, causal=causal,
                                route_block=MOBA_KERNEL_BLOCK)
    return BlockMask(counts, indices, seq_len, MOBA_KERNEL_BLOCK, causal=causal, validate=False, _trusted=True)


def moba_block_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 512, topk: int = 3, causal: bool = True,
                    backend: Optional[str] = None) -> BlockMask:
    """The ``BlockMask`` MoBA's tile router chooses for ``q (B, S, H, D)`` and ``k (B, S, Hkv, D)``:
    ``(B, H)`` rows at ``(64, 64)`` granularity (arguments as in :func:`moba_attention` with ``routing="tile"``;
    token routing's choice is per token, not a block mask)."""
    shape = check_qkv(q, k, k)
    _check_moba(shape, block_size, topk, causal)
    return _routed_mask(q, k, shape.seq_len_q, block_size, topk, causal, backend, "moba_block_mask")


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 512,
    topk: int = 3,
    causal: bool = True,
    routing: str = "token",
    softmax_scale: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    return_lse: bool = False,
    return_max_scores: bool = False,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
) -> Result:
    r"""MoBASpec: each query block attends to its own key block and the ``topk - 1`` others whose mean key
    scores highest against it.

    Definition (Lu et al. 2025, "MoBASpec: Mixture of Block Attention for Long-Context LLMs"): keys are
    split into blocks of ``block_size``; the gate of a query against block ``j`` is
    ``q . mean(k[block j])``; the query's own block is always selected and attended causally; under
    ``causal`` later blocks are never selected; the remaining ``topk - 1`` slots go to the highest
    gates (``topk`` counts the own block, as in the paper and its code: ``topk=3`` means the own
    block and two others). GQA: each query head routes itself, against the keys of its kv head.

    Routing (``routing``):

    - ``"token"`` (default): every query token routes itself, exactly as the paper and the authors' reference
      (MoonshotAI/MoBA ``moba_attn_varlen_naive``): float32 gates, ``torch.topk`` ties, any ``block_size``. Runs
      as a self pass and a pass over the packed (token, chosen block) pairs on the exact core, merged by their
      log-sum-exp (:mod:`attnops.ops.routed.token`); no N x N tensor, forward and backward, every backend.
      Takes softcap, sinks and dropout; ``alibi_slopes``, ``attn_bias`` and block maps need tile routing.
    - ``"tile"``: every **query tile of 64 rows** routes with the tile's mean query (which ranks blocks exactly
      as the sum of the tile's token gates does), so the choice is a ``BlockMask`` row and MoBA runs as one
      block-sparse call; faster, and a different method (35.7% of the routing sets differ on random inputs).
      ``block_size`` a multiple of 64; ties go to the lower block index; a NaN gate ranks highest.
      ``attnops.ops.routed.reference.moba_attention`` computes both (``route_rows=1`` / ``64``).

    Args:
        q: ``(B, S, H, D)``; k, v: ``(B, S, Hkv, D)`` with ``H % Hkv == 0`` (self-attention: one
            length).
        block_size: keys per MoBA block (the last block may be partial): any int >= 1 with token routing, a
            multiple of 64 with tile routing.
        topk: blocks per query, own block included (>= 1; ``topk >= ceil(S / block_size)`` is
            dense attention).
        causal: bottom-right causal attention inside the own block, earlier blocks only.
        routing: ``"token"`` (the paper's, default) or ``"tile"`` (above).
        softmax_scale: defaults to ``D ** -0.5``.
        softcap, alibi_slopes, sinks, attn_bias, dropout_p, generator: score modifiers and dropout of the
            attention (not of the routing), as in :func:`attnops.attention`.
        cu_seqlens, max_seqlen: packed sequences as MoBA's ``moba_attn_varlen`` takes them: ``q (total, H, D)``,
            ``k, v (total, Hkv, D)``, ``cu_seqlens`` int32 ``(N + 1,)`` from 0 to total; blocks start at each
            sequence's first token and routing and attention never cross a sequence (token routing: one packed
            call for all; tile routing: one routed call per sequence). Returns ``out (total, H, D)`` (lse
            ``(H, total)``); no ``attn_bias`` or block map here.
        return_lse: also return the log-sum-exp ``(B, H, S)``.
        {max_scores} Over the keys the row's routing chose (``(H, total)`` with ``cu_seqlens``).
        {map_args}
            (``map_block_size`` here, since ``block_size`` is MoBA's; default 64.)
        backend: force ``"cpu"``, ``"triton"`` or ``"reference"`` for the router and the attention.

    Returns:
        ``out (B, S, H, D)``, or a named tuple as in :func:`attnops.attention`.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    check_flag("return_max_scores", return_max_scores)
    if routing == "token":
        return _moba_token(q, k, v, cu_seqlens, max_seqlen, return_lse,
                           dict(block_size=block_size, topk=topk, causal=causal, softmax_scale=softmax_scale,
                                softcap=softcap, sinks=sinks, dropout_p=dropout_p, generator=generator,
                                backend=backend, max_scores=return_max_scores),
                           dict(alibi_slopes=alibi_slopes, attn_bias=attn_bias, return_block_map=return_block_map))
    if cu_seqlens is not None:
        return _moba_varlen(q, k, v, cu_seqlens, max_seqlen, attn_bias, return_lse, return_block_map,
                            dict(block_size=block_size, topk=topk, causal=causal, routing="tile",
                                 softmax_scale=softmax_scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                 dropout_p=dropout_p, generator=generator, backend=backend,
                                 return_max_scores=return_max_scores))
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("moba_attention", q, k, v)
    _check_moba(shape, block_size, topk, causal)
    check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)  # before the router runs
    check_attn_bias(attn_bias, shape, q.device, q.dtype)
    check_dropout_p(dropout_p, generator)
    mask = _routed_mask(q, k, shape.seq_len_q, block_size, topk, causal, backend)
    return block_sparse_attention(q, k, v, mask, softmax_scale=softmax_scale, softcap=softcap,
                                  alibi_slopes=alibi_slopes, sinks=sinks, attn_bias=attn_bias, dropout_p=dropout_p,
                                  generator=generator, return_lse=return_lse, return_max_scores=return_max_scores,
                                  return_block_map=return_block_map,
                                  map_block_size=map_block_size, reduce=reduce, backend=backend)


moba_attention.__doc__ = moba_attention.__doc__.replace("{map_args}", MAP_ARGS_DOC).replace("{max_scores}",
                                                                                            MAX_SCORES_DOC)


def _moba_token(q, k, v, cu_seqlens, max_seqlen, return_lse: bool, options: dict, tile_only: dict) -> Result:
    """:func:`moba_attention` with ``routing="token"``: batched ``(B, S, H, D)`` rows or packed sequences, as one
    packed computation (:func:`attnops.ops.routed.token.moba_token_attention`)."""
    given = [name for name, value in tile_only.items() if value is not None and value is not False]
    if given:
        raise NotImplementedError(f"moba_attention(routing='token'): {', '.join(given)} needs routing='tile' (the token "
                                  "route runs as packed (token, block) pairs, whose positions are not the sequence's)")
    packed = cu_seqlens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3 if packed else 4)
    if q.device.type == "meta":
        raise NotImplementedError("moba_attention(routing='token') on meta tensors: the routed pairs depend on the "
                                  "values; shape propagation needs routing='tile'")
    q, k, v = autocast_inputs(q, k, v)
    q4, k4, v4 = (t.unsqueeze(0) for t in (q, k, v)) if packed else (q, k, v)
    shape = check_qkv(q4, k4, v4)
    refuse_unsupported_ad("moba_attention", q, k, v)
    _check_moba(shape, options["block_size"], options["topk"], options["causal"], routing="token")
    check_score_mods(options["softcap"], None, options["sinks"], shape, q.device)
    check_dropout_p(options["dropout_p"], options["generator"])
    scale = resolve_softmax_scale(options.pop("softmax_scale"), shape.head_dim)
    B, S = shape.batch, shape.seq_len_q
    if packed:
        check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device, max_seqlen)
        bounds = [int(x) for x in cu_seqlens.tolist()]
        flat = (q, k, v)
    else:
        bounds = [i * S for i in range(B + 1)]
        flat = tuple(t.reshape(B * S, *t.shape[2:]) for t in (q, k, v))
    out, lse, *maxima = moba_token_attention(*flat, bounds, softmax_scale=scale, **options)
    if not packed:
        out = out.view(B, S, *out.shape[1:])
        lse = lse.view(-1, B, S).transpose(0, 1)
        maxima = [m.view(-1, B, S).transpose(0, 1) for m in maxima]
    return pack(out, lse, None, return_lse, maxima[0] if maxima else None)


def _moba_varlen(q, k, v, cu_seqlens, max_seqlen, attn_bias, return_lse: bool, return_block_map: bool,
                 options: dict) -> Result:
    """:func:`moba_attention` over packed sequences: one routed call per sequence (MoBA's varlen semantics:
    blocks restart at every sequence)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"with cu_seqlens, q and k/v pack the same tokens: {q.shape[0]} and {k.shape[0]}")
    if attn_bias is not None or return_block_map:
        raise NotImplementedError("moba_attention with cu_seqlens: attn_bias and return_block_map are not supported "
                                  "(call each sequence for them)")
    check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[0], q.device, max_seqlen)
    bounds = cu_seqlens.tolist()
    outs, lses, maxes = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        out, lse, *maxima = moba_attention(q[None, a:b], k[None, a:b], v[None, a:b], return_lse=True, **options)
        outs.append(out[0])
        lses.append(lse[0])
        maxes.extend(m[0] for m in maxima)
    if not outs:  # no tokens at all
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = q.new_empty(q.shape), torch.empty(q.shape[1], 0, dtype=lse_dtype, device=q.device)
        maxes = [lse.clone()]
    else:
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return pack(out, lse, None, return_lse, torch.cat(maxes, dim=1) if options["return_max_scores"] else None)
