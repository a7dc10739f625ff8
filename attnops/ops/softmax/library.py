"""The block-sparse core's operators: one argument list, shared by the C++ operators
(``block_sparse_attn_fwd`` / ``_bwd``) and their Triton twins (``*_triton``), with the fake
implementations, the autograd formula (the backward is an operator of its own) and the function the
dispatcher calls.

    fwd(q, k, v, <LUT>, <transposed LUT>, block_q, block_k, softmax_scale, causal, window_left,
        window_right, map_rows=0, map_cols=0, map_max=False, softcap=0.0, alibi_slopes=None,
        sinks=None, attn_bias=None, dropout_p=0.0, dropout_seed=None, key_bounds=None, query_bounds=None,
        alibi_offsets=None, return_max=False) -> (out, lse, partial block map or empty, max_scores or empty)
    bwd(dout, dlse?, q, k, v, out, lse, <the forward's arguments up to window_right>, softcap=0.0,
        alibi_slopes=None, attn_bias=None, bias_grad=False, dropout_p=0.0, dropout_seed=None, key_bounds=None,
        query_bounds=None, alibi_offsets=None)
        -> (dq, dk, dv, dbias (B, H, Sq, Sk) or empty)

q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hkv, D)``; ``kv_num_blocks (Bm, Hm, ceil(Sq/block_q))`` and
``kv_indices (Bm, Hm, ceil(Sq/block_q), W)`` int32 (None: dense); out ``(B, Sq, H, D)``, lse
``(B, H, Sq)`` (float32; float64 for float64 inputs). The forward does not read the transposed LUT
(``q_num_blocks``, ``q_indices``); it takes it so that autograd can save it for the backward.
``map_rows > 0`` asks for the block attention map as partial sums (``map_max``: maxima) of the
probabilities over ``map_rows`` queries x ``map_cols`` keys, ``(B, H, ceil(Sq/map_rows),
ceil(Sk/map_cols))`` in lse's dtype (:func:`attnops.core.block_map.finish` pools it). ``return_max`` asks for
each row's largest score ``(B, H, Sq)`` in lse's dtype (the one its softmax subtracts: after the softcap, ALiBi
and the bias, over the keys it attends; -inf where it attends none; sinks not included).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from attnops.core import block_map as _map
from attnops.core.library import Arg, OpDef, lse_dtype
from attnops.core.masks import BlockMask
from attnops.core.segments import SegmentBounds

_LUT = [Arg("kv_num_blocks", "Tensor?"), Arg("kv_indices", "Tensor?"), Arg("q_num_blocks", "Tensor?"),
        Arg("q_indices", "Tensor?"), Arg("block_q", "int"), Arg("block_k", "int")]
_PREDICATES = [Arg("softmax_scale", "float"), Arg("causal", "bool"), Arg("window_left", "int"),
               Arg("window_right", "int")]
_MAP = [Arg("map_rows", "int", "0"), Arg("map_cols", "int", "0"), Arg("map_max", "bool", "False")]
_QKV = [Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor")]
# Score modifiers (FlashAttention's order: softcap, mask, ALiBi, softmax with sinks): softcap 0 is off;
# alibi_slopes float32 (Bm, H) with Bm in {1, B}; sinks float32 (H,), one extra logit per head.
_SCORE_MODS = [Arg("softcap", "float", "0.0"), Arg("alibi_slopes", "Tensor?", "None")]
_SINKS = [Arg("sinks", "Tensor?", "None")]
# attn_bias: float (Bm, Hm, Sqm, Sk), size-1 dims broadcast, in lse's dtype, added with ALiBi; or, for a
# backend that reads masks (the C++ core), a bool mask of that shape (False: -inf; no gradient). The backward returns its gradient unreduced, (B, H, Sq, Sk), when bias_grad.
_BIAS = [Arg("attn_bias", "Tensor?", "None")]
# Dropout on the probabilities: dropout_p in [0, 1); dropout_seed one int64 on q's device, the seed of the
# mask's hash (csrc/cpu/dropout.h), which the backward regenerates the mask from.
_DROPOUT = [Arg("dropout_p", "float", "0.0"), Arg("dropout_seed", "Tensor?", "None")]
# Token-exact segments (packed documents, varlen; attnops.core.segments): int32 key_bounds (Bb, Sq, 2), each
# query's keys [lo, hi), and query_bounds (Bb, Sk, 2), each key's queries; Bb in {1, B}. The forward reads only
# key_bounds (it takes query_bounds so that autograd can save them), the backward both. alibi_offsets: int32 (Sq,),
# ALiBi's distance origin per query row (query i sits at key i + alibi_offsets[i]; None: i + Sk - Sq), for the varlen
# layouts whose sequences differ in Lk - Lq; it comes with bounds of batch 1 that keep each pair in one sequence.
_BOUNDS = [Arg("key_bounds", "Tensor?", "None"), Arg("query_bounds", "Tensor?", "None"),
           Arg("alibi_offsets", "Tensor?", "None")]

FWD = OpDef("block_sparse_attn_fwd",
            _QKV + _LUT + _PREDICATES + _MAP + _SCORE_MODS + _SINKS + _BIAS + _DROPOUT + _BOUNDS +
            [Arg("return_max", "bool", "False")],
            "(Tensor, Tensor, Tensor, Tensor)")
# dlse: the gradient flowing into lse when the caller used it (None otherwise). The sinks enter the
# backward only through lse (P = exp(s - lse)); their own gradient is computed in Python (register).
BWD = OpDef("block_sparse_attn_bwd", [Arg("dout", "Tensor"), Arg("dlse", "Tensor?"), *_QKV, Arg("out", "Tensor"),
                                      Arg("lse", "Tensor"), *_LUT, *_PREDICATES, *_SCORE_MODS, *_BIAS,
                                      Arg("bias_grad", "bool", "False"), *_DROPOUT, *_BOUNDS],
            "(Tensor, Tensor, Tensor, Tensor)")
# what the backward takes from the forward's call besides the tensors it saves
_PARAMS = tuple(a.name for a in _LUT[4:] + _PREDICATES + _SCORE_MODS[:1] + _DROPOUT[:1])
_LUT_TENSORS = tuple(a.name for a in _LUT[:4])
_BOUND_TENSORS = tuple(a.name for a in _BOUNDS)


def partial_map_shape(q: torch.Tensor, k: torch.Tensor, map_rows: int, map_cols: int) -> Tuple[int, ...]:
    """The forward's third output: (B, H, ceil(Sq / map_rows), ceil(Sk / map_cols)), or (0,) without a map."""
    if map_rows <= 0:
        return (0,)
    return (q.shape[0], q.shape[2], -(-q.shape[1] // map_rows), -(-k.shape[1] // map_cols))


def fwd_fake(q, k, v, map_rows, map_cols, return_max, **_):
    B, Sq, H, _ = q.shape
    dtype = lse_dtype(q.dtype)
    partial = q.new_empty(partial_map_shape(q, k, map_rows, map_cols), dtype=dtype)
    max_scores = q.new_empty((B, H, Sq) if return_max else (0,), dtype=dtype)
    return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=dtype), partial, max_scores


def bwd_fake(q, k, v, bias_grad, **_):
    dbias = (q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if bias_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dbias, dtype=lse_dtype(q.dtype)))


def register(fwd: OpDef, bwd: OpDef, bwd_op: Callable) -> None:
    """Fakes of ``fwd`` / ``bwd`` and the autograd of ``fwd`` through ``bwd_op``; ``bwd`` refuses
    double backward."""
    fwd.register_fake(fwd_fake)
    bwd.register_fake(bwd_fake)

    def setup_context(ctx, inputs, output):
        a = fwd.bind(inputs)
        ctx.params = {name: a[name] for name in _PARAMS}
        out, lse, partial_map, max_scores = output
        ctx.mark_non_differentiable(partial_map, max_scores)  # readouts, like an argmax
        # Outputs the caller did not differentiate get None, not zeros the engine would allocate and fill
        # (three of four outputs in the common call: 6-10 us of a 16-token backward, measured).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a["q"], a["k"], a["v"], out, lse, a["alibi_slopes"], a["sinks"], a["attn_bias"],
                              a["dropout_seed"], *(a[name] for name in _LUT_TENSORS + _BOUND_TENSORS))

    def backward(ctx, dout, dlse, dmap, dmax):
        q, k, v, out, lse, alibi_slopes, sinks, attn_bias, dropout_seed, *lut = ctx.saved_tensors
        if dout is None:  # only lse was differentiated
            dout = torch.zeros_like(out)
        lut = dict(zip(_LUT_TENSORS + _BOUND_TENSORS, lut))
        if lut["kv_num_blocks"] is not None and lut["q_num_blocks"] is None:
            raise RuntimeError("attnops: the forward ran without the transposed block LUT; cannot differentiate")
        wanted = ctx.needs_input_grad  # as long as the call's positional arguments

        def wants(name):
            at = fwd.names.index(name)
            return at < len(wanted) and wanted[at]

        dq, dk, dv, dbias = bwd.call(bwd_op, dout=dout, dlse=dlse, q=q, k=k, v=v, out=out, lse=lse, **lut,
                                     **ctx.params, alibi_slopes=alibi_slopes, attn_bias=attn_bias,
                                     bias_grad=wants("attn_bias"), dropout_seed=dropout_seed)
        dsinks = sink_grad(sinks, dout, out, lse, dlse) if wants("sinks") else None
        dbias = reduce_to(dbias, attn_bias) if wants("attn_bias") else None
        return fwd.grads(q=dq, k=dk, v=dv, sinks=dsinks, attn_bias=dbias)

    fwd.register_autograd(backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("attnops: double backward through attention is not supported")

    bwd.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)


def reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, Sq, Sk) gradient summed over the dims that ``like`` broadcasts (size 1), in its dtype."""
    dims = tuple(d for d in range(4) if like.shape[d] == 1 and grad.shape[d] != 1)
    return (grad.sum(dims, keepdim=True) if dims else grad).to(like.dtype)


def sink_grad(sinks: torch.Tensor, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dlse: Optional[torch.Tensor]) -> torch.Tensor:
    """``dsink_h = -sum over (b, rows) of p_sink * delta``: the sink's probability ``exp(sink - lse)`` times
    the row's ``delta = dO . O - dlse`` (the sink carries no value; it only takes mass from the keys)."""
    work = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (dout.to(work) * out.to(work)).sum(-1).transpose(1, 2)  # (B, H, Sq)
    if dlse is not None:
        delta = delta - dlse.to(work)
    p_sink = torch.exp(sinks.to(work).view(1, -1, 1) - lse.to(work))
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


def backend(fwd: OpDef, fwd_op: Optional[Callable] = None, reads_bool_masks: bool = False) -> Callable:
    """The dispatcher-facing function of a backend whose forward operator is ``fwd`` (``fwd_op``: its
    callable, default the registered operator). ``reads_bool_masks``: its kernels take a bool ``attn_bias``
    as is (the ops then pass SDPA-style masks without widening them to float)."""

    def block_sparse_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_mask: Optional[BlockMask],
        *,
        causal: bool,
        window_size: Tuple[int, int],
        softmax_scale: float,
        block_map: Optional[_map.MapRequest] = None,
        softcap: float = 0.0,
        alibi_slopes: Optional[torch.Tensor] = None,
        sinks: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
        dropout_seed: Optional[torch.Tensor] = None,
        segments: Optional[SegmentBounds] = None,
        max_scores: bool = False,
    ) -> Tuple[torch.Tensor, ...]:
        """(out, lse), then the block attention map when ``block_map`` asks for it, then each row's largest
        score ``(B, H, Sq)`` when ``max_scores``; ``segments``: token-exact document bounds
        (attnops.core.segments)."""
        lut = dict.fromkeys(_LUT_TENSORS)
        block_q = block_k = 0
        if block_mask is not None:
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            lut.update(kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices)
            if needs_grad:
                lut.update(q_num_blocks=block_mask.q_num_blocks, q_indices=block_mask.q_indices)
            block_q, block_k = block_mask.block_size
        args = dict(q=q, k=k, v=v, **lut, block_q=block_q, block_k=block_k, softmax_scale=float(softmax_scale),
                    causal=bool(causal), window_left=window_size[0], window_right=window_size[1],
                    softcap=float(softcap), alibi_slopes=alibi_slopes, sinks=sinks, attn_bias=attn_bias,
                    dropout_p=float(dropout_p), dropout_seed=dropout_seed)
        if segments is not None:
            args.update(key_bounds=segments.key_bounds, query_bounds=segments.query_bounds,
                        alibi_offsets=segments.alibi_offsets if alibi_slopes is not None else None)
        if max_scores:
            args.update(return_max=True)
        if block_map is None:
            out, lse, _, maxima = fwd.call(fwd_op, **args)
            return (out, lse, maxima) if max_scores else (out, lse)
        rows = _map.partial_rows(block_map, block_q)
        out, lse, partial, maxima = fwd.call(fwd_op, **args, map_rows=rows, map_cols=block_map.block_k,
                                             map_max=block_map.reduce == "max")
        result = (out, lse, _map.finish(partial, lse, rows, block_map))
        return result + (maxima,) if max_scores else result

    block_sparse_attention.reads_bool_masks = reads_bool_masks
    return block_sparse_attention


FWD_TRITON = FWD.variant("block_sparse_attn_fwd_triton")
BWD_TRITON = BWD.variant("block_sparse_attn_bwd_triton")

FWD.define()
BWD.define()
register(FWD, BWD, BWD.op)
