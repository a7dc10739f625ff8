"""Linear attention's Triton operators from one argument list each, their fakes and autograd (the
chunk forward's backward is an operator of its own; the recurrent kernel is forward-only).

    fwd(q, k, v, g?, h0?, softmax_scale, chunk_size) -> (out f32, final state, states entering each chunk)
    bwd(dout, dfinal?, q, k, v, g?, final, hs, softmax_scale, chunk_size) -> (dq, dk, dv, dg, dh0)
    recurrent(q, k, v, g?, h0?, softmax_scale) -> (out f32, final state)

q/k ``(B, S, H|Hkv, Dk)`` after the feature map, v ``(B, S, Hkv, Dv)``, g the log-gates ``(B, S, H, 1 | Dk)``
float32 (None: no gate), h0 the initial state ``(B, H, Dk, Dv)`` float32. The CPU path is the composite
chunk form (attnops.ops.linear.chunk), autograd through PyTorch: no operator.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from attnops.core.library import Arg, OpDef
from attnops.ops.linear.chunk import effective_chunk

NO_GATE, HEAD_GATE, CHANNEL_GATE = 0, 1, 2
CHANNEL_CHUNK = 16  # per-channel gates: the intra-chunk block is summed column by column

_QKVG = [Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor"), Arg("g", "Tensor?")]
FWD = OpDef("linear_attn_fwd_triton", _QKVG + [Arg("h0", "Tensor?"), Arg("softmax_scale", "float"),
                                                Arg("chunk_size", "int")], "(Tensor, Tensor, Tensor)")
BWD = OpDef("linear_attn_bwd_triton", [Arg("dout", "Tensor"), Arg("dfinal", "Tensor?"), *_QKVG, Arg("final", "Tensor"),
                                       Arg("hs", "Tensor"), Arg("softmax_scale", "float"), Arg("chunk_size", "int")],
            "(Tensor, Tensor, Tensor, Tensor, Tensor)")
RECURRENT = OpDef("linear_attn_recurrent_triton", _QKVG + [Arg("h0", "Tensor?"), Arg("softmax_scale", "float")],
                  "(Tensor, Tensor)")


def gate_kind(g: Optional[torch.Tensor]) -> int:
    return NO_GATE if g is None else (HEAD_GATE if g.shape[-1] == 1 else CHANNEL_GATE)


def chunk_rows(seq_len: int, chunk_size: int, gate: int) -> int:
    """The Triton kernels' chunk: 16 rows with per-channel gates, else the op's (at least 16)."""
    return CHANNEL_CHUNK if gate == CHANNEL_GATE else max(16, effective_chunk(seq_len, chunk_size))


def fwd_fake(q, v, g, chunk_size, **_):
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    N = -(-S // chunk_rows(S, chunk_size, gate_kind(g)))
    f32 = torch.float32
    return (q.new_empty(B, S, H, Dv, dtype=f32), q.new_empty(B, H, Dk, Dv, dtype=f32),
            q.new_empty(B, H, N, Dk, Dv, dtype=f32))


def bwd_fake(q, k, v, g, **_):
    f32 = torch.float32
    B, S, H, Dk = q.shape
    return (q.new_empty(q.shape, dtype=f32), k.new_empty(k.shape, dtype=f32), v.new_empty(v.shape, dtype=f32),
            q.new_empty(g.shape if g is not None else (0,), dtype=f32), q.new_empty(B, H, Dk, v.shape[-1], dtype=f32))


def recurrent_fake(q, v, **_):
    B, S, H, Dk = q.shape
    f32 = torch.float32
    return q.new_empty(B, S, H, v.shape[-1], dtype=f32), q.new_empty(B, H, Dk, v.shape[-1], dtype=f32)


def register(bwd_op: Callable) -> None:
    """Fakes of the three operators, the chunk forward's autograd through ``bwd_op``, and refusals for
    double backward and for backward through the recurrent kernel."""
    FWD.register_fake(fwd_fake)
    BWD.register_fake(bwd_fake)
    RECURRENT.register_fake(recurrent_fake)

    def setup_context(ctx, inputs, output):
        a = FWD.bind(inputs)
        out, final, hs = output
        ctx.mark_non_differentiable(hs)
        ctx.params = dict(softmax_scale=a["softmax_scale"], chunk_size=a["chunk_size"])
        ctx.has_h0, ctx.has_g = a["h0"] is not None, a["g"] is not None
        ctx.save_for_backward(a["q"], a["k"], a["v"], a["g"], final, hs)

    def backward(ctx, dout, dfinal, dhs):
        q, k, v, g, final, hs = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = BWD.call(bwd_op, dout=dout, dfinal=dfinal, q=q, k=k, v=v, g=g, final=final, hs=hs,
                                       **ctx.params)
        return FWD.grads(q=dq.to(q.dtype), k=dk.to(k.dtype), v=dv.to(v.dtype),
                         g=dg.to(g.dtype) if ctx.has_g else None, h0=dh0 if ctx.has_h0 else None)

    FWD.register_autograd(backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("attnops: double backward through linear attention's Triton kernels is not "
                                  "supported (the CPU path, the composite chunk form, supports it)")

    BWD.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)

    def forward_only(ctx, *grads):
        raise NotImplementedError("attnops: the recurrent linear-attention kernel is forward-only; the chunk "
                                  "kernel runs when gradients are needed")

    RECURRENT.register_autograd(forward_only, setup_context=lambda ctx, inputs, output: None)
