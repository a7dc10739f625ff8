"""The bfloat16 forward's bf16 tile products (csrc/cpu/gemm_bf16.h: AVX512-BF16 at the avx512 level) and
its float fallback: both against the float64 reference under the accuracy rule, on odd shapes, and the
fallback taken when V holds NaN/Inf. The rest of the suite runs bf16 through the bf16 products wherever
this CPU has them (the default), and through the widening path at the other ISA levels."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import backends

from helpers import assert_accurate, make_qkv

_HAS_DOT = backends.EXTENSION and "avx512" in backends.cpu_isa()["levels"] and "avx512_bf16" in backends.cpu_isa()["cpu"]
pytestmark = pytest.mark.skipif(not _HAS_DOT, reason="needs the avx512 level and an AVX512-BF16 CPU")


@pytest.fixture
def avx512():
    from attnops import _C

    previous = backends.set_cpu_isa("avx512")
    previous_dot = _C._bf16_dot()
    yield _C
    _C._set_bf16_dot(previous_dot)
    backends.set_cpu_isa(previous)


def _ref(q, k, v, **kw):
    return attnops.attention(q.double(), k.double(), v.double(), backend="reference", **kw)


@pytest.mark.parametrize("dot", [True, False], ids=["bf16_dot", "widened"])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,kw", [
    (1, 300, 300, 4, 4, 64, dict(causal=True)),
    (2, 77, 133, 4, 2, 40, dict()),
    (1, 257, 257, 8, 8, 96, dict(causal=True, window_size=(100, 0))),
    (2, 200, 333, 4, 1, 128, dict(softcap=20.0)),
    (1, 5, 301, 2, 2, 33, dict(causal=True)),  # odd D and Sk: the pairs' zero halves
])
def test_bf16_forward_matches_reference(avx512, dot, B, Sq, Sk, H, Hkv, D, kw):
    avx512._set_bf16_dot(dot)
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.bfloat16)
    out, lse = attnops.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = _ref(q, k, v, return_lse=True, **kw)
    low, low_lse = attnops.attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert_accurate("out", out, ref, low)
    assert_accurate("lse", lse, ref_lse, low_lse)


def test_bf16_block_mask_and_map(avx512):
    avx512._set_bf16_dot(True)
    q, k, v = make_qkv(1, 640, 640, 4, 2, 64, torch.bfloat16)
    mask = BlockMask.sliding_window((640, 640), window=200, block_size=64)
    out, block_map = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True)
    avx512._set_bf16_dot(False)
    out_w, block_map_w = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True)
    ref = attnops.block_sparse_attention(q.double(), k.double(), v.double(), mask, backend="reference")
    low = attnops.block_sparse_attention(q, k, v, mask, backend="reference")
    assert_accurate("out", out, ref, low)
    # the map comes from the float probabilities either way; only the scores' rounding differs
    torch.testing.assert_close(block_map, block_map_w, atol=1e-2, rtol=0)


def test_nan_in_v_takes_the_float_path(avx512):
    """0 * NaN of the masked keys must not reach rows that never see the NaN key: with NaN in V the call
    runs the float path (and its exact rerun), so rows before the NaN key stay finite under causal."""
    avx512._set_bf16_dot(True)
    q, k, v = make_qkv(1, 200, 200, 2, 2, 64, torch.bfloat16)
    v[0, 150, 1, 5] = float("nan")
    out = attnops.attention(q, k, v, causal=True)
    nan = torch.zeros(out.shape, dtype=torch.bool)
    nan[0, 150:, 1, 5] = True  # the rows that attend key 150, in the NaN's head and channel
    assert torch.isnan(out[nan]).all() and torch.isfinite(out[~nan]).all()
    avx512._set_bf16_dot(False)
    torch.testing.assert_close(out, attnops.attention(q, k, v, causal=True), equal_nan=True, atol=0, rtol=0)


def test_nan_in_q_stays_in_its_row(avx512):
    avx512._set_bf16_dot(True)
    q, k, v = make_qkv(1, 130, 130, 2, 1, 40, torch.bfloat16)
    q[0, 70, 0, 3] = float("nan")
    out = attnops.attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 70, 0]).all()
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[0, 70, 0] = True
    assert torch.isfinite(out[~bad]).all()
