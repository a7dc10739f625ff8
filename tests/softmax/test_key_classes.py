"""The CPU forward's key classes (csrc/cpu/mask.h, KeyClasses): a block mask whose every row keeps blocks of one
residue class mod some stride (a dilated mask, LongNet's) runs with K and V packed class by class, so that a row's
blocks, ``stride`` apart in the sequence, are one run of keys (tiles as wide as a sliding window's).

Against the float64 reference, forward and backward (the backward reads the keys in their order), on dilated masks
causal and not, decode-shaped (Sq < Sk), GQA / MQA, head dims 40 / 64 / 96, and per-head block tensors with gaps
and a token window (bounds that fall inside blocks of other classes); NaN in a key block packed next to a row's
run does not reach that row. The same calls with the regrouping off (``ATTNOPS_CPU_KEY_CLASSES=0``) round
differently in float32: the regrouped path ran."""

import os

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import backends
from attnops.ops.softmax import reference

from helpers import DTYPE_IDS, compare_with_reference, make_qkv

pytestmark = pytest.mark.skipif(not backends.EXTENSION, reason="needs the C++ extension")


def _classes_mask(Sq, Sk, H, stride, block, window):
    """Per head, every query block keeps random key blocks of one residue class mod ``stride`` (the class turns
    with the row and the head), at least two of them where the class has two below the row, gaps allowed."""
    gen = torch.Generator().manual_seed(5)
    nq, nk = -(-Sq // block), Sk // block
    blocks = torch.zeros(H, nq, nk, dtype=torch.bool)
    for h in range(H):
        for i in range(nq):
            members = torch.arange((i + h) % stride, nk, stride)
            keep = torch.rand(members.numel(), generator=gen) < 0.6
            keep[:2] = True
            blocks[h, i, members[keep]] = True
    return BlockMask.from_dense(blocks, (Sq, Sk), block_size=block, window_size=window)


# (B, Sq, Sk, H, Hkv, D, mask)
CASES = {
    "dilated_causal": (2, 512, 512, 4, 2, 64,
                       lambda: BlockMask.dilated(512, num_blocks=3, dilation=2, causal=True, block_size=64)),
    "dilated_bidir_mqa": (1, 384, 384, 4, 1, 40,
                          lambda: BlockMask.dilated(384, num_blocks=4, dilation=3, causal=False, block_size=32)),
    "dilated_decode": (1, 128, 512, 2, 2, 96,
                       lambda: BlockMask.dilated((128, 512), num_blocks=3, dilation=2, causal=True, block_size=64)),
    "per_head_window": (2, 256, 256, 3, 3, 64, lambda: _classes_mask(256, 256, 3, 3, 32, (150, 20))),
}


@pytest.fixture
def regrouping():
    """Sets ATTNOPS_CPU_KEY_CLASSES (read at every forward call) and restores it."""
    before = os.environ.get("ATTNOPS_CPU_KEY_CLASSES")

    def switch(on: bool):
        os.environ["ATTNOPS_CPU_KEY_CLASSES"] = "1" if on else "0"

    yield switch
    if before is None:
        os.environ.pop("ATTNOPS_CPU_KEY_CLASSES", None)
    else:
        os.environ["ATTNOPS_CPU_KEY_CLASSES"] = before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", list(CASES))
def test_regrouped_keys_match_reference(case, dtype, cpu_impl, regrouping):
    B, Sq, Sk, H, Hkv, D, make_mask = CASES[case]
    mask = make_mask()
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)

    def kernel(q, k, v):
        return attnops.block_sparse_attention(q, k, v, mask, return_lse=True, backend=cpu_impl.backend)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, mask, causal=mask.causal, window_size=mask.window_size,
                                                softmax_scale=D ** -0.5)

    regrouping(True)
    compare_with_reference(kernel, ref, inputs, dtype, name=case)
    if dtype == torch.float32:  # other tiles, other roundings: the classes were found and the keys regrouped
        regrouped = kernel(*inputs).out
        regrouping(False)
        assert not torch.equal(regrouped, kernel(*inputs).out)


def test_keys_packed_beside_a_run_are_not_read(cpu_impl, regrouping):
    """Dilation 2, three blocks a row: key block 1 (NaN) is packed just before blocks 3, 5, 7 of its class, and
    only query blocks 1, 3 and 5 keep it."""
    mask = BlockMask.dilated(512, num_blocks=3, dilation=2, causal=True, block_size=64)
    q, k, v = make_qkv(1, 512, 512, 2, 2, 32, torch.float32)
    k[:, 64:128] = float("nan")
    v[:, 64:128] = float("nan")
    regrouping(True)
    out = attnops.block_sparse_attention(q, k, v, mask, backend=cpu_impl.backend)
    for block in range(8):
        rows = out[:, block * 64:(block + 1) * 64]
        assert (rows.isnan().all() if block in (1, 3, 5) else rows.isfinite().all()), block
