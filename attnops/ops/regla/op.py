r"""ReGLA on the linear core.

The paper's three changes to gated linear attention, as equations (Lu et al. 2025, section 3):

- feature maps: ``phi_q(q_t) = exp(q_t - max_j q_{t,j})`` (each query row shifted by its own max) and
  ``phi_k(k_t) = exp(k_t - max_{s,j} k_{s,j})`` (the keys shifted by their max over positions and channels):
  bounded in (0, 1] and non-negative;
- the variance-reduction scale ``1 / (e sqrt(d (e^2 - 1)))`` on ``phi_q . phi_k`` (Theorem 3.1: for standard
  normal inputs the exponential inner product has variance ``d e^2 (e^2 - 1)``);
- the refining gate: with ``g = sigmoid(gate)``, ``r = sigmoid(refine)``, the forget gate of every key channel is
  ``F = (1 - r) g^2 + r (1 - (1 - g)^2)``, whose derivative in ``g`` stays away from 0 where ``g`` saturates.

The recurrence is GLA's, ``S_t = diag(F_t) S_{t-1} + phi_k(k_t)^T v_t``, ``o_t = scale * phi_q(q_t) S_t``, with no
denominator: the paper puts a normalisation layer on the output instead (``attnops.nn.ReGLA`` does). The product
runs on :func:`attnops.linear_attention` (identity feature map, ``gate = log F`` per key channel), chunked, never
N x N; gradients flow to q, k, v, both gate logits and the initial state through autograd and the core.

``log F`` is formed in log space, ``log F = log g + logaddexp(log g, log 2 + log r + log(1 - g))`` (as
``F = g (g + 2 r (1 - g))``), from ``logsigmoid`` of the logits in float32 at least: accurate where ``g`` or ``r``
saturate, where a direct ``log((1 - r) g^2 + ...)`` underflows to ``log 0`` or loses the small ``1 - F`` of
long-memory channels.

Decision (DESIGN.md): the keys' shift. The paper writes the max over every position of the sequence; in a causal
model that makes token t's output (its scale) depend on later keys, and a decoder cannot form it. The default,
``key_shift="running"``, shifts the keys seen up to t by their running max ``m_t = max_{s<=t, j} k_{s,j}``: still
bounded in (0, 1] and non-negative, causal, and exact across calls; when the max grows the state is rescaled by
``exp(m_{t-1} - m_t)``, a per-head log-gate added to the refined gates (so it runs inside the core's chunks). Its
output is the paper's times ``exp(M - m_t)`` per (row, head), ``M`` the sequence max: a positive factor the output
normalisation of a ReGLA layer removes (up to its ``eps``). ``key_shift="sequence"`` is the paper's letter: a call
that resumes from ``initial_state`` then shifts by the larger of the state's shift and its own keys' max, so the
second part of a split sequence equals one call and the first differs by ``exp(max_first - max_all)`` per head.
Causal only (the gates order the sequence).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from attnops.core.checks import check_qkv
from attnops.ops.linear import linear_attention

LOG2 = math.log(2.0)
KEY_SHIFTS = ("running", "sequence")


class ReGLAState(NamedTuple):
    """The recurrent state: ``state (B, H, D, Dv)`` (float32; float64 for float64 inputs) and ``key_max (B, Hkv)``,
    the shift the keys in it are taken with (the keys' max so far)."""

    state: torch.Tensor
    key_max: torch.Tensor


class ReGLAOutput(NamedTuple):
    """``out (B, S, H, Dv)`` and the state after the last step."""

    out: torch.Tensor
    final_state: ReGLAState


def variance_reduction_scale(head_dim: int) -> float:
    """The paper's ``1 / (e sqrt(d (e^2 - 1)))``."""
    return 1.0 / (math.e * math.sqrt(head_dim * (math.e ** 2 - 1.0)))


def refined_log_gate(gate: torch.Tensor, refine: torch.Tensor) -> torch.Tensor:
    """``log F`` for ``F = (1 - r) g^2 + r (1 - (1 - g)^2)``, ``g = sigmoid(gate)``, ``r = sigmoid(refine)``.

    ``gate`` and ``refine``: logits of one shape; the result has it, in float32 (float64 for float64 inputs), <= 0.
    ``F = g (g + 2 r (1 - g))``, so ``log F = log g + logaddexp(log g, log 2 + log r + log(1 - g))``, with
    ``log(1 - g) = log g - gate``. Forward and backward (written out: ``d/dgate = (1 - g)(1 + (1 - 2r) g / I)``,
    ``d/drefine = 2 (1 - g) r (1 - r) / I``, ``I = F / g``, each ratio <= 1 taken in log space) run in segments
    that stay in cache: as separate whole-tensor passes they cost 20 ns an element, mostly page faults.
    """
    if gate.shape != refine.shape:
        raise ValueError(f"gate and refine must have one shape, got {tuple(gate.shape)} and {tuple(refine.shape)}")
    if gate.device != refine.device:
        raise ValueError(f"gate is on {gate.device}, refine on {refine.device}")
    work = torch.promote_types(torch.promote_types(gate.dtype, refine.dtype), torch.float32)
    return _RefinedLogGate.apply(gate.to(work), refine.to(work))


SEGMENT = 1 << 16  # elements per segment of the refined gate's passes (256 KiB of float32)


def _segments(*tensors):
    """Matching flat segments of contiguous tensors of one shape (on a GPU one: its passes do not fault pages,
    and each segment would cost launches)."""
    flat = [t.reshape(-1) for t in tensors]
    step = SEGMENT if flat[0].device.type == "cpu" else max(1, flat[0].numel())
    for start in range(0, flat[0].numel(), step):
        yield [t[start:start + step] for t in flat]


def _log_terms(a: torch.Tensor, b: torch.Tensor):
    """``(log g, log r, log 2 + log r + log(1 - g), logaddexp(log g, that))`` of one segment."""
    log_g, log_r = F.logsigmoid(a), F.logsigmoid(b)
    other = (log_r + log_g).sub_(a).add_(LOG2)
    return log_g, log_r, other, torch.logaddexp(log_g, other)


class _RefinedLogGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        out = torch.empty_like(a)
        for a_s, b_s, out_s in _segments(a, b, out):
            log_g, _, _, lae = _log_terms(a_s, b_s)
            # F <= 1 exactly; rounding may land a hair above 0, which the core's check would refuse
            torch.add(log_g, lae, out=out_s).clamp_(max=0.0)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        for a_s, b_s, g_s, da_s, db_s in _segments(a, b, grad, da, db):
            log_g, log_r, other, lae = _log_terms(a_s, b_s)
            clamped = (log_g + lae) > 0  # the forward's clamp passes no gradient there
            one_minus_r = torch.exp(log_r - b_s)
            # d/da = (1 - g)(1 + (1 - 2r) g / I), d/db = (1 - r) * 2 r (1 - g) / I, I = exp(lae) >= both g, 2r(1-g)
            torch.exp(log_g - a_s, out=da_s)  # 1 - g
            da_s.mul_(torch.exp(log_g - lae).mul_(one_minus_r - torch.exp(log_r)).add_(1.0)).mul_(g_s)
            torch.exp(other.sub_(lae), out=db_s).mul_(one_minus_r).mul_(g_s)
            da_s.masked_fill_(clamped, 0.0)
            db_s.masked_fill_(clamped, 0.0)
        return da, db


def regla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    refine: torch.Tensor,
    *,
    softmax_scale: Optional[float] = None,
    key_shift: str = "running",
    initial_state: Optional[ReGLAState] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: Optional[str] = None,
):
    """Causal ReGLA: q ``(B, S, H, D)``, k ``(B, S, Hkv, D)``, v ``(B, S, Hkv, Dv)`` -> ``(B, S, H, Dv)``.

    Args:
        gate, refine: the forget and refining gates' logits (before the sigmoid), ``(B, S, H, D)``, one per
            query head and key channel (GLA's gate layout).
        softmax_scale: multiplies ``phi_q``; defaults to the paper's ``1 / (e sqrt(D (e^2 - 1)))``.
        key_shift: ``"running"`` (default: each key shifted by the max of the keys up to it, causal) or
            ``"sequence"`` (the paper's max over the call's positions); see the module's docstring.
        initial_state: a :class:`ReGLAState` to continue from (what ``output_final_state`` returned).
        output_final_state: return ``ReGLAOutput(out, final_state)``.
        chunk_size, backend: the linear core's.

    The output is in q's dtype; the features are formed in float32 (float64 for float64 inputs).
    """
    shape = check_qkv(q, k, v) if v.shape[-1] == q.shape[-1] else _check_qkv_dv(q, k, v)
    B, S, H, Hkv = shape.batch, shape.seq_len_q, shape.num_heads, shape.num_kv_heads
    if shape.seq_len_k != S:
        raise ValueError(f"regla_attention is causal: q and k need one length, got {S} and {shape.seq_len_k}")
    expected = (B, S, H, q.shape[-1])
    for name, t in (("gate", gate), ("refine", refine)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
            raise ValueError(f"{name} must be a tensor of shape (B, S, H, D) = {expected}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {output_final_state!r}")
    if initial_state is not None and not isinstance(initial_state, ReGLAState):
        raise TypeError("initial_state must be the ReGLAState a previous call returned")
    scale = variance_reduction_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    if key_shift not in KEY_SHIFTS:
        raise ValueError(f"key_shift must be one of {KEY_SHIFTS}, got {key_shift!r}")
    prev = prev_max = None
    if initial_state is not None:
        prev, prev_max = initial_state
        if tuple(prev_max.shape) != (B, Hkv) or tuple(prev.shape[:2]) != (B, H):
            raise ValueError(f"initial_state is for another batch or heads: state {tuple(prev.shape)}, key_max "
                             f"{tuple(prev_max.shape)}; expected ({B}, {H}, ...) and ({B}, {Hkv})")
    feat = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(feat), k.to(feat)
    phi_q = torch.exp(qf - qf.amax(dim=-1, keepdim=True))
    log_gate = refined_log_gate(gate, refine)
    group = H // Hkv
    if key_shift == "sequence":
        # (B, Hkv); an empty call keeps the state's shift (or none: -inf)
        key_max = kf.amax(dim=(1, 3)) if S else kf.new_full((B, Hkv), float("-inf"))
        if prev is not None:
            key_max = torch.maximum(key_max, prev_max.to(feat))
            rescale = torch.exp(prev_max.to(feat) - key_max).repeat_interleave(group, dim=1)  # (B, H), <= 1
            prev = prev * rescale.view(B, H, 1, 1).to(prev.dtype)
        shift = key_max.view(B, 1, Hkv, 1)
    else:
        row_max = kf.amax(dim=-1)  # (B, S, Hkv)
        if prev is not None:
            first = prev_max.to(feat).view(B, 1, Hkv)
        else:  # the first step's own max (no rescale there); an empty call: no shift yet
            first = row_max[:, :1] if S else kf.new_full((B, 1, Hkv), float("-inf"))
        running = torch.cummax(torch.cat([first, row_max], dim=1), dim=1).values  # (B, 1 + S, Hkv)
        # the state, taken at the previous step's shift, moves to this step's: a per-head log-gate <= 0
        log_gate = log_gate + (running[:, :-1] - running[:, 1:]).repeat_interleave(group, dim=2).unsqueeze(-1)
        shift = running[:, 1:].unsqueeze(-1)
        key_max = running[:, -1]
    phi_k = torch.exp(kf - shift)
    result = linear_attention(phi_q.to(q.dtype), phi_k.to(k.dtype), v, feature_map="identity", causal=True,
                              gate=log_gate, softmax_scale=scale, chunk_size=chunk_size,
                              initial_state=prev, output_final_state=output_final_state, backend=backend)
    if not output_final_state:
        return result
    out, final = result
    return ReGLAOutput(out, ReGLAState(final, key_max))


def _check_qkv_dv(q, k, v):
    """``check_qkv`` for a value width other than the key width."""
    shape = check_qkv(q, k, k)
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must be (B, S, Hkv, Dv) like k {tuple(k.shape)} in its dtype and device, got "
                         f"{tuple(v.shape)} {v.dtype} {v.device}")
    return shape
