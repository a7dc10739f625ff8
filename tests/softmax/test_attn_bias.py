"""attn_bias: SDPA's attn_mask on the softmax core. A float tensor is added to the scores (with its gradient,
reduced to its broadcast shape), a bool one masks and skips the key blocks it empties; both compose with
causal / window / GQA / block masks / score modifiers / block maps, on every implementation; against the
float64 reference, flash_attn's attention_ref (attn_bias argument) and torch SDPA."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.softmax import op as softmax_op
from attnops.ops.softmax import reference
from authors_ref import attention_ref
from helpers import DTYPE_IDS, compare_with_reference, make_qkv

SHAPES = [(2, 63, 63, 4, 4, 32), (1, 130, 100, 4, 2, 40), (2, 100, 150, 4, 1, 96)]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]
# the bias's shape (B, H, Sq, Sk with 1 where it broadcasts; fewer dims are leading 1s) and the call's options
CASES = {
    "full": dict(dims="BHQK"),
    "per_head_causal": dict(dims="HQK", causal=True),
    "keys_only": dict(dims="B__K"),
    "2d_window_softcap": dict(dims="QK", window_size=(25, 10), softcap=3.0),
    "bool": dict(dims="B_QK", kind="bool"),
    "bool_rows_masked_causal": dict(dims="QK", kind="bool_empty_rows", causal=True),
    "bool_per_head_keys": dict(dims="BH_K", kind="bool", causal=True),  # one row for every query: stride 0
    "bool_query_rows": dict(dims="B_Q_", kind="bool"),  # broadcast over keys: widened to (B, 1, Sq, Sk) once
}


def make_bias(spec, B, H, Sq, Sk, dtype, device):
    sizes = {"B": B, "H": H, "Q": Sq, "K": Sk, "_": 1}
    shape = tuple(sizes[c] for c in spec["dims"])
    kind = spec.get("kind", "float")
    if kind == "float":
        return (torch.randn(shape, dtype=torch.float64) * 2).to(dtype).to(device)
    keep = torch.rand(shape) > 0.4
    if kind == "bool_empty_rows":
        keep[..., 5:9, :] = False  # rows that the mask empties: zeros, lse = -inf
        keep[..., 40:, : Sk // 2] = False  # a block region with nothing: skipped
    return keep.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attn_bias_matches_reference(shape, case, dtype, impl):
    """out, lse, dq, dk, dv and (float biases) d attn_bias under the accuracy rule."""
    B, Sq, Sk, H, Hkv, D = shape
    spec = dict(CASES[case])
    bias = make_bias(spec, B, H, Sq, Sk, dtype, impl.device)
    opts = {n: spec[n] for n in ("causal", "window_size", "softcap") if n in spec}
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=impl.device)
    grads = ("dq", "dk", "dv")
    if bias.is_floating_point():
        inputs, grads = inputs + [bias], grads + ("dbias",)

    def kernel(q, k, v, *b):
        return attnops.attention(q, k, v, attn_bias=b[0] if b else bias, return_lse=True, backend=impl.backend,
                                 **opts)

    def ref(q, k, v, *b):
        return attnops.attention(q, k, v, attn_bias=b[0] if b else bias.cpu(), return_lse=True, backend="reference",
                                 **opts)

    compare_with_reference(kernel, ref, inputs, dtype, name=case, labels=grads)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_flash_attn_attention_ref(case):
    B, Sq, Sk, H, Hkv, D = 2, 50, 70, 4, 2, 24
    spec = CASES[case]
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64)
    bias = make_bias(spec, B, H, Sq, Sk, torch.float64, "cpu")
    opts = {n: spec[n] for n in ("causal", "window_size", "softcap") if n in spec}
    out, lse = attnops.attention(q, k, v, attn_bias=bias, return_lse=True, backend="reference", **opts)
    additive = bias if bias.is_floating_point() else torch.zeros(bias.shape, dtype=torch.float64).masked_fill(
        ~bias, float("-inf"))
    want, want_lse = attention_ref(q, k, v, attn_bias=additive, **opts)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_matches_sdpa_attn_mask(kind, fwd_impl):
    """SDPA's attn_mask semantics (float added, bool False masked), on rows SDPA defines (it gives NaN for
    rows the mask empties; attnops gives zeros)."""
    B, S, H, D = 2, 96, 4, 32
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float32, device=fwd_impl.device)
    mask = torch.randn(B, 1, S, S) if kind == "float" else torch.rand(B, 1, S, S) > 0.3
    out = attnops.attention(q, k, v, attn_bias=mask.to(fwd_impl.device), backend=fwd_impl.backend)
    want = torch.nn.functional.scaled_dot_product_attention(*(t.double().cpu().transpose(1, 2) for t in (q, k, v)),
                                                            attn_mask=mask if kind == "bool" else mask.double())
    torch.testing.assert_close(out.cpu().double(), want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_bool_mask_skips_the_blocks_it_empties(monkeypatch):
    """The kernels get a block mask without the key blocks where the bool mask has no True."""
    B, S, H, D = 1, 256, 2, 16
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float32)
    keep = torch.ones(S, S, dtype=torch.bool)
    keep[:, 64:192] = False  # key blocks 1 and 2 of 4 are empty for every query
    seen = {}
    original = softmax_op.dispatch.resolve

    def resolve(op, device, backend=None, api=None):
        impl = original(op, device, backend, api)

        def spy(q, k, v, block_mask, **kw):
            seen["mask"] = block_mask
            return impl(q, k, v, block_mask, **kw)
        return spy

    monkeypatch.setattr(softmax_op.dispatch, "resolve", resolve)
    out = attnops.attention(q, k, v, attn_bias=keep)
    assert seen["mask"] is not None and seen["mask"].density == pytest.approx(0.5)
    monkeypatch.undo()
    want = attnops.attention(q, k, v, attn_bias=keep, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_on_a_block_mask_and_with_maps(kind, fwd_impl):
    B, S, H, Hkv, D = 2, 150, 4, 2, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, torch.float32, device=fwd_impl.device)
    mask = BlockMask.random(S, 0.5, seed=2, batch=B, num_heads=H, block_size=32, device=fwd_impl.device)
    bias = make_bias(dict(dims="HQK", kind=kind), B, H, S, S, torch.float32, fwd_impl.device)
    got = attnops.block_sparse_attention(q, k, v, mask, attn_bias=bias, return_lse=True, return_block_map=True,
                                         backend=fwd_impl.backend)
    want = attnops.block_sparse_attention(*(t.cpu().double() for t in (q, k, v)), mask.to("cpu"),
                                          attn_bias=bias.cpu() if kind == "bool" else bias.cpu().double(),
                                          return_lse=True, return_block_map=True, backend="reference")
    for name, a, b in zip(("out", "lse", "block_map"), got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradcheck_float64():
    """Exact gradients (q, k, v and a broadcast bias) of the C++ kernels in float64, with softcap and a
    window."""
    B, Sq, Sk, H, Hkv, D = 2, 9, 13, 2, 1, 8
    q, k, v = make_qkv(B, Sq, Sk, H, Hkv, D, torch.float64, requires_grad=True)
    bias = torch.randn(B, 1, Sq, Sk, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        return attnops.attention(q, k, v, causal=True, softcap=2.0, window_size=(6, -1), attn_bias=bias,
                                 return_lse=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v, bias))


def test_moba_takes_attn_bias():
    B, S, H, D = 1, 256, 2, 32
    q, k, v = make_qkv(B, S, S, H, H, D, torch.float64)
    bias = torch.randn(H, S, S, dtype=torch.float64)
    out = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2, attn_bias=bias)
    mask = attnops.moba_block_mask(q, k, block_size=64, topk=2)
    want = reference.block_sparse_attention(q, k, v, mask, causal=True, window_size=(-1, -1), softmax_scale=D ** -0.5,
                                            attn_bias=bias.unsqueeze(0))[0]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_the_cpu_kernels_read_bool_masks_as_bytes():
    """A bool attn_bias reaches the C++ core as bool (one byte per pair, widened per tile row in the kernel);
    backends without that path get 0 / -inf floats from the op."""
    from attnops.core import dispatch
    from attnops.core.checks import bias_for

    mask = torch.rand(1, 2, 64, 64) > 0.5
    if attnops.core.backends.EXTENSION:
        assert bias_for(dispatch.resolve("block_sparse_attention", torch.device("cpu"), "cpu"), mask,
                        torch.float32) is mask
    widened = bias_for(dispatch.resolve("block_sparse_attention", torch.device("cpu"), "reference"), mask,
                       torch.float32)
    assert widened.dtype == torch.float32 and torch.equal(torch.isneginf(widened), ~mask)
