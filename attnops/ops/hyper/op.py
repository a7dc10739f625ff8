"""HyperAttention on the exact softmax core.

Non-causal (the authors' ``forward_no_causal_mask``), per (batch, kv head):

1. sortLSH: keys sorted by (code, position) and split into ``nb = ceil(Sk / block_size)`` blocks of
   ``block_size``; every query head's queries sorted by (code, position) and split into ``nb`` blocks of
   ``bq = ceil(Sq / nb)``. Query block ``i`` attends key block ``i`` exactly. The queries of a kv head's group,
   ordered by (rank, head), see nondecreasing key intervals of the sorted key stretch, so one call of
   :func:`attnops.ops.softmax.bounded.bounded_attention` covers every batch and head.
2. The rest: ``sample_size`` positions of the sorted key order drawn uniformly (with replacement, per (batch, kv
   head)), sorted; a query skips the samples inside its own key block (counted by step 1; the authors' CPU path
   masks them the same way) and weights the others by ``Sk / sample_size``: with the sorted samples laid out twice
   in a row, the samples a query sees are one interval, so one more bounded call, its lse raised by
   ``log(Sk / sample_size)``.
3. The two partial softmaxes merge by their lse (:func:`attnops.ops.softmax.merge.merge_partials`) and the rows
   go back to their places. Below ``min_seq_len`` queries the authors run exact attention, and so does this.

Causal (the authors' recursion): exact causal attention up to ``min_seq_len`` keys; longer sequences are split in
halves (an odd length padded with one zero row, which only the padded query sees); the two diagonal halves recurse
as a batch of twice the size, the lower-left quarter is the non-causal method, merged into the lower half's rows.

Work: ``O(N (block_size + sample_size) D)`` per level and ``log2(N / min_seq_len)`` levels plus exact causal
blocks of ``min_seq_len``; memory O(N), never N x N. Gradients reach q, k and v exactly for the drawn hash and
samples (both discrete).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from attnops.core.checks import autocast_inputs, check_causal, check_qkv, refuse_unsupported_ad, resolve_softmax_scale
from attnops.ops.hyper.lsh import draw_samples, lsh_codes, lsh_projections
from attnops.ops.softmax.bounded import bounded_attention
from attnops.ops.softmax.merge import merge_partials
from attnops.ops.softmax.op import attention

_API = "hyper_attention"


class _Config(NamedTuple):
    scale: float
    block_size: int
    sample_size: int
    min_seq_len: int
    generator: torch.Generator
    backend: Optional[str]
    work: torch.dtype


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _exact(q, k, v, causal: bool, cfg: _Config):
    out, lse = attention(q, k, v, causal=causal, softmax_scale=cfg.scale, return_lse=True, backend=cfg.backend)
    return out.to(cfg.work), lse.to(cfg.work)


def _sorted_blocks(q, k, v, q_codes, k_codes, cfg: _Config):
    """The non-causal method for ``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)`` and their codes ``(B, S, Hx)``
    -> ``out (B, Sq, H, Dv)``, ``lse (B, H, Sq)`` in ``cfg.work``."""
    B, Sq, H, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Sq < cfg.min_seq_len:
        return _exact(q, k, v, False, cfg)
    dev, group = q.device, H // Hkv
    bk = cfg.block_size
    nb = -(-Sk // bk)
    bq = -(-Sq // nb)

    # keys of each (batch, kv head), sorted by (code, position): one stretch of the packed key sequence each
    key_order = torch.sort(k_codes.permute(0, 2, 1), dim=-1, stable=True).indices  # (B, Hkv, Sk)
    stretch = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1)
    key_rows = (key_order + stretch * Sk).reshape(-1)
    kp = k.permute(0, 2, 1, 3).reshape(B * Hkv * Sk, D).index_select(0, key_rows)
    vp = v.permute(0, 2, 1, 3).reshape(B * Hkv * Sk, Dv).index_select(0, key_rows)

    # queries of each head sorted by (code, position); packed per (batch, kv head) in (rank, head of the group) order
    query_order = torch.sort(q_codes.permute(0, 2, 1), dim=-1, stable=True).indices  # (B, H, Sq)
    by_rank = query_order.view(B, Hkv, group, Sq).transpose(2, 3)  # (B, Hkv, Sq, group): position of (rank, g)
    head = torch.arange(group, device=dev).view(1, 1, 1, group)
    q_rows = (((stretch.unsqueeze(-1) * group + head) * Sq) + by_rank).reshape(-1)
    qp = q.permute(0, 2, 1, 3).reshape(B * H * Sq, D).index_select(0, q_rows)
    rank = torch.arange(Sq, device=dev).view(1, 1, Sq, 1).expand(B, Hkv, Sq, group)
    block = torch.div(rank, bq, rounding_mode="floor")  # (B, Hkv, Sq, group): the query's sorted block
    lo, hi = block * bk, torch.clamp((block + 1) * bk, max=Sk)
    base = (stretch * Sk).unsqueeze(-1)
    bounds = torch.stack([lo + base, hi + base], dim=-1).reshape(-1, 2)
    out, lse = bounded_attention(qp[None, :, None], kp[None, :, None], vp[None, :, None], bounds,
                                 softmax_scale=cfg.scale, api=_API, backend=cfg.backend)

    m = cfg.sample_size
    if m > 0 and Sq > bq and Sk > bk:
        # samples of each (batch, kv head) in sorted-key positions, ascending, so each block's own samples are one
        # interval [lo_s, hi_s) of them; laid out twice in a row, the others are one interval too, [hi_s, m + lo_s)
        samples = draw_samples(cfg.generator, Sk, B, Hkv, m, dev).sort(dim=-1).values  # (B, Hkv, m)
        rows = (torch.cat([samples, samples], dim=-1) + stretch * Sk).reshape(-1)
        ks, vs = kp.index_select(0, rows)[None, :, None], vp.index_select(0, rows)[None, :, None]
        sample_block = torch.div(samples, bk, rounding_mode="floor").contiguous()
        flat = block.reshape(B, Hkv, Sq * group)
        lo_s = torch.searchsorted(sample_block, flat).view_as(block)
        hi_s = torch.searchsorted(sample_block, flat, right=True).view_as(block)
        base = (stretch * 2 * m).unsqueeze(-1)
        seen = torch.stack([hi_s + base, lo_s + m + base], dim=-1).reshape(-1, 2)
        out_s, lse_s = bounded_attention(qp[None, :, None], ks, vs, seen, softmax_scale=cfg.scale, api=_API,
                                         backend=cfg.backend)
        out, lse = merge_partials((out, lse), out_s, lse_s + math.log(Sk / m), cfg.work)

    # back to (batch, head, position) order: q_rows is a permutation of every row
    back = torch.empty_like(q_rows).scatter_(0, q_rows, torch.arange(q_rows.numel(), device=dev))
    out = out[0, :, 0].index_select(0, back).to(cfg.work)
    lse = lse[0, 0].index_select(0, back).to(cfg.work)
    return out.view(B, H, Sq, Dv).permute(0, 2, 1, 3), lse.view(B, H, Sq)


def _halves(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2h, ...)`` -> ``(2B, h, ...)``: batch ``2b + i`` holds half ``i`` of sequence ``b``."""
    return x.reshape(x.shape[0] * 2, x.shape[1] // 2, *x.shape[2:])


def _causal(q, k, v, q_codes, k_codes, cfg: _Config):
    """The causal method for ``Sq == Sk`` (the authors' recursive halving) -> ``out (B, S, H, Dv)``, ``lse (B, H,
    S)``."""
    B, S, H, _ = q.shape
    if S <= cfg.min_seq_len:
        return _exact(q, k, v, True, cfg)
    pad = S % 2
    if pad:  # one zero row at the end: a key only the padded query sees (and code 0, as the authors' zero row)
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1)) for t in (q, k, v))
        q_codes, k_codes = (torch.nn.functional.pad(c, (0, 0, 0, 1)) for c in (q_codes, k_codes))
    n = S + pad
    h = n // 2
    out_d, lse_d = _causal(_halves(q), _halves(k), _halves(v), _halves(q_codes), _halves(k_codes), cfg)
    out_d = out_d.reshape(B, n, H, -1)
    lse_d = lse_d.reshape(B, 2, H, h).transpose(1, 2).reshape(B, H, n)
    out_l, lse_l = _sorted_blocks(q[:, h:], k[:, :h], v[:, :h], q_codes[:, h:], k_codes[:, :h], cfg)
    low_out, low_lse = merge_partials((out_d[:, h:], lse_d[..., h:]), out_l, lse_l, cfg.work)
    out = torch.cat([out_d[:, :h], low_out], dim=1)
    lse = torch.cat([lse_d[..., :h], low_lse], dim=-1)
    return out[:, :S], lse[..., :S]


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    block_size: int = 256,
    sample_size: int = 256,
    num_projections: int = 7,
    min_seq_len: int = 4096,
    seed: int = 0,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """HyperAttention (the authors' defaults: 7 LSH directions, blocks of 256, 256 samples, exact below 4096).

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0`` (the kv heads' sorted keys and samples
            serve every query head of their group; each query head sorts its own queries).
        causal: the recursive causal form; needs ``Sq == Sk`` unless ``Sq <= min_seq_len`` (a decoding step or a
            short chunk against a longer cache: exact bottom-right causal attention).
        softmax_scale: default ``D ** -0.5``.
        block_size: keys per sorted block (the last block may be shorter); queries per block ``ceil(Sq / nb)``.
        sample_size: uniformly sampled key columns for the part outside the blocks (0: none).
        num_projections: LSH directions (codes in ``[0, 2^r)``, 1..30).
        min_seq_len: exact attention below this many queries (non-causal) or up to this many keys (causal).
        seed: the LSH directions and the samples are drawn from a CPU generator with this seed.
        return_lse: also return the estimate's log-sum-exp ``(B, H, Sq)`` (float32; float64 for float64 inputs).
        backend: the softmax core's backend.

    Returns:
        ``out (B, Sq, H, Dv)`` in q's dtype, or ``(out, lse)``.
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad(_API, q, k, v)
    causal = check_causal(causal)
    block_size = _positive_int("block_size", block_size)
    sample_size = _positive_int("sample_size", sample_size, minimum=0)
    min_seq_len = _positive_int("min_seq_len", min_seq_len)
    num_projections = _positive_int("num_projections", num_projections)
    if num_projections > 30:
        raise ValueError(f"num_projections must be at most 30, got {num_projections}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    Sq, Sk = shape.seq_len_q, shape.seq_len_k
    if causal and Sq != Sk and Sq > min_seq_len:
        raise NotImplementedError(f"hyper_attention: the causal form halves a square attention; Sq = {Sq} queries "
                                  f"against Sk = {Sk} keys is supported only up to min_seq_len = {min_seq_len} "
                                  "queries (exact)")
    generator = torch.Generator().manual_seed(seed)
    projections = lsh_projections(generator, shape.head_dim, num_projections)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    cfg = _Config(resolve_softmax_scale(softmax_scale, shape.head_dim), block_size, sample_size, min_seq_len,
                  generator, backend, work)
    if causal and Sq != Sk:
        out, lse = _exact(q, k, v, True, cfg)
    else:
        q_codes, k_codes = lsh_codes(q, projections), lsh_codes(k, projections)
        run = _causal if causal else _sorted_blocks
        out, lse = run(q, k, v, q_codes, k_codes, cfg)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
