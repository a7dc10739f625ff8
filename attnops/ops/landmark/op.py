"""Landmark attention on the exact softmax core.

Layout (the authors' data pipeline and their test's masks): position ``j`` of the keys is a landmark when
``j % block_size == block_size - 1``; query ``i`` sits at position ``p = i + Sk - Sq`` (bottom-right, as the other
ops), in block ``c = p // block_size``. Its grouped softmax (their ``landmark_grouped_softmax``, with the masks of
their ``test_flash_landmark_attention.py``) is

    out_p = ( sum_{j in own(p)} e^{s_pj} v_j + sum_{b in blocks(p)} e^{s_pL_b} o_pb ) / Z_p,
    Z_p   =   sum_{j in own(p)} e^{s_pj}     + sum_{b in blocks(p)} e^{s_pL_b},
    o_pb  =   softmax over the block's other tokens j in [b B, b B + B - 1) of s_pj, times v_j

with ``own(p)`` the own block's tokens up to ``p`` (its landmark excluded), ``L_b = b B + B - 1`` and
``blocks(p)`` every earlier block, or with ``topk`` the ``topk`` earlier blocks of the highest ``s_pL_b``
(``torch.topk``'s choice, per query and head: the authors' per-token retrieval).

So: the own block is one call of the core with per-row key bounds; every (query, head, block) pair is a packed row
against that block's tokens, one more call; the pairs merge into the rows with the landmark logits as their
log-weights (:func:`attnops.ops.softmax.merge.merge_rows`), gradients through the outputs and the logits. The
retrieval runs without autograd over chunks of query rows (its logits are ``(B, H, rows, Sk / block_size)``);
with a gradient to take, the chosen pairs' logits are recomputed from their query and landmark rows. Memory:
``O(pairs x D)``: ``Sq topk`` per head with retrieval, about ``Sq^2 / (2 block_size)`` per head for the full form
(the training form; dense work, as the authors').
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import autocast_inputs, check_qkv, refuse_unsupported_ad, resolve_softmax_scale
from attnops.ops.softmax.bounded import bounded_attention
from attnops.ops.softmax.merge import merge_rows

_API = "landmark_attention"


def landmark_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    topk: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    return_blocks: bool = False,
    backend: Optional[str] = None,
):
    """Landmark attention (causal; the landmark of every block is its last token).

    Args:
        q: ``(B, Sq, H, D)``, ``Sq <= Sk``: the last ``Sq`` positions (a whole sequence, a chunk, or a decoding
            step against the cache); k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``, landmarks included.
        block_size: tokens per block including the landmark (the authors' ``mem_freq + 1``), >= 2.
        topk: earlier blocks a query keeps, by its landmark scores (None: all: the training form).
        softmax_scale: default ``D ** -0.5``.
        return_blocks: also return the chosen earlier blocks, ``(B, H, Sq, Nb)`` bool (``Nb`` complete blocks).
        backend: the softmax core's backend.

    Returns:
        ``out (B, Sq, H, Dv)`` in q's dtype (or ``(out, blocks)``).
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad(_API, q, k, v)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (a block holds its landmark and at least one token), got "
                         f"{block_size!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be None or an int >= 1, got {topk!r}")
    if not isinstance(return_blocks, bool):
        raise TypeError(f"return_blocks must be a bool, got {return_blocks!r}")
    B, Sq, H, D = q.shape
    Sk, Hkv, Dv = shape.seq_len_k, shape.num_kv_heads, v.shape[-1]
    if Sq > Sk:
        raise ValueError(f"landmark_attention needs Sq <= Sk (queries are the last Sq positions), got Sq = {Sq}, "
                         f"Sk = {Sk}")
    scale = resolve_softmax_scale(softmax_scale, D)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev, group, bs = q.device, H // Hkv, block_size
    nb = Sk // bs  # complete blocks: the ones with a landmark

    pos = torch.arange(Sq, device=dev) + Sk - Sq
    own = torch.div(pos, bs, rounding_mode="floor")
    own_start = own * bs
    own_end = torch.minimum(pos + 1, own_start + bs - 1)  # the own landmark is never attended
    batch_keys = (torch.arange(B, device=dev) * Sk).view(B, 1)
    bounds = torch.stack([own_start + batch_keys, own_end + batch_keys], dim=-1).reshape(-1, 2)
    out_self, lse_self = bounded_attention(q.reshape(1, B * Sq, H, D), k.reshape(1, B * Sk, Hkv, D),
                                           v.reshape(1, B * Sk, Hkv, Dv), bounds, softmax_scale=scale, api=_API,
                                           backend=backend)  # (1, B Sq, H, Dv), (1, H, B Sq)

    # retrieval without autograd, in chunks of query rows (the logits are (B, H, rows, nb)); the pairs' weights are
    # recomputed with gradients below when a gradient is needed
    landmarks = k[:, bs - 1::bs][:, :nb].transpose(1, 2).to(work)  # (B, Hkv, nb, D)
    pairs, chosen_all = [], []
    with torch.no_grad():
        qh = q.transpose(1, 2).to(work).reshape(B, Hkv, group, Sq, D)
        step = max(1, (1 << 24) // max(1, B * H * nb))
        for lo in range(0, Sq, step):
            hi = min(Sq, lo + step)
            logits = (qh[:, :, :, lo:hi] * scale) @ landmarks.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, g, r, nb)
            logits = logits.view(B, H, hi - lo, nb)
            earlier = torch.arange(nb, device=dev).view(1, -1) < own[lo:hi].view(-1, 1)  # (r, nb)
            if topk is None or topk >= nb:
                chosen = earlier.expand(B, H, hi - lo, nb)
            else:
                index = torch.topk(logits.masked_fill_(~earlier, float("-inf")), k=topk, dim=-1).indices
                chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True) & earlier
            b_idx, h, i, blk = chosen.nonzero(as_tuple=True)
            pairs.append((b_idx, h, i + lo, blk, logits[b_idx, h, i, blk]))
            if return_blocks:
                chosen_all.append(chosen)
        b_idx, h, i, blk, weight = (torch.cat(x) for x in zip(*pairs))
        # packed keys (Hkv, B Sk): a pair row's keys are one stretch; ordering by it keeps both bounds monotone
        start = (h // group) * (B * Sk) + b_idx * Sk + blk * bs
        order = torch.argsort(start, stable=True)
        b_idx, h, i, blk, start, weight = (t[order] for t in (b_idx, h, i, blk, start, weight))
        row = (b_idx * Sq + i) * H + h
    kp = k.permute(2, 0, 1, 3).reshape(1, Hkv * B * Sk, 1, D)
    vp = v.permute(2, 0, 1, 3).reshape(1, Hkv * B * Sk, 1, Dv)
    q_rows = q.reshape(B * Sq * H, D).index_select(0, row)
    out_pair, _ = bounded_attention(q_rows[None, :, None], kp, vp, torch.stack([start, start + bs - 1], dim=-1),
                                    softmax_scale=scale, api=_API, backend=backend)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):  # each block's log-weight: its landmark's logit
        landmark_rows = kp[0, :, 0].index_select(0, start + bs - 1)
        weight = (q_rows.to(work) * landmark_rows.to(work)).sum(-1) * scale
    out, _ = merge_rows(out_self[0].reshape(B * Sq * H, Dv), lse_self[0].transpose(0, 1).reshape(-1),
                        out_pair[0, :, 0], weight, row, work)
    out = out.view(B, Sq, H, Dv).to(q.dtype)
    return (out, torch.cat(chosen_all, dim=2)) if return_blocks else out
