"""The block map of a decode step on the backends whose kernels do not fuse it (Triton, CUDA): one
chunked ``q K^T`` pass over the cache from the kernel's lse. (The C++ decode kernel sums the map with
the forward.)"""

from __future__ import annotations

import torch

from attnops.core.block_map import MapRequest, finish


def decode_block_map(q: torch.Tensor, k_cache: torch.Tensor, cache_seqlens: torch.Tensor, lse: torch.Tensor,
                     block_mask, window_left: int, request: MapRequest, softmax_scale: float,
                     chunk: int = 4096, softcap: float = 0.0, alibi_slopes=None, cache_leftpad=None) -> torch.Tensor:
    """The block map of a decode step, from the decode kernel's ``lse (B, H, Sq_new)``.

    Decoding has at most 64 query rows, so the map is a batched ``q K^T`` over the cache in chunks
    of ``chunk`` keys: memory ``B * H * Sq_new * chunk``, never a square matrix, one extra read of K
    and none of V. The keep predicate is the decode kernels' (``attnops.decode_attention``): query
    ``i`` of sequence ``b`` sits at ``cache_seqlens[b] - Sq_new + i``, sees keys up to it (and back to
    ``pos - window_left``, and not before ``cache_leftpad[b]``), in the blocks ``block_mask`` keeps. ``softcap`` /
    ``alibi_slopes`` modify the scores as in the kernels; ``lse`` includes any sinks.
    """
    B, Sq, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).permute(0, 2, 1, 3).reshape(B, Hkv, (H // Hkv) * Sq, D) * softmax_scale  # one kv group per row set
    lse_w = lse.to(work)
    lse_rows = torch.where(torch.isneginf(lse_w), torch.inf, lse_w).view(B, Hkv, -1, 1)  # no key: p = 0
    pos = cache_seqlens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1) - Sq + torch.arange(
        Sq, device=q.device).view(1, 1, Sq, 1)
    starts = None if cache_leftpad is None else cache_leftpad.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
    kept_blocks = None
    if block_mask is not None:
        kept_blocks = block_mask.to_dense().to(q.device)[:, :, torch.arange(Sq, device=q.device) // block_mask.block_size[0]]
    nk = -(-S // request.block_k)
    rows = torch.zeros(B, H, Sq, nk, dtype=work, device=q.device)
    step = max(request.block_k, chunk // request.block_k * request.block_k)
    for lo in range(0, S, step):
        hi = min(lo + step, S)
        j = torch.arange(lo, hi, device=q.device).view(1, 1, 1, -1)
        keep = j <= pos  # pos < cache_seqlens, so this also drops the unused cache
        if window_left >= 0:
            keep = keep & (j >= pos - window_left)
        if starts is not None:
            keep = keep & (j >= starts)
        if kept_blocks is not None:
            keep = keep & kept_blocks[..., j.view(-1) // block_mask.block_size[1]]
        kc = k_cache[:, lo:hi].to(work).permute(0, 2, 3, 1)  # (B, Hkv, D, n)
        s = torch.matmul(qg, kc).view(B, H, Sq, hi - lo)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if alibi_slopes is not None:
            slopes = alibi_slopes.to(device=q.device, dtype=work)
            slopes = (slopes if slopes.dim() == 2 else slopes.unsqueeze(0)).view(-1, H, 1, 1)
            s = s - slopes * (pos - j).abs().to(work)
        p = torch.exp(s - lse_rows.view(B, H, Sq, 1)).masked_fill(~keep, 0.0)
        width = -(-(hi - lo) // request.block_k) * request.block_k
        p = torch.nn.functional.pad(p, (0, width - (hi - lo))).view(B, H, Sq, -1, request.block_k)
        first = lo // request.block_k
        rows[..., first:first + p.shape[3]] = p.amax(-1) if request.reduce == "max" else p.sum(-1)
    return finish(rows, lse, 1, request).to(lse.dtype)
