"""Linear Log-Normal attention on the linear core.

With ``phi_q(x) = exp(alpha x)``, ``phi_k(x) = exp(beta x)``, attention is ``phi_q(q) . phi_k(k)`` normalised
over the keys: its scores are log-normal, and the paper chooses ``alpha, beta`` so that their concentration
matches softmax attention's. The authors' code (``LLNAttention`` in the LLN repository's lln/lln_attention.py)
fits ``sigma~^2 = (sigma_q^2 sigma_k^2 - b) / (2 a)`` with ``a = 0.14855178144710912``,
``b = -0.35487039130661086`` and sets ``alpha = sigma~ / sigma_q``, ``beta = sigma~ / sigma_k``, where
``sigma_q, sigma_k`` are the standard deviations of the whole q and k tensors of the call (no gradient flows
through them). Before the exponentials each query row subtracts its max and the keys their max per head (over
positions and dims): shifts that cancel in the normalised output, for range. The output is
``phi_q(q)^T sum_j phi_k(k_j) v_j^T / (phi_q(q) . sum_j phi_k(k_j) + eps)`` (causal: prefix sums), the product
on the linear core (identity feature map, scale 1), never N x N. ``diag=True`` is the authors'
``LLNPlusDiagAttention(mode="average")``: the mean of that and softmax attention inside diagonal blocks of ``D``
tokens (the last, partial block its own), run exactly as packed documents of the softmax core.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.core.checks import check_qkv
from attnops.ops.linear import linear_attention
from attnops.ops.softmax import attention

# The moment fit of the authors' code (sigma~^2 = (sigma_q^2 sigma_k^2 - B) / (2 A))
A = 0.14855178144710912
B = -0.35487039130661086


def lln_scales(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)``, 0-d float64 tensors without gradient: the moment-matched scales of q and k."""
    with torch.no_grad():
        sig_q, sig_k = q.double().std(), k.double().std()
        sig = ((sig_q ** 2 * sig_k ** 2 - B) / (2 * A)) ** 0.5
        return sig / sig_q, sig / sig_k


def lln_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    eps: float = 1e-8,
    diag: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear Log-Normal attention: q ``(B, Sq, H, D)``, k, v ``(B, Sk, Hkv, D)`` -> ``(B, Sq, H, D)``.

    Args:
        causal: prefix sums (``Sq == Sk``); else every query sees every key.
        eps: added to the denominator (the authors' 1e-8).
        diag: average with softmax attention inside diagonal blocks of ``D`` tokens (LLN+Diag, ``Sq == Sk``).
        backend: the cores' backend.

    float16 runs in float32, as the authors' code does. Forward and backward through autograd and the cores.
    """
    shape = check_qkv(q, k, v)
    if not isinstance(causal, bool) or not isinstance(diag, bool):
        raise TypeError(f"causal and diag must be bools, got {causal!r}, {diag!r}")
    if (causal or diag) and shape.seq_len_q != shape.seq_len_k:
        raise ValueError(f"causal and diag LLN attention need Sq == Sk, got {shape.seq_len_q} and {shape.seq_len_k}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    dtype = q.dtype
    work = torch.float32 if dtype == torch.float16 else dtype
    # the O(N D) parts (features, denominator, division) in float64: the exponentials span many orders and a
    # small early denominator amplifies their rounding in the gradients; only the products run in `work`
    qw, kw, vw = (t.to(work) for t in (q, k, v))
    alpha, beta = lln_scales(qw, kw)
    qs, ks = alpha.double() * q.double(), beta.double() * k.double()
    phi_q = torch.exp(qs - qs.amax(dim=-1, keepdim=True))
    phi_k = torch.exp(ks - ks.amax(dim=(1, 3), keepdim=True))  # per (batch, kv head): positions and dims
    num = linear_attention(phi_q.to(work), phi_k.to(work), vw, feature_map="identity", causal=causal, normalize=False,
                           softmax_scale=1.0, backend=backend)
    keys = phi_k.cumsum(1) if causal else phi_k.sum(1, keepdim=True)
    group = shape.num_heads // shape.num_kv_heads
    den = (phi_q * keys.repeat_interleave(group, dim=2)).sum(-1, keepdim=True) + eps
    out = (num.double() / den).to(work)
    if diag:
        blocks = (torch.arange(shape.seq_len_q, device=q.device) // shape.head_dim).expand(shape.batch, -1)
        local = attention(qw, kw, vw, causal=causal, document_ids=blocks, backend=backend)
        out = 0.5 * (out + local)
    return out.to(dtype)
