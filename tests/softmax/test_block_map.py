"""Block attention maps (return_block_map) against the float64 reference, which builds the full
probability matrix and pools it: every mask constructor, dense / causal / window, odd lengths,
GQA, map granularities other than the kernel's, mean and max, decode."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.decode import reference as decode_reference
from attnops.ops.softmax import reference
from attnops.core.block_map import MapRequest
from helpers import DTYPE_IDS, assert_accurate, make_qkv, ragged_lengths
from test_block_sparse import MASKS, SHAPES, SHAPE_IDS

REDUCE = ["mean", "max"]


def check_map(name, block_map, request, ref_fn, inputs, dtype):
    """The kernel's map against the reference map in float64, with the DESIGN.md rule."""
    cpu = [t.detach().cpu() for t in inputs]
    map64 = ref_fn(*[t.double() for t in cpu])[2]
    mapT = ref_fn(*cpu)[2]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert block_map.dtype == expected_dtype
    assert_accurate(f"{name} block_map", block_map.cpu(), map64, mapT.double())
    return map64


# Each mask on one of the shapes, in turn (the kernels' own suite runs every pair).
MASK_SHAPES = [pytest.param(name, SHAPES[i % len(SHAPES)], id=f"{name}-{SHAPE_IDS[i % len(SHAPES)]}")
               for i, name in enumerate(MASKS)]


@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("mask_name, shape", MASK_SHAPES)
def test_block_sparse_map_matches_reference(mask_name, shape, dtype, reduce, fwd_impl):
    if fwd_impl.interpreted and dtype != torch.float32:
        pytest.skip("interpreter: float32 only (the bf16 path is the forward's, tested in test_block_sparse)")
    B, Sq, Sk, H, Hkv, D = shape
    mask = MASKS[mask_name]((Sq, Sk)).to(fwd_impl.device)
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=fwd_impl.device)
    res = attnops.block_sparse_attention(*inputs, mask, return_block_map=True, reduce=reduce, backend=fwd_impl.backend)
    request = MapRequest(*mask.block_size, reduce)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, mask.to("cpu"), causal=mask.causal,
                                                window_size=mask.window_size, softmax_scale=D ** -0.5,
                                                block_map=request)

    map64 = check_map(mask_name, res.block_map, request, ref, inputs, dtype)
    block_map = res.block_map.cpu()
    kept = mask.to("cpu").to_dense().expand(B, H, -1, -1)
    assert torch.all(block_map[~kept] == 0), "blocks the mask drops must be exactly 0"
    if reduce == "mean":  # a row sums to 1 when a query of its block attends to something, else 0
        has_keys = map64.sum(-1) > 0.5
        sums = block_map.double().sum(-1)
        torch.testing.assert_close(sums[has_keys], torch.ones_like(sums[has_keys]), rtol=0, atol=1e-2)
        assert torch.all(sums[~has_keys] == 0)
    # the map rides along: the output is the one computed without it
    plain = attnops.block_sparse_attention(*inputs, mask, backend=fwd_impl.backend)
    assert torch.equal(res.out, plain)


DENSE_CASES = {  # (B, Sq, Sk, H, Hkv, D), attention kwargs
    "full-gqa": ((2, 200, 200, 4, 2, 40), {}),
    "causal-sq<sk": ((1, 130, 257, 4, 1, 64), {"causal": True}),
    "causal-sq>sk": ((1, 100, 60, 2, 1, 16), {"causal": True}),
    "window": ((1, 300, 300, 2, 2, 96), {"causal": True, "window_size": (50, 0)}),
    "window-bidir": ((2, 150, 170, 4, 4, 32), {"window_size": (20, 33)}),
}


@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("block_size", [None, 16, (128, 32), (32, 128)], ids=str)
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_map_matches_reference(case, block_size, reduce, fwd_impl):
    if fwd_impl.interpreted and block_size in (16, (128, 32)) and case != "causal-sq<sk":
        pytest.skip("interpreter: the 16 and (128, 32) grids run on one case")
    shape, kwargs = DENSE_CASES[case]
    B, Sq, Sk, H, Hkv, D = shape
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float32, device=fwd_impl.device)
    res = attnops.attention(*inputs, return_block_map=True, return_lse=True, map_block_size=block_size, reduce=reduce,
                            backend=fwd_impl.backend, **kwargs)
    bq, bk = (64, 64) if block_size is None else (block_size, block_size) if isinstance(block_size, int) else block_size
    assert res.block_map.shape == (B, H, -(-Sq // bq), -(-Sk // bk))
    request = MapRequest(bq, bk, reduce)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, None, softmax_scale=D ** -0.5, block_map=request,
                                                causal=kwargs.get("causal", False),
                                                window_size=kwargs.get("window_size", (-1, -1)))

    check_map(case, res.block_map, request, ref, inputs, torch.float32)
    # the same map whether or not the lse is also asked for
    _, block_map = attnops.attention(*inputs, return_block_map=True, map_block_size=block_size, reduce=reduce,
                                     backend=fwd_impl.backend, **kwargs)
    assert torch.equal(block_map, res.block_map)


def test_map_of_float64_is_exact():
    inputs = make_qkv(2, 77, 90, 6, 3, 40, torch.float64)
    for reduce in REDUCE:
        res = attnops.attention(*inputs, causal=True, return_block_map=True, map_block_size=32, reduce=reduce)
        ref = reference.block_sparse_attention(*inputs, None, causal=True, window_size=(-1, -1),
                                               softmax_scale=40 ** -0.5, block_map=MapRequest(32, 32, reduce))[2]
        torch.testing.assert_close(res.block_map, ref, rtol=1e-12, atol=1e-14)


def test_empty_rows_give_zero_map_rows_and_nan_gives_nan(fwd_impl):
    blocks = torch.zeros(4, 4, dtype=torch.bool)
    blocks[1, 1] = blocks[3, 0] = blocks[3, 2] = True
    mask = BlockMask.from_dense(blocks, 256, block_size=64).to(fwd_impl.device)
    q, k, v = make_qkv(1, 256, 256, 2, 2, 32, torch.float32, device=fwd_impl.device)
    block_map = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True,
                                               backend=fwd_impl.backend).block_map.cpu()
    assert torch.all(block_map[:, :, 0] == 0) and torch.all(block_map[:, :, 2] == 0)
    torch.testing.assert_close(block_map[:, :, 1].sum(-1), torch.ones(1, 2), rtol=0, atol=1e-5)
    q[0, 70, 1] = float("nan")  # query block 1 of head 1
    block_map = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True,
                                               backend=fwd_impl.backend).block_map.cpu()
    assert torch.isnan(block_map[0, 1, 1, 1]) and not torch.isnan(block_map[0, 0]).any()
    assert not torch.isnan(block_map[0, 1, 3]).any()


def test_map_does_not_change_gradients(fwd_impl):
    q, k, v = make_qkv(1, 150, 150, 4, 2, 32, torch.float32, requires_grad=True, device=fwd_impl.device)
    res = attnops.attention(q, k, v, causal=True, return_block_map=True, backend=fwd_impl.backend)
    assert not res.block_map.requires_grad
    grads = torch.autograd.grad(res.out.square().sum(), (q, k, v))
    out = attnops.attention(q, k, v, causal=True, backend=fwd_impl.backend)
    for a, b in zip(grads, torch.autograd.grad(out.square().sum(), (q, k, v))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("case", ["ragged-gqa", "window", "block_mask"])
def test_decode_map_matches_reference(case, reduce, fwd_impl):
    B, S, H, Hkv, D, Sq = 3, 300, 8, 2, 64, 3
    q = torch.randn(B, Sq, H, D, device=fwd_impl.device)
    k, v = (torch.randn(B, S, Hkv, D, device=fwd_impl.device) for _ in range(2))
    lens = ragged_lengths(B, S).to(fwd_impl.device)
    window, mask, block_size = (-1, -1), None, 32
    if case == "window":
        window = (70, 0)
    if case == "block_mask":
        mask = BlockMask.random((Sq, S), 0.5, seed=3, batch=B, num_heads=H, block_size=(16, 32)).to(fwd_impl.device)
        block_size = None
    res = attnops.decode_attention(q, k, v, lens, block_mask=mask, window_size=window, return_block_map=True,
                                   map_block_size=block_size, reduce=reduce, backend=fwd_impl.backend)
    request = MapRequest(16 if mask is not None else 32, 32, reduce)
    assert res.block_map.shape == (B, H, -(-Sq // request.block_q), -(-S // request.block_k))

    def ref(q, k, v):
        return decode_reference.decode_attention(q, k, v, lens.cpu(), mask.to("cpu") if mask is not None else None,
                                          window_size=window, softmax_scale=D ** -0.5, block_map=request)

    check_map(case, res.block_map, request, ref, (q, k, v), torch.float32)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"reduce": "sum"}, ValueError, "reduce must be one of"),
    ({"map_block_size": 24}, ValueError, "power of two >= 16"),
    ({"map_block_size": 8}, ValueError, "power of two >= 16"),
    ({"map_block_size": (16,)}, TypeError, "(block_q, block_k) pair"),
    ({"map_block_size": 64.0}, TypeError, "an int or"),
])
def test_block_map_bad_input(kwargs, error, words):
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float32)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        attnops.attention(q, k, v, return_block_map=True, **kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        attnops.decode_attention(q[:, :1], k, v, torch.tensor([64]), return_block_map=True, **kwargs)


def test_result_tuples():
    q, k, v = make_qkv(1, 64, 64, 2, 2, 16, torch.float32)
    assert isinstance(attnops.attention(q, k, v), torch.Tensor)
    out, block_map = attnops.attention(q, k, v, return_block_map=True)
    out, lse, block_map = attnops.attention(q, k, v, return_block_map=True, return_lse=True)
    assert block_map.shape == (1, 2, 1, 1) and lse.shape == (1, 2, 64)


@pytest.mark.parametrize("reduce", REDUCE)
@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("heads", [(4, 4, 1), (8, 2, 3)], ids=["mha-dot-path", "gqa-gemm-path"])
def test_decode_map_across_splits(heads, num_splits, reduce):
    """The C++ decode kernel fuses the map: each split's blocks relative to its own lse, merged with
    the splits' weights; map blocks (256 keys) straddle the splits' boundaries."""
    H, Hkv, Sq = heads
    B, S, D = 2, 1000, 64
    q = torch.randn(B, Sq, H, D) * 2
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lens = torch.tensor([S, 613], dtype=torch.int32)
    request = MapRequest(16, 256, reduce)
    res = attnops.decode_attention(q, k, v, lens, return_block_map=True, map_block_size=(16, 256), reduce=reduce,
                                   num_splits=num_splits)
    plain = attnops.decode_attention(q, k, v, lens, num_splits=num_splits)
    assert torch.equal(res.out, plain)

    def ref(q, k, v):
        return decode_reference.decode_attention(q, k, v, lens, None, window_size=(-1, -1), softmax_scale=D ** -0.5,
                                          block_map=request)

    check_map("splits", res.block_map, request, ref, (q, k, v), torch.float32)
