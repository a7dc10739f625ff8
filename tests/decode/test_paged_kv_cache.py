"""PagedKVCache: the pages hold, token for token, what a contiguous KVCache holds after the same appends (ragged
left-padded prefills, steps of 1 and 3 tokens), and decoding through its block table equals decoding the contiguous
cache, at every forward implementation; pages are taken as sequences grow and come back on release (a new sequence
reuses them, the others keep theirs); a refused append (out of pages, past max_len, bad tensors) changes nothing.
The pools start as NaN, so a read of a row no append wrote fails the comparison."""

import pytest
import torch

import attnops
from attnops.ops.decode.kv_cache import gather_pages


def poisoned(cache):
    cache.k_pages.fill_(float("nan"))
    cache.v_pages.fill_(float("nan"))
    return cache


def contents(cache):
    """Each sequence's keys and values up to its length, read through the block table: lists of (len, Hkv, D)."""
    k, v = (gather_pages(t, cache.block_table) for t in (cache.k_pages, cache.v_pages))
    return [(k[b, :n].clone(), v[b, :n].clone()) for b, n in enumerate(cache.host_seqlens.tolist())]


def assert_same_contents(paged, dense):
    for b, (k, v) in enumerate(contents(paged)):
        n = int(dense.host_seqlens[b])
        assert k.shape[0] == n and torch.equal(k, dense.k[b, :n].cpu()) and torch.equal(v, dense.v[b, :n].cpu())


def held_pages(cache):
    return sum(-(-n // cache.page_size) for n in cache.host_seqlens.tolist())


def distinct_pages(cache):
    """The pages the sequences hold (a page forked sequences share counts once)."""
    table, ps = cache.block_table.cpu(), cache.page_size
    return {int(p) for b, n in enumerate(cache.host_seqlens.tolist()) for p in table[b, :-(-n // ps)]}


def append_and_decode_both(paged, dense, g, T, H, backend, lengths=None):
    """Appends the same ``T`` random tokens (``lengths``: as append's) to both caches, checks their contents agree,
    and decodes ``T`` random queries from each: ``(paged's output, the contiguous cache's)`` on the CPU."""
    B, Hkv, D, dev = dense.batch, dense.num_kv_heads, dense.head_dim, dense.device
    q = torch.randn(B, T, H, D, generator=g).to(dev)
    k, v = (torch.randn(B, T, Hkv, D, generator=g).to(dev) for _ in range(2))
    kc, vc, seqlens = dense.append(k, v, lengths=lengths)
    kp, vp, seqlens_p, table = paged.append(k, v, lengths=lengths)
    assert torch.equal(seqlens_p.cpu(), seqlens.cpu()) and table.dtype == torch.int32
    assert_same_contents(paged, dense)
    want = attnops.decode_attention(q, kc, vc, seqlens, backend=backend).cpu()
    got = attnops.decode_attention(q, kp, vp, seqlens_p, block_table=table, backend=backend).cpu()
    return got, want


@pytest.mark.parametrize("page", [1, 4, 16, 64])
def test_paged_cache_decodes_as_the_contiguous_cache(page, fwd_impl):
    lens, H, Hkv, D = [5, 17, 0, 1, 40], 4, 2, 40
    B, T = len(lens), max(lens)
    dev = fwd_impl.device
    g = torch.Generator().manual_seed(page)
    num_pages = B * -(-(T + 8) // page) + 2
    paged = poisoned(attnops.PagedKVCache(B, num_pages, page, Hkv, D, device=dev))
    dense = attnops.KVCache(B, T + 8, Hkv, D, device=dev)
    for step, (n_new, lengths) in enumerate([(T, lens), (1, None), (3, None), (1, [1, 0, 1, 1, 0])]):
        got, want = append_and_decode_both(paged, dense, g, n_new, H, fwd_impl.backend, lengths)
        assert paged.block_table.shape == (B, max(-(-n // page) for n in paged.host_seqlens.tolist()))
        assert paged.free_pages == num_pages - held_pages(paged)
        assert torch.isfinite(got).all(), f"step {step}: a row read an unwritten page row"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_release_frees_pages_that_a_new_sequence_reuses():
    """Continuous batching: sequence 1 finishes, its pages return to the pool (lowest first), a new prompt in its slot
    takes them; sequences 0 and 2 keep their tokens; the new sequence decodes as it would alone."""
    torch.manual_seed(0)
    B, page, Hkv, D = 3, 4, 1, 8
    paged = poisoned(attnops.PagedKVCache(B, 12, page, Hkv, D))
    k, v = torch.randn(B, 10, Hkv, D), torch.randn(B, 10, Hkv, D)
    paged.append(k, v, lengths=[6, 10, 3])
    assert paged.free_pages == 12 - (2 + 3 + 1)
    held_by_1 = paged.block_table[1, :3].tolist()
    before = contents(paged)
    paged.release(1)
    assert paged.host_seqlens.tolist() == [6, 0, 3] and paged.free_pages == 12 - 3
    assert paged.block_table[1].eq(0).all()
    k2, v2 = torch.randn(B, 9, Hkv, D), torch.randn(B, 9, Hkv, D)
    _, _, lens, table = paged.append(k2, v2, lengths=[0, 9, 0])
    assert sorted(table[1, :3].tolist()) == sorted(held_by_1)  # the freed pages, the lowest free ones
    after = contents(paged)
    for b in (0, 2):
        assert torch.equal(after[b][0], before[b][0]) and torch.equal(after[b][1], before[b][1])
    assert torch.equal(after[1][0], k2[1]) and torch.equal(after[1][1], v2[1])
    q = torch.randn(B, 1, 2, D)
    out = attnops.decode_attention(q, paged.k_pages, paged.v_pages, lens, block_table=table)
    alone = attnops.attention(q[1:2], k2[1:2], v2[1:2], causal=True)
    torch.testing.assert_close(out[1:2], alone, rtol=1e-5, atol=1e-6)
    paged.reset()
    assert paged.free_pages == 12 and paged.host_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="sequence indices"):
        paged.release(3)
    with pytest.raises(ValueError, match="sequence indices"):
        paged.release([0, -1])


def test_a_refused_append_changes_nothing():
    paged = attnops.PagedKVCache(2, 5, 4, 2, 8, max_pages_per_seq=3)
    paged.append(torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8), lengths=[6, 5])  # 2 + 2 pages of 5
    state = lambda: (paged.k_pages.clone(), paged.v_pages.clone(), paged.block_table.clone(),  # noqa: E731
                     paged.host_seqlens, paged.free_pages)
    before = state()
    bad = [
        ((torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)), {}, ValueError, "out of pages"),  # 2 more, 1 free
        ((torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)), dict(lengths=[7, 0]), ValueError, "max_len=12"),
        ((torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)), {}, ValueError, "num_kv_heads"),
        ((torch.randn(2, 1, 2, 8), torch.randn(2, 2, 2, 8)), {}, ValueError, "differ"),
        ((torch.randn(2, 1, 2, 8).double(), torch.randn(2, 1, 2, 8).double()), {}, TypeError, "dtype"),
        ((torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)), dict(lengths=[2, 0]), ValueError, "lengths"),
        ((torch.randn(2, 1, 2, 8, requires_grad=True), torch.randn(2, 1, 2, 8)), {}, RuntimeError, "forward-only"),
    ]
    for (k, v), kw, error, words in bad:
        with pytest.raises(error, match=words):
            paged.append(k, v, **kw)
        after = state()
        assert all(torch.equal(a, b) for a, b in zip(after[:4], before[:4])) and after[4] == before[4]
    paged.append(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8), lengths=[2, 0])  # 8 tokens: no new page
    assert paged.free_pages == 1


@pytest.mark.parametrize("args, error, words", [
    (dict(num_pages=0), ValueError, "num_pages must be >= 1"),
    (dict(page_size=2.0), TypeError, "page_size must be an int"),
    (dict(max_pages_per_seq=9), ValueError, "more than the pool"),
    (dict(head_dim=4096), ValueError, "head_dim"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_construction(args, error, words):
    kw = {**dict(batch=2, num_pages=8, page_size=4, num_kv_heads=1, head_dim=8), **args}
    with pytest.raises(error, match=words):
        attnops.PagedKVCache(**kw)


def test_an_earlier_table_is_not_changed_by_later_appends():
    """The returned table and lengths are the state of that call (the kernels may still read them)."""
    paged = attnops.PagedKVCache(1, 4, 2, 1, 8)
    _, _, lens, table = paged.append(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    kept = (lens.clone(), table.clone())
    paged.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    paged.release(0)
    assert torch.equal(lens, kept[0]) and torch.equal(table, kept[1]) and "free_pages=4" in repr(paged)


def test_fork_shares_full_pages_and_copies_the_last_one(fwd_impl):
    """``fork(0, [1, 2])`` after a 10-token prompt on 4-token pages: the copies hold the prompt through 2 shared pages
    and 1 new page each (the partly filled one, copied); then each sequence appends its own tokens, and contents and
    decoding equal a contiguous cache holding the prompt in every row. Releasing the source keeps the shared pages
    for the copies; the last release returns them. Refused forks change nothing."""
    B, page, H, Hkv, D = 4, 4, 4, 2, 8
    dev = fwd_impl.device
    g = torch.Generator().manual_seed(0)
    paged = poisoned(attnops.PagedKVCache(B, 12, page, Hkv, D, device=dev))
    dense = attnops.KVCache(B, 16, Hkv, D, device=dev)
    k, v = (torch.randn(1, 10, Hkv, D, generator=g).to(dev) for _ in range(2))
    paged.append(torch.cat((k, k.new_zeros(3, 10, Hkv, D))), torch.cat((v, v.new_zeros(3, 10, Hkv, D))),
                 lengths=[10, 0, 0, 0])
    dense.append(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous(), lengths=[10, 10, 10, 0])
    before = (paged.free_pages, paged.host_seqlens.tolist(), paged.block_table.clone())
    for bad, words in ((dict(src=0, dst=0), "other than itself"), (dict(src=4, dst=1), "src must be"),
                       (dict(src=0, dst=[1, 9]), "fork takes"), (dict(src=True, dst=1), "src must be")):
        with pytest.raises(ValueError, match=words):
            paged.fork(**bad)
    assert (paged.free_pages, paged.host_seqlens.tolist()) == before[:2] and torch.equal(paged.block_table, before[2])
    paged.fork(0, [1, 2])
    assert paged.host_seqlens.tolist() == [10, 10, 10, 0] and paged.free_pages == 12 - 3 - 2
    table = paged.block_table.cpu()
    assert torch.equal(table[1, :2], table[0, :2]) and torch.equal(table[2, :2], table[0, :2])
    assert len({int(table[b, 2]) for b in range(3)}) == 3  # each its own last page
    assert_same_contents(paged, dense)
    with pytest.raises(ValueError, match="release them first"):
        paged.fork(3, 1)
    for lengths in ([1, 2, 3, 0], [3, 1, 0, 0], [2, 2, 2, 0]):
        got, want = append_and_decode_both(paged, dense, g, 3, H, fwd_impl.backend, lengths)
        for b, n in enumerate(lengths):  # rows that saw no key of their own sequence are zeros in both
            torch.testing.assert_close(got[b, 3 - n:], want[b, 3 - n:], rtol=1e-5, atol=1e-6)
    assert paged.free_pages == 12 - len(distinct_pages(paged))
    paged.release(0)
    assert paged.free_pages == 12 - len({int(p) for b in (1, 2) for p in paged.block_table[b, :4]})
    assert_same_contents(paged, dense.release(0) or dense)
    full = paged.free_pages
    paged.release([1, 2])
    assert paged.free_pages == 12 > full
    small = attnops.PagedKVCache(3, 3, page, Hkv, D, device=dev)  # 5 tokens: 2 pages, 1 free
    small.append(torch.cat((k[:, :5], k.new_zeros(2, 5, Hkv, D))), torch.cat((v[:, :5], v.new_zeros(2, 5, Hkv, D))),
                 lengths=[5, 0, 0])
    with pytest.raises(ValueError, match="out of pages"):
        small.fork(0, [1, 2])
    assert small.host_seqlens.tolist() == [5, 0, 0] and small.free_pages == 1
    small.fork(0, 2)
    assert small.host_seqlens.tolist() == [5, 0, 5] and small.free_pages == 0


def test_reorder_continues_parents_like_the_contiguous_cache(fwd_impl):
    """``reorder(parents)`` (beam search): each sequence becomes its parent (repeats allowed), on a PagedKVCache and a
    KVCache alike; contents and decoding then equal the contiguous cache's through further ragged appends, pages no
    child holds return to the pool, and a reorder the pool cannot copy for is refused, changing nothing."""
    B, page, H, Hkv, D = 4, 4, 4, 2, 8
    dev = fwd_impl.device
    g = torch.Generator().manual_seed(1)
    paged = poisoned(attnops.PagedKVCache(B, 14, page, Hkv, D, device=dev))
    dense = attnops.KVCache(B, 16, Hkv, D, device=dev)
    k, v = (torch.randn(B, 9, Hkv, D, generator=g).to(dev) for _ in range(2))
    for cache in (paged, dense):
        cache.append(k, v, lengths=[6, 9, 3, 4])
    for parents in ([1, 1, 0, 1], torch.tensor([3, 2, 2, 0])):
        paged.reorder(parents)
        dense.reorder(parents)
        assert paged.host_seqlens.tolist() == dense.host_seqlens.tolist()
        assert_same_contents(paged, dense)
        assert paged.free_pages == 14 - len(distinct_pages(paged))
        got, want = append_and_decode_both(paged, dense, g, 2, H, fwd_impl.backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for bad, error in (([0, 1, 2], ValueError), ([0, 1, 2, 4], ValueError), ([0.0, 1, 2, 3], TypeError),
                       (torch.tensor([True, False, True, True]), TypeError)):
        with pytest.raises(error, match="parents must be"):
            paged.reorder(bad)
    small = attnops.PagedKVCache(3, 3, page, Hkv, D, device=dev)  # 5 tokens: 2 pages, 1 free
    small.append(k[:3, :5], v[:3, :5], lengths=[5, 0, 0])
    with pytest.raises(ValueError, match="out of pages"):
        small.reorder([0, 0, 0])  # two copies of the partly filled page
    assert small.host_seqlens.tolist() == [5, 0, 0] and small.free_pages == 1
    small.reorder([0, 0, 1])
    assert small.host_seqlens.tolist() == [5, 5, 0] and small.free_pages == 0


@pytest.mark.parametrize("seed", range(4))
def test_random_appends_and_releases_keep_every_sequence(seed):
    """Seeded runs of ragged appends, releases, forks, reorders and refused ones against a plain record of each
    sequence's tokens: after every operation the pages read through the table hold exactly the record, no sequence
    holds a page twice, a page two sequences hold is full in both (no append can write it), and the free count is
    the pool minus the pages in use."""
    g = torch.Generator().manual_seed(seed)
    B, num_pages, page, D = 4, 11, 3, 2
    paged = poisoned(attnops.PagedKVCache(B, num_pages, page, 1, D, max_pages_per_seq=6))
    record = [torch.zeros(0, 1, D) for _ in range(B)]
    rows = [[] for _ in range(B)]
    draw = lambda n: int(torch.randint(n, (), generator=g))  # noqa: E731
    for _ in range(80):
        op = draw(6)
        if op == 0:
            gone = [b for b in range(B) if draw(2)]
            paged.release(gone)
            for b in gone:
                record[b] = torch.zeros(0, 1, D)
        elif op == 2 and draw(2):
            parents = [draw(B) for _ in range(B)]
            copies = sum(1 for b, p in enumerate(parents) if len(record[p]) % page and p in parents[:b])
            kept = {q for row, r in zip(rows, record) for q in row}
            held = {q for p in set(parents) for q in rows[p][:-(-len(record[p]) // page)]}
            if copies > paged.free_pages + len(kept - held):
                with pytest.raises(ValueError, match="out of pages"):
                    paged.reorder(parents)
            else:
                paged.reorder(torch.tensor(parents) if draw(2) else parents)
                record = [record[p].clone() for p in parents]
        elif op == 1:
            src, empty = draw(B), [b for b in range(B) if not len(record[b])]
            dst = [b for b in empty if b != src and draw(2)]
            if not dst:
                continue
            if len(record[src]) % page and len(dst) > paged.free_pages:
                with pytest.raises(ValueError, match="out of pages"):
                    paged.fork(src, dst)
            else:
                paged.fork(src, dst)
                for b in dst:
                    record[b] = record[src].clone()
        else:
            T = draw(6)
            k = torch.randn(B, T, 1, D, generator=g)
            lengths = [draw(T + 1) for _ in range(B)]
            needed = sum(-(-(len(r) + n) // page) - -(-len(r) // page) for r, n in zip(record, lengths))
            fits = needed <= paged.free_pages and all(len(r) + n <= paged.max_len for r, n in zip(record, lengths))
            if fits:
                paged.append(k, -k, lengths=lengths)
                for b, n in enumerate(lengths):
                    record[b] = torch.cat((record[b], k[b, T - n:]))
            else:
                with pytest.raises(ValueError, match="out of pages|overflow"):
                    paged.append(k, -k, lengths=lengths)
        assert paged.host_seqlens.tolist() == [len(r) for r in record]
        for b, (keys, values) in enumerate(contents(paged)):
            assert torch.equal(keys, record[b]) and torch.equal(values, -record[b])
        rows = [[int(p) for p in paged.block_table[b, :-(-n // page)]]
                for b, n in enumerate(paged.host_seqlens.tolist())]
        assert all(len(set(row)) == len(row) for row in rows)
        for b, row in enumerate(rows):
            for c, p in enumerate(row):
                if any(p in other for o, other in enumerate(rows) if o != b):
                    assert (c + 1) * page <= len(record[b])
        assert paged.free_pages == num_pages - len({p for row in rows for p in row})
