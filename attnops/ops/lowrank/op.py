"""Low-rank-key attention (Loki): approximate scores in a calibrated key basis pick the top-k keys
of every query; attention over those keys is exact.

Keys live in a low-dimensional subspace (Singhania et al. 2024): projected onto their first
``rank`` principal components (:class:`attnops.lowrank.KeyProjection`), they rank almost as the
full scores do. The kernels read ``rank`` of the ``D`` dims of every key and the full rows of the
``topk`` chosen ones, which is what makes decoding against a long cache cheaper than dense.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from attnops.core import dispatch
from attnops.core.block_map import MapRequest, check_request
from attnops.core.checks import QKVShape, check_qkv, refuse_unsupported_ad, resolve_softmax_scale
from attnops.core.results import MAP_ARGS_DOC, Result, pack
from attnops.ops.lowrank.projection import KeyProjection


def check_lowrank_args(projection, rank, topk, local, shape: QKVShape, causal: bool = True,
                       prefix: str = "", num_keys: Optional[int] = None) -> Tuple[int, Union[int, float]]:
    """The low-rank arguments of the ops and modules: one set of messages. Returns ``(rank, topk)`` with
    Loki's fractional forms resolved (hpcgroup/loki, ``get_pca_components`` and ``get_pca_forward`` in
    methods/pca_topk/modify_llama.py): a float ``rank`` in (0, 1) is ``projection.loki_rank(rank)``; a
    float ``topk`` in (0, 1] is ``int(topk * num_keys)`` (at least ``max(1, local)``), or stays a
    fraction when ``num_keys`` is None (resolved per call)."""
    if projection is not None:
        if not isinstance(projection, KeyProjection):
            raise TypeError(f"{prefix}projection must be an attnops.lowrank.KeyProjection or None, got "
                            f"{type(projection).__name__}")
        if (projection.num_kv_heads, projection.head_dim) != (shape.num_kv_heads, shape.head_dim):
            raise ValueError(f"{prefix}projection is for (Hkv, D) = ({projection.num_kv_heads}, {projection.head_dim})"
                             f" but k has ({shape.num_kv_heads}, {shape.head_dim})")
    if not isinstance(causal, bool):
        raise TypeError(f"{prefix}causal must be a bool, got {causal!r}")
    if isinstance(rank, float):
        if not 0 < rank < 1:
            raise ValueError(f"{prefix}rank must be an int in [1, head_dim] or a float in (0, 1) (Loki's top_r: a "
                             f"fraction of the keys' explained variance), got {rank}")
        if projection is None:
            raise ValueError(f"{prefix}a fractional rank needs projection= (it is read off its explained variance)")
        rank = projection.loki_rank(rank)
    if isinstance(topk, float):
        if not 0 < topk <= 1:
            raise ValueError(f"{prefix}topk must be an int >= 1 or a float in (0, 1] (Loki's top_k <= 1: a fraction "
                             f"of the keys), got {topk}")
        if num_keys is not None:
            topk = max(1, int(local) if isinstance(local, int) else 1, int(topk * num_keys))
    for name, value in (("rank", rank), ("topk", topk), ("local", local)):
        if name == "topk" and isinstance(value, float):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{prefix}{name} must be an int, got {value!r}")
    if not 1 <= rank <= shape.head_dim:
        raise ValueError(f"{prefix}rank must be in [1, head_dim={shape.head_dim}], got {rank}")
    if isinstance(topk, int) and topk < 1:
        raise ValueError(f"{prefix}topk must be >= 1, got {topk}")
    if local < 0 or (isinstance(topk, int) and local > topk):
        raise ValueError(f"{prefix}local must be in [0, topk={topk}], got {local}")
    if local and not causal:
        raise ValueError(f"{prefix}local keys (the newest ones) need causal=True")
    return rank, topk


def lowrank_key_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    projection: Optional[KeyProjection] = None,
    rank: Union[int, float],
    topk: Union[int, float],
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    local: int = 0,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
    block_size=None,
) -> Result:
    r"""Loki attention: each query attends exactly to the ``topk`` keys of highest low-rank score.

    Args:
        q: ``(B, Sq, H, D)``.
        k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        projection: the key basis (:func:`attnops.lowrank.calibrate`); ``None``: q and k are already
            in it (their first ``rank`` dims are the principal ones).
        rank: components of q and k in the approximate scores, ``1 <= rank <= D``; a float in (0, 1)
            is Loki's ``top_r``: :meth:`KeyProjection.loki_rank` of that fraction of explained variance.
        topk: keys each query attends to (all of them when it sees ``topk`` or fewer: ``rank = D``
            with ``topk >= Sk`` is dense attention); a float in (0, 1] is Loki's ``top_k <= 1``: that
            fraction of the ``Sk`` keys, ``int(topk * Sk)`` (at least ``max(1, local)``). An int is always
            a count (Loki reads ``top_k = 1`` as all keys).
        causal: bottom-right aligned, as :func:`attnops.attention`.
        softmax_scale: defaults to ``D ** -0.5``.
        return_lse: also return lse ``(B, H, Sq)`` over the chosen keys.
        local: the newest ``local`` keys in a query's view are always chosen (they count in
            ``topk``); causal only.
        {map_args} Default block 64. The map of the probabilities over the chosen keys (every
            other key 0), recomputed from the keys the kernel chose and its lse
            (``attnops.ops.lowrank.map.lowrank_block_map``).
        backend: as in :func:`attnops.attention`.

    Selection: approximate scores ``(q P)[:rank] . (k P)[:rank]`` per query head (GQA: against its
    kv head's keys); the ``topk - local`` highest among the keys older than the local ones, ties
    to the later key, NaN ranked highest (NaN in, NaN out). The exact pass uses q and k as given.
    Forward only (an inference method); memory O(Sk) per query row, never Sq x Sk.

    Example::

        >>> proj = attnops.lowrank.calibrate(sample_keys)               # (B, S, Hkv, D)
        >>> out = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=D // 4, topk=S // 8)
    """
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("lowrank_key_attention", q, k, v)
    rank, topk = check_lowrank_args(projection, rank, topk, local, shape, causal, num_keys=shape.seq_len_k)
    scale = resolve_softmax_scale(softmax_scale, shape.head_dim)
    if projection is None:
        q_score, k_score = q[..., :rank], k[..., :rank]
    else:
        q_score, k_score = projection.rotate(q, rank), projection.rotate(k, rank)
    request = check_request(map_block_size, reduce, (64, 64), block_size) if return_block_map else None
    impl = dispatch.resolve("lowrank_key_attention", q.device, backend, api="lowrank_key_attention")
    res = impl(q, k, v, q_score, k_score, None, topk=topk, local=local, causal=causal, softmax_scale=scale,
               block_map=request)
    return pack(res[0], res[1], res[2] if request is not None else None, return_lse)


lowrank_key_attention.__doc__ = lowrank_key_attention.__doc__.replace("{map_args}", MAP_ARGS_DOC)


def lowrank_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   projection: KeyProjection, *, rank: int, topk: int, local: int, softmax_scale: float,
                   k_score: Optional[torch.Tensor], backend: Optional[str], block_map: Optional[MapRequest] = None):
    """``decode_attention``'s low-rank path (validated there): the cache holds keys in the basis
    already, so only the new queries are rotated; the scores read the first ``rank`` dims of the
    score plane ``k_score`` when given, else of the cache rows in place."""
    q_rot = projection.rotate(q)
    scores_from = k_cache if k_score is None else k_score
    q_score = q_rot[..., :rank].to(scores_from.dtype)
    impl = dispatch.resolve("lowrank_key_attention", q.device, backend, api="lowrank_decode")
    return impl(q_rot, k_cache, v_cache, q_score, scores_from[..., :rank], cache_seqlens, topk=topk, local=local,
                causal=True, softmax_scale=softmax_scale, block_map=block_map)
