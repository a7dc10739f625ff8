"""Variable-length (packed) softmax attention in flash_attn's varlen layout, on the block-sparse core.

The sequences are rows of one packed batch (B = 1); token-exact segment bounds
(attnops.core.segments) keep every query inside its own sequence and carry each sequence's own
bottom-right causal / window alignment. No unpadding copy, no Sq x Sk tensor: the kernels skip the
tiles of other sequences, so the cost is the sum of the sequences' own work.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import check_request
from attnops.core.checks import (autocast_inputs, check_block_mask, check_causal, check_dropout, check_flag,
                                 check_qkv, check_score_mods, check_tensor, refuse_unsupported_ad, resolve_softmax_scale)
from attnops.core.masks import BlockMask, check_window_size
from attnops.core.results import MAP_ARGS_DOC, MAX_SCORES_DOC, Result
from attnops.core.segments import check_cu_seqlens, from_cu_seqlens
from attnops.ops.softmax.op import DEFAULT_MAP_BLOCK, DROPOUT_DOC, MODS_DOC, pack_extra


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    *,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    block_mask: Optional[BlockMask] = None,
    return_max_scores: bool = False,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
) -> Result:
    r"""Exact softmax attention over packed sequences of different lengths (flash_attn_varlen_func).

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, Hkv, D)``, ``H % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(num_seqs + 1,)``, the cumulative lengths from 0 to
            ``total_q`` / ``total_k`` (sequence s is ``q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]]``; empty
            sequences allowed).
        max_seqlen_q, max_seqlen_k: the longest sequence (None: not given). The kernels do not need them;
            on CPU tensors they are checked against the lengths (a smaller value is an error).
        causal: per sequence, aligned to its bottom-right corner (flash_attn >= 2.1): query ``a`` of a
            sequence with ``Lq`` queries and ``Lk`` keys sees its keys ``<= a + Lk - Lq``.
        window_size: ``(left, right)`` likewise per sequence; -1 is unbounded.
        {score_mods}
        ALiBi here: ``alibi_slopes (H,)`` (or ``(1, H)``, one packed batch); the distance is flash_attn's
            ``|a + Lk - Lq - b|`` inside each sequence (query ``a``, key ``b``), whatever the two layouts.
        block_mask: an extra ``BlockMask`` over the packed ``(total_q, total_k)`` (B = 1), without its own
            causal / window predicates (give those here, per sequence).
        return_lse: also return the log-sum-exp ``(H, total_q)`` (float32).
        {max_scores} Here ``(H, total_q)``, as lse.
        {map_args} The map is over the packed layout, ``(H, ceil(total_q / block_q), ceil(total_k / block_k))``;
            blocks of other sequences are exactly 0.
        backend: as in :func:`attnops.attention`.

    Returns:
        ``out (total_q, H, D)``, or a named tuple of ``out`` and what was asked (``lse (H, total_q)``,
        ``block_map``, ``max_scores (H, total_q)``). A query with no key (an empty key sequence, or causal with
        ``Lq > Lk``) gets zeros and ``lse = -inf`` (flash_attn 2 writes +inf there).

    Example::

        >>> cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> q = torch.randn(12, 8, 64)
        >>> attnops.varlen_attention(q, q, q, cu, cu, 7, 7, causal=True).shape
        torch.Size([12, 8, 64])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    q, k, v = autocast_inputs(q, k, v)
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    shape = check_qkv(q4, k4, v4)
    refuse_unsupported_ad("varlen_attention", q, k, v)
    causal = check_causal(causal)
    window = check_window_size(window_size)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, shape.seq_len_q, q.device, max_seqlen_q)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, shape.seq_len_k, q.device, max_seqlen_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    check_flag("return_lse", return_lse)
    check_flag("return_max_scores", return_max_scores)
    check_flag("return_block_map", return_block_map)
    mods = check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)
    if block_mask is not None:
        check_block_mask(block_mask, shape, q.device)
        if block_mask.causal or tuple(block_mask.window_size) != (-1, -1):
            raise ValueError("varlen_attention: the block_mask's causal / window predicates would align to the "
                             "packed corner, not each sequence's: build it without them and pass causal / "
                             "window_size here")
    default_block = block_mask.block_size if block_mask is not None else DEFAULT_MAP_BLOCK
    request = check_request(map_block_size, reduce, default_block, None) if return_block_map else None
    dropout = check_dropout(dropout_p, generator, q.device)
    segments = from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, shape.seq_len_q, shape.seq_len_k, causal, window,
                               alibi=alibi_slopes is not None)
    impl = dispatch.resolve("block_sparse_attention", q.device, backend, api="varlen_attention")
    out, lse, *extra = impl(q4, k4, v4, block_mask, causal=False, window_size=(-1, -1), softmax_scale=scale,
                            block_map=request, segments=segments, **mods, **dropout, max_scores=return_max_scores)
    return pack_extra(out[0], lse[0], [x[0] for x in extra], request, return_lse, return_max_scores)


varlen_attention.__doc__ = varlen_attention.__doc__.replace("{map_args}", MAP_ARGS_DOC).replace(
    "{score_mods}", MODS_DOC + "\n        " + DROPOUT_DOC).replace("{max_scores}", MAX_SCORES_DOC)
