"""The bfloat16 forward's and backward's bf16 tile products (csrc/cpu/gemm_bf16.h: AVX512-BF16 at the avx512
level; oneDNN's brgemm at the amx level, forced here through the same calls, where brgemm runs AVX-512 code
without AMX) and their float fallback: both against the float64 reference under the accuracy rule, on odd
shapes, each backward form, score modifiers and biases, and the fallbacks taken for non-finite inputs. The rest of
the suite runs bf16 through the bf16 products wherever this CPU has them (the default), and through the
widening path at the other ISA levels."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import backends

from helpers import CPU_BACKWARD_FORMS, assert_accurate, assert_op_matches_oracle, cpu_backward_form, make_qkv

_HAS_DOT = backends.EXTENSION and "avx512" in backends.cpu_isa()["levels"] and "avx512_bf16" in backends.cpu_isa()["cpu"]
pytestmark = pytest.mark.skipif(not _HAS_DOT, reason="needs the avx512 level and an AVX512-BF16 CPU")


@pytest.fixture
def avx512():
    from attnops import _C

    previous = backends.set_cpu_isa("avx512")
    previous_dot = _C._set_bf16_dot(-1)  # the mode (-1: the CPU's default), restored as it was
    previous_brgemm = _C._set_bf16_brgemm(0)
    yield _C
    _C._set_bf16_brgemm(previous_brgemm)
    _C._set_bf16_dot(previous_dot)
    backends.set_cpu_isa(previous)


def _products(_C, products):
    """Runs the bf16 tile products as `products` says: "bf16_dot" (the avx512 level's VDPBF16PS kernel),
    "brgemm" (the amx level's calls to oneDNN's brgemm: here its AVX-512 code, AMX tiles on a CPU with them) or
    "widened" (float products)."""
    _C._set_bf16_dot(products != "widened")
    _C._set_bf16_brgemm(1 if products == "brgemm" else 0)


def _ref(q, k, v, **kw):
    return attnops.attention(q.double(), k.double(), v.double(), backend="reference", **kw)


# (B, Sq, Sk, H, Hkv, D, kwargs) for the forward and backward checks
_CASES = [
    (1, 300, 300, 4, 4, 64, dict(causal=True)),
    (2, 77, 133, 4, 2, 40, dict()),
    (1, 257, 257, 8, 2, 96, dict(causal=True, window_size=(100, 0))),
    (2, 200, 333, 4, 1, 128, dict(softcap=20.0)),
    (1, 5, 301, 2, 2, 33, dict(causal=True)),  # odd D, Sq and Sk: the pairs' zero halves
    (1, 331, 331, 2, 1, 64, dict(window_size=(101, 3))),  # backward query tiles whose live keys start at an odd key
    (1, 90, 120, 4, 2, 512, dict(causal=True)),  # the widest head dim
    (1, 70, 70, 2, 2, 301, dict()),  # an odd one past 256
    (1, 1100, 1100, 2, 1, 40, dict()),  # the backward's 256-key tiles and 256-query S^T tiles (a ragged last one)
    (1, 1100, 1100, 2, 2, 64, dict(causal=True)),  # its 128-key tiles
]


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm", "widened"])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,kw", _CASES)
def test_bf16_forward_matches_reference(avx512, products, B, Sq, Sk, H, Hkv, D, kw):
    _products(avx512, products)
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.bfloat16)
    out, lse = attnops.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = _ref(q, k, v, return_lse=True, **kw)
    low, low_lse = attnops.attention(q, k, v, backend="reference", return_lse=True, **kw)
    assert_accurate("out", out, ref, low)
    assert_accurate("lse", lse, ref_lse, low_lse)


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm"])
def test_bf16_block_mask_and_map(avx512, products):
    _products(avx512, products)
    q, k, v = make_qkv(1, 640, 640, 4, 2, 64, torch.bfloat16)
    mask = BlockMask.sliding_window((640, 640), window=200, block_size=64)
    out, block_map = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True)
    _products(avx512, "widened")
    out_w, block_map_w = attnops.block_sparse_attention(q, k, v, mask, return_block_map=True)
    ref = attnops.block_sparse_attention(q.double(), k.double(), v.double(), mask, backend="reference")
    low = attnops.block_sparse_attention(q, k, v, mask, backend="reference")
    assert_accurate("out", out, ref, low)
    # the map comes from the float probabilities either way; only the scores' rounding differs
    torch.testing.assert_close(block_map, block_map_w, atol=1e-2, rtol=0)


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm"])
def test_bf16_products_exponential_error(avx512, products):
    """Where P is rounded to bf16 for its product, the forward's exponential is a cubic (csrc/cpu/vec.h,
    exp2_bf16p: relative error <= 1.0e-4, exactly 1 at a row's max): the row sums, and so the lse, stay within that
    of the float64 reference (the output within the accuracy rule: test_bf16_forward_matches_reference); the
    widened path keeps float32's exp2."""
    _products(avx512, products)
    q, k, v = make_qkv(1, 700, 700, 4, 2, 64, torch.bfloat16)
    _, ref_lse = _ref(q, k, v, causal=True, return_lse=True)
    _, lse = attnops.attention(q, k, v, causal=True, return_lse=True)
    assert (lse.double() - ref_lse).abs().max().item() <= 1.2e-4
    _products(avx512, "widened")
    _, lse = attnops.attention(q, k, v, causal=True, return_lse=True)
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5


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


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(20, 0))])
def test_nan_in_q_stays_in_its_row(avx512, products, kw):
    # the softmax takes the running max of 16 rows at a time (softmax_rows_to_bf16): a NaN row among them, rows
    # whose window misses a key tile and a group of fewer live rows (the causal diagonal) keep their own state
    _products(avx512, products)
    q, k, v = make_qkv(1, 330, 330, 2, 1, 40, torch.bfloat16)
    ref, low = _ref(q, k, v, **kw), attnops.attention(q, k, v, backend="reference", **kw)
    q[0, 70, 0, 3] = float("nan")
    out = attnops.attention(q, k, v, **kw)
    assert torch.isnan(out[0, 70, 0]).all()
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[0, 70, 0] = True
    assert_accurate("out", out[~bad], ref[~bad], low[~bad])


@pytest.fixture(params=list(CPU_BACKWARD_FORMS))
def backward_mode(request, avx512):
    with cpu_backward_form(request.param):
        yield request.param


def _grads(q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attnops.attention(q, k, v, **kw).backward(dout)
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm", "widened"])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D,kw", _CASES)
def test_bf16_backward_matches_reference(avx512, backward_mode, products, B, Sq, Sk, H, Hkv, D, kw):
    _products(avx512, products)
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64)
    dout = torch.randn(B, Sq, H, D, dtype=torch.float64)
    assert_op_matches_oracle(lambda q, k, v: attnops.attention(q, k, v, **kw),
                             lambda q, k, v: attnops.attention(q, k, v, backend="reference", **kw),
                             [q, k, v], dout.to(torch.bfloat16), torch.bfloat16, "cpu", ("dq", "dk", "dv"))


def test_bf16_backward_takes_the_bf16_products(avx512):
    """The switch reaches the backward: its gradients differ from the widened ones (P and dS rounded to bf16),
    and both are within the accuracy rule (above)."""
    q, k, v = make_qkv(1, 200, 200, 4, 2, 64, torch.bfloat16)
    dout = torch.randn_like(q)
    avx512._set_bf16_dot(True)
    dot = _grads(q, k, v, dout, causal=True)
    avx512._set_bf16_dot(False)
    widened = _grads(q, k, v, dout, causal=True)
    for a, b in zip(dot, widened):
        assert not torch.equal(a, b)


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm"])
@pytest.mark.parametrize("mods", ["alibi_sinks", "bias", "bool_mask"])
def test_bf16_backward_score_mods_and_bias(avx512, backward_mode, mods, products):
    """What models put around the softmax composes with the bf16 products: ALiBi and sinks (their gradient),
    an additive bias with its gradient, a boolean mask."""
    _products(avx512, products)
    B, S, H, Hkv, D = 2, 150, 4, 2, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, torch.float64)
    dout = torch.randn(B, S, H, D, dtype=torch.float64).to(torch.bfloat16)
    extra, names = [], ["dq", "dk", "dv"]
    if mods == "alibi_sinks":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        extra, names = [torch.randn(H, dtype=torch.float64)], names + ["dsinks"]

        def call(q, k, v, sinks, backend=None):
            return attnops.attention(q, k, v, causal=True, alibi_slopes=slopes, sinks=sinks, backend=backend)
    elif mods == "bias":
        extra, names = [torch.randn(1, H, S, S, dtype=torch.float64)], names + ["dbias"]

        def call(q, k, v, bias, backend=None):
            return attnops.attention(q, k, v, attn_bias=bias, backend=backend)
    else:
        keep = torch.rand(B, 1, S, S) > 0.3
        keep[..., 0] = True

        def call(q, k, v, backend=None):
            return attnops.attention(q, k, v, attn_bias=keep, backend=backend)
    assert_op_matches_oracle(call, lambda *t: call(*t, backend="reference"), [q, k, v, *extra], dout,
                             torch.bfloat16, "cpu", names)


def test_bf16_backward_nan_in_v_matches_the_float_path(avx512, backward_mode):
    """NaN in V reaches dP only through its key: the bf16 backward's NaN pattern is the float path's, and
    gradients of keys and queries that never meet the NaN stay finite."""
    q, k, v = make_qkv(1, 200, 200, 2, 2, 64, torch.bfloat16)
    v[0, 150, 1, 5] = float("nan")
    dout = torch.randn_like(q)
    avx512._set_bf16_dot(True)
    dot = _grads(q, k, v, dout, causal=True, window_size=(20, 0))
    avx512._set_bf16_dot(False)
    widened = _grads(q, k, v, dout, causal=True, window_size=(20, 0))
    for a, b in zip(dot, widened):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.isfinite(dot[0][0, :150]).all() and torch.isfinite(dot[1][0, :130]).all()
    assert torch.isnan(dot[0][0, 150:171, 1]).any()


# decode: groups of more than 16 query rows per kv head (MQA, wide GQA) with a bf16 cache multiply in bf16
@pytest.mark.parametrize("products", ["bf16_dot", "brgemm", "widened"])
@pytest.mark.parametrize("shape,kw", [
    ((2, 333, 32, 1, 128, 1), dict()),
    ((2, 190, 8, 1, 40, 3), dict(window_size=(50, 0), num_splits=3)),  # 24 rows a group, a window, splits
    ((1, 257, 24, 1, 96, 2), dict(softcap=5.0)),  # 48 rows: two panels of query columns
    ((2, 300, 32, 2, 64, 1), dict(num_splits=1)),
], ids=["mqa", "window", "softcap", "gqa16"])
def test_bf16_decode_matches_reference(avx512, products, shape, kw):
    from helpers import make_decode_inputs

    _products(avx512, products)
    q, k, v, lens = make_decode_inputs(shape, torch.bfloat16, "cpu")
    out, lse = attnops.decode_attention(q, k, v, lens, return_lse=True, **kw)
    ref_kw = {key: val for key, val in kw.items() if key != "num_splits"}
    ref, ref_lse = attnops.decode_attention(q.double(), k.double(), v.double(), lens, return_lse=True,
                                            backend="reference", **ref_kw)
    low, low_lse = attnops.decode_attention(q, k, v, lens, return_lse=True, backend="reference", **ref_kw)
    assert_accurate("out", out, ref, low)
    assert_accurate("lse", lse, ref_lse, low_lse)


def test_bf16_decode_takes_the_bf16_products_and_falls_back(avx512):
    """MQA decode's lse differs from the widened path's (the bf16 scores' own rounding), so the products ran; a
    cache whose rows are not 4-byte aligned pairs (odd row stride) takes the widened path, still accurate."""
    from helpers import make_decode_inputs

    q, k, v, lens = make_decode_inputs((2, 300, 32, 1, 64, 1), torch.bfloat16, "cpu")
    avx512._set_bf16_dot(True)
    _, lse_dot = attnops.decode_attention(q, k, v, lens, return_lse=True)
    avx512._set_bf16_dot(False)
    _, lse_widened = attnops.decode_attention(q, k, v, lens, return_lse=True)
    assert not torch.equal(lse_dot, lse_widened)
    avx512._set_bf16_dot(True)
    wide = torch.randn(2, 300, 1, 65, dtype=torch.bfloat16)
    k_odd, v_odd = wide[..., 1:], torch.randn(2, 300, 1, 65, dtype=torch.bfloat16)[..., :64]
    assert k_odd.stride(1) % 2 == 1
    out, lse = attnops.decode_attention(q, k_odd, v_odd, lens, return_lse=True)
    avx512._set_bf16_dot(False)
    out_w, lse_w = attnops.decode_attention(q, k_odd, v_odd, lens, return_lse=True)
    torch.testing.assert_close(out, out_w, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse_w, atol=0, rtol=0)


def test_bf16_decode_nan_in_v_stays_in_its_rows(avx512):
    """NaN in a cache's V reaches only the sequences and rows that see it (the float rerun of the split)."""
    avx512._set_bf16_dot(True)
    q = torch.randn(2, 2, 32, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 400, 1, 64, dtype=torch.bfloat16) for _ in range(2))
    v[0, 100, 0, 7] = float("nan")
    lens = torch.tensor([400, 400], dtype=torch.int32)
    out = attnops.decode_attention(q, k, v, lens, window_size=(200, 0), num_splits=2)
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, :, :, :7]).all()
    near = attnops.decode_attention(q, k, v, lens, window_size=(350, 0), num_splits=2)
    assert torch.isnan(near[0, :, :, 7]).all() and torch.isfinite(near[0, :, :, 8:]).all()
