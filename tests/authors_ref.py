"""The authors' reference implementations, ported for the tests (einops rearranges written as views):
flash_attn's ``attention_ref`` (tests/test_flash_attn.py) with ``construct_local_mask`` and
``attn_bias_from_alibi_slopes``, and gpt-oss's sinks (``sdpa`` in gpt_oss/torch/model.py)."""

import math

import torch


def _local_mask(sq, sk, window_size):
    """flash_attn tests' ``construct_local_mask`` (True = masked), -1 sides unbounded."""
    row = torch.arange(sq).unsqueeze(1)
    col = torch.arange(sk)
    masked = torch.zeros(sq, sk, dtype=torch.bool)
    if window_size[1] >= 0:
        masked |= col > torch.clamp(row + sk - sq + window_size[1], max=sk)
    if window_size[0] >= 0:
        masked |= col < row + sk - sq - window_size[0]
    return masked


def _alibi_bias(slopes, sq, sk):
    """flash_attn tests' ``attn_bias_from_alibi_slopes`` (non-causal form, the documented one)."""
    slopes = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    rel = (torch.arange(sq).unsqueeze(1) + sk - sq - torch.arange(sk)).abs()
    return -slopes[:, :, None, None] * rel.to(slopes.dtype)


def attention_ref(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, sinks=None,
                  attn_bias=None, dropout_p=0.0, dropout_mask=None):
    """flash_attn's ``attention_ref`` (scores, softcap, local mask, attn_bias, softmax, zero fully
    masked rows) with gpt-oss's sinks: a sink column joins the softmax and is dropped after it.
    ``attn_bias``: additive, broadcast to (B, H, Sq, Sk) (ALiBi's bias joins it, as in flash_attn's tests).
    ``dropout_mask`` (B, H, Sq, Sk) bool, True = kept, with ``dropout_p``: flash_attn's own handling (the
    probabilities are masked, V is scaled by ``1 / (1 - dropout_p)``)."""
    if causal:
        window_size = (window_size[0], 0)
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    local = _local_mask(sq, sk, window_size)
    scores = scores.masked_fill(local, float("-inf"))
    if alibi_slopes is not None:
        scores = scores + _alibi_bias(alibi_slopes.to(scores.dtype), sq, sk)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        full = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(full, dim=-1)
        attn = torch.softmax(full, dim=-1)[..., :-1]
    else:
        lse = torch.logsumexp(scores, dim=-1)
        attn = torch.softmax(scores, dim=-1)
    attn = attn.masked_fill(local.all(dim=-1, keepdim=True), 0.0)
    attn = attn.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)  # rows a -inf bias masks
    dropout_scaling = 1.0 / (1 - dropout_p)
    attn_drop = attn.masked_fill(~dropout_mask, 0.0) if dropout_mask is not None else attn
    return torch.einsum("bhts,bshd->bthd", attn_drop, v * dropout_scaling), lse
