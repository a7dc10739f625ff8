"""Eager calls that need a gradient run through each operator's own autograd.Function
(``OpDef.register_autograd``), not through the layer ``torch.library.register_autograd`` installs (which
completes the arguments from the schema on every call: ~165 us at the block-sparse forward's 31). Both run the
same ``setup_context`` / ``backward``: the results and gradients must be the same bits, for every subset of
inputs that requires a gradient, and the refusals (double backward, forward-only operators) must stay."""

import pytest
import torch

import attnops
from attnops.core import dispatch
from attnops.ops.softmax import library as lib

B, S, H, HKV, D = 2, 37, 4, 2, 40


def _registered_call(opdef, q, k, v, sinks=None, attn_bias=None, alibi_slopes=None, softcap=0.0):
    """The forward operator called through torch.ops: the registered autograd layer."""
    args = opdef.bind((), dict(q=q, k=k, v=v, kv_num_blocks=None, kv_indices=None, q_num_blocks=None, q_indices=None,
                               block_q=0, block_k=0, softmax_scale=q.shape[-1] ** -0.5, causal=True, window_left=-1,
                               window_right=-1, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                               attn_bias=attn_bias))
    out, lse, *_ = opdef.op(*args.values())
    return out, lse


_BACKENDS = ["cpu"] + (["triton"] if dispatch.is_available("triton") else [])


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("wanted", ["qkv", "v", "k", "sinks", "bias"])
def test_eager_autograd_matches_the_registered_layer(backend, wanted):
    opdef = lib.FWD if backend == "cpu" else lib.FWD_TRITON
    dtype = torch.float64 if backend == "cpu" else torch.float32  # the Triton kernels take no float64
    q = torch.randn(B, S, H, D, dtype=dtype)
    k, v = (torch.randn(B, S, HKV, D, dtype=dtype) for _ in range(2))
    sinks, bias, slopes = torch.randn(H, dtype=dtype), torch.randn(1, H, S, S, dtype=dtype), torch.rand(H)
    leaves = dict(q=q, k=k, v=v, sinks=sinks, bias=bias)
    names = {"qkv": ("q", "k", "v")}.get(wanted, (wanted,))
    for name in names:
        leaves[name].requires_grad_(True)
    g_out, g_lse = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, H, S, dtype=dtype)

    out, lse = attnops.attention(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, sinks=sinks, attn_bias=bias,
                                 return_lse=True, backend=backend)
    assert type(out.grad_fn).__name__ == f"{opdef.name}_autogradBackward"  # the eager Function ran
    ref_out, ref_lse = _registered_call(opdef, q, k, v, sinks, bias, slopes, softcap=3.0)
    assert "Generated" in type(ref_out.grad_fn).__name__  # and the reference did not
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    inputs = [leaves[name] for name in names]
    grads = torch.autograd.grad((out, lse), inputs, (g_out, g_lse))
    ref_grads = torch.autograd.grad((ref_out, ref_lse), inputs, (g_out, g_lse))
    for name, got, ref in zip(names, grads, ref_grads):
        assert got is not None and torch.isfinite(got).all(), name
        assert torch.equal(got, ref), name


def test_eager_autograd_accumulates_into_leaves():
    """Through .backward(): each leaf that requires a gradient gets one, the others none."""
    q = torch.randn(1, 16, 2, 16, requires_grad=True)
    k, v = torch.randn(1, 16, 2, 16), torch.randn(1, 16, 2, 16, requires_grad=True)
    attnops.attention(q, k, v, causal=True).sum().backward()
    assert q.grad is not None and v.grad is not None and k.grad is None
    q2, v2 = q.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = _registered_call(lib.FWD, q2, k, v2)[0]
    (ref * 1).sum().backward()
    assert torch.equal(q.grad, q2.grad) and torch.equal(v.grad, v2.grad)


def test_double_backward_is_still_refused():
    q, k, v = (torch.randn(1, 16, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attnops.attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


def test_forward_only_operators_still_refuse_backward():
    q = torch.randn(2, 1, 4, 16, requires_grad=True)
    k, v = torch.randn(2, 50, 2, 16), torch.randn(2, 50, 2, 16)
    out = attnops.decode_attention(q, k, v, torch.tensor([50, 20], dtype=torch.int32))
    assert type(out.grad_fn).__name__.endswith("_autogradBackward")
    with pytest.raises(NotImplementedError, match="forward-only"):
        out.sum().backward()
