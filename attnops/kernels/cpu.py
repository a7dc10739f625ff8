"""The C++ CPU backend: thin wrappers over ``torch.ops.attnops.*`` (csrc/cpu).

Importing this module loads ``attnops._C`` (which registers the operators) and adds, in Python,
what the C++ side leaves out: fake (meta) implementations, so that ``torch.compile`` and meta
tensors work, and autograd formulas, which call the backward operators.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnops.masks import BlockMask

try:
    from attnops import _C  # noqa: F401  (registers torch.ops.attnops.*)

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except ImportError as e:  # not built: `make test` / `pip install --no-build-isolation -e .`
    _C = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"the C++ extension attnops._C is not built ({e})"


def set_poison_outputs(enable: bool) -> bool:
    """Test aid: C++ kernels fill outputs with NaN at allocation. Returns the previous setting."""
    return _C._set_poison_outputs(enable) if AVAILABLE else False


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if AVAILABLE:
    _ops = torch.ops.attnops

    @torch.library.register_fake("attnops::block_sparse_attn_fwd")
    def _block_sparse_attn_fwd_fake(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
                                    softmax_scale, causal, window_left, window_right):
        B, Sq, H, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((B, H, Sq), dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake("attnops::block_sparse_attn_bwd")
    def _block_sparse_attn_bwd_fake(dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks,
                                    q_indices, block_q, block_k, softmax_scale, causal, window_left, window_right):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _fwd_setup_context(ctx, inputs, output):
        q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices = inputs[:7]
        ctx.params = inputs[7:]  # block_q, block_k, softmax_scale, causal, window_left, window_right
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices)

    def _fwd_backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices = ctx.saved_tensors
        if kv_num_blocks is not None and q_num_blocks is None:
            raise RuntimeError("attnops: the forward ran without the transposed block LUT; cannot differentiate")
        dq, dk, dv = _ops.block_sparse_attn_bwd(
            dout, dlse, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, *ctx.params
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "attnops::block_sparse_attn_fwd", _fwd_backward, setup_context=_fwd_setup_context
    )

    def _no_double_backward(ctx, *grads):
        raise NotImplementedError("attnops: double backward through attention is not supported")

    torch.library.register_autograd(
        "attnops::block_sparse_attn_bwd", _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[BlockMask],
    *,
    causal: bool,
    window_size: Tuple[int, int],
    softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """C++ block-sparse flash attention (see ``attnops.kernels.reference.block_sparse_attention``)."""
    if block_mask is None:
        lut = (None, None, None, None)
        block_q = block_k = 0
    else:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        transposed = (block_mask.q_num_blocks, block_mask.q_indices) if needs_grad else (None, None)
        lut = (block_mask.kv_num_blocks, block_mask.kv_indices, *transposed)
        block_q, block_k = block_mask.block_size
    return torch.ops.attnops.block_sparse_attn_fwd(
        q, k, v, *lut, block_q, block_k, float(softmax_scale), bool(causal), window_size[0], window_size[1]
    )
