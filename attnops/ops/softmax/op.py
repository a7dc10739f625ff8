"""Exact softmax attention: dense (full / causal / sliding window) and block-sparse.

Both ops run on the block-sparse core: dense attention is the case without a block LUT, where
the kernels walk the key range that the causal / window predicates leave each query tile.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.block_map import check_request
from attnops.core.checks import (autocast_inputs, bias_for, check_attn_bias, check_block_mask, check_causal, check_dropout,
                                 check_flag, check_qkv, check_score_mods, clamp_window, refuse_unsupported_ad, resolve_softmax_scale)
from attnops.core.masks import BlockMask, check_window_size
from attnops.core.results import MAP_ARGS_DOC, MAX_SCORES_DOC, Result, pack
from attnops.core.segments import SegmentBounds, from_document_ids, from_key_mask, intersect

# The map granularity of dense attention when none is asked for: the kernels' block (DESIGN.md).
DEFAULT_MAP_BLOCK = (64, 64)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    document_ids: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    return_max_scores: bool = False,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
    block_size=None,
) -> Result:
    r"""Exact softmax attention with flash_attn conventions.

    Args:
        q: ``(B, Sq, H, D)``.
        k, v: ``(B, Sk, Hkv, D)`` with ``H % Hkv == 0``; query head ``h`` reads kv head
            ``h // (H // Hkv)`` (grouped-query attention; ``Hkv = 1`` is multi-query).
        causal: mask aligned to the bottom-right corner: query ``i`` sees keys
            ``j <= i + Sk - Sq`` (the decode convention of flash_attn >= 2.1).
        softmax_scale: defaults to ``D ** -0.5``.
        window_size: ``(left, right)``: query ``i`` sees keys in
            ``[i + Sk - Sq - left, i + Sk - Sq + right]``; -1 is unbounded.
        {score_mods}
        return_lse: also return the log-sum-exp ``(B, H, Sq)``.
        {max_scores}
        {map_args} Default block 64.
        backend: force ``"cpu"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (else chosen by device,
            or by the ``ATTNOPS_BACKEND`` environment variable).

    Returns:
        ``out (B, Sq, H, D)`` in q's dtype, or a named tuple of ``out`` and what was asked, in the order
        ``out, lse, block_map, max_scores``: ``AttentionOutput(out, lse)``, ``AttentionMapOutput(out, block_map)``,
        ``AttentionLseMapOutput(out, lse, block_map)``, ``AttentionMaxOutput(out, max_scores)`` and so on
        (``attnops.core.results``). A query with no key to attend to gets zeros
        and ``lse = -inf``.

    Example::

        >>> q, k, v = (torch.randn(1, 128, 8, 64) for _ in range(3))
        >>> attnops.attention(q, k, v, causal=True).shape
        torch.Size([1, 128, 8, 64])
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("attention", q, k, v)
    causal = check_causal(causal)
    window = clamp_window(check_window_size(window_size), shape.seq_len_q, shape.seq_len_k)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    check_flag("return_lse", return_lse)
    check_flag("return_max_scores", return_max_scores)
    check_flag("return_block_map", return_block_map)
    mods = check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)
    bias, keep_blocks_of = check_attn_bias(attn_bias, shape, q.device, q.dtype, keep_bool=True)
    request = check_request(map_block_size, reduce, DEFAULT_MAP_BLOCK, block_size) if return_block_map else None
    dropout = check_dropout(dropout_p, generator, q.device)
    segments = check_document_ids(document_ids, shape, q.device)
    bias, keep_blocks_of, segments = key_mask_as_bounds(attn_bias, bias, keep_blocks_of, segments, shape)
    impl = dispatch.resolve("block_sparse_attention", q.device, backend, api="attention")
    if runs_as_decode(impl, shape, causal, mods, q, k, v) and bias is None and keep_blocks_of is None \
            and segments is None and not dropout and request is None and not return_max_scores:
        decode = dispatch.resolve("decode_attention", q.device, "cpu", api="attention")
        lens = torch.full((shape.batch,), shape.seq_len_k, dtype=torch.int32)
        out, lse = decode(q, k, v, lens, None, window_size=(window[0], 0), softmax_scale=scale, **mods)
        return pack(out, lse, None, return_lse)
    mask = None
    if keep_blocks_of is not None:  # a bool mask: its blocks without a True are skipped
        mask = BlockMask.from_dense(keep_blocks_of(*DEFAULT_MAP_BLOCK), (shape.seq_len_q, shape.seq_len_k),
                                    DEFAULT_MAP_BLOCK, causal=causal, window_size=window)
    out, lse, *extra = impl(q, k, v, mask, causal=causal, window_size=window, softmax_scale=scale,
                            block_map=request, attn_bias=bias_for(impl, bias, q.dtype), segments=segments, **mods,
                            **dropout, max_scores=return_max_scores)
    return pack_extra(out, lse, extra, request, return_lse, return_max_scores)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    softmax_scale: Optional[float] = None,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    document_ids: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    return_max_scores: bool = False,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
    block_size=None,
) -> Result:
    r"""Exact softmax attention restricted to the blocks of ``block_mask``.

    Only the listed ``(query block, key block)`` tiles are computed; the mask's token-level
    predicates (``causal``, ``window_size``) are applied inside boundary blocks. Memory is
    O(S * D) plus the LUT: no Sq x Sk tensor is ever allocated.

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        block_mask: an ``attnops.BlockMask`` built for ``(Sq, Sk)``, with batch and head dims equal
            to q's or 1 (broadcast), on q's device.
        softmax_scale: defaults to ``D ** -0.5``.
        {score_mods}
        return_lse: also return the log-sum-exp ``(B, H, Sq)``.
        {max_scores}
        {map_args} Default: the mask's block size.
        backend: as in :func:`attention`.

    Returns:
        ``out`` or a named tuple as in :func:`attention`; rows whose mask keeps nothing give zeros,
        lse -inf.

    Example::

        >>> mask = attnops.BlockMask.sliding_window(4096, window=512)
        >>> out = attnops.block_sparse_attention(q, k, v, mask)
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("block_sparse_attention", q, k, v)
    check_block_mask(block_mask, shape, q.device)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    check_flag("return_lse", return_lse)
    check_flag("return_max_scores", return_max_scores)
    check_flag("return_block_map", return_block_map)
    mods = check_score_mods(softcap, alibi_slopes, sinks, shape, q.device)
    bias, keep_blocks_of = check_attn_bias(attn_bias, shape, q.device, q.dtype, keep_bool=True)
    request = check_request(map_block_size, reduce, block_mask.block_size, block_size) if return_block_map else None
    dropout = check_dropout(dropout_p, generator, q.device)
    segments = check_document_ids(document_ids, shape, q.device)
    bias, keep_blocks_of, segments = key_mask_as_bounds(attn_bias, bias, keep_blocks_of, segments, shape)
    impl = dispatch.resolve("block_sparse_attention", q.device, backend, api="block_sparse_attention")
    if keep_blocks_of is not None:  # the mask's blocks that the bool attn_bias leaves something in
        block_mask = BlockMask.from_dense(block_mask.to_dense() & keep_blocks_of(*block_mask.block_size),
                                          (shape.seq_len_q, shape.seq_len_k), block_mask.block_size,
                                          causal=block_mask.causal, window_size=block_mask.window_size)
    window = clamp_window(block_mask.window_size, shape.seq_len_q, shape.seq_len_k)
    out, lse, *extra = impl(q, k, v, block_mask, causal=block_mask.causal, window_size=window,
                            softmax_scale=scale, block_map=request, attn_bias=bias_for(impl, bias, q.dtype),
                            segments=segments, **mods, **dropout, max_scores=return_max_scores)
    return pack_extra(out, lse, extra, request, return_lse, return_max_scores)


# Query rows per kv head up to which a call runs on the decode kernel (runs_as_decode).
DECODE_ROWS = 8


def runs_as_decode(impl, shape, causal: bool, mods: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` runs this call on the C++ decode kernel (``decode_attn_fwd``): a few queries against
    the keys, as a decoding step through ``attention`` (Hugging Face's ``generate``) makes. The tile kernel packs
    K^T of each kv head for its ``Sq * group`` query rows, which costs more than their product when the rows are few;
    the decode kernel reads each key row once for all of them. Measured side by side (CPU, Zen 4, HF's cache layout,
    Sq = 1; tile vs decode kernel): H = 8, D = 64, Sk = 4096: 2405 vs 514 us; H = 32, Hkv = 8, D = 128, Sk = 2048:
    4760 vs 706 us (2 threads); the decode kernel stays ahead up to ~8 rows per kv head, any Sq = 1 (MQA: 1308 vs
    308 us). Only where the results are the same computation: the C++ backend, no gradient needed, one query
    or causal (decoding's bottom-right causality; one query sees every key either way, and the window's right
    side nothing more), ``Sq <= Sk``; the caller adds: no bias, dropout, document ids or block map."""
    Sq, Sk = shape.seq_len_q, shape.seq_len_k
    if not (Sq == 1 or (causal and Sq * (shape.num_heads // shape.num_kv_heads) <= DECODE_ROWS)) or not 1 <= Sq <= Sk:
        return False  # the shape first: it costs nothing (a call is ~50 us, the backend lookup 1 us)
    if dispatch.device_type(q.device) != "cpu" or dispatch.name_of("block_sparse_attention", impl) != "cpu":
        return False
    sinks = mods["sinks"]
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                             or (sinks is not None and sinks.requires_grad)))


def check_document_ids(document_ids, shape, device) -> Optional[SegmentBounds]:
    """The kernels' segment bounds of a packed batch, or None; packing is self-attention (Sq == Sk)."""
    if document_ids is None:
        return None
    if shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"document_ids packs one sequence of queries and keys: needs Sq == Sk, got "
                         f"{shape.seq_len_q} and {shape.seq_len_k}")
    return from_document_ids(document_ids, shape.batch, shape.seq_len_q, device)


def key_mask_as_bounds(attn_bias, bias, keep_blocks_of, segments, shape):
    """A bool key padding mask (``(B|1, 1, 1, Sk)`` after broadcasting) whose kept keys are one run per row
    runs as segment bounds instead of a bias: the same result, no bias read per score, and the kernels never
    visit the padded tiles. Other masks stay as they are."""
    if keep_blocks_of is None or not isinstance(attn_bias, torch.Tensor) or attn_bias.dtype != torch.bool:
        return bias, keep_blocks_of, segments
    mask = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    if mask.shape[3] != shape.seq_len_k:
        return bias, keep_blocks_of, segments
    bounds = from_key_mask(mask, shape.seq_len_q)
    if bounds is None:
        return bias, keep_blocks_of, segments
    return None, None, intersect(segments, bounds, shape.seq_len_k)


# The ops' shared docstring lines, in parts: varlen_attention takes the modifiers and dropout, not the bias or
# document ids.
MODS_DOC = """softcap: ``cap * tanh(s / cap)`` on the scaled scores before the mask (Gemma 2, Grok);
            0 is off. Exact backward.
        alibi_slopes: ``(H,)`` or ``(B, H)`` floats: ALiBi's bias ``-slope * |i + Sk - Sq - j|`` added after
            the softcap and the mask (flash_attn's convention). No gradient.
        sinks: ``(H,)`` learnable logits, one per head, that join every row's softmax denominator and carry
            no value (gpt-oss, StreamingLLM); lse includes them, a row that sees no key gets zeros and
            ``lse = sinks[h]``. Differentiable."""
BIAS_DOC = """attn_bias: SDPA's ``attn_mask``, broadcastable to ``(B, H, Sq, Sk)`` (each dim full or 1): a float
            tensor is added to the scores with ALiBi's (after the softcap and the masks; its gradient
            flows, reduced to its shape: T5's relative position bias), a bool one masks (False: not
            attended; key blocks with no True are skipped). It combines with causal and windows; rows it
            masks entirely give zeros. The one path that reads an ``Sq x Sk`` tensor (the one given), and
            with a float bias that requires grad the backward writes one (its gradient). NaN/Inf in k or v
            stays out of other rows at the granularity of the causal/window/block predicates, not of the
            bias's -inf / False entries."""
DROPOUT_DOC = """dropout_p: attention dropout on the probabilities, in [0, 1) (0: off; pass the module's rate only in
            training). Kept probabilities are scaled by ``1 / (1 - p)`` (p rounded to a multiple of 2**-24);
            lse and block maps are of the probabilities before dropout. The mask is a hash of one seed drawn
            per call from ``generator``, regenerated in the backward (never stored), the same on every backend.
        generator: the ``torch.Generator`` the seed is drawn from (default: the device's default generator;
            ``torch.manual_seed`` then reproduces the mask)."""
DOCUMENTS_DOC = """document_ids: ``(B, S)`` or ``(S,)`` integers, for packed rows (needs ``Sq == Sk``): a query attends only
            keys of its own document (a run of equal ids), exactly at any token; causal, windows, block masks
            and the bias act within each document, positions stay the row's (ALiBi's distance too, which is
            the same inside a document). Tiles wholly in another document are never visited. Padding is one
            more document: drop its rows after."""
SCORE_MODS_DOC = "\n        ".join((MODS_DOC, BIAS_DOC, DROPOUT_DOC, DOCUMENTS_DOC))

def pack_extra(out, lse, extra, request, return_lse: bool, return_max_scores: bool) -> Result:
    """The op's result from a backend's ``(out, lse, [block_map], [max_scores])``."""
    block_map = extra[0] if request is not None else None
    return pack(out, lse, block_map, return_lse, extra[-1] if return_max_scores else None)


for _op in (attention, block_sparse_attention):
    _op.__doc__ = _op.__doc__.replace("{map_args}", MAP_ARGS_DOC).replace("{score_mods}", SCORE_MODS_DOC) \
        .replace("{max_scores}", MAX_SCORES_DOC)
