"""Routing Transformer attention on the exact softmax core, in cluster order.

Per (batch, kv head) the keys are sorted by (cluster, position) into one stretch of a packed key sequence; the
queries of every head of the group are sorted by (cluster, position, head). A query of cluster c at position p
then sees one interval of that stretch: the keys of cluster c, up to position ``p + Sk - Sq`` when causal (a
``searchsorted`` of ``c * Sk + p`` in the sorted key codes), and both interval ends are nondecreasing along the
sorted queries, as the core's segment bounds need. One core call for every batch and head
(:func:`attnops.ops.softmax.bounded.bounded_attention`), then the rows go back to their places. The work is
``sum_c |Q_c| |K_c|`` (halved when causal), never N x N; gradients reach q, k and v exactly for the given
assignment (the assignment itself is discrete and takes none).
"""

from __future__ import annotations

from typing import Optional

import torch

from attnops.core.checks import autocast_inputs, check_causal, check_qkv, refuse_unsupported_ad, resolve_softmax_scale
from attnops.ops.softmax.bounded import bounded_attention


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def cluster_assignment(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``x (B, S, Hx, D)``, ``centroids (Hc, C, D)`` with ``Hx % Hc == 0`` (head ``h`` uses centroid set
    ``h // (Hx / Hc)``) -> ``(B, S, Hx)`` int64: the nearest centroid on the unit sphere (the largest cosine
    ``x . mu / (|x| |mu|)``: spherical k-means, as the paper's normalised routing); ties to the lower index. A NaN
    row goes to cluster 0 (its attention is NaN anyway)."""
    Hx, Hc = x.shape[2], centroids.shape[0]
    with torch.no_grad():
        mu = _unit(centroids.float()).repeat_interleave(Hx // Hc, dim=0)  # (Hx, C, D)
        scores = torch.einsum("bshd,hcd->bshc", _unit(x.float()), mu)
        return torch.nan_to_num(scores, nan=float("-inf")).argmax(dim=-1)


@torch.no_grad()
def update_centroids(centroids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, decay: float = 0.999) -> torch.Tensor:
    """One online k-means step (the paper's exponential moving average), in place: each centroid of kv head ``g``
    moves to ``decay * mu + (1 - decay) * mean`` of the unit queries (of the heads that use it) and unit keys
    assigned to it, then back onto the unit sphere; a centroid nothing was assigned to stays. ``centroids
    (Hkv, C, D)``, ``q (B, S, H, D)``, ``k (B, S, Hkv, D)``. Returns ``centroids``."""
    Hkv, C, D = centroids.shape
    group = q.shape[2] // Hkv
    unit_q = _unit(q.float()).reshape(-1, Hkv, group, D).transpose(1, 2).reshape(-1, Hkv, D)
    xs = torch.cat([unit_q, _unit(k.float()).reshape(-1, Hkv, D)])  # (n, Hkv, D)
    assign = cluster_assignment(xs.unsqueeze(0), centroids)[0]  # (n, Hkv)
    flat = (torch.arange(Hkv, device=xs.device) * C + assign).reshape(-1)  # (n * Hkv,)
    sums = torch.zeros(Hkv * C, D, device=xs.device).index_add_(0, flat, xs.reshape(-1, D))
    counts = torch.bincount(flat, minlength=Hkv * C).to(sums.dtype).unsqueeze(-1)
    means = (sums / counts.clamp_min(1)).view(Hkv, C, D)
    seen = (counts > 0).view(Hkv, C, 1)
    moved = _unit(decay * _unit(centroids.float()) + (1 - decay) * means)
    centroids.copy_(torch.where(seen, moved, centroids.float()).to(centroids.dtype))
    return centroids


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    return_clusters: bool = False,
    backend: Optional[str] = None,
):
    """Routing Transformer attention: each query attends the keys assigned to its own centroid.

    Args:
        q: ``(B, Sq, H, D)``; k, v: ``(B, Sk, Hkv, D)``, ``H % Hkv == 0``.
        centroids: ``(Hkv, C, D)``: the clusters of each kv head, shared by its keys and the queries of its
            heads (the paper's shared routing); assignments as :func:`cluster_assignment`. No gradient.
        causal: query ``i`` sees keys ``j <= i + Sk - Sq`` of its cluster (bottom-right, as the other ops).
        softmax_scale: default ``D ** -0.5``.
        return_clusters: also return ``(q_cluster (B, Sq, H), k_cluster (B, Sk, Hkv))``.
        backend: the softmax core's backend.

    Returns:
        ``out (B, Sq, H, D)`` (a query whose cluster holds no key it may see gets zeros), or ``(out, q_cluster,
        k_cluster)``.
    """
    q, k, v = autocast_inputs(q, k, v)
    shape = check_qkv(q, k, v)
    refuse_unsupported_ad("routing_attention", q, k, v)
    causal = check_causal(causal)
    if not isinstance(return_clusters, bool):
        raise TypeError(f"return_clusters must be a bool, got {return_clusters!r}")
    B, Sq, H, D = q.shape
    Sk, Hkv = shape.seq_len_k, shape.num_kv_heads
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3 or centroids.shape[0] != Hkv or \
            centroids.shape[2] != D or centroids.shape[1] < 1:
        raise ValueError(f"centroids must be (Hkv, C, D) = ({Hkv}, C >= 1, {D}), got "
                         f"{tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__}")
    if centroids.device != q.device or not centroids.dtype.is_floating_point:
        raise ValueError(f"centroids must be a floating tensor on {q.device}, got {centroids.dtype} on {centroids.device}")
    scale = resolve_softmax_scale(softmax_scale, D)
    group = H // Hkv
    q_cluster = cluster_assignment(q, centroids)  # (B, Sq, H)
    k_cluster = cluster_assignment(k, centroids)  # (B, Sk, Hkv)
    dev = q.device

    # keys of each (batch, kv head) sorted by (cluster, position): one stretch each of the packed key sequence
    key_code = (k_cluster.permute(0, 2, 1) * Sk + torch.arange(Sk, device=dev)).reshape(B * Hkv, Sk)
    key_code, key_order = torch.sort(key_code, dim=-1)
    key_code = key_code.contiguous()
    stretch = (torch.arange(B * Hkv, device=dev) * Sk).unsqueeze(-1)
    key_rows = (key_order + stretch).reshape(-1)  # packed position -> row of k.permute(0, 2, 1, 3) flattened
    kp = k.permute(0, 2, 1, 3).reshape(B * Hkv * Sk, -1).index_select(0, key_rows).unsqueeze(0).unsqueeze(2)
    vp = v.permute(0, 2, 1, 3).reshape(B * Hkv * Sk, -1).index_select(0, key_rows).unsqueeze(0).unsqueeze(2)

    # queries of each (batch, kv head) sorted by (cluster, position, head of the group)
    qc = q_cluster.view(B, Sq, Hkv, group).permute(0, 2, 1, 3).reshape(B * Hkv, Sq * group)  # (b kvh, (pos, g))
    pos = torch.arange(Sq, device=dev).repeat_interleave(group)
    query_code = qc * (Sq * group) + torch.arange(Sq * group, device=dev)
    query_code, query_order = torch.sort(query_code, dim=-1)
    c_sorted = qc.gather(1, query_order)
    p_sorted = pos[query_order]
    lo = torch.searchsorted(key_code, c_sorted * Sk)  # the cluster's first key
    if causal:
        hi = torch.searchsorted(key_code, c_sorted * Sk + (p_sorted + Sk - Sq).clamp(min=-1), right=True)
    else:
        hi = torch.searchsorted(key_code, (c_sorted + 1) * Sk)
    hi = torch.maximum(hi, lo)
    bounds = torch.stack([lo + stretch, hi + stretch], dim=-1).reshape(-1, 2)
    # row of q.permute(0, 2, 1, 3) flattened: ((b kvh g), pos)
    b_kvh = torch.arange(B * Hkv, device=dev).unsqueeze(-1)
    g_sorted = query_order % group
    q_rows = ((b_kvh * group + g_sorted) * Sq + p_sorted).reshape(-1)
    qp = q.permute(0, 2, 1, 3).reshape(B * H * Sq, D).index_select(0, q_rows).unsqueeze(0).unsqueeze(2)
    out, _ = bounded_attention(qp, kp, vp, bounds, softmax_scale=scale, api="routing_attention", backend=backend)
    Dv = v.shape[-1]
    full = out.new_zeros(B * H * Sq, Dv).index_copy(0, q_rows, out[0, :, 0])
    full = full.view(B, H, Sq, Dv).permute(0, 2, 1, 3)
    return (full, q_cluster, k_cluster) if return_clusters else full
