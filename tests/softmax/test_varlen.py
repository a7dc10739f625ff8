"""Packed sequences on the softmax core: ``varlen_attention`` (flash_attn's cu_seqlens layout) and
``document_ids`` (packed documents in the batched layout). Token-exact segment bounds in the kernels
(C++ both backward algorithms, Triton), forward and backward, checked sequence by sequence against the
float64 oracle run on each sequence alone (and flash_attn's attention_ref), on lengths off the block grid,
empty sequences, GQA / MQA, causal / window per sequence, block masks, score modifiers and block maps."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core.segments import from_cu_seqlens, from_document_ids
from attnops.ops.softmax import reference
from authors_ref import attention_ref
from helpers import DTYPE_IDS, assert_accurate

# (lengths of q's sequences, of k's, H, Hkv, D): self-attention packing with lengths around the 64 grid
# and an empty sequence; cross lengths (Lq != Lk, causal aligns each sequence's bottom-right corner).
LAYOUTS = {
    "self-H4-Hkv2-D40": ([1, 2, 63, 64, 65, 0, 300, 17], None, 4, 2, 40),
    "cross-H6-Hkv1-D96": ([5, 0, 64, 65, 1, 40, 3], [3, 7, 70, 64, 0, 129, 3], 6, 1, 96),
    "self-H2-Hkv1-D320": ([33, 0, 70, 1], None, 2, 1, 320),
}
CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(20, 5)),
    "causal_window_softcap_sinks": dict(causal=True, window_size=(16, 0), softcap=2.0, sinks=True),
    # ALiBi's distance is each sequence's own |a + Lk - Lq - b|: the cross layout's sequences differ in Lk - Lq
    "alibi": dict(alibi=True),
    "causal_window_softcap_alibi": dict(causal=True, window_size=(30, 0), softcap=3.0, alibi=True),
}


def cu(lengths):
    return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)


def per_sequence(q, k, v, cu_q, cu_k, opts, dtype_like):
    """out (total_q, H, D), lse (H, total_q): the oracle run on each sequence alone (B = 1)."""
    outs, lses = [], []
    for s in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        o, lse = reference.block_sparse_attention(q[None, a:b], k[None, c:d], v[None, c:d], None,
                                                  causal=opts.get("causal", False),
                                                  window_size=opts.get("window_size", (-1, -1)),
                                                  softmax_scale=q.shape[-1] ** -0.5, softcap=opts.get("softcap", 0.0),
                                                  sinks=opts.get("sinks"), alibi_slopes=opts.get("alibi_slopes"))
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1).to(dtype_like)


def grads_of(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*inputs)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_varlen_matches_each_sequence_alone(layout, case, impl):
    """out, lse, dq, dk, dv (and dsinks) of the packed call against the oracle on every sequence alone."""
    lens_q, lens_k, H, Hkv, D = LAYOUTS[layout]
    lens_k = lens_k or lens_q
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    torch.manual_seed(0)
    dtype = torch.float32
    q = torch.randn(int(cu_q[-1]), H, D, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, dtype=dtype)
    opts = dict(CASES[case])
    inputs = [q, k, v]
    if opts.pop("sinks", False):
        inputs.append(torch.randn(H, dtype=dtype))
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(H) * 0.5

    def kernel(q, k, v, *sinks):
        extra = {n: t.to(impl.device) if isinstance(t, torch.Tensor) else t for n, t in opts.items()}
        return attnops.varlen_attention(q.to(impl.device), k.to(impl.device), v.to(impl.device), cu_q.to(impl.device),
                                        cu_k.to(impl.device), max(lens_q), max(lens_k), return_lse=True,
                                        backend=impl.backend, **extra, **({"sinks": sinks[0]} if sinks else {}))

    def ref(q, k, v, *sinks):
        return per_sequence(q, k, v, cu_q, cu_k, {**opts, **({"sinks": sinks[0]} if sinks else {})}, torch.float32)

    dout = torch.randn(q.shape, dtype=torch.float64)
    got = grads_of(kernel, inputs, dout)
    want64 = grads_of(ref, [t.double() for t in inputs], dout)
    want32 = grads_of(ref, inputs, dout)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want64, want32):
        assert_accurate(f"{layout} {case} {name}", a.cpu(), b, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_varlen_half_precision_and_authors_reference(dtype, fwd_impl):
    """bf16 / f16 under the accuracy rule; the float64 result equals flash_attn's attention_ref on each sequence."""
    lens_q, lens_k, H, Hkv, D = LAYOUTS["cross-H6-Hkv1-D96"]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    torch.manual_seed(1)
    q = torch.randn(int(cu_q[-1]), H, D).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D).to(dtype)
    out, lse = attnops.varlen_attention(*(t.to(fwd_impl.device) for t in (q, k, v, cu_q, cu_k)), None, None,
                                        causal=True, return_lse=True, backend=fwd_impl.backend)
    out64, lse64 = per_sequence(q.double(), k.double(), v.double(), cu_q, cu_k, dict(causal=True), torch.float64)
    outT, lseT = per_sequence(q, k, v, cu_q, cu_k, dict(causal=True), torch.float32)
    assert_accurate("out", out.cpu(), out64, outT)
    assert_accurate("lse", lse.cpu(), lse64, lseT)
    for s in range(len(lens_q)):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if a == b:
            continue
        theirs = attention_ref(q[None, a:b].double(), k[None, c:d].double(), v[None, c:d].double(), causal=True)
        torch.testing.assert_close(out64[a:b], theirs[0][0], atol=1e-10, rtol=0)


def test_varlen_block_mask_map_and_other_sequences_zero(fwd_impl):
    """A block mask over the packed layout composes with the sequences; the block map equals the oracle's
    (over the packed layout) and blocks that pair two sequences are exactly 0."""
    lens = [70, 33, 100, 52]
    cu_q = cu(lens)
    T, H, D = int(cu_q[-1]), 2, 32
    torch.manual_seed(2)
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    mask = BlockMask.from_dense(torch.rand(1, 1, -(-T // 32), -(-T // 32)) > 0.3, (T, T), 32)
    res = attnops.varlen_attention(*(t.to(fwd_impl.device) for t in (q, k, v, cu_q, cu_q)), 100, 100, causal=True,
                                   block_mask=mask, return_lse=True, return_block_map=True, map_block_size=16,
                                   backend=fwd_impl.backend)
    seg = from_cu_seqlens(cu_q, cu_q, T, T, True, (-1, -1))
    ref_out, ref_lse, ref_map = reference.block_sparse_attention(
        q[None].double(), k[None].double(), v[None].double(), mask, causal=False, window_size=(-1, -1),
        softmax_scale=D ** -0.5, block_map=_request(16), segments=seg)
    torch.testing.assert_close(res.out.cpu().double(), ref_out[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(res.block_map.cpu().double(), ref_map[0], atol=2e-5, rtol=0)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    first, last = doc[::16], doc[torch.arange(15, T + 15, 16).clamp(max=T - 1)]
    apart = (last[:, None] < first[None, :]) | (first[:, None] > last[None, :])  # no shared sequence
    assert bool((res.block_map.cpu()[:, apart] == 0).all())


def test_varlen_alibi_map_and_max_scores_across_layouts(fwd_impl):
    """ALiBi with cu_seqlens_q != cu_seqlens_k (the kernels take each query's own offset, cu_k[s+1] - cu_q[s+1]): the
    block map and each row's largest score equal the packed float64 oracle's, whose output is pinned to the oracle
    run on every sequence alone."""
    lens_q, lens_k = [5, 64, 0, 70, 33, 1], [90, 40, 7, 70, 100, 3]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    Tq, Tk, H, D = int(cu_q[-1]), int(cu_k[-1]), 2, 32
    torch.manual_seed(5)
    q, k, v = torch.randn(Tq, H, D), torch.randn(Tk, H, D), torch.randn(Tk, H, D)
    slopes = torch.tensor([0.4, 0.05])
    res = attnops.varlen_attention(*(t.to(fwd_impl.device) for t in (q, k, v, cu_q, cu_k)), None, None, causal=True,
                                   alibi_slopes=slopes.to(fwd_impl.device), return_block_map=True, map_block_size=16,
                                   return_max_scores=True, backend=fwd_impl.backend)
    seg = from_cu_seqlens(cu_q, cu_k, Tq, Tk, True, (-1, -1), alibi=True)
    assert seg.alibi_offsets is not None
    out64, _, map64, max64 = reference.block_sparse_attention(
        q[None].double(), k[None].double(), v[None].double(), None, causal=False, window_size=(-1, -1),
        softmax_scale=D ** -0.5, block_map=_request(16), alibi_slopes=slopes, segments=seg, max_scores=True)
    alone, _ = per_sequence(q.double(), k.double(), v.double(), cu_q, cu_k, dict(causal=True, alibi_slopes=slopes),
                            torch.float64)
    torch.testing.assert_close(out64[0], alone, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.out.cpu().double(), alone, atol=2e-5, rtol=0)
    torch.testing.assert_close(res.block_map.cpu().double(), map64[0], atol=2e-5, rtol=0)
    seen = torch.isfinite(max64[0])
    assert torch.equal(torch.isfinite(res.max_scores.cpu()), seen)
    torch.testing.assert_close(res.max_scores.cpu().double()[seen], max64[0][seen], atol=2e-5, rtol=1e-5)


def test_nonfinite_values_stay_in_their_sequence(fwd_impl):
    """NaN in one sequence's keys and values reaches that sequence's rows only."""
    cu_q = cu([40, 70, 30])
    torch.manual_seed(4)
    q, k, v = (torch.randn(140, 2, 32) for _ in range(3))
    clean = attnops.varlen_attention(*(t.to(fwd_impl.device) for t in (q, k, v, cu_q, cu_q)), 70, 70,
                                     backend=fwd_impl.backend).cpu()
    k[45], v[50] = float("nan"), float("inf")
    dirty = attnops.varlen_attention(*(t.to(fwd_impl.device) for t in (q, k, v, cu_q, cu_q)), 70, 70,
                                     backend=fwd_impl.backend).cpu()
    assert torch.equal(dirty[:40], clean[:40]) and torch.equal(dirty[110:], clean[110:])
    assert bool(dirty[40:110].isnan().any())


def _request(block):
    from attnops.core.block_map import MapRequest
    return MapRequest(block, block, "mean")


DOC_CASES = {
    "plain": dict(),
    "causal_window_alibi": dict(causal=True, window_size=(24, 0), alibi=True),
    "sliding_block_mask": dict(block_mask=True),
}


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_document_ids_match_each_document_alone(case, impl):
    """Packed rows of the batched layout (a different packing per batch row, boundaries off the block
    grid): every document's rows equal the document run alone, forward and backward."""
    B, S, H, Hkv, D = 2, 150, 4, 2, 40
    packings = [[1, 63, 64, 22], [100, 50]]
    ids = torch.stack([torch.repeat_interleave(torch.arange(len(p)), torch.tensor(p)) for p in packings])
    torch.manual_seed(3)
    q = torch.randn(B, S, H, D)
    k, v = torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    spec = DOC_CASES[case]
    opts = {n: spec[n] for n in ("causal", "window_size") if n in spec}
    if spec.get("alibi"):
        opts["alibi_slopes"] = torch.rand(H) * 0.3
    dout = torch.randn(q.shape, dtype=torch.float64)

    def packed(q, k, v):
        dev = impl.device
        extra = {n: t.to(dev) if isinstance(t, torch.Tensor) else t for n, t in opts.items()}
        if spec.get("block_mask"):
            mask = BlockMask.sliding_window(S, window=40, block_size=32).to(dev)
            return attnops.block_sparse_attention(q.to(dev), k.to(dev), v.to(dev), mask, document_ids=ids.to(dev),
                                                  return_lse=True, backend=impl.backend, **extra)
        return attnops.attention(q.to(dev), k.to(dev), v.to(dev), document_ids=ids.to(dev), return_lse=True,
                                 backend=impl.backend, **extra)

    def alone(q, k, v):
        outs, lses = torch.empty_like(q), torch.empty(B, H, S, dtype=torch.float32 if q.dtype != torch.float64
                                                          else torch.float64)
        for b, p in enumerate(packings):
            start = 0
            for n in p:
                sl = slice(start, start + n)
                # the token-exact causal window of 40 keys is the same in the document's own coordinates
                own = dict(causal=True, window_size=(39, 0)) if spec.get("block_mask") else opts
                o, lse = attnops.attention(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], return_lse=True,
                                           backend="reference", **own)
                outs[b:b + 1, sl], lses[b:b + 1, :, sl] = o, lse
                start += n
        return outs, lses

    got = grads_of(packed, [q, k, v], dout)
    want64 = grads_of(alone, [q.double(), k.double(), v.double()], dout)
    want32 = grads_of(alone, [q, k, v], dout)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want32):
        assert_accurate(f"documents {case} {name}", a.cpu(), b, c)


def test_segment_bounds_transpose_and_document_runs():
    """The bounds builders: per-key intervals are the transpose of per-query ones (checked against the
    dense mask), and document runs of the batched layout."""
    cu_q, cu_k = cu([5, 0, 64, 65, 1, 3]), cu([3, 7, 70, 64, 0, 9])
    for causal, window in [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 2)), (True, (10, 0))]:
        seg = from_cu_seqlens(cu_q, cu_k, int(cu_q[-1]), int(cu_k[-1]), causal, window)
        dense = seg.token_mask(int(cu_k[-1]))[0, 0]
        j_lo, j_hi = seg.query_bounds[0, :, 0], seg.query_bounds[0, :, 1]
        i = torch.arange(dense.shape[0])[:, None]
        assert torch.equal(dense.T, (i.T >= j_lo[:, None]) & (i.T < j_hi[:, None]))
    ids = torch.tensor([[7, 7, 3, 3, 3, 9], [0, 1, 1, 1, 1, 2]])
    seg = from_document_ids(ids, 2, 6, "cpu")
    assert seg.key_bounds[0].tolist() == [[0, 2], [0, 2], [2, 5], [2, 5], [2, 5], [5, 6]]
    assert seg.key_bounds[1].tolist() == [[0, 1], [1, 5], [1, 5], [1, 5], [1, 5], [5, 6]]


def test_packed_inputs_are_refused_when_malformed():
    q = torch.randn(10, 2, 16)
    good = cu([4, 6])
    call = attnops.varlen_attention
    with pytest.raises(ValueError, match="int32"):
        call(q, q, q, good.long(), good, 6, 6)
    with pytest.raises(ValueError, match="start at 0"):
        call(q, q, q, torch.tensor([1, 4, 10], dtype=torch.int32), good, 6, 6)
    with pytest.raises(ValueError, match="end at the total"):
        call(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), good, 6, 6)
    with pytest.raises(ValueError, match="nondecreasing"):
        call(q, q, q, torch.tensor([0, 7, 4, 10], dtype=torch.int32), cu([7, 0, 3]), 7, 7)
    with pytest.raises(ValueError, match="max_seqlen"):
        call(q, q, q, good, good, 5, 6)
    with pytest.raises(ValueError, match="same sequences"):
        call(q, q, q, good, cu([4, 6, 0]), 6, 6)
    with pytest.raises(ValueError, match="3 dimensions"):
        call(q[None], q[None], q[None], good, good, 6, 6)
    with pytest.raises(ValueError, match="block_mask"):
        call(q, q, q, good, good, 6, 6, block_mask=BlockMask.causal(10, 16))
    x = torch.randn(2, 6, 2, 16)
    with pytest.raises(ValueError, match="contiguous run"):
        attnops.attention(x, x, x, document_ids=torch.tensor([0, 0, 1, 1, 0, 0]))
    with pytest.raises(ValueError, match="document_ids must be"):
        attnops.attention(x, x, x, document_ids=torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        attnops.attention(x, x, x, document_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="Sq == Sk"):
        attnops.attention(x, x[:, :5], x[:, :5], document_ids=torch.zeros(6, dtype=torch.long))


def test_compiles_fullgraph_without_guards_on_the_lengths():
    """torch.compile(fullgraph=True): the bounds are built from tensors (no data-dependent Python branch); the
    value checks of cu_seqlens / document_ids run eagerly only."""
    torch.manual_seed(5)
    x = torch.randn(100, 4, 32)
    cu_q = torch.tensor([0, 30, 100], dtype=torch.int32)
    packed = torch.compile(lambda x, c: attnops.varlen_attention(x, x, x, c, c, 70, 70, causal=True), fullgraph=True)
    torch.testing.assert_close(packed(x, cu_q), attnops.varlen_attention(x, x, x, cu_q, cu_q, 70, 70, causal=True))
    ids = torch.cat([torch.zeros(40), torch.ones(60)]).long()[None]
    docs = torch.compile(lambda x, d: attnops.attention(x, x, x, causal=True, document_ids=d), fullgraph=True)
    torch.testing.assert_close(docs(x[None], ids), attnops.attention(x[None], x[None], x[None], causal=True,
                                                                     document_ids=ids))
    # ALiBi across different layouts: the per-query offsets are tensor arithmetic too
    kv, cu_k, slopes = torch.randn(120, 4, 32), torch.tensor([0, 50, 120], dtype=torch.int32), torch.rand(4)
    alibi = torch.compile(lambda x, kv, c, ck: attnops.varlen_attention(x, kv, kv, c, ck, 70, 70, causal=True,
                                                                        alibi_slopes=slopes), fullgraph=True)
    torch.testing.assert_close(alibi(x, kv, cu_q, cu_k), attnops.varlen_attention(x, kv, kv, cu_q, cu_k, 70, 70,
                                                                                  causal=True, alibi_slopes=slopes))


def test_contiguous_key_padding_runs_as_bounds(monkeypatch, impl):
    """A bool key mask whose kept keys are one run per row (right, left, both-sided padding, a row with no key)
    runs as segment bounds (no bias read, padded tiles skipped): outputs and gradients as the float64 oracle
    with the mask as an additive bias; a mask with holes stays a bias and gives the same."""
    from attnops.core.checks import additive_mask
    from attnops.ops.softmax import op as softmax_op

    used = []
    real = softmax_op.from_key_mask
    monkeypatch.setattr(softmax_op, "from_key_mask", lambda *a: used.append(real(*a)) or used[-1])
    B, S, H, D = 4, 100, 2, 32
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 70:] = False  # right
    keep[1, :33] = False  # left
    keep[2, :5] = keep[2, 90:] = False  # both
    keep[3] = False  # nothing: zeros, lse -inf
    holes = keep.clone()
    holes[0, 10:20] = False
    torch.manual_seed(8)
    inputs = [torch.randn(B, S, H, D) for _ in range(3)]
    dout = torch.randn(B, S, H, D, dtype=torch.float64)
    for mask, as_bounds in ((keep, True), (holes, False)):
        used.clear()

        def ours(q, k, v):
            return attnops.attention(q.to(impl.device), k.to(impl.device), v.to(impl.device), causal=True,
                                     attn_bias=mask[:, None, None, :].to(impl.device), return_lse=True,
                                     backend=impl.backend)

        def theirs(q, k, v):  # the float64 oracle with the mask as an additive bias (no segment bounds)
            return reference.block_sparse_attention(q, k, v, None, causal=True, window_size=(-1, -1),
                                                    softmax_scale=D ** -0.5,
                                                    attn_bias=additive_mask(mask[:, None, None, :], q.dtype))

        got = grads_of(ours, inputs, dout)
        want64 = grads_of(theirs, [t.double() for t in inputs], dout)
        want32 = grads_of(theirs, inputs, dout)
        assert (used[-1] is not None) == as_bounds
        for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want32):
            assert_accurate(f"key mask {name}", a.cpu(), b, c)
        assert bool(torch.isneginf(got[1][3]).all()) and bool((got[0][3] == 0).all())


def test_varlen_and_documents_with_dropout_match_reference(impl):
    """Dropout inside packed sequences: the kernels and the float64 oracle (given the same seed, so the same
    hash mask over the packed positions) agree on out, lse, dq, dk, dv; with document_ids likewise."""
    from helpers import compare_with_reference

    cu_q = cu([33, 0, 70, 1])
    torch.manual_seed(10)
    inputs = [torch.randn(104, 4, 32, device=impl.device), torch.randn(104, 2, 32, device=impl.device),
              torch.randn(104, 2, 32, device=impl.device)]

    def packed(backend, q, k, v):
        gen = torch.Generator(device=q.device).manual_seed(99)
        c = cu_q.to(q.device)
        return attnops.varlen_attention(q, k, v, c, c, 70, 70, causal=True, dropout_p=0.3, generator=gen,
                                        return_lse=True, backend=backend)

    compare_with_reference(lambda *t: packed(impl.backend, *t), lambda *t: packed("reference", *t), inputs,
                           torch.float32, name="varlen dropout")
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 1, 63]))

    def documents(backend, q, k, v):
        gen = torch.Generator(device=q.device).manual_seed(98)
        out, lse = attnops.attention(q[None], k[None], v[None], causal=True, document_ids=ids.to(q.device),
                                     dropout_p=0.3, generator=gen, return_lse=True, backend=backend)
        return out[0], lse[0]

    compare_with_reference(lambda *t: documents(impl.backend, *t), lambda *t: documents("reference", *t), inputs,
                           torch.float32, name="documents dropout")
