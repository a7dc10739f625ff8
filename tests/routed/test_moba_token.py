"""Token-routed MoBA (the default ``routing="token"``) against MoonshotAI/MoBA's ``moba_attn_varlen_naive``: the same
routing, ties included, and the same attention (forward and gradients under the accuracy rule against a float64
oracle with their selection), over block sizes that are not multiples of 64, packed sequences, GQA and every
backend; what it refuses; and the needle case the tile routing misses."""

import itertools

import pytest
import torch

import attnops
from attnops.ops.routed.token import block_gates, block_means, route_tokens
from attnops.ops.softmax.reference import masked_attention
from authors_ref import moba_attn_varlen_naive
from helpers import DTYPE_IDS, assert_accurate, output_and_grads

# (sequence lengths, H, Hkv, D, block, topk)
CASES = [((300, 1, 399), 4, 2, 40, 50, 3), ((700,), 2, 2, 96, 100, 10), ((257, 130), 3, 1, 64, 33, 2),
         ((512,), 2, 2, 32, 64, 1)]


def _inputs(lengths, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = torch.randn(T, H, D, generator=g), torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _oracle(q, k, v, cu, block, topk):
    """Their routing (on the inputs as given), then exact attention in q's dtype over their mask, per sequence."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    _, masks = moba_attn_varlen_naive(q.detach(), kr.detach(), vr.detach(), cu, None, block, topk, return_masks=True)
    return masks


def _masked(q, k, v, cu, masks):
    outs = []
    bounds = cu.tolist()
    for (a, b), mask in zip(zip(bounds[:-1], bounds[1:]), masks):
        out, _ = masked_attention(q[None, a:b], k[None, a:b], v[None, a:b], mask[None], q.shape[-1] ** -0.5)
        outs.append(out[0])
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-H{}-Hkv{}-D{}-bs{}-k{}".format("+".join(map(str, c[0])), *c[1:]))
def test_matches_the_authors_moba_naive(case, dtype, fwd_impl):
    lengths, H, Hkv, D, block, topk = case
    q, k, v, cu = _inputs(lengths, H, Hkv, D)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    masks = _oracle(q, k, v, cu, block, topk)

    def ours(q, k, v):
        return attnops.moba_attention(q, k, v, block_size=block, topk=topk, cu_seqlens=cu.to(q.device),
                                      backend=fwd_impl.backend)

    dout = torch.randn(q.shape[0], H, D, generator=torch.Generator().manual_seed(1))
    out64, g64 = output_and_grads(lambda *t: _masked(*t, cu, masks), [q.double(), k.double(), v.double()], dout.double())
    outT, gT = output_and_grads(lambda *t: _masked(*t, cu, masks), [q, k, v], dout)
    out, grads = output_and_grads(ours, [t.to(fwd_impl.device) for t in (q, k, v)], dout.to(fwd_impl.device))
    assert out.dtype == dtype
    assert_accurate("out", out.cpu(), out64, outT)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, gT):
        assert_accurate(name, a.cpu(), b, c)
    if Hkv == H:  # and their output itself (float32 attention over the same mask)
        theirs = moba_attn_varlen_naive(q, k, v, cu, None, block, topk)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.cpu(), theirs, rtol=tol, atol=tol)


def test_batched_rows_are_sequences_and_lse_merges():
    q, k, v, _ = _inputs((2 * 333,), 4, 2, 40, seed=2)
    qb, kb, vb = (t.view(2, 333, *t.shape[1:]) for t in (q, k, v))
    out, lse = attnops.moba_attention(qb, kb, vb, block_size=70, topk=3, return_lse=True)
    cu = torch.tensor([0, 333, 666], dtype=torch.int32)
    out2, lse2 = attnops.moba_attention(q, k, v, block_size=70, topk=3, cu_seqlens=cu, return_lse=True)
    torch.testing.assert_close(out.reshape(666, 4, 40), out2, rtol=0, atol=0)
    torch.testing.assert_close(lse.transpose(0, 1).reshape(4, 666), lse2, rtol=0, atol=0)
    # lse is the one softmax's over the union of the chosen keys
    masks = _oracle(q, k, v, cu, 70, 3)
    for s, (a, b) in enumerate(((0, 333), (333, 666))):
        _, lse64 = masked_attention(q[None, a:b].double(), k[None, a:b].double(), v[None, a:b].double(),
                                    masks[s][None], 40 ** -0.5)
        torch.testing.assert_close(lse2[:, a:b].double(), lse64[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("L, block", [(2048, 512), (777, 100), (513, 7), (64, 64), (40, 64)])
def test_block_means_are_the_authors_per_block_means(L, block, dtype, monkeypatch):
    """Routing's block means come from reductions over chunks of full blocks (one block, a few, all of them): bit
    for bit the official per-block ``k[block].mean(dim=0)`` (a routing decision can turn on the last bit of a gate),
    on a head slice of k."""
    from attnops.ops.routed import token

    k = torch.randn(L + 3, 5, 40, generator=torch.Generator().manual_seed(L)).to(dtype)[3:, 1:3]
    theirs = torch.cat([k[s:s + block].mean(dim=0, keepdim=True) for s in range(0, L, block)])
    for chunk in (1, 3 * block * 80, token._MEANS_CHUNK, 1 << 30):
        monkeypatch.setattr(token, "_MEANS_CHUNK", chunk)
        assert torch.equal(block_means(k, block), theirs), chunk


def test_one_head_gates_are_the_official_einsum_bit_for_bit():
    """Gates are computed head by head as 2-d GEMMs: every head's equal the official all-heads einsum bit for bit
    (odd lengths, head dims 40 / 96, a strided head slice; one head and groups of heads), so the selection stays
    theirs."""
    g = torch.Generator().manual_seed(12)
    for (L, H, D, n), dtype in itertools.product(
            [(300, 4, 40, 6), (1000, 2, 96, 20), (777, 3, 64, 13), (4097, 2, 128, 9), (64, 1, 16, 1)],
            [torch.float32, torch.bfloat16]):
        q, means = torch.randn(L, H, D, generator=g).to(dtype), torch.randn(n, H, D, generator=g).to(dtype)
        theirs = torch.einsum("shd,nhd->hsn", q.float(), means.float())
        for h in range(H):
            assert torch.equal(block_gates(q[:, h:h + 1], means[:, h:h + 1])[0], theirs[h]), (L, H, D, n, h)
        assert torch.equal(block_gates(q, means), theirs)


@pytest.mark.parametrize("H", [1, 2])
def test_ties_are_broken_as_the_authors_topk(H):
    """Key blocks 0..4 are copies of one block (equal means, equal gates, bit for bit) with different values: which
    copies a token takes is torch.topk's tie order, which the op reproduces; the outputs then agree (one head and a
    group of two)."""
    g = torch.Generator().manual_seed(3)
    S, D, block = 64 * 8, 16, 64
    q, v = torch.randn(S, H, D, generator=g), torch.randn(S, H, D, generator=g)
    k = torch.randn(S, H, D, generator=g)
    k[64:320] = k[:64].repeat(4, 1, 1)
    cu = torch.tensor([0, S], dtype=torch.int32)
    routes = route_tokens(q, k, [0, S], block, 3, True)
    _, masks = moba_attn_varlen_naive(q, k, v, cu, None, block, 3, return_masks=True)
    theirs = masks[0][:, :, ::block]  # (H, S, blocks): the chosen blocks, the own one included
    ours = torch.zeros_like(theirs)
    ours[routes.head, routes.token, routes.block] = True
    own = torch.arange(S) // block
    ours[:, torch.arange(S), own] = True
    assert torch.equal(ours, theirs)
    out = attnops.moba_attention(q, k, v, block_size=block, topk=3, cu_seqlens=cu)
    torch.testing.assert_close(out, moba_attn_varlen_naive(q, k, v, cu, None, block, 3), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["normal", "ties", "integers", "nan", "inf"])
def test_cpu_selection_is_torch_topks(kind, causal, cpu_impl):
    """The C++ selection (``moba_token_select``) chooses the rows whose choice is unambiguous and leaves the rest to
    torch.topk: the chosen sets equal the official masked topk's on every row, over tied, integer and non-finite
    gates, topk beyond the block count and partial last blocks; only ambiguous rows are left to torch.topk. At every
    ISA level: rows go W (the vector width) at a time through the lanes' form, the rest one by one, and the longer
    cases hold groups of W rows across two heads and the first blocks of a causal sequence."""
    from attnops.core import dispatch
    from attnops.ops.routed.token import _topk_blocks, select_token_blocks

    if not dispatch.is_available("cpu"):
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(5)
    for L, block, topk in [(1, 8, 3), (37, 8, 2), (300, 16, 3), (300, 16, 5), (300, 64, 40), (129, 13, 7),
                          (300, 8, 9), (300, 8, 10), (1000, 32, 3), (1000, 24, 9), (999, 40, 4)]:
        n = -(-L // block)
        gate = {"normal": lambda: torch.randn(3, L, n, generator=g),
                "ties": lambda: torch.randint(0, 3, (3, L, n), generator=g).float(),
                "integers": lambda: torch.randint(-40, 40, (3, L, n), generator=g).float(),
                "nan": lambda: torch.randn(3, L, n, generator=g).masked_fill(torch.rand(3, L, n, generator=g) < 0.1,
                                                                            float("nan")),
                "inf": lambda: torch.randn(3, L, n, generator=g).masked_fill(torch.rand(3, L, n, generator=g) < 0.1,
                                                                            float("-inf"))}[kind]()
        ours = select_token_blocks(gate, block, topk, causal).long()
        theirs = _topk_blocks(gate, torch.arange(L) // block, min(topk, n), causal)
        assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values), (L, block, topk)
        if min(topk, n) >= 2:
            _, ambiguous = dispatch.resolve("moba_token_select", gate.device, "cpu")(
                gate, block_size=block, topk=topk, causal=causal, width=min(topk, n))
            if kind == "normal":
                assert not ambiguous.any()  # continuous gates: every row chosen in C++
            if kind == "ties" and n > topk + 1:
                assert ambiguous.any()  # three values over many blocks: ties at the cut reach torch.topk
            if kind in ("nan", "inf"):
                assert torch.equal(ambiguous, _has_nonfinite_candidate(gate, block, causal))


@pytest.mark.parametrize("lengths, H, group, block, topk", [((300, 1, 399), 4, 2, 50, 3), ((257, 130), 3, 3, 33, 2),
                                                             ((700,), 2, 1, 100, 10), ((0, 130), 2, 1, 64, 3)])
def test_cpu_pair_order_is_the_torch_order(lengths, H, group, block, topk, monkeypatch):
    """The C++ counting sort (``moba_token_pairs``) lays out the pair pass's rows as the stable argsort of the torch
    form does: the same rows, bounds and padding, bit for bit, over packed sequences (one empty), GQA groups and
    selections with -1 anywhere in a row (torch.topk's unsorted picks)."""
    from attnops.core import dispatch
    from attnops.ops.routed import token

    if not dispatch.is_available("cpu"):
        pytest.skip("the C++ extension is not built")
    q, k, _, cu = _inputs(lengths, H, H // group, 16, seed=9)
    choice = token.choose_blocks(q, k, cu.tolist(), block, topk, True)
    g = torch.Generator().manual_seed(1)
    shuffled = choice.chosen.gather(-1, torch.rand(choice.chosen.shape, generator=g).argsort(-1))
    for chosen in (choice.chosen, shuffled):
        c = choice._replace(chosen=chosen)
        ours = token._order_pairs(c, group, q.shape[0])
        monkeypatch.setattr(dispatch, "is_available", lambda device: False)
        theirs = token._order_pairs(c, group, q.shape[0])
        monkeypatch.undo()
        assert ours[0].dtype == theirs[0].dtype and torch.equal(ours[0], theirs[0])
        assert torch.equal(ours[1].long(), theirs[1]) and ours[1].shape[1] > 0


@pytest.mark.parametrize("work, pair_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float64, torch.float64)])
def test_cpu_merge_is_the_torch_steps_bit_for_bit(work, pair_dtype, monkeypatch):
    """The C++ merge (``moba_token_merge``) scales a head group's rows and adds the scaled pairs with torch's
    roundings in torch's order: equal bit for bit to mul_ + index_add_ (which the autograd path runs), with rows
    of up to three pairs, padding pairs (scale 0) and a head slice of a wider output; the longer case on two
    threads (each lists the pairs of its own rows)."""
    from attnops.core import dispatch

    if not dispatch.is_available("cpu"):
        pytest.skip("the C++ extension is not built")
    threads = torch.get_num_threads()
    try:
        for T, P in ((301, 700), (3000, 7000)):
            torch.set_num_threads(2 if T > 1000 else threads)
            _check_merge(work, pair_dtype, T, P, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _check_merge(work, pair_dtype, T, P, monkeypatch):
    from attnops.core import dispatch
    from attnops.ops.routed import token

    g = torch.Generator().manual_seed(13)
    H, Dv = 6, 40
    heads = slice(2, 5)
    out = torch.randn(T, H, Dv, generator=g, dtype=work)
    lse = torch.randn(H, T, generator=g, dtype=work)
    row = torch.randint(0, T * 3, (P,), generator=g)
    out_pair = torch.randn(P, Dv, generator=g).to(pair_dtype)
    lse_pair = torch.randn(P, generator=g, dtype=work)
    lse_pair[::50] = float("-inf")  # padding pairs
    results = []
    for cpp in (True, False):
        o, l = out.clone(), lse.clone()
        if not cpp:
            monkeypatch.setattr(dispatch, "is_available", lambda device: False)
        token._merge_into(o, l, heads, out_pair, lse_pair, row)
        monkeypatch.undo()
        results.append((o, l))
    (o1, l1), (o2, l2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert torch.equal(o1[:, :2], out[:, :2]) and not torch.equal(o1[:, 2:5], out[:, 2:5])
    if work == torch.float32:  # an out in bf16 / fp16 (the self pass's, as it came): the float32 merge, rounded once
        for reduced in (torch.bfloat16, torch.float16):
            o, l = out.to(reduced), lse.clone()
            token._merge_into(o, l, heads, out_pair, lse_pair, row)
            expected, l2 = out.to(reduced).to(work), lse.clone()
            monkeypatch.setattr(dispatch, "is_available", lambda device: False)
            token._merge_into(expected, l2, heads, out_pair, lse_pair, row)
            monkeypatch.undo()
            assert o.dtype == reduced and torch.equal(o, expected.to(reduced)) and torch.equal(l, l2)
            assert torch.equal(o[:, :2], out[:, :2].to(reduced))


def _has_nonfinite_candidate(gate, block, causal):
    L, n = gate.shape[1:]
    own = (torch.arange(L) // block).unsqueeze(-1)
    col = torch.arange(n)
    candidate = (col < own) if causal else (col != own)
    return (~torch.isfinite(gate) & candidate).any(-1)


def test_needles_are_routed_per_token():
    """Each query of the last block points at one earlier block (its direction is that block's mean key): token
    routing sends every query to its target; the tile routing, one choice per 64 rows, cannot."""
    g = torch.Generator().manual_seed(4)
    block, nb, D = 64, 8, 32
    S = block * nb
    k = torch.randn(S, 1, D, generator=g) * 0.1
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g)).Q[:nb - 1]
    for j in range(nb - 1):
        k[j * block:(j + 1) * block, 0] += dirs[j] * 3
    q = torch.randn(S, 1, D, generator=g) * 0.01
    target = torch.randint(0, nb - 1, (block,), generator=g)
    q[S - block:, 0] = dirs[target] * 5
    routes = route_tokens(q, k, [0, S], block, 2, True)
    last = routes.token >= S - block
    got = torch.full((block,), -1)
    got[routes.token[last] - (S - block)] = routes.block[last]
    assert torch.equal(got, target)
    tile = attnops.moba_block_mask(q[None], k[None], block_size=block, topk=2)
    tile_blocks = tile.to_dense()[0, 0, nb - 1]  # the last tile's key blocks (64-wide = MoBA blocks here)
    hit = tile_blocks[target].float().mean()
    assert hit < 0.5  # one tile choice serves a few of the targets


def test_score_modifiers_and_refusals():
    q, k, v, cu = _inputs((200, 150), 4, 2, 32, seed=5)
    masks = _oracle(q, k, v, cu, 48, 2)
    sinks = torch.randn(4)
    out = attnops.moba_attention(q, k, v, block_size=48, topk=2, cu_seqlens=cu, softcap=5.0, sinks=sinks)
    ref = []
    for (a, b), mask in zip(((0, 200), (200, 350)), masks):
        o, _ = masked_attention(q[None, a:b].double(), k[None, a:b].double(), v[None, a:b].double(), mask[None],
                                32 ** -0.5, softcap=5.0, sinks=sinks.double())
        ref.append(o[0])
    torch.testing.assert_close(out.double(), torch.cat(ref), rtol=1e-5, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d1 = attnops.moba_attention(q, k, v, block_size=48, topk=2, cu_seqlens=cu, dropout_p=0.3, generator=g1)
    d2 = attnops.moba_attention(q, k, v, block_size=48, topk=2, cu_seqlens=cu, dropout_p=0.3, generator=g2)
    assert torch.equal(d1, d2) and not torch.allclose(d1, out)
    qb, kb, vb = q[None, :200], k[None, :200], v[None, :200]
    for kw in (dict(alibi_slopes=torch.rand(4)), dict(attn_bias=torch.zeros(200, 200)), dict(return_block_map=True)):
        with pytest.raises(NotImplementedError, match="routing='tile'"):
            attnops.moba_attention(qb, kb, vb, block_size=48, topk=2, **kw)
    with pytest.raises(ValueError, match="lengths differ"):
        attnops.moba_attention(qb[:, :100], kb, vb, block_size=48)


def test_nonfinite_keys_reach_only_the_rows_that_route_to_them():
    q, k, v, cu = _inputs((320,), 2, 2, 16, seed=6)
    k[70, 0, 3] = float("nan")  # block 1 of head 0 (block size 64)
    out = attnops.moba_attention(q, k, v, block_size=64, topk=2, cu_seqlens=cu)
    routes = route_tokens(q, k, [0, 320], 64, 2, True)
    sees = torch.zeros(320, dtype=torch.bool)
    sees[routes.token[(routes.head == 0) & (routes.block == 1)]] = True
    sees[64:128] |= torch.arange(64, 128) >= 70  # its own block, causally
    bad = torch.isnan(out[:, 0]).any(-1)
    assert torch.equal(bad, sees) and torch.isfinite(out[:, 1]).all()


def test_long_sequence_without_n_by_n():
    g = torch.Generator().manual_seed(8)
    S = 65536
    q, k, v = (torch.randn(1, S, 1, 16, generator=g) for _ in range(3))
    out = attnops.moba_attention(q, k, v, block_size=1000, topk=2)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["gqa2", "mqa"])
def test_kv_head_groups_equal_one_group(case, monkeypatch):
    """A long sequence runs routing, passes and merge per group of kv heads (token._GROUP_PAIR_BYTES): forced here to
    one kv head a group, outputs and lse equal the one-group run bit for bit (sinks sliced per group; without
    autograd the pair rows are read from q's storage in place and every group merges in place into the self pass's
    output), gradients to rounding."""
    from attnops.ops.routed import token

    lengths, H, Hkv, D, block, topk = case
    q, k, v, cu = _inputs(lengths, H, Hkv, D, seed=3)
    sinks = torch.randn(H, generator=torch.Generator().manual_seed(4))
    dout = torch.randn(q.shape[0], H, D, generator=torch.Generator().manual_seed(5))

    def run(q, k, v):
        return attnops.moba_attention(q, k, v, block_size=block, topk=topk, cu_seqlens=cu, sinks=sinks,
                                      return_lse=True)

    def out_lse(q, k, v):
        out, lse = run(q, k, v)
        return out + 0 * lse.sum()  # lse joins the graph: its gradient path is checked too

    one, one_grads = output_and_grads(out_lse, [q, k, v], dout)
    one_lse = run(q, k, v).lse
    with torch.no_grad():  # the merge in place into the self pass's buffer, one group
        plain_one = run(q, k, v)
        bf16 = [t.bfloat16() for t in (q, k, v)]
        bf16_one = run(*bf16)
    # with autograd the bf16 partials merge in float32 through torch (merge_rows) and are cast once: the C++ merge
    # of the bf16 self-pass output above gives the same output bit for bit
    bf16_graph = run(*[t.detach().requires_grad_() for t in bf16])
    monkeypatch.setattr(token, "_GROUP_PAIR_BYTES", 1)
    grouped, grouped_grads = output_and_grads(out_lse, [q, k, v], dout)
    with torch.no_grad():  # ... and per group
        plain = run(q, k, v)
        bf16_grouped = run(*bf16)
    for a, b in [(one, grouped), (one, plain.out), (one_lse, plain.lse), (one, plain_one.out),
                 (one_lse, plain_one.lse), (bf16_one.out, bf16_grouped.out), (bf16_one.lse, bf16_grouped.lse),
                 (bf16_one.out, bf16_graph.out.detach()), (bf16_one.lse, bf16_graph.lse.detach())]:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(one_grads, grouped_grads):  # a slice's gradient adds its pieces in another order: rounding
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dropout_masks_do_not_depend_on_autograd(monkeypatch):
    """With dropout, a seeded generator gives the same output with and without autograd, in kv-head groups too
    (each core call draws its mask's seed; both paths draw them in one order)."""
    from attnops.ops.routed import token

    q, k, v, cu = _inputs((300, 130), 4, 2, 32, seed=6)
    monkeypatch.setattr(token, "_GROUP_PAIR_BYTES", 1)

    def run(grad):
        args = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        return attnops.moba_attention(*args, block_size=48, topk=3, cu_seqlens=cu, dropout_p=0.3,
                                      generator=torch.Generator().manual_seed(11))

    with_grad = run(True)
    with torch.no_grad():
        without = run(False)
    torch.testing.assert_close(with_grad.detach(), without, atol=0, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["merge_in_place", "autograd"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "L{}-H{}-Hkv{}-D{}-bs{}-k{}".format("+".join(map(str, c[0])),
                                                                                              *c[1:]))
def test_max_scores_over_the_chosen_keys(case, grad, fwd_impl):
    """``return_max_scores``: each row's largest score over the keys the authors' routing chose (their masks), the
    self pass's and the pairs' maxima folded together, in the in-place merge and in the autograd one; the batched
    layout equals the packed one."""
    lengths, H, Hkv, D, block, topk = case
    q, k, v, cu = _inputs(lengths, H, Hkv, D)
    masks = _oracle(q, k, v, cu, block, topk)
    dev = fwd_impl.device
    inputs = [t.to(dev).requires_grad_(grad) for t in (q, k, v)]
    res = attnops.moba_attention(*inputs, block_size=block, topk=topk, cu_seqlens=cu.to(dev), return_max_scores=True,
                                 backend=fwd_impl.backend)
    assert res.max_scores.shape == (H, q.shape[0]) and not res.max_scores.requires_grad
    bounds = cu.tolist()
    group = H // Hkv
    for (a, b), mask in zip(zip(bounds[:-1], bounds[1:]), masks):
        kr = k[None, a:b].double().repeat_interleave(group, 2)
        *_, want = masked_attention(q[None, a:b].double(), kr, kr, mask[None], D ** -0.5, return_max=True)
        torch.testing.assert_close(res.max_scores[:, a:b].detach().cpu().double(), want[0], rtol=1e-5, atol=1e-5)
    if len(lengths) == 1:
        batched = attnops.moba_attention(*(t.detach()[None] for t in inputs), block_size=block, topk=topk,
                                         return_max_scores=True, backend=fwd_impl.backend)
        torch.testing.assert_close(batched.max_scores[0], res.max_scores.detach(), rtol=0, atol=0)


def test_max_scores_of_tile_routing_and_nan():
    """Tile routing's maxima are the block-sparse core's on the routed mask (batched and packed); a NaN key reaches
    the maxima of exactly the token-routed rows that chose its block (their max is NaN), as it reaches their output."""
    q, k, v, cu = _inputs((300, 1, 399), 4, 2, 40)
    tile = attnops.moba_attention(q[None, :300], k[None, :300], v[None, :300], block_size=64, topk=3, routing="tile",
                                  return_max_scores=True)
    mask = attnops.moba_block_mask(q[None, :300], k[None, :300], block_size=64, topk=3)
    want = attnops.block_sparse_attention(q[None, :300].double(), k[None, :300].double(), v[None, :300].double(), mask,
                                          return_max_scores=True, backend="reference").max_scores
    torch.testing.assert_close(tile.max_scores.double(), want, rtol=1e-5, atol=1e-5)
    packed = attnops.moba_attention(q, k, v, block_size=64, topk=3, routing="tile", cu_seqlens=cu,
                                    return_max_scores=True)
    torch.testing.assert_close(packed.max_scores[:, :300], tile.max_scores[0], rtol=0, atol=0)
    k[100, 0, 5] = float("nan")  # kv head 0: query heads 0 and 1
    out, max_scores = attnops.moba_attention(q, k, v, block_size=50, topk=3, cu_seqlens=cu, return_max_scores=True)
    nan_rows = torch.isnan(out).any(-1).transpose(0, 1)  # (H, T)
    assert bool(nan_rows.any()) and torch.equal(torch.isnan(max_scores), nan_rows)
