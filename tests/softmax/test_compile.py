"""Operator registration: opcheck, gradcheck in float64, meta tensors, torch.compile without graph
breaks."""

import functools

import pytest
import torch

import attnops
from attnops import BlockMask
from helpers import make_qkv, skip_fallback


def _fwd_args(q, k, v, mask=None, causal=False, window=(-1, -1)):
    lut = (None, None, None, None) if mask is None else (
        mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices)
    bq, bk = (0, 0) if mask is None else mask.block_size
    return (q, k, v, *lut, bq, bk, q.shape[-1] ** -0.5, causal, window[0], window[1])


OPS = {"cpu": ("block_sparse_attn_fwd", "block_sparse_attn_bwd"),
       "triton": ("block_sparse_attn_fwd_triton", "block_sparse_attn_bwd_triton")}


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked, impl):
    skip_fallback(impl)
    fwd, bwd = (getattr(torch.ops.attnops, name) for name in OPS[impl.backend])
    # two heads over one kv head (GQA): opcheck runs each operator several times, ~25-50 s a call under the
    # Triton interpreter with four heads
    q, k, v = make_qkv(2, 70, 90, 2, 1, 32, torch.float32, requires_grad=True, device=impl.device)
    mask = BlockMask.sliding_window((70, 90), 40, block_size=32).to(impl.device) if masked else None
    causal = mask.causal if masked else True
    window = mask.window_size if masked else (-1, -1)
    args = _fwd_args(q, k, v, mask, causal, window)
    torch.library.opcheck(fwd, args)
    torch.library.opcheck(fwd, (*args, 16, 32, masked))  # with the partial block map (sums / maxima)
    out, lse, no_map, no_max = fwd(*args)
    assert no_map.numel() == 0 and no_max.numel() == 0
    dout = torch.randn_like(out)
    bwd_args = (dout, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *args[3:])
    torch.library.opcheck(bwd, bwd_args)


@pytest.mark.parametrize("case", ["dense", "causal_gqa", "window", "sparse"])
def test_gradcheck_float64(case, impl):
    if impl.backend != "cpu":
        pytest.skip("float64 runs on the C++ kernels only (triton rejects it with a clear error)")
    q, k, v = make_qkv(1, 21, 37, 4, 2, 8, torch.float64, requires_grad=True)
    mask = BlockMask.strided((21, 37), 2, block_size=16)

    def fn(q, k, v):
        if case == "dense":
            return attnops.attention(q, k, v, return_lse=True)
        if case == "causal_gqa":
            return attnops.attention(q, k, v, causal=True, return_lse=True)
        if case == "window":
            return attnops.attention(q, k, v, window_size=(5, 3), return_lse=True)
        return attnops.block_sparse_attention(q, k, v, mask, return_lse=True)

    def finite(q, k, v):  # lse of an empty row is -inf: keep the gradient check on finite outputs
        out, lse = fn(q, k, v)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(finite, (q, k, v), eps=1e-6, atol=1e-7)


def test_meta_tensors():
    q, k, v = make_qkv(2, 100, 120, 8, 2, 64, torch.float16, device="meta")
    out, lse = attnops.attention(q, k, v, causal=True, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32
    _, block_map = attnops.attention(q, k, v, causal=True, return_block_map=True, map_block_size=(32, 16))
    assert block_map.device.type == "meta" and block_map.shape == (2, 8, 4, 8)


def _model_fn(q, k, v, mask, backend=None):
    a = attnops.attention(q, k, v, causal=True, backend=backend)
    b, block_map = attnops.block_sparse_attention(q, k, v, mask, backend=backend, return_block_map=True)
    return (a * b).sum(-1) + block_map.sum()


def test_torch_compile_fullgraph_matches_eager(impl):
    skip_fallback(impl)
    q, k, v = make_qkv(2, 130, 130, 4, 2, 32, torch.float32, requires_grad=True, device=impl.device)
    mask = BlockMask.sliding_window(130, 50, block_size=32).to(impl.device)
    mask.q_num_blocks  # transposes built outside the graph (a mask is usually built once, reused)
    fn = functools.partial(_model_fn, backend=impl.backend)
    explanation = torch._dynamo.explain(fn)(q, k, v, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, fullgraph=True)
    y = compiled(q, k, v, mask)
    y_eager = fn(q, k, v, mask)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum(), (q, k, v))
    g_eager = torch.autograd.grad(y_eager.sum(), (q, k, v))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_double_backward_is_a_clear_error():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 16, torch.float64, requires_grad=True)
    out = attnops.attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gq.sum().backward()
