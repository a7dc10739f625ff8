"""Exact softmax attention where every query row has its own key interval: the building block of the methods
that pack rows (Mixture-of-Head's chosen (token, head) pairs, token-routed MoBA's (token, block) pairs).

The rows are the sequences of the block-sparse core with token-exact segment bounds (attnops.core.segments): one
sequence for every caller but token-routed MoBA, whose batch is its kv heads (so k and v are strided views, not
copies); both bound columns must be nondecreasing along each sequence's rows, which the callers get by ordering
their rows. The kernels visit only the key tiles inside each query tile's interval, so the work is that
of the intervals, never Sq x Sk, forward and backward (the lse takes a gradient too: callers merge partial
results by it).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core import dispatch
from attnops.core.checks import check_dropout, check_qkv, check_score_mods
from attnops.core.segments import SegmentBounds, transpose_bounds


def bounded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bounds: torch.Tensor, *,
                      softmax_scale: float, api: str, backend: Optional[str] = None, softcap: float = 0.0,
                      sinks: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      generator: Optional[torch.Generator] = None,
                      max_scores: bool = False) -> Tuple[torch.Tensor, ...]:
    """``q (B, n, H, D)``, ``k, v (B, m, Hkv, D)``; query row ``i`` attends keys ``[key_bounds[.., i, 0],
    key_bounds[.., i, 1])`` (``(n, 2)`` integers for every batch row alike, or ``(B, n, 2)``; each column
    nondecreasing along the rows, ``lo <= hi``), every head alike. Returns ``out (B, n, H, Dv)`` and ``lse (B, H, n)``
    (a row with an empty interval: 0 and -inf, or the sink), and with ``max_scores`` each row's largest score
    ``(B, H, n)`` (-inf for an empty interval). ``api`` names the calling op in backend errors."""
    shape = check_qkv(q, k, v)
    bounds = key_bounds.to(device=q.device, dtype=torch.int32)
    bounds = (bounds if bounds.dim() == 3 else bounds.unsqueeze(0)).contiguous()
    # the per-key query intervals only serve the backward (the forward saves them for it): a call no gradient
    # reaches skips them (two searchsorted passes over the keys)
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    segments = SegmentBounds(bounds, transpose_bounds(bounds, k.shape[1]) if backward else None)
    impl = dispatch.resolve("block_sparse_attention", q.device, backend, api=api)
    return impl(q, k, v, None, causal=False, window_size=(-1, -1), softmax_scale=softmax_scale, block_map=None,
                segments=segments, **check_score_mods(softcap, None, sinks, shape, q.device),
                **check_dropout(dropout_p, generator, q.device), max_scores=max_scores)
