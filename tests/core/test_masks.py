"""BlockMask: the LUT structure, its transpose, the pattern constructors and validation."""

import math

import pytest
import torch

from attnops import BlockMask


def brute_blocks(sq, sk, bq, bk, keep_fn):
    """Dense (Nq, Nk) bool from a python predicate on (qb, kb, diag) with the documented diagonal:
    the key block holding the aligned position of the query block's last query."""
    nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    for qb in range(nq):
        last = min((qb + 1) * bq, sq) - 1 + (sk - sq)
        diag = last // bk
        for kb in range(nk):
            out[qb, kb] = bool(keep_fn(qb, kb, diag))
    return out


PATTERNS = {
    "full": (lambda sl, bs: BlockMask.full(sl, block_size=bs), lambda qb, kb, d: True),
    "causal": (lambda sl, bs: BlockMask.causal(sl, block_size=bs), lambda qb, kb, d: kb <= d),
    "dilated": (lambda sl, bs: BlockMask.dilated(sl, num_blocks=3, dilation=2, block_size=bs),
                lambda qb, kb, d: 0 <= d - kb < 6 and (d - kb) % 2 == 0),
    "dilated_bidir": (lambda sl, bs: BlockMask.dilated(sl, num_blocks=2, dilation=3, causal=False, block_size=bs),
                      lambda qb, kb, d: abs(d - kb) < 6 and abs(d - kb) % 3 == 0),
    "strided": (lambda sl, bs: BlockMask.strided(sl, stride=3, block_size=bs),
                lambda qb, kb, d: kb <= d and (d - kb < 3 or (d - kb) % 3 == 0)),
    "fixed": (lambda sl, bs: BlockMask.fixed(sl, stride=3, num_summary=1, block_size=bs),
              lambda qb, kb, d: kb <= d and (kb // 3 == d // 3 or kb % 3 == 2)),
    "sink_local": (lambda sl, bs: BlockMask.sink_local(sl, num_sink_blocks=1, num_local_blocks=2, block_size=bs),
                   lambda qb, kb, d: kb <= d and (kb < 1 or d - kb < 2)),
    "global_tokens": (lambda sl, bs: BlockMask.global_tokens(sl, global_blocks=1, num_local_blocks=1, block_size=bs),
                      lambda qb, kb, d: kb < 1 or qb < 1 or abs(d - kb) < 1),
    "global_list": (lambda sl, bs: BlockMask.global_tokens(sl, global_blocks=[2], num_local_blocks=2, causal=True,
                                                           block_size=bs),
                    lambda qb, kb, d: kb <= d and (kb == 2 or qb == 2 or abs(d - kb) < 2)),
}
GEOMETRIES = [((300, 300), (64, 64)), ((200, 333), (32, 64)), ((333, 200), (64, 16)), ((1, 257), (16, 32))]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"S{g[0][0]}x{g[0][1]}-b{g[1][0]}x{g[1][1]}")
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_blocks(pattern, geometry):
    (sq, sk), (bq, bk) = geometry
    build, keep = PATTERNS[pattern]
    mask = build((sq, sk), (bq, bk))
    assert mask.shape == (1, 1, sq, sk) and mask.block_size == (bq, bk)
    assert torch.equal(mask.to_dense()[0, 0], brute_blocks(sq, sk, bq, bk, keep))


def test_sliding_window_blocks_cover_exactly_the_token_window():
    sq, sk, bq, bk, w = 300, 300, 32, 64, 70
    for causal in (True, False):
        mask = BlockMask.sliding_window((sq, sk), w, causal=causal, block_size=(bq, bk))
        assert mask.window_size == (w - 1, 0 if causal else w - 1) and mask.causal == causal
        # A block is listed iff some token pair inside it is in the window.
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk).unsqueeze(0)
        inside = (j >= i - (w - 1)) & (j <= i + (0 if causal else w - 1))
        expected = inside.reshape(-1).new_zeros(mask.num_blocks)
        for qb in range(mask.num_blocks[0]):
            for kb in range(mask.num_blocks[1]):
                expected[qb, kb] = inside[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk].any()
        assert torch.equal(mask.to_dense()[0, 0], expected)


def test_random_mask_is_per_head_and_seeded():
    a = BlockMask.random(500, 0.3, seed=3, batch=2, num_heads=4)
    b = BlockMask.random(500, 0.3, seed=3, batch=2, num_heads=4)
    c = BlockMask.random(500, 0.3, seed=4, batch=2, num_heads=4)
    assert a.shape[:2] == (2, 4)
    assert torch.equal(a.to_dense(), b.to_dense()) and not torch.equal(a.to_dense(), c.to_dense())
    assert 0.1 < a.density < 0.5
    empty = BlockMask.random(500, 0.0)
    assert empty.density == 0.0 and int(empty.kv_num_blocks.sum()) == 0


def test_from_dense_roundtrip_and_transpose():
    blocks = torch.rand(2, 3, 7, 9) < 0.4
    blocks[0, 0, 3] = False  # an empty row
    blocks[1, 2, :, 4] = False  # an empty column
    mask = BlockMask.from_dense(blocks, (7 * 16 - 5, 9 * 32 - 3), block_size=(16, 32))
    assert torch.equal(mask.to_dense(), blocks)
    n, idx = mask.kv_num_blocks, mask.kv_indices
    assert n.dtype == idx.dtype == torch.int32 and n.shape == (2, 3, 7)
    for b in range(2):
        for h in range(3):
            for r in range(7):
                assert idx[b, h, r, : n[b, h, r]].tolist() == torch.nonzero(blocks[b, h, r]).flatten().tolist()
    tn, tidx = mask.q_num_blocks, mask.q_indices
    assert tn.shape == (2, 3, 9)
    for b in range(2):
        for h in range(3):
            for c in range(9):
                assert tidx[b, h, c, : tn[b, h, c]].tolist() == torch.nonzero(blocks[b, h, :, c]).flatten().tolist()
    assert mask.density == pytest.approx(float(blocks.float().mean()))


def test_repr_shows_the_pattern():
    text = repr(BlockMask.causal(256, block_size=64))
    assert "BlockMask(" in text and "causal=True" in text and "density=0.625" in text
    assert "█···" in text and "████" in text


def test_to_device_and_broadcast_dims():
    mask = BlockMask.causal(128).to("cpu")
    assert mask.device.type == "cpu" and mask.shape[:2] == (1, 1)


def _i(*shape):
    return torch.ones(*shape, dtype=torch.int32)


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: BlockMask.full(100, block_size=24), ValueError),  # not a power of two
        (lambda: BlockMask.full(100, block_size=8), ValueError),  # below 16
        (lambda: BlockMask.full(-1), ValueError),
        (lambda: BlockMask.sliding_window(100, 0), ValueError),
        (lambda: BlockMask.strided(100, 0), ValueError),
        (lambda: BlockMask.fixed(100, 2, num_summary=3), ValueError),
        (lambda: BlockMask.random(100, 1.5), ValueError),
        (lambda: BlockMask.full(100, block_size="64"), TypeError),
        (lambda: BlockMask.from_dense(torch.ones(2, 2), 64, 32), TypeError),  # not bool
        (lambda: BlockMask(_i(1, 1, 3), _i(1, 1, 3, 1), 100), ValueError),  # Nq is 2 for block 64
        (lambda: BlockMask(_i(1, 1, 2), _i(1, 2, 2, 1), 100), ValueError),  # counts/indices shapes differ
        (lambda: BlockMask(torch.full((1, 1, 2), 1), torch.full((1, 1, 2, 1), 2), 100), ValueError),  # index >= Nk
        (lambda: BlockMask(torch.full((1, 1, 2), 1), torch.full((1, 1, 2, 1), -1), 100), ValueError),  # negative
        (lambda: BlockMask(torch.full((1, 1, 2), 2), torch.tensor([[[[1, 0], [0, 1]]]]), 100), ValueError),  # unsorted
        (lambda: BlockMask(torch.full((1, 1, 2), 2), torch.tensor([[[[1, 1], [0, 1]]]]), 100), ValueError),  # repeated
        (lambda: BlockMask(torch.full((1, 1, 2), 3), torch.zeros(1, 1, 2, 3, dtype=torch.int32), 100), ValueError),
        (lambda: BlockMask(_i(1, 1, 2), _i(1, 1, 2, 1), 100, window_size=(-2, 0)), ValueError),
        (lambda: BlockMask(torch.ones(1, 1, 2), _i(1, 1, 2, 1), 100), TypeError),  # float counts
    ],
)
def test_malformed_masks_are_rejected(make, error):
    with pytest.raises(error):
        make()


def test_static_transpose_equals_the_compact_one():
    """The transpose built under torch.compile (full width, from the block bitmap) holds the same
    rows as the compact one."""
    from attnops.core.masks import _transpose_lut, _transpose_lut_static

    mask = BlockMask.random((300, 257), 0.3, seed=5, batch=2, num_heads=3, block_size=(32, 16))
    counts, idx = _transpose_lut(mask.kv_num_blocks, mask.kv_indices, mask.num_blocks[1])
    s_counts, s_idx = _transpose_lut_static(mask.kv_num_blocks, mask.kv_indices, mask.num_blocks[1])
    assert torch.equal(counts, s_counts) and s_idx.shape[-1] == mask.num_blocks[0]
    width = idx.shape[-1]
    keep = torch.arange(width) < counts.unsqueeze(-1)
    assert torch.equal(torch.where(keep, s_idx[..., :width], 0), torch.where(keep, idx, 0))
