"""Aaren's many-to-many attention by a chunked prefix scan.

For a query ``q`` (one per head, learned) and keys / values ``k_1..k_N``, Aaren's output at step ``t`` is
``o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)``, ``s_i = scale * q . k_i``: causal softmax attention
of the same query at every position. The paper computes all ``o_t`` with a parallel scan of the
associative operator on ``(m, u, w)`` (running max, numerator ``sum exp(s_i - m) v_i``, denominator
``sum exp(s_i - m)``),

    (m_a, u_a, w_a) + (m_b, u_b, w_b) = (m, u_a e^{m_a - m} + u_b e^{m_b - m}, w_a e^{m_a - m} + w_b e^{m_b - m}),
    m = max(m_a, m_b),

and updates the state in O(1) per new token. Here the scan is two-level: inside chunks of ``C`` tokens the
prefixes are a ``C x C`` lower-triangular product (every chunk at once), across chunks a sequential scan of
the chunk states (``N / C`` small steps), then each position combines its chunk's prefix with the state
before the chunk. O(N C) work per head and value column, never N x N; differentiable through autograd;
computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

CHUNK = 64


class AarenState(NamedTuple):
    """The scan's state after a prefix: ``m (B, H)`` the running max of the scores, ``u (B, H, Dv)`` and
    ``w (B, H)`` the numerator and denominator relative to ``m``; ``o = u / w``. Empty prefix: ``m = -inf``,
    ``u = w = 0``."""

    m: torch.Tensor
    u: torch.Tensor
    w: torch.Tensor


def _check(q, k, v, initial_state, scale):
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("q, k, v must be tensors")
    if q.dim() != 2 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"aaren takes q (H, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    H, D = q.shape
    B, S, Hkv, Dk = k.shape
    if Dk != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k must be (B, S, Hkv, {D}) and v (B, S, Hkv, Dv) with the same B, S, Hkv; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"the query heads ({H}) must be a multiple of the kv heads ({Hkv})")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if initial_state is not None:
        if not isinstance(initial_state, AarenState):
            raise TypeError("initial_state must be an AarenState (from output_final_state=True)")
        want = ((B, H), (B, H, v.shape[-1]), (B, H))
        got = tuple(tuple(t.shape) for t in initial_state)
        if got != want:
            raise ValueError(f"initial_state must have shapes m {want[0]}, u {want[1]}, w {want[2]}; got {got}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"softmax_scale must be a positive number, got {scale!r}")


def aaren(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    initial_state: Optional[AarenState] = None,
    output_final_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, AarenState]]:
    """Aaren: ``o_t = softmax_{i <= t}(scale * q . k_i) . v`` for every ``t``, by a prefix scan.

    Args:
        q: ``(H, D)``: one (learned) query per head.
        k: ``(B, S, Hkv, D)``; v: ``(B, S, Hkv, Dv)``; ``H % Hkv == 0`` (head ``h`` reads kv head
            ``h // (H / Hkv)``).
        softmax_scale: default ``D ** -0.5``.
        initial_state: the :class:`AarenState` of a preceding prefix (from ``output_final_state``): the
            outputs continue it exactly, so a stream of tokens costs O(1) per token.
        output_final_state: also return the state after the last token.

    Returns ``(B, S, H, Dv)`` in v's dtype, and the state when asked. A position with no finite score yet
    (an empty prefix) has ``w = 0`` and output 0; NaN in, NaN out.
    """
    _check(q, k, v, initial_state, softmax_scale)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {output_final_state!r}")
    H, D = q.shape
    B, S, Hkv, Dv = v.shape
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    group = H // Hkv
    s = torch.einsum("hd,bshd->bhs", q.to(work), k.to(work).repeat_interleave(group, dim=2)) * scale  # (B, H, S)
    vals = v.to(work).repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, S, Dv)
    if initial_state is None:
        m0 = torch.full((B, H), float("-inf"), dtype=work, device=v.device)
        u0 = torch.zeros(B, H, Dv, dtype=work, device=v.device)
        w0 = torch.zeros(B, H, dtype=work, device=v.device)
    else:
        m0, u0, w0 = (t.to(work) for t in initial_state)
    n = -(-S // CHUNK)
    pad = n * CHUNK - S
    # padded positions score -inf: they add nothing to any prefix
    sc = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(B, H, n, CHUNK)
    vc = torch.nn.functional.pad(vals, (0, 0, 0, pad)).view(B, H, n, CHUNK, Dv)
    # inside each chunk: prefix maxima and the lower-triangular weights exp(s_i - m_t), i <= t
    m_in = torch.cummax(sc, dim=-1).values  # (B, H, n, C)
    tri = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=v.device).tril()
    diff = sc.unsqueeze(-2) - _finite(m_in).unsqueeze(-1)  # (B, H, n, C_t, C_i)
    weights = torch.where(tri, torch.exp(diff.masked_fill(~tri, float("-inf"))), torch.zeros((), dtype=work,
                                                                                             device=v.device))
    u_in = weights @ vc  # (B, H, n, C, Dv)
    w_in = weights.sum(-1)  # (B, H, n, C)
    # across chunks: the state before each chunk, a sequential scan of the chunks' full-extent states
    m_prev, u_prev, w_prev = [m0], [u0], [w0]
    # each chunk's full-extent state, split once: indexing the chunk inside the loop would make every step's
    # backward allocate a gradient of the whole tensor (quadratic in the number of chunks)
    m_last, u_last, w_last = m_in[..., -1].unbind(2), u_in[:, :, :, -1].unbind(2), w_in[..., -1].unbind(2)
    for c in range(n):
        m_a, u_a, w_a = m_prev[-1], u_prev[-1], w_prev[-1]
        m_b, u_b, w_b = m_last[c], u_last[c], w_last[c]
        m, ea, eb = _combine_scales(m_a, m_b)
        m_prev.append(m)
        u_prev.append(u_a * ea.unsqueeze(-1) + u_b * eb.unsqueeze(-1))
        w_prev.append(w_a * ea + w_b * eb)
    m_b4 = torch.stack(m_prev[:-1], 2)  # (B, H, n): the state before chunk c
    u_b4 = torch.stack(u_prev[:-1], 2)
    w_b4 = torch.stack(w_prev[:-1], 2)
    m_t, ea, eb = _combine_scales(m_b4.unsqueeze(-1), m_in)  # (B, H, n, C)
    u_t = u_b4.unsqueeze(-2) * ea.unsqueeze(-1) + u_in * eb.unsqueeze(-1)
    w_t = w_b4.unsqueeze(-1) * ea + w_in * eb
    out = u_t / torch.where(w_t > 0, w_t, torch.ones_like(w_t)).unsqueeze(-1)  # empty prefix: u = 0 -> 0
    out = out.view(B, H, n * CHUNK, Dv)[:, :, :S].transpose(1, 2).to(v.dtype)
    if not output_final_state:
        return out
    return out, AarenState(m_prev[-1], u_prev[-1], w_prev[-1])


def _finite(m: torch.Tensor) -> torch.Tensor:
    """-inf (no score yet) as 0, so ``s - m`` stays -inf - 0 = -inf rather than NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _combine_scales(m_a: torch.Tensor, m_b: torch.Tensor):
    """``m = max(m_a, m_b)`` and the factors ``e^{m_a - m}``, ``e^{m_b - m}`` (0 for an empty side)."""
    m = torch.maximum(m_a, m_b)
    ref = _finite(m)
    return m, torch.exp(m_a - ref), torch.exp(m_b - ref)
