"""attention's decode-shaped calls (a few queries against the keys: a decoding step through ``attnops.attention``,
as Hugging Face's ``generate`` makes it) run on the C++ decode kernel (``ops/softmax/op.py: runs_as_decode``):
which calls are routed, which stay on the tile kernel, and that a routed call is the decode kernel's result and
meets the accuracy rule against the float64 reference, with every modifier the route takes."""

import pytest
import torch

import attnops
from attnops import dispatch
from attnops.ops.softmax import reference
from helpers import DTYPE_IDS, assert_accurate

pytestmark = pytest.mark.skipif(not dispatch.is_available("cpu"), reason="needs the C++ extension")


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the calls that reach the C++ decode backend."""
    calls = []
    impls = dispatch._IMPLS["decode_attention"]
    inner = impls["cpu"]

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return inner(*args, **kwargs)

    monkeypatch.setitem(impls, "cpu", counted)
    return calls


def _inputs(B, Sq, Sk, H, Hkv, D, dtype, hf_layout):
    """q, k, v in flash_attn's layout; ``hf_layout``: views of (B, H, S, D) tensors, as the Hugging Face adapter
    passes its cache (no copy)."""
    if hf_layout:
        return (torch.randn(B, h, n, D, dtype=dtype).transpose(1, 2) for n, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    return (torch.randn(B, n, h, D, dtype=dtype) for n, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))


# (B, Sq, Sk, H, Hkv, D, causal, hf_layout): one query (causal or not: the same keys), MHA / GQA / MQA, a few causal
# queries up to 8 rows per kv head, head dims 40 and 96, an empty-ish cache (Sk = Sq)
ROUTED = [
    (1, 1, 333, 4, 4, 64, False, False),
    (2, 1, 200, 8, 2, 40, True, True),
    (1, 1, 130, 32, 1, 96, True, True),
    (2, 2, 150, 8, 2, 64, True, False),
    (1, 8, 77, 4, 4, 32, True, True),
    (1, 3, 3, 2, 2, 16, True, False),
]
MODS = {
    "plain": dict(),
    "window": dict(window_size=(50, 7)),
    "all": dict(softcap=3.0, alibi=True, sinks=True, window_size=(60, -1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("shape", ROUTED, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-causal{}-hf{}".format(*s))
def test_decode_shaped_calls_run_on_the_decode_kernel(shape, mods, dtype, decode_calls):
    B, Sq, Sk, H, Hkv, D, causal, hf = shape
    q, k, v = _inputs(B, Sq, Sk, H, Hkv, D, dtype, hf)
    kw = dict(MODS[mods])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H).to(dtype)
    out, lse = attnops.attention(q, k, v, causal=causal, return_lse=True, **kw)
    assert len(decode_calls) == 1
    # the decode op on the full cache gives the same bits: the call ran there
    lens = torch.full((B,), Sk, dtype=torch.int32)
    window = kw.pop("window_size", (-1, -1))
    dec, dec_lse = attnops.decode_attention(q, k, v, lens, window_size=(window[0], 0), return_lse=True, **kw)
    assert torch.equal(out, dec) and torch.equal(lse, dec_lse)
    ref_kw = dict(kw, causal=causal, window_size=window, softmax_scale=D ** -0.5)
    wide = {n: (t.double() if isinstance(t, torch.Tensor) and n == "sinks" else t) for n, t in ref_kw.items()}
    out64, lse64 = reference.block_sparse_attention(q.double(), k.double(), v.double(), None, **wide)
    outT, lseT = reference.block_sparse_attention(q, k, v, None, **ref_kw)
    assert_accurate("out", out, out64, outT)
    assert_accurate("lse", lse, lse64, lseT)


def test_nan_in_one_head_stays_there(decode_calls):
    q, k, v = _inputs(1, 1, 100, 4, 4, 32, torch.float32, True)
    k[0, 17, 2, 5] = float("nan")
    out = attnops.attention(q, k, v, causal=True)
    assert len(decode_calls) == 1
    assert torch.isnan(out[0, 0, 2]).all() and torch.isfinite(out[0, 0, [0, 1, 3]]).all()


def _stays_on_tile(decode_calls, q, k, v, **kw):
    out = attnops.attention(q, k, v, **kw)
    assert not decode_calls, f"routed to the decode kernel: {kw}"
    return out


def test_calls_the_decode_kernel_cannot_run_stay_on_the_tile_kernel(decode_calls):
    q, k, v = _inputs(1, 1, 90, 4, 2, 32, torch.float32, False)
    _stays_on_tile(decode_calls, q, k, v, attn_bias=torch.randn(1, 4, 1, 90))
    _stays_on_tile(decode_calls, q, k, v, attn_bias=torch.rand(1, 1, 1, 90) > 0.3)
    _stays_on_tile(decode_calls, q, k, v, dropout_p=0.2)
    _stays_on_tile(decode_calls, q, k, v, return_block_map=True)
    _stays_on_tile(decode_calls, q, k, v, backend="reference")
    q1, k1, v1 = _inputs(1, 1, 1, 4, 2, 32, torch.float32, False)
    _stays_on_tile(decode_calls, q1, k1, v1, document_ids=torch.zeros(1, dtype=torch.long))
    # more rows per kv head than DECODE_ROWS, several queries without causality, more queries than keys
    for shape, causal in (((1, 5, 90, 4, 2, 32), True), ((1, 2, 90, 4, 4, 32), False), ((1, 9, 90, 4, 4, 32), True),
                          ((1, 6, 4, 4, 4, 32), True)):
        _stays_on_tile(decode_calls, *_inputs(*shape, torch.float32, False), causal=causal)


def test_calls_that_need_a_gradient_stay_on_the_tile_kernel(decode_calls):
    q, k, v = _inputs(1, 1, 90, 4, 2, 32, torch.float32, False)
    for t in (q, k, v):
        t.requires_grad_(True)
        out = _stays_on_tile(decode_calls, q, k, v, causal=True)
        g, = torch.autograd.grad(out.sum(), t)
        assert torch.isfinite(g).all()
        t.requires_grad_(False)
    sinks = torch.randn(4, requires_grad=True)
    out = _stays_on_tile(decode_calls, q, k, v, sinks=sinks)
    assert out.requires_grad
    with torch.no_grad():  # no graph: the decode kernel again
        attnops.attention(q, k, v, sinks=sinks)
    assert len(decode_calls) == 1
