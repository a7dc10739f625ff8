"""NaN and Inf stay in the rows that attend them (README conventions), forward and backward.

A non-finite value travels only along (query, key) pairs that attend each other: a NaN in ``v[j]``
reaches the outputs of the rows that attend key ``j``; a NaN in ``k[j]`` the rows that attend ``j``
and, backward, their dq; a NaN in ``q[i]`` or ``dO[i]`` row ``i`` and the dk / dv of the keys row
``i`` attends. A tile product over a key range that a row does not attend multiplies masked zeros by
the values (``0 * NaN = NaN``); these tests catch that, on every implementation, for dense, windowed,
block-sparse (LUT) and routed attention and for decoding. The float64 reference follows the same
convention (its own test below), so NaN patterns compare exactly.
"""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.decode import reference as decode_reference
from attnops.ops.softmax import reference

B, S, H, HKV, D = 1, 150, 4, 2, 40
SCALE = D ** -0.5

# (name, op kwargs builder): masks whose rows attend different key ranges inside one tile
MASKS = {
    "causal": lambda: dict(causal=True),
    "window": lambda: dict(window_size=(10, 10)),
    "sliding_window_lut": lambda: dict(block_mask=BlockMask.sliding_window(S, 40, block_size=16)),
    "random_lut_causal": lambda: dict(block_mask=BlockMask.random(S, 0.5, seed=3, num_heads=H, causal=True,
                                                                  block_size=32)),
}

# where the non-finite value goes: (tensor, index (b, s, h, d), value)
POISON = {
    "nan_v": ("v", (0, 70, 0, 3), float("nan")),
    "inf_v": ("v", (0, 70, 1, 5), float("inf")),
    "nan_k": ("k", (0, 70, 1, 5), float("nan")),
    "nan_q": ("q", (0, 90, 2, 7), float("nan")),
    "nan_dout": ("dout", (0, 40, 3, 1), float("nan")),
}


def _allowed(opts):
    mask = opts.get("block_mask")
    if mask is not None:
        return reference.token_mask(S, S, mask, mask.causal, mask.window_size)
    return reference.token_mask(S, S, None, opts.get("causal", False), opts.get("window_size", (-1, -1)))


def _run(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach()] + [g.detach() for g in grads]


def _compare(label, got, want):
    """Same non-finite pattern (NaN and Inf alike: Inf * 0-weight sums may turn NaN), finite values
    accurate."""
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    assert torch.equal(bad_got, bad_want), (
        f"{label}: non-finite at {int(bad_got.sum())} places, the reference at {int(bad_want.sum())} "
        f"({int((bad_got & ~bad_want).sum())} leaked, {int((bad_want & ~bad_got).sum())} missing)")
    err = (got.double() - want)[~bad_want].abs().max().item() if (~bad_want).any() else 0.0
    assert err < 2e-5, f"{label}: finite values off by {err:.2e}"
    return int(bad_want.sum())


@pytest.mark.parametrize("poison", list(POISON))
@pytest.mark.parametrize("mask", list(MASKS))
def test_nonfinite_stays_in_the_rows_that_attend_it(mask, poison, impl):
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D)
    k, v = torch.randn(B, S, HKV, D), torch.randn(B, S, HKV, D)
    dout = torch.randn(B, S, H, D)
    tensors = dict(q=q, k=k, v=v, dout=dout)
    name, index, value = POISON[poison]
    tensors[name][index] = value
    opts = MASKS[mask]()
    allowed = _allowed(opts)

    def kernel(q, k, v):
        if "block_mask" in opts:
            return attnops.block_sparse_attention(q, k, v, opts["block_mask"].to(impl.device), backend=impl.backend)
        return attnops.attention(q, k, v, backend=impl.backend, **opts)

    def ref(q, k, v):
        return reference.masked_attention(q, k, v, allowed, SCALE)[0]

    dev = impl.device
    got = _run(kernel, [t.to(dev) for t in (q, k, v)], dout.to(dev))
    want = _run(ref, [t.double() for t in (q, k, v)], dout.double())
    poisoned = [_compare(f"{label} ({mask}, {poison})", a.cpu(), b)
                for label, a, b in zip(("out", "dq", "dk", "dv"), got, want)]
    assert sum(poisoned) > 0 and min(poisoned) < S * H * D  # something, but not everything, is non-finite


@pytest.mark.parametrize("poison", ["nan_k", "nan_q", "nan_dout", "nan_v"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nonfinite_under_the_wide_backward_tiles(causal, poison):
    """1100 tokens: the C++ backward's 256- and 128-key tiles (backward_tiles) with its exact path (NaN in q, k or
    dO: products over each row's own span) and its tile products (NaN in v), against the reference."""
    n = 1100
    torch.manual_seed(0)
    tensors = dict(q=torch.randn(1, n, 2, D), k=torch.randn(1, n, 1, D), v=torch.randn(1, n, 1, D),
                   dout=torch.randn(1, n, 2, D))
    name, (b, s, h, d), value = POISON[poison]
    tensors[name][b, s * 7, min(h, tensors[name].shape[2] - 1), d] = value
    allowed = reference.token_mask(n, n, None, causal, (-1, -1))
    qkv = [tensors[x] for x in ("q", "k", "v")]
    got = _run(lambda q, k, v: attnops.attention(q, k, v, causal=causal, backend="cpu"), qkv, tensors["dout"])
    want = _run(lambda q, k, v: reference.masked_attention(q, k, v, allowed, SCALE)[0], [t.double() for t in qkv],
                tensors["dout"].double())
    poisoned = [_compare(f"{label} ({poison})", a, b) for label, a, b in zip(("out", "dq", "dk", "dv"), got, want)]
    assert sum(poisoned) > 0


@pytest.mark.parametrize("causal", [True, False])
def test_moba_nonfinite_stays_in_its_rows(causal, fwd_impl):
    """Causal: the own block's diagonal tile masks the later keys of the block (key 60 for queries
    0..59). Non-causal MoBA masks nothing inside the tiles it computes: a control."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 512, 2, 32) for _ in range(3))
    v[0, 60, 1, 4] = float("nan")
    out = attnops.moba_attention(q.to(fwd_impl.device), k.to(fwd_impl.device), v.to(fwd_impl.device),
                                 routing="tile", block_size=64, topk=2, causal=causal, backend=fwd_impl.backend).cpu()
    allowed = reference.token_mask(512, 512, attnops.moba_block_mask(q, k, block_size=64, topk=2, causal=causal), causal)
    want = reference.masked_attention(q.double(), k.double(), v.double(), allowed, 32 ** -0.5)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert int(torch.isnan(want).sum()) < 512  # rows that do not attend key 60 exist
    assert int(torch.isnan(out).sum()) > 0


@pytest.mark.parametrize("shape", [(4, 4, 1), (8, 1, 3), (16, 2, 4)], ids=["MHA-1", "MQA-3", "GQA8-4"])
@pytest.mark.parametrize("window", [(-1, -1), (50, 0)])
def test_decode_nonfinite_stays_in_its_rows(shape, window, fwd_impl):
    H, Hkv, Sq = shape
    torch.manual_seed(2)
    Bd, Smax = 2, 300
    q = torch.randn(Bd, Sq, H, D)
    k, v = torch.randn(Bd, Smax, Hkv, D), torch.randn(Bd, Smax, Hkv, D)
    lens = torch.tensor([250, 300])
    v[0, 249, 0, 3] = float("nan")  # the newest token of sequence 0: the earlier new rows do not attend it
    v[1, 10, 0, 5] = float("nan")  # outside the window
    v[0, 280, 0, 1] = float("nan")  # past sequence 0's length
    dev = fwd_impl.device
    out = attnops.decode_attention(q.to(dev), k.to(dev), v.to(dev), lens.to(dev), window_size=window,
                                   backend=fwd_impl.backend).cpu()
    want = decode_reference.decode_attention(q.double(), k.double(), v.double(), lens, None, window_size=window,
                                      softmax_scale=SCALE)[0]
    _compare(f"decode {shape} {window}", out, want)


def test_reference_follows_the_convention():
    """The oracle itself, against the mask: NaN exactly in the rows (and gradients) that attend it."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 8, dtype=torch.float64) for _ in range(3))
    allowed = reference.token_mask(40, 40, None, False, (5, 3))
    v[0, 20, 1, 2] = float("nan")
    k[0, 30, 0, 1] = float("nan")
    q = q.requires_grad_(True)
    k = k.requires_grad_(True)
    out, _ = reference.masked_attention(q, k, v, allowed, 0.3)
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    sees = allowed[0, 0]  # (Sq, Sk)
    rows_v = sees[:, 20]
    rows_k = sees[:, 30]
    assert torch.equal(torch.isnan(out[0, :, 1, 2]), rows_v)  # head 1: v's NaN, in one channel
    assert torch.equal(torch.isnan(out[0, :, 0]).all(-1), rows_k)  # head 0: k's NaN spoils whole rows
    assert torch.equal(torch.isnan(dq[0, :, 0, 0]), rows_k)
    # head 0's NaN rows spoil dS on every key they attend, hence those keys' dk, and no other
    assert torch.equal(torch.isnan(dk[0, :, 0]).any(-1), (rows_k.unsqueeze(1) & sees).any(0))


def test_finite_inputs_do_not_take_the_exact_path_wrongly():
    """Inputs with an Inf whose rows all attend it: every output of those rows is non-finite and the
    others equal the run without it (the exact path recomputes whole tasks)."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 100, 2, 16) for _ in range(3))
    clean = attnops.attention(q, k, v, causal=True)
    v2 = v.clone()
    v2[0, 99, 0, 0] = float("inf")  # only the last row attends key 99
    out = attnops.attention(q, k, v2, causal=True)
    assert not torch.isfinite(out[0, 99, 0, 0])
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 99, 0, 0] = False
    torch.testing.assert_close(out[keep], clean[keep], rtol=1e-6, atol=1e-6)
