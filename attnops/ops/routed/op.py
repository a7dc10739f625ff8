"""MoBA (Mixture of Block Attention, Lu et al. 2025): a router picks, per (batch, head, query tile),
the key blocks to attend, as a ``BlockMask``; the attention itself is the exact block-sparse core.

Routing is a hard choice: no gradient flows through it; gradients reach q, k and v through the
blocks chosen. The router never allocates anything larger than ``B x H x Nq x Nk`` blocks.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core import dispatch
from attnops.core.checks import (QKVShape, autocast_inputs, check_attn_bias, check_causal, check_dropout_p, check_qkv,
                                 check_score_mods, check_tensor, refuse_forward_ad)
from attnops.core.masks import BlockMask
from attnops.core.results import MAP_ARGS_DOC, AttentionOutput, Result
from attnops.core.segments import check_cu_seqlens
from attnops.ops.softmax.op import block_sparse_attention

# Routing granularity of the MoBA kernels: query tiles of this many rows, and the key sub-block of
# the LUT. MoBA blocks are multiples of it.
MOBA_KERNEL_BLOCK = 64


def check_moba_args(block_size, topk, prefix: str = "") -> None:
    """MoBA's block size (a multiple of the kernel block) and ``topk`` (>= 1); shared with the
    ``attnops.nn.MoBASpec`` spec, whose ``prefix`` names it in the message."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < MOBA_KERNEL_BLOCK \
            or block_size % MOBA_KERNEL_BLOCK:
        raise ValueError(f"{prefix}block_size must be a multiple of the kernel block, i.e. a multiple of "
                         f"{MOBA_KERNEL_BLOCK}, got {block_size!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"{prefix}topk must be an int >= 1 (it counts the query's own block), got {topk!r}")


def _check_moba(shape: QKVShape, block_size, topk, causal) -> None:
    check_causal(causal)
    if shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"moba_attention is self-attention over one sequence: q and k lengths differ "
                         f"({shape.seq_len_q} vs {shape.seq_len_k})")
    check_moba_args(block_size, topk)


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
    """The ``BlockMask`` MoBA's router chooses for ``q (B, S, H, D)`` and ``k (B, S, Hkv, D)``:
    ``(B, H)`` rows at ``(64, 64)`` granularity (arguments as in :func:`moba_attention`)."""
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

    Granularity: the paper routes every query token; these kernels route every **query tile of 64
    rows** with the tile's mean query (which ranks blocks exactly as the sum of the tile's token
    gates does). A token-level choice would need a per-row block set inside the attention kernels;
    a tile-level one is a ``BlockMask`` row, so MoBA runs on the exact block-sparse core (fwd and bwd,
    CPU and GPU). ``attnops.ops.routed.reference.moba_attention`` computes both: ``route_rows=1`` (the
    paper) and ``route_rows=64`` (this op, which the tests hold it to). Ties go to the lower block
    index; a NaN gate ranks highest.

    Args:
        q: ``(B, S, H, D)``; k, v: ``(B, S, Hkv, D)`` with ``H % Hkv == 0`` (self-attention: one
            length).
        block_size: keys per MoBA block, a multiple of 64 (the last block may be partial).
        topk: blocks per query, own block included (>= 1; ``topk >= ceil(S / block_size)`` is
            dense attention).
        causal: bottom-right causal attention inside the own block, earlier blocks only.
        softmax_scale: defaults to ``D ** -0.5``.
        softcap, alibi_slopes, sinks, attn_bias, dropout_p, generator: score modifiers and dropout of the
            attention (not of the routing), as in :func:`attnops.attention`.
        cu_seqlens, max_seqlen: packed sequences as MoBA's ``moba_attn_varlen`` takes them: ``q (total, H, D)``,
            ``k, v (total, Hkv, D)``, ``cu_seqlens`` int32 ``(N + 1,)`` from 0 to total; blocks start at each
            sequence's first token and routing and attention never cross a sequence (one routed call per
            sequence, exact). Returns ``out (total, H, D)`` (lse ``(H, total)``); no ``attn_bias`` or block map here.
        return_lse: also return the log-sum-exp ``(B, H, S)``.
        {map_args}
            (``map_block_size`` here, since ``block_size`` is MoBA's; default 64.)
        backend: force ``"cpu"``, ``"triton"`` or ``"reference"`` for the router and the attention.

    Returns:
        ``out (B, S, H, D)``, or a named tuple as in :func:`attnops.attention`.
    """
    if cu_seqlens is not None:
        return _moba_varlen(q, k, v, cu_seqlens, max_seqlen, attn_bias, return_lse, return_block_map,
                            dict(block_size=block_size, topk=topk, causal=causal, softmax_scale=softmax_scale,
                                 softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                                 generator=generator, backend=backend))
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_forward_ad("moba_attention", q, k, v)
    _check_moba(shape, block_size, topk, causal)
    check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)  # before the router runs
    check_attn_bias(attn_bias, shape, q.device, q.dtype)
    check_dropout_p(dropout_p, generator)
    mask = _routed_mask(q, k, shape.seq_len_q, block_size, topk, causal, backend)
    return block_sparse_attention(q, k, v, mask, softmax_scale=softmax_scale, softcap=softcap,
                                  alibi_slopes=alibi_slopes, sinks=sinks, attn_bias=attn_bias, dropout_p=dropout_p,
                                  generator=generator, return_lse=return_lse,
                                  return_block_map=return_block_map,
                                  map_block_size=map_block_size, reduce=reduce, backend=backend)


moba_attention.__doc__ = moba_attention.__doc__.replace("{map_args}", MAP_ARGS_DOC)


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
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        out, lse = moba_attention(q[None, a:b], k[None, a:b], v[None, a:b], return_lse=True, **options)
        outs.append(out[0])
        lses.append(lse[0])
    if not outs:  # no tokens at all
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = q.new_empty(q.shape), torch.empty(q.shape[1], 0, dtype=lse_dtype, device=q.device)
    else:
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return AttentionOutput(out, lse) if return_lse else out
