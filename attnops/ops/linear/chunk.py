"""Linear attention in its chunkwise-parallel form, in vectorised PyTorch (ATen) ops: the kernel of
the ``composite`` backend, which runs on every device and is the CPU path of
``attnops.linear_attention`` (matmuls on whole chunks reach the CPU's GEMM; backward by autograd
through the same chunk graph).

Recurrence (per query head; ``a_t = exp(g_t)`` with ``g_t`` a log-gate of shape ``(1,)`` or ``(Dk,)``):

    S_t = a_t * S_{t-1} + k_t v_t^T,      o_t = q_t^T S_t

Chunks of ``C`` steps, ``Gamma`` the inclusive cumulative log-gate inside a chunk (``Gamma_C`` its last
row, all <= 0):

    inter:  O = (Q * e^Gamma) S_[n]
    intra:  O += ((Q K^T) * D) V,   D_ij = e^(Gamma_i - Gamma_j) for i >= j, else 0
    state:  S_[n+1] = e^Gamma_C * S_[n] + (K * e^(Gamma_C - Gamma))^T V

Every exponent above is <= 0 (differences are taken with i >= j and masked *before* the exponential),
so nothing overflows: fla's first-position NaN (an exclusive cumsum's ``exp(g_q - g_n)``) cannot
happen. With one gate per key channel ``D`` does not factor into a matmul; each chunk is split into
sub-chunks of ``SUB_CHUNK`` rows: off-diagonal sub-blocks factor around the query sub-chunk's start
(both factors <= 1); diagonal sub-blocks factor around their middle row where the gates span at most ``DIAG_SPAN``
there (factors within e^+-60), else are summed exactly, ``(c, c, Dk)`` per sub-chunk, their exponents the sums of
the gates in ``(j, i]`` (no cancellation).

Memory: O(S * C) for the intra-chunk scores and O(S * Dk * Dv / C) for the chunk states, never S x S.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch

from attnops.core.contractions import masked_matmul
from attnops.core import backends, dispatch

SUB_CHUNK = 16
SEGMENT_ELEMENTS = 1 << 18  # per chunk tensor of a segment: 1 MiB of float32
# A log-gate below this acts as this: e^-80 < 2e-35 is zero to float32 already, and a -inf gate
# (a full reset) would make the cumulative differences -inf - -inf = NaN.
MIN_LOG_GATE = -80.0
# A chunk or diagonal sub-block whose cumulative gates span at most this factors around its middle row (both factors
# within e^+-60: finite and normal in float32 for |q|, |k| up to 1e12); beyond it, finer blocks (_factored_scores).
DIAG_SPAN = 60.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulation: float32, or float64 for float64 inputs (the exact path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def product_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the chunk products' operands for inputs of ``dtype`` on ``device``. bfloat16 inputs multiply in
    bfloat16 with float32 accumulation inside the GEMM (oneDNN's bf16 kernels: AVX512-BF16 or AMX where the CPU has
    them; a ``(1024, 64, 64)`` bmm took 2.0 ms against 6.4-8.8 ms in float32 on the Zen 4 dev VM), the operands
    rounded as flash-linear-attention's chunk kernels round theirs (scores and states to bf16 before their
    products); states, gates, the chunk prefix and the exponentials stay in float32. A CPU without bf16
    dot-product units (``backends.cpu_bf16_matmul``: an AVX2-only one) multiplies them in float32: its bf16 bmm is
    ATen's scalar loop, 18x slower than float32's (a bf16 forward at N = 8192 took 545 ms against float32's 51).
    float16 keeps float32 products: its range (65504) does not hold the un-normalised scores of positive feature
    maps."""
    if dtype == torch.bfloat16 and (device.type != "cpu" or backends.cpu_bf16_matmul()):
        return torch.bfloat16
    return compute_dtype(dtype)


def effective_chunk(seq_len: int, chunk_size: int) -> int:
    """Short inputs (decoding) run as one chunk of their own length rounded to a power of two: one
    token is then exactly the recurrent step ``S = a S + k v^T, o = q^T S``."""
    return min(chunk_size, 1 << max(0, seq_len - 1).bit_length())


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor],
    causal: bool,
    softmax_scale: float,
    chunk_size: int,
    chunk_sums: bool = False,
    denominator_eps: Optional[float] = None,
):
    """``q (B, S, H, D)``, ``k (B, S, Hkv, D)``, ``v (B, S, Hkv, Dv)``, ``log_gate (B, S, H, 1 | Dk)`` or
    None, ``initial_state (B, H, Dk, Dv)`` or None -> ``out (B, S, H, Dv)`` (causal: in the product dtype,
    :func:`product_dtype`; else the compute dtype), ``final_state (B, H, Dk, Dv)`` in the compute dtype;
    ``feature_map`` (``D -> Dk``, token by token) is applied per segment, where its output is consumed.

    The normalised form reaches here with a column of ones appended to ``v`` (its output column is
    the denominator, its state column ``z``): one code path for both; ``denominator_eps`` says so (the op
    passes it whenever it normalises; it keeps the products in float32, see ``_causal``).

    ``chunk_sums`` (causal only) adds a third result, :class:`ChunkSums`: what the block map at the
    chunk's granularity needs, read off the forward's own intermediates (see
    ``block_map.map_from_chunk_sums``); with ``denominator_eps`` each query's sums are weighed by
    ``1 / (den + eps)``, ``den`` the normaliser column's output."""
    B, S, H, _ = q.shape
    Dk = feature_map(q[:, :1]).shape[-1]
    Dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    state = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, Dk, Dv, dtype=dt)
    if not causal:
        kh, vh = (heads_first(t.to(dt), H, t.shape[1], 0) for t in (feature_map(k), v))
        state = state + kh.transpose(-1, -2) @ vh
        out = (heads_first(feature_map(q).to(dt), H, S, 0) @ state) * softmax_scale
        return out.transpose(1, 2), state
    if S == 0:  # nothing to attend: the state passes through
        empty = q.new_zeros(B, 0, H, Dv, dtype=dt)
        return (empty, state, ChunkSums.empty(B, H, Dk, dt)) if chunk_sums else (empty, state)
    C = effective_chunk(S, chunk_size)
    # Segments of the sequence, carrying the state: each one's chunk tensors stay in cache, so time
    # grows linearly with S (one pass over 16K tokens at once ran 2.8x per doubling on the dev VM).
    seg = max(C, SEGMENT_ELEMENTS // (B * H * max(Dk, Dv)) // C * C)
    # torch.split, not slicing: the backward of a slice is a zero-filled full-size gradient per
    # segment (quadratic in S); split's is one concatenation.
    parts = [t.split(seg, dim=1) if t is not None else [None] * (-(-S // seg)) for t in (q, k, v, log_gate)]
    # Outside autograd (decided by the first segment's output: a learned feature map makes it tracked
    # too) each segment goes straight into the result: holding every segment until a concatenation
    # grew the heap by the output's size per call, and fresh pages cost more than the copy (first
    # touch is ~1 ms per MiB on the dev VM).
    result = None
    outs, sums, start = [], [], 0
    for q_s, k_s, v_s, g_s in zip(*parts):
        out, state, seg_sums = _causal(feature_map(q_s), feature_map(k_s), v_s, g_s, state, softmax_scale, C, dt,
                                       chunk_sums, denominator_eps)
        sums.append(seg_sums)
        if not start and not out.requires_grad and out.shape[1] < S:
            result = out.new_empty(B, S, H, Dv)
        if result is None:
            outs.append(out)
        else:
            result[:, start:start + out.shape[1]].copy_(out)
        start += out.shape[1]
    if result is None:  # tracked, or one segment
        result = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return (result, state, ChunkSums.cat(sums)) if chunk_sums else (result, state)


linear_attention.chunk_sums = True  # the op asks this backend for the map's sums (see the op)


class ChunkSums(NamedTuple):
    """Per chunk of the causal forward (``N = ceil(S / C)`` chunks), the quantities of its block map at
    the chunk's granularity, all weighted per query by ``1 / (den + eps)`` when normalised:

    - ``band (B, H, N)``: the total intra-chunk weight (the map's diagonal block, scale included);
    - ``q_sum (B, H, N, Dk)``: the queries relative to the state entering the chunk, ``sum q e^gamma``;
    - ``k_sum (B, H, N, Dk)``: the keys relative to the chunk's last row, ``sum k e^(gamma_C - gamma)``;
    - ``log_decay (B, H, N, G)`` float64: the chunk's total log-gate ``gamma_C``, or None without gates.
    """

    band: torch.Tensor
    q_sum: torch.Tensor
    k_sum: torch.Tensor
    log_decay: Optional[torch.Tensor]

    @staticmethod
    def empty(B: int, H: int, Dk: int, dt: torch.dtype) -> "ChunkSums":
        return ChunkSums(torch.zeros(B, H, 0, dtype=dt), torch.zeros(B, H, 0, Dk, dtype=dt),
                         torch.zeros(B, H, 0, Dk, dtype=dt), None)

    @staticmethod
    def cat(parts) -> "ChunkSums":
        fields = list(zip(*parts))
        return ChunkSums(*(torch.cat(f, dim=2) for f in fields[:3]),
                         None if fields[3][0] is None else torch.cat(fields[3], dim=2))


def _causal(q, k, v, log_gate, state, softmax_scale: float, C: int, dt: torch.dtype, chunk_sums: bool = False,
            denominator_eps: Optional[float] = None):
    """One segment of the causal chunk form: ``(out (B, S, H, Dv) in the product dtype, state after it (``dt``),
    ChunkSums or None)``."""
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    pad = -S % C
    N = (S + pad) // C
    # Normalised, q's gradient is the difference of the numerator's and the denominator's terms: bf16 products
    # rounded both and gave 2.05x the bf16 recurrence's dq error at S = 500 (over the DESIGN.md rule).
    pdt = product_dtype(q.dtype, q.device) if denominator_eps is None else dt
    # (B * H * N, C, D) batches for bmm; the scale rides on the matmuls' alpha
    qc, kc, vc = (heads_first(t.to(pdt), H, S, pad).view(B * H * N, C, t.shape[-1]) for t in (q, k, v))
    idt = _intra_dtype(log_gate, pdt)
    if log_gate is None or log_gate.shape[-1] == 1:
        no_input = qc.new_zeros(())  # baddbmm's ignored input (beta = 0)
        scores = torch.baddbmm(no_input, qc, kc.transpose(1, 2), beta=0, alpha=softmax_scale).to(idt)
    k_weighted, gamma_last = kc, None
    if log_gate is None:
        kv = _value_bmm(kc.transpose(1, 2), vc).to(dt).view(B, H, N, Dk, Dv)  # each chunk's own contribution
        entering, final = _scan(state, None, kv)
        q_inter = qc
        scores = scores.tril_()
    else:
        # Cumulative log-gates in float64: their differences gamma_i - gamma_j are what the
        # exponentials take, and a float32 prefix sum of strong gates (-50 after a few steps) loses
        # the small differences that matter most (the weights near 1). Each difference is rounded
        # to the compute dtype before its exponential.
        g = log_gate.to(torch.float64).clamp(min=MIN_LOG_GATE)
        gates = heads_first(g, H, S, pad).view(B * H * N, C, g.shape[-1])  # padding: gate 0, no decay
        gamma = gates.cumsum(1)
        gamma_last = gamma[:, -1:]  # (B * H * N, 1, 1 | Dk)
        k_weighted = kc * _exp(gamma_last - gamma, dt)
        kv = _value_bmm(k_weighted.to(pdt).transpose(1, 2), vc).to(dt).view(B, H, N, Dk, Dv)
        chunk_decay = _exp(gamma_last, dt).transpose(1, 2).view(B, H, N, g.shape[-1], 1)
        entering, final = _scan(state, chunk_decay, kv)
        q_inter = (qc * _exp(gamma, dt)).to(pdt)
        causal_cc = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        if g.shape[-1] == 1:
            scores = scores * _exp((gamma - gamma.transpose(1, 2)).masked_fill(~causal_cc, float("-inf")), idt)
        else:  # in float32: the exact diagonal sums add gates, which bf16 would round by |sum| * 2^-9
            scores = _channel_gated_scores(qc.to(dt), kc.to(dt), gamma, gates.to(dt)) * softmax_scale
        # the weights above the diagonal are exp(-inf) = 0 times a score: a NaN / inf key would leave NaN there
        # (0 * NaN) and reach the chunk's earlier rows; the recurrence never lets a key reach an earlier query
        scores = scores.tril_()
    intra = _intra_chunk(scores, vc.to(idt)).to(pdt)
    out = torch.baddbmm(intra, q_inter, entering.to(pdt).view(B * H * N, Dk, Dv), alpha=softmax_scale)
    sums = None
    if chunk_sums:
        with torch.no_grad():  # a readout of the forward's intermediates, summed in dt
            q_inter, k_weighted, scores = q_inter.to(dt), k_weighted.to(dt), scores.to(dt)
            weight = None if denominator_eps is None else 1.0 / (out[..., -1].to(dt) + denominator_eps)  # (B*H*N, C)
            rows = scores.sum(-1)
            if weight is not None:
                rows = rows * weight
            q_sum = (q_inter if weight is None else q_inter * weight.unsqueeze(-1)).sum(1)
            sums = ChunkSums(rows.sum(-1).view(B, H, N), q_sum.view(B, H, N, Dk), k_weighted.sum(1).view(B, H, N, Dk),
                             None if gamma_last is None else gamma_last.view(B, H, N, -1))
    return out.view(B, H, N * C, Dv)[:, :, :S].transpose(1, 2), final, sums


def _intra_dtype(log_gate: Optional[torch.Tensor], pdt: torch.dtype) -> torch.dtype:
    """The dtype of the intra-chunk weights and product ``(scores * D) V`` with one gate per head: float64 where
    float32 would be used and the gate's gradient is wanted (the ``Q K^T`` product stays in ``pdt``). That gradient
    sums ``dA * A`` over the pairs that straddle each step, ``dA = dO V^T``; with ``dA`` and the product rounded to
    float32, dgate came out 2.0-2.8x the float32 recurrence's error at S = 500, D = 100, chunk 64 (8 seeds; the
    DESIGN.md rule allows 2x). With this product in float64: 0.9-1.4x; with ``Q K^T`` in float64 as well,
    0.3-0.8x, for twice the added time (fwd+bwd at N = 4096, D = 64: +10-15% against +25-30%). The weights alone
    (the exponentials), the inter-chunk term or the chunk states in float64 left it at 1.5-2.3x (2 seeds).
    Inference and the other gate shapes keep ``pdt``."""
    if (log_gate is not None and log_gate.shape[-1] == 1 and log_gate.requires_grad and torch.is_grad_enabled()
            and pdt == torch.float32):
        return torch.float64
    return pdt


def _intra_chunk(scores: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
    """``scores (.., C, C) @ vc (.., C, Dv)`` for lower-triangular scores: a NaN / inf value reaches only the
    rows at or after its position (the plain product's ``0 * NaN`` would spread it to the chunk's earlier
    rows), as the recurrence and the reference give. Eager only: on meta tensors and under ``torch.compile``
    (no data-dependent branch there) it is the plain product."""
    scores = scores.to(vc.dtype)
    # a sum is finite when every element is (or overflows, leaving the exact path below to a finite input): one
    # reduction, where isfinite(vc).all() made three passes and two temporaries (~7% of a forward)
    if vc.device.type == "meta" or torch.compiler.is_compiling() or bool(vc.sum().isfinite()):
        return _value_bmm(scores, vc)
    C = scores.shape[-1]
    return masked_matmul(scores, vc, torch.ones(C, C, dtype=torch.bool, device=vc.device).tril())


class _ValueBmm(torch.autograd.Function):
    """``a @ v`` (bmm) whose gradient for ``v`` is accumulated in float64. The value gradient sums
    the products of large non-negative scores with the upstream gradient (positive feature maps:
    every ``q . k`` is large and of one sign), and in float32 its error came out 2.2-2.8x that of the
    token-by-token recurrence at S = 500, D = 100, outside the DESIGN.md rule; the
    other gradients and the forward are within 0.5x in float32."""

    @staticmethod
    def forward(ctx, a, v):
        ctx.save_for_backward(a, v)
        return torch.bmm(a, v)

    @staticmethod
    def backward(ctx, grad):
        a, v = ctx.saved_tensors
        da = torch.bmm(grad, v.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dv = None
        if ctx.needs_input_grad[1]:  # bf16 products accumulate in float32 inside the GEMM
            wide = torch.float64 if v.dtype == torch.float32 else v.dtype
            dv = torch.bmm(a.transpose(1, 2).to(wide), grad.to(wide)).to(v.dtype)
        return da, dv


def _value_bmm(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _ValueBmm.apply(a, v)


def _exp(log_weight: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return torch.exp(log_weight.to(dt))


def heads_first(t: torch.Tensor, num_heads: int, seq_len: int, pad: int) -> torch.Tensor:
    """``(B, S, Hkv, D)`` -> contiguous ``(B, H, S + pad, D)``, zero-padded at the end, each query
    head with its kv head (the state is per query head, since decays and gates are): one copy."""
    B, _, Hkv, D = t.shape
    group = num_heads // Hkv
    src = t.transpose(1, 2)
    if group > 1:
        src = src.unsqueeze(2).expand(B, Hkv, group, seq_len, D).reshape(B, num_heads, seq_len, D)
    if not pad:
        return src.contiguous()
    out = t.new_empty(B, num_heads, seq_len + pad, D)
    out[:, :, :seq_len] = src  # one copy (padding first, then transposing, made two)
    out[:, :, seq_len:] = 0
    return out


class _Scan(torch.autograd.Function):
    """States entering each chunk ``(B, H, N, Dk, Dv)`` and the final state, from
    ``S_[0] = state``, ``S_[n+1] = chunk_decay_n * S_[n] + kv_n`` (``chunk_decay (B, H, N, 1 | Dk, 1)``
    or None: no decay). A loop over chunks writing in place; as an autograd graph of N steps the
    prefix sum cost more than the chunk matmuls (torch's cumsum over a non-last dim is not
    vectorised), so the backward is written out: ``lam_n = dE_n + decay_n * lam_{n+1}``."""

    @staticmethod
    def forward(ctx, state, chunk_decay, kv):
        N = kv.shape[2]
        entering = torch.empty_like(kv)
        entering[:, :, 0] = state
        for n in range(N - 1):
            if chunk_decay is None:
                torch.add(entering[:, :, n], kv[:, :, n], out=entering[:, :, n + 1])
            else:
                torch.addcmul(kv[:, :, n], chunk_decay[:, :, n], entering[:, :, n], out=entering[:, :, n + 1])
        last = entering[:, :, N - 1]
        if chunk_decay is None:
            final = last + kv[:, :, N - 1]
        else:
            final = torch.addcmul(kv[:, :, N - 1], chunk_decay[:, :, N - 1], last)
        ctx.save_for_backward(chunk_decay, entering if chunk_decay is not None else None)
        return entering, final

    @staticmethod
    def backward(ctx, d_entering, d_final):
        chunk_decay, entering = ctx.saved_tensors
        N = d_entering.shape[2]
        d_kv = torch.empty_like(d_entering)
        d_decay = torch.empty_like(chunk_decay) if chunk_decay is not None and ctx.needs_input_grad[1] else None
        # In place when nothing records this backward; out of place under create_graph=True (double
        # backward), where autograd keeps every lam it has seen.
        recorded = torch.is_grad_enabled()
        lam = d_final.clone()  # gradient of S_[n+1]
        for n in range(N - 1, -1, -1):
            d_kv[:, :, n] = lam
            if d_decay is not None:
                d_decay[:, :, n] = (lam * entering[:, :, n]).sum(-1, keepdim=True).sum_to_size(
                    d_decay[:, :, n].shape)
            if recorded:
                lam = (lam * chunk_decay[:, :, n] if chunk_decay is not None else lam) + d_entering[:, :, n]
                continue
            if chunk_decay is not None:
                lam.mul_(chunk_decay[:, :, n])
            lam.add_(d_entering[:, :, n])
        return lam, d_decay, d_kv


def _scan(state: torch.Tensor, chunk_decay: Optional[torch.Tensor], kv: torch.Tensor
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _Scan.apply(state, chunk_decay, kv)


def _channel_gated_scores(qc: torch.Tensor, kc: torch.Tensor, gamma: torch.Tensor, gates: torch.Tensor
                          ) -> torch.Tensor:
    """Intra-chunk ``A_ij = sum_d q_id k_jd e^(gamma_id - gamma_jd)`` for ``i >= j`` (else 0), chunks
    ``(.., C, Dk)`` -> ``(.., C, C)``. ``gamma``: the cumulative log-gates (float64), ``gates``: the log-gates
    themselves, in the compute dtype.

    A chunk whose gates span at most ``DIAG_SPAN`` (GLA's gates: ~4 over 64 steps) is one factored product
    (:func:`_factored_scores`); the others split into sub-chunks (:func:`_sub_chunk_scores`)."""
    if torch.compiler.is_compiling():  # no data-dependent subsets while compiling
        return _sub_chunk_scores(qc, kc, gamma, gates)
    return _factored_scores(qc, kc, gamma, _sub_chunk_scores, gates)


def _factored_scores(qs: torch.Tensor, ks: torch.Tensor, gs: torch.Tensor, fallback, *fallback_args) -> torch.Tensor:
    """``sum_d q_id k_jd e^(g_id - g_jd)`` for ``i >= j`` over blocks ``(.., n, Dk)`` -> ``(.., n, n)``; the upper
    triangle is garbage (e^(positive) products, maybe inf) that the caller replaces: ``_causal`` keeps the lower
    triangle of the whole chunk once.

    Where a block's cumulative gates ``gs`` (float64) span at most ``DIAG_SPAN`` in every channel,
    ``e^(g_i - g_j)`` factors around its middle row into two factors within ``e^(+-DIAG_SPAN)``, finite and normal
    in float32, each product as exact as the one weight: one ``(n, Dk) x (Dk, n)`` product per block. The other
    blocks (a strong gate, a reset, NaN) are ``fallback(q, k, g, *fallback_args)`` on that subset."""
    dt = qs.dtype
    n = qs.shape[-2]
    span = (gs[..., 0, :] - gs[..., -1, :]).amax(-1)  # (..), >= 0; NaN where a gate is NaN
    fast = span <= DIAG_SPAN
    # the other blocks get exponent 0 here (finite, replaced below: no inf * 0 in the gradients). The factors'
    # exponents cancel in the product (e^30 e^-30), so they are exponentiated in float64: a float32 exponent of
    # 30 is off by 1e-6, which would be the product's relative error.
    expo = (gs - gs[..., n // 2:n // 2 + 1, :]).masked_fill_(~fast[..., None, None], 0.0)
    scores = torch.matmul(qs * torch.exp(expo).to(dt), (ks * torch.exp(expo.neg_()).to(dt)).transpose(-1, -2))
    slow = (~fast).flatten().nonzero().flatten()
    if slow.numel():
        picked = (t.flatten(0, -3).index_select(0, slow) for t in (qs, ks, gs, *fallback_args))
        scores = scores.flatten(0, -3).index_copy(0, slow, fallback(*picked)).view_as(scores)
    return scores


def _sub_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, gamma: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """:func:`_channel_gated_scores` by sub-chunks of ``SUB_CHUNK`` rows. Off-diagonal sub-blocks (key sub-chunk
    ``s`` before query sub-chunk ``p``) factor with every exponent <= 0: ``e^(g_i - g_j) = e^(g_i - r_p) e^(r_p -
    e_s) e^(e_s - g_j)``, ``r_p`` the cumulative gate before ``p``, ``e_s`` the last of ``s`` (each factor >= the
    weight, so none underflows where the weight does not). Diagonal sub-blocks: factored where they span at most
    ``DIAG_SPAN``, else the exact sums (:func:`_exact_diagonal_scores`)."""
    *lead, C, Dk = qc.shape
    dt = qc.dtype
    c = min(SUB_CHUNK, C)
    P = C // c
    qs, ks, gs = (t.reshape(*lead, P, c, Dk) for t in (qc, kc, gamma))
    last = gs[..., -1, :]  # (.., P, Dk): e_s
    # r_p: the cumulative gate just before sub-chunk p (0 for the first) = e_{p-1}
    ref = torch.cat([torch.zeros_like(last[..., :1, :]), last[..., :-1, :]], dim=-2)  # (.., P, Dk)
    q_f = qs * _exp(gs - ref.unsqueeze(-2), dt)
    k_f = ks * _exp(last.unsqueeze(-2) - gs, dt)
    earlier = torch.ones(P, P, dtype=torch.bool, device=qc.device).tril(-1)  # key sub-chunk s < p
    between = _exp((ref.unsqueeze(-2) - last.unsqueeze(-3)).masked_fill(~earlier[:, :, None], float("-inf")), dt)
    off = torch.einsum("...pid,...psd,...sjd->...pisj", q_f, between, k_f)  # (.., P, c, P, c)
    gates = gates.reshape(*lead, P, c, Dk)
    if torch.compiler.is_compiling():
        diag = _exact_diagonal_scores(qs, ks, gs, gates)
    else:
        diag = _factored_scores(qs, ks, gs, _exact_diagonal_scores, gates)
    # written over the diagonal blocks, which the product above leaves 0 (between = 0) or NaN (0 * a NaN factor of a
    # later NaN gate, which must not reach earlier rows); a product with an identity would spread NaN to other blocks
    off.diagonal(dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
    return off.reshape(*lead, C, C)


def _exact_diagonal_scores(qs: torch.Tensor, ks: torch.Tensor, gs: torch.Tensor, gates: torch.Tensor
                           ) -> torch.Tensor:
    """The diagonal sub-blocks ``(.., c, Dk)`` -> ``(.., c, c)`` with every exponent ``gamma_i - gamma_j`` taken as the sum of the gates in
    ``(j, i]`` (one small GEMM with a 0/1 matrix, in the compute dtype) rather than as a difference of two
    cumulative sums: the terms are all <= 0, so it has no cancellation (the difference of two float32 prefix sums
    loses its small values), and no exponent is positive. ``c * c * Dk`` weights per sub-chunk."""
    *lead, c, Dk = qs.shape
    dt = qs.dtype
    t = torch.arange(c, device=qs.device)
    window = (t.view(1, 1, c) > t.view(1, c, 1)) & (t.view(1, 1, c) <= t.view(c, 1, 1))  # [i, j, t]: j < t <= i
    # masked: a NaN gate at step t must not reach the pairs (i, j) whose window excludes t (0 * NaN)
    sums = masked_matmul(window.to(dt).view(c * c, c), gates, window.view(c * c, c))  # (.., c * c, Dk)
    later = (t.view(-1, 1) < t.view(1, -1)).view(c * c, 1)  # j > i
    if torch.is_grad_enabled() and any(x.requires_grad for x in (qs, ks, gates)):
        weight = torch.exp(sums.masked_fill(later, float("-inf"))).view(*lead, c, c, Dk)
        return (qs.unsqueeze(-2) * ks.unsqueeze(-3) * weight).sum(-1)
    # no graph: in place (each fresh (c, c, Dk) buffer costs its first-touch page faults, as much as the op)
    weight = sums.masked_fill_(later, float("-inf")).exp_().view(*lead, c, c, Dk)
    return weight.mul_(qs.unsqueeze(-2)).mul_(ks.unsqueeze(-3)).sum(-1)


# the composite backend: runs on any device, and is linear attention's CPU path
dispatch.register("linear_attention", "composite", linear_attention)
