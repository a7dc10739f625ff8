"""Split-KV decoding against the float64 reference: ragged cache lengths (0 and S_max included),
1..16 new tokens, GQA ratios 1/2/4/5/8/32, head dims 40/64/72/96/100/128, every split count, windows, block masks,
on every implementation (C++, Triton, and the CUDA kernel where a GPU is present)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import attnops
from attnops import BlockMask, dispatch
from attnops.ops.decode import reference
from helpers import DTYPE_IDS, assert_accurate, make_decode_inputs, ragged_lengths

# (B, S_max, H, Hkv, D, Sq_new)
SHAPES = [
    (3, 300, 32, 1, 64, 1),
    (3, 257, 8, 2, 128, 3),
    (2, 300, 8, 8, 64, 16),
    (2, 190, 16, 2, 40, 2),
    (1, 333, 4, 4, 128, 1),
    (2, 200, 8, 2, 96, 1),
    (1, 150, 4, 4, 64, 3),
    (2, 131, 6, 3, 100, 1),  # 2 rows per group, D not a multiple of the vector width
    (1, 97, 10, 2, 72, 1),  # 5 rows per group: register blocks of 4 + 1 rows, an odd key count
    (2, 150, 8, 2, 512, 2),  # head dims past 256 (Gemma 4's global layers: 512)
    (1, 120, 4, 1, 264, 1),
]
SHAPE_IDS = ["B{}-S{}-H{}-Hkv{}-D{}-new{}".format(*s) for s in SHAPES]


def check_decode(q, k, v, lens, block_mask=None, window=(-1, -1), num_splits=0, backend=None):
    D = q.shape[-1]
    out, lse = attnops.decode_attention(q, k, v, lens, block_mask=block_mask, window_size=window, return_lse=True,
                                        num_splits=num_splits, backend=backend)
    cpu = [t.detach().cpu() for t in (q, k, v)]
    mask = None if block_mask is None else block_mask.to("cpu")
    ref64 = reference.decode_attention(*(t.double() for t in cpu), lens.cpu(), mask, window_size=(window[0], 0),
                                       softmax_scale=D ** -0.5)
    refT = reference.decode_attention(*cpu, lens.cpu(), mask, window_size=(window[0], 0), softmax_scale=D ** -0.5)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_accurate("out", out.cpu(), ref64[0], refT[0])
    assert_accurate("lse", lse.cpu(), ref64[1], refT[1])
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_matches_reference(shape, num_splits, dtype, fwd_impl):
    B, S, H, Hkv, D, Sq = shape
    dev = fwd_impl.device
    q, k, v, lens = make_decode_inputs(shape, dtype, dev)
    out, lse = check_decode(q, k, v, lens, num_splits=num_splits, backend=fwd_impl.backend)
    if B > 1:  # the empty sequence: zeros and lse = -inf
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))


@pytest.mark.parametrize("window", [(-1, -1), (37, 0)], ids=["no-window", "window37"])
def test_decode_with_block_mask_and_window(window, fwd_impl):
    B, S, H, Hkv, D, Sq = 2, 300, 8, 2, 64, 4
    dev = fwd_impl.device
    q, k, v = (torch.randn(B, n, h, D, device=dev) for n, h in ((Sq, H), (S, Hkv), (S, Hkv)))
    mask = BlockMask.random((Sq, S), 0.6, seed=3, batch=B, num_heads=H, block_size=(16, 32)).to(dev)
    check_decode(q, k, v, torch.tensor([S, 123], dtype=torch.int32, device=dev), block_mask=mask, window=window,
                 num_splits=3, backend=fwd_impl.backend)


def test_decode_equals_attention_on_the_prefix():
    """With a full cache, decoding the last Sq tokens is causal attention of those queries."""
    q, k, v = torch.randn(1, 5, 8, 64), torch.randn(1, 200, 2, 64), torch.randn(1, 200, 2, 64)
    dec = attnops.decode_attention(q, k, v, torch.tensor([200], dtype=torch.int32))
    full = attnops.attention(q, k, v, causal=True)
    torch.testing.assert_close(dec, full, rtol=0, atol=2e-6)


def test_decode_is_forward_only():
    q = torch.randn(1, 1, 4, 32, requires_grad=True)
    k, v = torch.randn(1, 50, 4, 32), torch.randn(1, 50, 4, 32)
    out = attnops.decode_attention(q, k, v, torch.tensor([50], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="forward-only"):
        out.sum().backward()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(q=torch.randn(1, 65, 4, 32)), ValueError, "new tokens"),
        (dict(lens=torch.tensor([10, 10], dtype=torch.int32)), ValueError, "shape (1,)"),
        (dict(lens=torch.tensor([51], dtype=torch.int32)), ValueError, "[0, S_max=50]"),
        (dict(lens=torch.tensor([-1], dtype=torch.int32)), ValueError, "[0, S_max=50]"),
        (dict(lens=torch.tensor([10.0])), TypeError, "integer"),
        (dict(lens=[10]), TypeError, "tensor"),
        (dict(window_size=(8, 2)), ValueError, "causal"),
        (dict(num_splits=-1), ValueError, "num_splits"),
        (dict(block_mask=BlockMask.causal(50)), ValueError, "(Sq, Sk)"),
        (dict(k=torch.randn(1, 50, 3, 32)), ValueError, "multiple"),
    ],
)
def test_decode_bad_input(kwargs, error, words):
    args = dict(q=torch.randn(1, 1, 4, 32), k=torch.randn(1, 50, 2, 32), v=torch.randn(1, 50, 2, 32),
                lens=torch.tensor([10], dtype=torch.int32))
    args.update(kwargs)
    if "k" in kwargs:
        args["v"] = torch.randn_like(args["k"])
    q, k, v, lens = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("lens")
    with pytest.raises(error) as info:
        attnops.decode_attention(q, k, v, lens, **args)
    assert words in str(info.value)


# ---- KVCache -------------------------------------------------------------------------------------

def test_kv_cache_appends_per_sequence_and_resets():
    cache = attnops.KVCache(batch=2, max_len=10, num_kv_heads=1, head_dim=4)
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    kview, vview, lens = cache.append(k1, v1)
    assert lens.tolist() == [3, 3] and kview.shape == (2, 3, 1, 4) and torch.equal(kview, k1)
    k2, v2 = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    kview, vview, lens = cache.append(k2, v2)
    assert lens.tolist() == [4, 4] and torch.equal(kview[:, 3:4], k2) and torch.equal(vview[:, :3], v1)
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0]
    assert "seqlens=[0, 0]" in repr(cache)


def test_kv_cache_release_empties_chosen_sequences():
    """``release(b)`` empties sequence b only (the others keep their tokens); a new sequence appended into the slot
    reads from position 0; lengths an earlier append returned do not change; bad indices leave the cache as it was."""
    cache = attnops.KVCache(batch=3, max_len=10, num_kv_heads=1, head_dim=4)
    k1 = torch.randn(3, 4, 1, 4)
    _, _, lens = cache.append(k1, k1 + 1)
    for bad in (3, -1, [0, 5], True, [1.0], 1.0, "0", torch.tensor([True, False, False]), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="sequence indices in \\[0, 3\\)"):
            cache.release(bad)
    assert cache.host_seqlens.tolist() == [4, 4, 4]
    cache.release(1)
    assert cache.host_seqlens.tolist() == [4, 0, 4] and lens.tolist() == [4, 4, 4]
    k2 = torch.randn(3, 2, 1, 4)
    kc, vc, lens2 = cache.append(k2, k2 + 1, lengths=[0, 2, 1])
    assert lens2.tolist() == [4, 2, 5]
    assert torch.equal(kc[1, :2], k2[1]) and torch.equal(vc[1, :2], k2[1] + 1)
    assert torch.equal(kc[0, :4], k1[0]) and torch.equal(kc[2, :4], k1[2]) and torch.equal(kc[2, 4], k2[2, 1])
    cache.release(torch.tensor([0, 2]))
    assert cache.host_seqlens.tolist() == [0, 2, 0] and cache.seqlens.tolist() == [0, 2, 0]
    # the other ways to name sequences: a 0-d tensor, a range, the elements of an index tensor
    cache.append(k2, k2, lengths=range(3))
    for chosen, left in ((torch.tensor(1), [0, 0, 2]), (range(2, 3), [0, 0, 0])):
        cache.release(chosen)
        assert cache.host_seqlens.tolist() == left
    cache.append(k2, k2)
    cache.release(list(torch.tensor([0, 1])))
    assert cache.host_seqlens.tolist() == [0, 0, 2]


def test_kv_cache_fork_copies_a_sequence():
    """``KVCache.fork(src, dst)``: empty sequences take a copy of ``src``'s rows (the score plane too) and then
    diverge; refused forks (into a sequence holding tokens, into itself, bad indices) change nothing."""
    cache = attnops.KVCache(batch=3, max_len=10, num_kv_heads=1, head_dim=4, score_dim=2)
    k1 = torch.randn(3, 5, 1, 4)
    cache.append(k1, -k1, lengths=[5, 0, 0])
    for src, dst, words in ((0, 0, "other than itself"), (1, 0, "release them first"), (3, 1, "src must be"),
                            (0, [1, 7], "fork takes")):
        with pytest.raises(ValueError, match=words):
            cache.fork(src, dst)
    assert cache.host_seqlens.tolist() == [5, 0, 0]
    cache.fork(0, [1, 2])
    assert cache.seqlens.tolist() == [5, 5, 5]
    k2 = torch.randn(3, 1, 1, 4)
    kc, vc, _ = cache.append(k2, -k2)
    for b in range(3):
        assert torch.equal(kc[b], torch.cat((k1[0], k2[b]))) and torch.equal(vc[b], -kc[b])
        assert torch.equal(cache.score_view()[b], kc[b, :, :, :2])


def test_kv_cache_bad_append_leaves_it_unchanged():
    cache = attnops.KVCache(batch=1, max_len=4, num_kv_heads=2, head_dim=8)
    cache.append(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    before = (cache.k.clone(), cache.v.clone(), cache.seqlens.clone())
    bad = [
        ((torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)), ValueError, "overflow"),
        ((torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)), ValueError, "num_kv_heads"),
        ((torch.randn(1, 1, 2, 8), torch.randn(1, 2, 2, 8)), ValueError, "differ"),
        ((torch.randn(1, 1, 2, 8).double(), torch.randn(1, 1, 2, 8).double()), TypeError, "dtype"),
        ((torch.randn(1, 1, 2, 8, device="meta"), torch.randn(1, 1, 2, 8, device="meta")), ValueError, "on"),
    ]
    for (k, v), error, words in bad:
        with pytest.raises(error, match=words):
            cache.append(k, v)
        assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
        assert torch.equal(cache.seqlens, before[2])
    with pytest.raises(ValueError):
        attnops.KVCache(batch=0, max_len=4, num_kv_heads=1, head_dim=8)


def test_kv_cache_ragged_prefill_matches_each_sequence_alone(fwd_impl):
    """Prompts of different lengths (0, 1, 5, 17, 40) in one batch: each appends its own number of tokens (left
    padded to T) and the left-padded queries attend exactly as each prompt alone does, then two decoding steps
    for the whole batch; the padding rows are finite. Bad lengths leave the cache unchanged."""
    lens = [5, 17, 0, 1, 40]
    B, T, H, Hkv, D = len(lens), max(lens), 4, 2, 24
    dev = fwd_impl.device
    cache = attnops.KVCache(batch=B, max_len=64, num_kv_heads=Hkv, head_dim=D, device=dev)
    seqs = [[torch.randn(n, H, D), torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)] for n in lens]
    q, k, v = torch.zeros(B, T, H, D), torch.zeros(B, T, Hkv, D), torch.zeros(B, T, Hkv, D)
    for b, (qs, ks, vs) in enumerate(seqs):  # left padding
        n = lens[b]
        q[b, T - n:], k[b, T - n:], v[b, T - n:] = qs, ks, vs
    kc, vc, seqlens = cache.append(k.to(dev), v.to(dev), lengths=torch.tensor(lens))
    assert cache.host_seqlens.tolist() == lens
    out = attnops.decode_attention(q.to(dev), kc, vc, seqlens, backend=fwd_impl.backend).cpu()
    assert torch.isfinite(out).all()
    for step in range(3):
        for b, (qs, ks, vs) in enumerate(seqs):
            n = lens[b] + step
            if n == 0:
                continue
            want = attnops.attention(qs[None], ks[None], vs[None], causal=True)[0]
            rows = out[b, out.shape[1] - (lens[b] if step == 0 else 1):]
            torch.testing.assert_close(rows, want[want.shape[0] - rows.shape[0]:], rtol=1e-5, atol=1e-5)
        # one more token for every sequence
        new = [(torch.randn(1, H, D), torch.randn(1, Hkv, D), torch.randn(1, Hkv, D)) for _ in lens]
        for b, (qn, kn, vn) in enumerate(new):
            seqs[b] = [torch.cat([a, x]) for a, x in zip(seqs[b], (qn, kn, vn))]
        kc, vc, seqlens = cache.append(torch.stack([x[1] for x in new]).to(dev),
                                       torch.stack([x[2] for x in new]).to(dev))
        out = attnops.decode_attention(torch.stack([x[0] for x in new]).to(dev), kc, vc, seqlens,
                                       backend=fwd_impl.backend).cpu()
    before = cache.k.clone(), cache.host_seqlens
    for bad, error in (([1, 2], ValueError), ([0, 0, 0, 0, 2], ValueError), ([0.5] * 5, TypeError),
                       (torch.ones(5), TypeError), ([64, 0, 0, 0, 0], ValueError)):
        with pytest.raises(error, match="lengths|overflow"):
            cache.append(torch.zeros(B, 1 if bad != [64, 0, 0, 0, 0] else 64, Hkv, D, device=dev),
                         torch.zeros(B, 1 if bad != [64, 0, 0, 0, 0] else 64, Hkv, D, device=dev), lengths=bad)
        assert torch.equal(cache.k, before[0]) and torch.equal(cache.host_seqlens, before[1])


# ---- CUDA kernels ----------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ
                                else None)


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_decode_kernels_compile(arch, tmp_path):
    """Compile only (CI has nvcc but no GPU): the kernels build for sm_80 and sm_90 with the flags
    setup.py uses."""
    cmd = [NVCC, "-c", str(CSRC / "decode_attention_kernels.cu"), "-o", str(tmp_path / "k.o"), "-std=c++20", "-O3",
           "--use_fast_math", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC.parent}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.skipif(not dispatch.is_available("cuda"),
                    reason="CUDA decode kernel unavailable (no GPU, or attnops._C built without CUDA)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cuda_decode_kernel(shape, dtype):
    B, S, H, Hkv, D, Sq = shape
    q = torch.randn(B, Sq, H, D, dtype=dtype, device="cuda")
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device="cuda")
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device="cuda")
    for splits in (0, 1, 3):
        check_decode(q, k, v, ragged_lengths(B, S).cuda(), num_splits=splits, backend="cuda")
