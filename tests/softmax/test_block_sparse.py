"""block_sparse_attention against the float64 reference for every mask constructor, odd lengths,
GQA/MQA, per-head masks, both backward algorithms."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.softmax import reference
from helpers import DTYPE_IDS, compare_with_reference, make_qkv

MASKS = {
    "full": lambda sl: BlockMask.full(sl, block_size=64),
    "causal": lambda sl: BlockMask.causal(sl, block_size=(32, 64)),
    "sliding_window": lambda sl: BlockMask.sliding_window(sl, 70, block_size=32),
    "sliding_window_bidir": lambda sl: BlockMask.sliding_window(sl, 45, causal=False, block_size=(64, 16)),
    "dilated": lambda sl: BlockMask.dilated(sl, num_blocks=3, dilation=2, block_size=32),
    "strided": lambda sl: BlockMask.strided(sl, stride=3, block_size=(16, 32)),
    "fixed": lambda sl: BlockMask.fixed(sl, stride=4, num_summary=1, block_size=32),
    "sink_local": lambda sl: BlockMask.sink_local(sl, 1, 2, block_size=32),
    "global_tokens": lambda sl: BlockMask.global_tokens(sl, global_blocks=1, num_local_blocks=1, block_size=64),
    "random_per_head": lambda sl: BlockMask.random(sl, 0.35, seed=7, batch=2, num_heads=4, block_size=(32, 32)),
    "random_causal": lambda sl: BlockMask.random(sl, 0.5, seed=1, num_heads=4, causal=True, block_size=(128, 32)),
}
# (B, Sq, Sk, H, Hkv, D)
SHAPES = [(2, 300, 300, 4, 2, 64), (2, 200, 333, 4, 1, 40), (2, 271, 150, 4, 4, 96), (2, 150, 130, 4, 1, 512)]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_block_sparse_matches_reference(mask_name, shape, dtype, impl):
    if impl.interpreted and (list(MASKS).index(mask_name) + SHAPES.index(shape)) % len(SHAPES):
        pytest.skip("interpreter: each mask runs on one of the shapes, in turn, to keep CI under its budget")
    B, Sq, Sk, H, Hkv, D = shape
    mask = MASKS[mask_name]((Sq, Sk)).to(impl.device)
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=impl.device)

    def kernel(q, k, v):
        return attnops.block_sparse_attention(q, k, v, mask, return_lse=True, backend=impl.backend)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, mask.to("cpu"), causal=mask.causal,
                                                window_size=mask.window_size, softmax_scale=D ** -0.5)

    compare_with_reference(kernel, ref, inputs, dtype, name=mask_name)


def test_full_mask_equals_dense_attention(fwd_impl):
    q, k, v = make_qkv(1, 190, 190, 4, 2, 64, torch.float32, device=fwd_impl.device)
    for mask, causal in ((BlockMask.full(190), False), (BlockMask.causal(190), True)):
        a = attnops.block_sparse_attention(q, k, v, mask.to(fwd_impl.device), return_lse=True,
                                           backend=fwd_impl.backend)
        b = attnops.attention(q, k, v, causal=causal, return_lse=True, backend=fwd_impl.backend)
        torch.testing.assert_close(a.out, b.out, rtol=0, atol=2e-6)
        torch.testing.assert_close(a.lse, b.lse, rtol=0, atol=2e-6)


def test_empty_mask_rows_give_zeros_and_neg_inf_lse(impl):
    blocks = torch.zeros(4, 4, dtype=torch.bool)
    blocks[1, 1] = blocks[3, 0] = True
    mask = BlockMask.from_dense(blocks, 256, block_size=64).to(impl.device)
    q, k, v = make_qkv(1, 256, 256, 2, 2, 32, torch.float32, requires_grad=True, device=impl.device)
    out, lse = attnops.block_sparse_attention(q, k, v, mask, return_lse=True, backend=impl.backend)
    for qb in (0, 2):
        assert torch.all(out[:, qb * 64:(qb + 1) * 64] == 0)
        assert torch.all(torch.isneginf(lse[:, :, qb * 64:(qb + 1) * 64]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unlisted_blocks_are_never_read(impl):
    """NaN in the keys/values of blocks a row does not list must not reach that row: had the kernel
    computed such a tile and masked it afterwards, 0 * NaN would still poison P V."""
    mask = BlockMask.sliding_window(512, 64, block_size=64).to(impl.device)  # row r lists blocks r-1, r
    q, k, v = make_qkv(1, 512, 512, 2, 2, 32, torch.float32, device=impl.device)
    k[:, 0:64] = float("nan")  # key block 0: listed only by query blocks 0 and 1
    v[:, 0:64] = float("nan")
    q.requires_grad_(True)
    out = attnops.block_sparse_attention(q, k, v, mask, backend=impl.backend)
    # query i sees keys [i - 63, i]: the queries up to 126 attend some key of block 0 (NaN), query 127
    # and later none, not even through a masked zero (README: NaN reaches only the rows that attend it)
    assert torch.isnan(out[:, :127]).all()
    assert torch.isfinite(out[:, 127:]).all()
    out[:, 128:].sum().backward()
    assert torch.isfinite(q.grad[:, 128:]).all()
