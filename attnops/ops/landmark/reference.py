"""Float64 oracle of Landmark attention: the grouped softmax as dense per-key weights.

For query position ``p`` the weight of key ``j`` is ``e^{s_pj} / Z_p`` for ``j`` in its own block up to ``p`` (the
own landmark excluded), ``(e^{s_pL_b} / Z_p) * e^{s_pj} / Z_pb`` for ``j`` a token of a chosen earlier block ``b``
(``Z_pb`` over the block's tokens, landmark excluded), 0 elsewhere; ``Z_p`` sums the own block's ``e^{s_pj}`` and the
chosen blocks' ``e^{s_pL_b}``. O(Sq Sk) memory, tests only."""

from __future__ import annotations

from typing import Optional

import torch


def landmark_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chosen: torch.Tensor, *,
                       block_size: int, softmax_scale: Optional[float] = None,
                       rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q (B, Sq, H, D)``, ``k, v (B, Sk, Hkv, D)``, ``chosen (B, H, Sq, Nb)`` bool: the earlier blocks each query
    keeps (the op's ``return_blocks``) -> ``(B, R, H, Dv)`` for query rows ``rows`` (default all)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    rows = torch.arange(Sq) if rows is None else rows.cpu()
    q, chosen = q[:, rows.to(q.device)], chosen[:, :, rows.to(chosen.device)].to(q.device)
    group = H // k.shape[2]
    kk, vv = (t.repeat_interleave(group, dim=2) for t in (k, v))
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale  # (B, H, R, Sk)
    bs = block_size
    pos = rows + Sk - Sq
    key = torch.arange(Sk)
    pos, key = pos.to(q.device), key.to(q.device)
    own = (key.view(1, -1) // bs == pos.view(-1, 1) // bs) & (key.view(1, -1) <= pos.view(-1, 1)) \
        & (key.view(1, -1) % bs != bs - 1)  # (Sq, Sk)
    nb = chosen.shape[-1]
    landmark_logit = s[..., bs - 1:nb * bs:bs]  # (B, H, Sq, nb)
    # the local softmax over the own block's tokens and the chosen blocks' landmarks
    local = torch.cat([s.masked_fill(~own, float("-inf")), landmark_logit.masked_fill(~chosen, float("-inf"))], -1)
    p_local = torch.softmax(local.float() if s.dtype in (torch.float16, torch.bfloat16) else local, dim=-1)
    p_own, p_block = p_local[..., :Sk], p_local[..., Sk:]  # (B, H, Sq, Sk), (B, H, Sq, nb)
    # within each chosen block: a softmax over its tokens, the landmark excluded
    block_of = key // bs
    regular = (key % bs != bs - 1) & (block_of < nb)
    w = torch.zeros_like(p_own)
    if nb > 0:
        sb = s[..., :nb * bs].reshape(B, H, -1, nb, bs).masked_fill(~regular[:nb * bs].view(nb, bs),
                                                                    float("-inf"))
        within = torch.softmax(sb.float() if s.dtype in (torch.float16, torch.bfloat16) else sb, dim=-1)
        w[..., :nb * bs] = (within * p_block.unsqueeze(-1)).reshape(B, H, -1, nb * bs).to(w.dtype)
    weights = (p_own + w).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", weights, vv)
