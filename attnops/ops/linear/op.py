"""Linear attention: kernelized attention ``phi(q) phi(k)^T`` computed as a recurrence over a
``(Dk, Dv)`` state, with feature maps, fixed per-head decays (RetNet, Lightning) and data-dependent
gates (Simple-GLA / Mamba2 per head, GLA per key channel). Cost and memory grow linearly with the
sequence; the state carries a sequence across calls (decoding, split-and-resume).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from attnops.core import dispatch
from attnops.core.block_map import check_request
from attnops.core.checks import check_qkv_tensors, refuse_unsupported_ad, resolve_softmax_scale
from attnops.core.results import AttentionMapOutput
from attnops.core.segments import check_cu_seqlens
from attnops.ops.linear.chunk import effective_chunk
from attnops.ops.linear.decay import check_nonpositive, resolve_decay
from attnops.ops.linear.feature_maps import resolve_feature_map
from attnops.ops.linear.map import linear_block_map, map_from_chunk_sums

NORMALIZE_EPS = 1e-6
MIN_CHUNK, MAX_CHUNK = 16, 256
# A (Dk, Dv) state per head: the Triton kernels hold a (BK, BV) block of it; the softmax ops' 512 would make it 1 MiB
MAX_HEAD_DIM = 256

State = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class LinearAttentionOutput(NamedTuple):
    """``out (B, S, H, Dv)`` and ``final_state``: ``(B, H, Dk, Dv)`` float32 (float64 for float64
    inputs), or the pair ``(S (B, H, Dk, Dv), z (B, H, Dk))`` when ``normalize=True``."""

    out: torch.Tensor
    final_state: State


class LinearAttentionMapOutput(NamedTuple):
    """``out``, ``final_state`` as above, and the block map ``(B, H, ceil(S / block_q), ceil(Sk / block_k))``."""

    out: torch.Tensor
    final_state: State
    block_map: torch.Tensor


# ---- the op ---------------------------------------------------------------------------------------

def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "elu",
    causal: bool = True,
    decay: Union[None, str, torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    normalize: bool = False,
    softmax_scale: Optional[float] = None,
    chunk_size: int = 64,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_block_map: bool = False,
    map_block_size=None,
    reduce: str = "mean",
    backend: Optional[str] = None,
    block_size=None,
) -> Union[torch.Tensor, LinearAttentionOutput, AttentionMapOutput, LinearAttentionMapOutput]:
    r"""Linear attention, causal (a recurrence) or not (one global state).

    Args:
        q: ``(B, S, H, D)``.
        k: ``(B, S, Hkv, D)``, ``H % Hkv == 0`` (GQA/MQA: a query head reads its group's k and v);
            non-causal, ``(B, Sk, Hkv, D)`` with its own length (cross-attention).
        v: ``(B, S, Hkv, Dv)`` like k; ``Dv`` may differ from ``D``.
        feature_map: ``"elu"`` (elu + 1), ``"identity"``, ``"relu"``, ``"focused"`` (FLatten, power 3;
            :func:`focused_feature_map` for another power), or a callable applied to q and k
            (``(..., D) -> (..., Dk)``, token by token, the same ``Dk`` for both; the state is then
            ``(Dk, Dv)``).
        causal: the recurrence ``S_t = a_t * S_{t-1} + phi(k_t) v_t^T``,
            ``o_t = softmax_scale * phi(q_t)^T S_t``; ``False``: ``o_t = softmax_scale * phi(q_t)^T S``
            with ``S`` the sum over the whole sequence (no decay or gate then).
        decay: a fixed per-head decay ``a = exp(decay[h])``: a ``(H,)`` tensor of log-decays (<= 0) or
            a preset, ``"retnet"`` or ``"lightning"`` (:func:`decay_preset`).
        gate: data-dependent log-gates (<= 0), ``(B, S, H)`` (one per head and step, Simple-GLA /
            Mamba2) or ``(B, S, H, Dk)`` (one per key channel, GLA: ``S_t = diag(a_t) S_{t-1} + ...``).
            With ``decay`` too, the log-gates add.
        normalize: divide by ``softmax_scale * phi(q_t)^T z_t + 1e-6``, ``z_t = a_t * z_{t-1} + phi(k_t)``
            (the Katharopoulos normaliser; the state is then the pair ``(S, z)``). Off by default, as
            in fla and RetNet: models put a norm on the output instead.
        softmax_scale: multiplies ``phi(q)``; defaults to ``Dk ** -0.5``.
        chunk_size: rows per chunk of the chunkwise-parallel form, a power of two in [16, 256]; it
            changes the rounding, not the result. Inputs shorter than a chunk run as one chunk of their
            own length (one token: the recurrent step).
        initial_state: the state to start from, as ``final_state`` returns it (``(B, H, Dk, Dv)``, or
            ``(S, z)`` with ``normalize``): a sequence split in two and resumed gives one call's result.
        output_final_state: also return the state after the last step.
        cu_seqlens: packed sequences, fla's varlen convention: inputs ``(1, T, H, D)`` (and ``gate (1, T, H[, Dk])``),
            ``cu_seqlens`` int32 ``(N + 1,)`` from 0 to T; the state starts afresh (or from ``initial_state[n]``)
            at every sequence, ``initial_state`` / ``final_state`` are per sequence, ``(N, H, Dk, Dv)`` (and
            ``z (N, H, Dk)`` with ``normalize``). The kernels run once per sequence (exact; a fused varlen chunk
            kernel is future work). No block map here.
        return_block_map: also return the block map ``(B, H, ceil(S / block_q), ceil(Sk / block_k))``
            (float32): the mean, over the queries of a query block, of the weight they put on each key
            block, the weight of key s for query t being ``softmax_scale * phi(q_t) . (a_{s+1..t} *
            phi(k_s))`` (s <= t when causal), divided by the normaliser when ``normalize=True`` (rows
            then sum to 1, like softmax attention's), un-normalised otherwise. Exact, from block sums
            of ``phi(q)``/``phi(k)`` and the band of blocks around the diagonal: never S x S.
        map_block_size: the map's granularity, an int or ``(block_q, block_k)``, powers of two >= 16
            (default 64; ``block_size=``: its former name, deprecated).
        reduce: ``"mean"`` only (a max over a tile would need every (query, key) pair).
        backend: as in :func:`attnops.attention` (CPU: the chunk form in vectorised PyTorch,
            ``composite``; ``reference`` runs the float64-grade token-by-token definition).

    Returns:
        ``out (B, S, H, Dv)`` in q's dtype, or ``LinearAttentionOutput(out, final_state)``,
        ``AttentionMapOutput(out, block_map)`` or ``LinearAttentionMapOutput(out, final_state, block_map)``.

    Everything is differentiable (q, k, v, gate, decay tensor, initial_state); memory is
    O(S * chunk_size) plus the chunk states, never S x S. NaN in gives NaN out from that step on.

    Example::

        >>> q, k, v = (torch.randn(1, 4096, 8, 64) for _ in range(3))
        >>> out = attnops.linear_attention(q, k, v, decay="retnet")
        >>> out1, state = attnops.linear_attention(q[:, :100], k[:, :100], v[:, :100], decay="retnet",
        ...                                        output_final_state=True)
        >>> out2 = attnops.linear_attention(q[:, 100:], k[:, 100:], v[:, 100:], decay="retnet",
        ...                                 initial_state=state)   # == out[:, 100:]
    """
    for name, flag in (("causal", causal), ("normalize", normalize), ("output_final_state", output_final_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if cu_seqlens is not None:
        return _varlen(q, k, v, cu_seqlens, gate, initial_state, output_final_state, return_block_map, normalize,
                       dict(feature_map=feature_map, causal=causal, decay=decay, softmax_scale=softmax_scale,
                            chunk_size=chunk_size, backend=backend))
    shape = _check_qkv(q, k, v, causal)
    refuse_unsupported_ad("linear_attention", q, k, v, gate, initial_state,
                      decay if isinstance(decay, torch.Tensor) else None)
    B, S, H, Hkv, D, Dv = shape
    dtype = q.dtype
    phi = resolve_feature_map(feature_map)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not (
            MIN_CHUNK <= chunk_size <= MAX_CHUNK and chunk_size & (chunk_size - 1) == 0):
        raise ValueError(f"chunk_size must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk_size!r}")
    if not causal and (decay is not None or gate is not None):
        raise ValueError("decay and gate need causal=True: a decay orders the sequence")
    Dk = _feature_width(phi, q, k)
    scale = resolve_softmax_scale(softmax_scale, Dk)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_gate = _log_gate(decay, gate, shape, Dk, q.device, state_dtype)
    state = _pack_state(initial_state, normalize, (B, H, Dk, Dv), q.device)
    request = _map_request(map_block_size, reduce, block_size, initial_state) if return_block_map else None
    if normalize:
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # its output column: the denominator
    impl = dispatch.resolve("linear_attention", q.device, backend, api="linear_attention")
    # A map at the chunk's granularity from the chunk form is a readout of its intermediates; other
    # block sizes and backends compute it afterwards (linear_block_map).
    chunk = effective_chunk(S, chunk_size)
    chunk_form = getattr(impl, "chunk_sums", False)
    fused_map = request is not None and causal and chunk_form and request.block_q == request.block_k == chunk
    extra = dict(chunk_sums=True) if fused_map else {}
    if normalize and chunk_form:  # the chunk form: v's last column is the normaliser
        extra["denominator_eps"] = NORMALIZE_EPS
    out, final, *sums = impl(q, k, v, log_gate, state, feature_map=phi, causal=causal, softmax_scale=scale,
                             chunk_size=chunk_size, **extra)
    denominator = out[..., Dv] if normalize else None
    if normalize:
        out = out[..., :Dv] / (out[..., Dv:] + NORMALIZE_EPS)
        final = (final[..., :Dv], final[..., Dv])
    out = out.to(dtype)
    if request is not None:
        with torch.no_grad():  # a readout, like the attention ops' maps
            if fused_map:
                block_map = map_from_chunk_sums(sums[0], S, chunk, scale)
            else:
                block_map = linear_block_map(q, k, log_gate, denominator, causal=causal, softmax_scale=scale,
                                             request=request, feature_map=phi)
        if output_final_state:
            return LinearAttentionMapOutput(out, final, block_map)
        return AttentionMapOutput(out, block_map)
    return LinearAttentionOutput(out, final) if output_final_state else out


def _varlen(q, k, v, cu_seqlens, gate, initial_state, output_final_state: bool, return_block_map: bool,
            normalize: bool, options: dict):
    """:func:`linear_attention` over the packed sequences of ``cu_seqlens`` (one call per sequence; the state
    never crosses a boundary)."""
    _check_qkv(q, k, v, options["causal"])
    if q.shape[0] != 1 or k.shape[1] != q.shape[1]:
        raise ValueError(f"with cu_seqlens, q, k, v are one packed row (1, T, ...) of one length, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if return_block_map:
        raise NotImplementedError("linear_attention: return_block_map with cu_seqlens is not supported (a map per "
                                  "sequence: call each sequence)")
    T = q.shape[1]
    check_cu_seqlens("cu_seqlens", cu_seqlens, T, q.device, None)
    bounds = cu_seqlens.tolist()
    N = len(bounds) - 1
    if N < 1:
        raise ValueError("cu_seqlens must describe at least one sequence")
    states = None
    if initial_state is not None:
        states = list(initial_state) if normalize and isinstance(initial_state, (tuple, list)) else [initial_state]
        for t in states:
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != N:
                raise ValueError(f"with cu_seqlens, initial_state holds one state per sequence: leading dim {N}, "
                                 f"got {tuple(getattr(t, 'shape', ()))}")
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None
        if states is not None:
            init = tuple(t[n:n + 1] for t in states) if len(states) == 2 else states[0][n:n + 1]
        # an empty sequence passes its state through (the zero state without one)
        res = linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], gate=None if gate is None else gate[:, a:b],
                               initial_state=init, output_final_state=True, normalize=normalize, **options)
        outs.append(res.out)
        finals.append(res.final_state)
    out = torch.cat(outs, dim=1)
    if not output_final_state:
        return out
    final = tuple(torch.cat(parts) for parts in zip(*finals)) if normalize else torch.cat(finals)
    return LinearAttentionOutput(out, final)


def _feature_width(phi, q: torch.Tensor, k: torch.Tensor) -> int:
    """The feature map's output width. The kernels apply the map where its output is consumed (the CPU
    chunk form: per segment, in cache); one token of each tells its width and catches a map that
    changes the other dims."""
    fq, fk = phi(q[:, :1]), phi(k[:, :1])
    if not (isinstance(fq, torch.Tensor) and isinstance(fk, torch.Tensor)) or fq.shape[:-1] != q[:, :1].shape[:-1] \
            or fk.shape[:-1] != k[:, :1].shape[:-1] or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map must map q {tuple(q.shape)} and k {tuple(k.shape)} to tensors that keep "
                         "every dim but the last and share the last")
    return fq.shape[-1]


def _map_request(map_block_size, reduce, block_size, initial_state):
    """The block map linear attention can give: the mean, over the keys of this call."""
    request = check_request(map_block_size, reduce, (64, 64), block_size)
    if request.reduce != "mean":
        raise ValueError("linear attention's block map is the mean (reduce='mean'); a max over a tile would need "
                         "every (query, key) pair")
    if initial_state is not None:
        raise ValueError("return_block_map covers the keys of this call; it cannot start from initial_state")
    return request


class _Shape(NamedTuple):
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int


def _check_qkv(q, k, v, causal) -> _Shape:
    check_qkv_tensors(q, k, v)
    B, S, H, D = q.shape
    if k.shape[0] != B or (causal and k.shape[1] != S) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"causal linear attention is self-attention over one sequence: q (B, S, H, D), k (B, S, Hkv, "
                         f"D), v (B, S, Hkv, Dv) (non-causal: k and v may have their own length); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv, Dv = k.shape[2], v.shape[3]
    if k.shape[3] != D:
        raise ValueError(f"head dims differ: q has {D}, k has {k.shape[3]}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
    for name, d in (("head dim", D), ("value head dim", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} {d} is not supported (1 <= D <= {MAX_HEAD_DIM})")
    return _Shape(B, S, H, Hkv, D, Dv)


def _log_gate(decay, gate, shape: _Shape, Dk: int, device, dtype) -> Optional[torch.Tensor]:
    """decay and gate merged into one log-gate ``(B, S, H, 1 | Dk)`` in ``dtype``, or None."""
    B, S, H = shape.batch, shape.seq_len, shape.num_heads
    total = None
    decay = resolve_decay(decay, H, device)
    if decay is not None:
        total = decay.to(device, dtype).view(1, 1, H, 1)
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
            raise TypeError(f"gate must be a float tensor, got {type(gate).__name__}")
        if gate.shape not in ((B, S, H), (B, S, H, Dk)):
            raise ValueError(f"gate must have shape (B, S, H) = {(B, S, H)} (one log-gate per head) or "
                             f"(B, S, H, Dk) = {(B, S, H, Dk)} (one per key channel), got {tuple(gate.shape)}")
        if gate.device != device:
            raise ValueError(f"gate is on {gate.device} but q is on {device}")
        check_nonpositive("gate", gate)
        g = gate.to(dtype)
        g = g.unsqueeze(-1) if g.dim() == 3 else g
        total = g if total is None else g + total
    if total is None:
        return None
    return total.expand(B, S, H, total.shape[-1])


def _pack_state(initial_state, normalize: bool, state_shape, device) -> Optional[torch.Tensor]:
    """The user's state as the kernels take it: ``(B, H, Dk, Dv)``, with ``z`` as one more value column
    when normalised."""
    if initial_state is None:
        return None
    B, H, Dk, Dv = state_shape
    if normalize:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise TypeError("with normalize=True, initial_state is the pair (S (B, H, Dk, Dv), z (B, H, Dk)) that "
                            "final_state returns")
        parts = (("initial_state S", initial_state[0], (B, H, Dk, Dv)),
                 ("initial_state z", initial_state[1], (B, H, Dk)))
    else:
        parts = (("initial_state", initial_state, (B, H, Dk, Dv)),)
    for name, t, want in parts:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if normalize:
        return torch.cat([initial_state[0], initial_state[1].unsqueeze(-1).to(initial_state[0].dtype)], dim=-1)
    return initial_state
