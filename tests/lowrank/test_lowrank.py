"""Low-rank-key attention (Loki) against the float64 reference of the same algorithm.

Selection is a hard choice: a score that rounds differently could pick another key and move the
output by far more than rounding. So the kernel tests use inputs whose low-rank scores are exact
in every dtype (multiples of 1/4 in [-2, 2]) and a signed-permutation basis (orthonormal, rotates
without rounding): the kernels and the reference must then choose the same keys, ties included
(there are many: the tie rule, later key first, is tested with them). Real PCA bases are tested
where the choice is forced (rank = D, topk = N: dense attention) or statistical (recall).
"""

import pytest
import torch

import attnops
from attnops import lowrank
from attnops.core import backends
from attnops.ops.lowrank import reference as lowrank_reference
from attnops.ops.softmax import reference
from attnops.lowrank import KeyProjection
from helpers import DTYPE_IDS, assert_accurate
from tests.authors_ref import loki_chosen, loki_top_r, sklearn_pca


def dyadic(*shape, dtype=torch.float32, device="cpu"):
    return (torch.randint(-8, 9, shape) / 4).to(dtype=dtype, device=device)


def signed_permutation(num_kv_heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.zeros(num_kv_heads, head_dim, head_dim)
    for h in range(num_kv_heads):
        perm = torch.randperm(head_dim, generator=g)
        signs = torch.randint(0, 2, (head_dim,), generator=g) * 2.0 - 1
        basis[h, perm, torch.arange(head_dim)] = signs
    return KeyProjection(basis, torch.linspace(2, 1, head_dim).expand(num_kv_heads, head_dim).contiguous())


def random_orthonormal(num_kv_heads, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(num_kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64))[0]
    return KeyProjection(basis.float(), torch.linspace(2, 1, head_dim).expand(num_kv_heads, head_dim).contiguous())


def check_lowrank(q, k, v, proj, rank, topk, causal=True, local=0, backend=None):
    D = q.shape[-1]
    out, lse = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=rank, topk=topk, causal=causal, return_lse=True, local=local,
                                             backend=backend)

    def ref(dtype):
        qq, kk, vv = (t.detach().cpu().to(dtype) for t in (q, k, v))
        p = proj if proj is not None else KeyProjection.identity(k.shape[2], D)
        return lowrank_reference.lowrank_key_attention(qq, kk, vv, p.rotate(qq, rank), p.rotate(kk, rank), None, topk=topk,
                                               local=local, causal=causal, softmax_scale=D ** -0.5)

    ref64, refT = ref(torch.float64), ref(q.dtype)
    assert out.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_accurate("out", out.cpu(), ref64[0], refT[0])
    assert_accurate("lse", lse.cpu(), ref64[1], refT[1])
    return out, lse


# (B, Sq, Sk, H, Hkv, D, rank, topk, local)
CASES = [
    (2, 257, 257, 4, 2, 40, 10, 33, 0),
    (1, 300, 300, 8, 2, 96, 24, 37, 8),
    (2, 100, 300, 4, 1, 64, 16, 40, 4),   # Sq < Sk: bottom-right aligned
    (1, 200, 200, 4, 4, 128, 32, 25, 25),  # topk all local
    (2, 63, 63, 2, 2, 64, 64, 64, 0),      # rank = D, topk = Sk
    (1, 150, 150, 6, 3, 100, 7, 1, 0),     # topk 1
    (1, 100, 100, 2, 1, 512, 16, 20, 4),   # the widest head dim
]
INTERPRET_CASES = [
    (1, 70, 70, 4, 2, 40, 10, 17, 0),
    (1, 40, 90, 4, 1, 64, 16, 20, 4),
]


def _ids(cases):
    return ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-r{}-k{}-l{}".format(*c) for c in cases]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES + INTERPRET_CASES, ids=_ids(CASES + INTERPRET_CASES))
def test_lowrank_matches_reference(case, dtype, causal, fwd_impl):
    if fwd_impl.interpreted and case not in INTERPRET_CASES:
        pytest.skip("interpreter: the small shapes only")
    if fwd_impl.interpreted and dtype in (torch.float16, torch.float64):
        pytest.skip("interpreter: float32 and bfloat16")
    if fwd_impl.device == "cuda" and dtype == torch.float64:
        pytest.skip("the Triton kernels take 16- and 32-bit floats")
    B, Sq, Sk, H, Hkv, D, rank, topk, local = case
    if not causal:
        local = 0
    dev = fwd_impl.device
    q, k, v = dyadic(B, Sq, H, D, dtype=dtype, device=dev), dyadic(B, Sk, Hkv, D, dtype=dtype, device=dev), \
        torch.randn(B, Sk, Hkv, D, dtype=dtype, device=dev)
    check_lowrank(q, k, v, signed_permutation(Hkv, D), rank, topk, causal, local, backend=fwd_impl.backend)


def test_lowrank_without_projection_uses_the_raw_dims(fwd_impl):
    B, S, H, Hkv, D = 1, 60, 2, 1, 40
    dev = fwd_impl.device
    q, k, v = dyadic(B, S, H, D, device=dev), dyadic(B, S, Hkv, D, device=dev), torch.randn(B, S, Hkv, D, device=dev)
    check_lowrank(q, k, v, None, 5, 11, backend=fwd_impl.backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_rank_D_and_topk_N_equal_dense_attention(dtype, fwd_impl):
    """With every key chosen the op is dense attention on q and k as given (the basis only ranks)."""
    B, S, H, Hkv, D = (1, 60, 4, 2, 64) if fwd_impl.interpreted else (2, 333, 4, 2, 64)
    dev = fwd_impl.device
    q, k, v = (torch.randn(B, S, h, D, dtype=dtype, device=dev) for h in (H, Hkv, Hkv))
    proj = random_orthonormal(Hkv, D)
    for causal in (True, False):
        out = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=D, topk=S, causal=causal, backend=fwd_impl.backend)
        cast = [t.cpu() for t in (q, k, v)]
        ref64 = reference.block_sparse_attention(*(t.double() for t in cast), None, causal=causal,
                                                 window_size=(-1, -1), softmax_scale=D ** -0.5)[0]
        refT = reference.block_sparse_attention(*cast, None, causal=causal, window_size=(-1, -1),
                                                softmax_scale=D ** -0.5)[0]
        assert_accurate("out", out.cpu(), ref64, refT)


def test_ties_go_to_the_later_key():
    """All scores equal: the chosen keys are the newest ones, so the output is their mean of v."""
    S, D, topk = 50, 16, 5
    q, k = torch.ones(1, S, 1, D), torch.ones(1, S, 1, D)
    v = torch.arange(S, dtype=torch.float32).view(1, S, 1, 1).expand(1, S, 1, D).contiguous()
    out = attnops.lowrank_key_attention(q, k, v, rank=4, topk=topk, causal=False)
    torch.testing.assert_close(out[0, :, 0, 0], torch.full((S,), float(sum(range(S - topk, S))) / topk))


def test_nan_in_nan_out_and_empty_rows(fwd_impl):
    dev = fwd_impl.device
    B, S, H, D = 2, 64, 2, 32
    q, k, v = dyadic(B, S, H, D, device=dev), dyadic(B, S, H, D, device=dev), torch.randn(B, S, H, D, device=dev)
    q[0, 10, 1, 3] = float("nan")   # one query row
    k[1, 20, 0, 0] = float("nan")   # one key: it ranks highest, every later query of head 0 picks it
    out = attnops.lowrank_key_attention(q, k, v, rank=8, topk=6, backend=fwd_impl.backend)
    nan = torch.isnan(out).any(-1).cpu()
    expected = torch.zeros(B, S, H, dtype=torch.bool)
    expected[0, 10, 1] = True
    expected[1, 20:, 0] = True
    assert torch.equal(nan, expected)
    # a query that sees no key: zeros, lse = -inf (3 rows: the decoding passes; 20: the prefill tiles)
    for rows in (3, 20):
        out, lse = attnops.lowrank_key_attention(q[:, :rows], k[:, :0], v[:, :0], rank=8, topk=6, causal=False,
                                                 return_lse=True, backend=fwd_impl.backend)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("Sq,H", [(1, 2), (1, 8), (20, 2)], ids=["decode_pass", "decode_group8_tiles", "prefill_tiles"])
@pytest.mark.parametrize("order", ["period4", "ascending", "descending", "equal", "two_levels", "extremes"])
@pytest.mark.parametrize("topk", [1, 60, 250, 700, 999])
def test_selection_is_exact_however_the_scores_are_arranged(order, topk, Sq, H, fwd_impl):
    """The C++ selection finds each row's threshold by bisection over the scores' order keys: periodic and sorted
    rows, ties everywhere, both zeros and magnitudes whose keys span the integer range all choose exactly the
    reference's keys (the orders were first written against a strided sample's bounds, which some of them
    defeated, and are kept for whatever selection comes next). Rank 1 (dim 0 of q times dim 0 of k) puts
    the designed scores in place; both the decoding passes (1 query row, 2 heads a kv head) and the tiles (20 rows;
    1 row of 8 heads a kv head) run."""
    if fwd_impl.interpreted:
        pytest.skip("C++ selection (the interpreter runs the Triton kernels' sort)")
    Sk, D = 1000, 16
    j = torch.arange(Sk)
    # extremes: magnitudes from 1e-30 to 1e6 of both signs and both zeros, whose order keys span more than a signed
    # 32-bit difference (the bisection's midpoint overflowed one); not 1e30: there the float64 reference's
    # exp(s - lse) loses the log of the sum from lse and returns the sum of the tied keys' values, not their mean
    extremes = torch.tensor([1e6, -1e6, 1e-30, -1e-30, 0.0, -0.0, 3.0, -2.5])[j % 8] * (1 + (j % 13) / 16)
    scores = {"period4": torch.where(j % 4 == 1, 2.0, 0.25) + (j % 7) / 8, "ascending": j / 64,
              "descending": -j / 64, "equal": torch.ones(Sk), "two_levels": (j % 2) / 2, "extremes": extremes}[order]
    dev = fwd_impl.device
    k = dyadic(1, Sk, 1, D)
    k[0, :, 0, 0] = scores
    q = dyadic(1, Sq, H, D)
    q[..., 0] = 1
    v = torch.randn(1, Sk, 1, D)
    check_lowrank(q.to(dev), k.to(dev), v.to(dev), None, 1, topk, causal=False, backend=fwd_impl.backend)


_HAS_BF16_DOT = backends.EXTENSION and "avx512" in backends.cpu_isa()["levels"] and \
    "avx512_bf16" in backends.cpu_isa()["cpu"]


@pytest.fixture
def bf16_products():
    """Sets how the avx512 level multiplies bf16 tiles: "bf16_dot" (VDPBF16PS), "brgemm" (the amx level's calls to
    oneDNN's brgemm, its AVX-512 code on a CPU without AMX) or "widened" (float products); restores it after."""
    if not _HAS_BF16_DOT:
        pytest.skip("needs the avx512 level and an AVX512-BF16 CPU")
    from attnops import _C

    previous = (backends.set_cpu_isa("avx512"), _C._set_bf16_dot(-1), _C._set_bf16_brgemm(0))

    def use(products):
        _C._set_bf16_dot(products != "widened")
        _C._set_bf16_brgemm(1 if products == "brgemm" else 0)

    yield use
    _C._set_bf16_brgemm(previous[2])
    _C._set_bf16_dot(previous[1])
    backends.set_cpu_isa(previous[0])


@pytest.mark.parametrize("products", ["bf16_dot", "brgemm", "widened"])
@pytest.mark.parametrize("B,S,H,Hkv,D,rank,topk,local,causal", [
    (2, 300, 4, 2, 64, 16, 40, 4, True),
    (1, 257, 6, 3, 40, 7, 33, 0, False),  # odd rank: the pairs' zero halves
    (1, 70, 2, 1, 96, 23, 9, 0, True),
])
def test_bf16_prefill_scores_in_bf16_products(bf16_products, products, B, S, H, Hkv, D, rank, topk, local, causal):
    """Prefill (4 or more query rows per kv head) scores by GEMM tiles, for a bf16 score plane in bf16 products at
    the avx512 level: the dyadic scores are exact in every product, so the keys chosen, and the outputs, are the
    reference's."""
    bf16_products(products)
    q, k = dyadic(B, S, H, D, dtype=torch.bfloat16), dyadic(B, S, Hkv, D, dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, dtype=torch.bfloat16)
    check_lowrank(q, k, v, signed_permutation(Hkv, D), rank, topk, causal, local)


def test_bf16_prefill_scores_take_the_bf16_products(bf16_products):
    """VDPBF16PS reads subnormal inputs as zero: queries of subnormal size score every key 0 there (ties: the
    newest keys win) and +-1e-39 in float products (other keys), so the outputs differ when the products ran. The
    float-plane path is unaffected by the switch."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 64, generator=g) for _ in range(3))
    q = q.sign() * 1e-39
    outs = {}
    for products in ("bf16_dot", "widened"):
        bf16_products(products)
        outs[products] = [attnops.lowrank_key_attention(x, y, z, rank=64, topk=32, causal=False)
                          for x, y, z in ((q.bfloat16(), k.bfloat16(), v.bfloat16()), (q, k, v))]
    assert not torch.equal(outs["bf16_dot"][0], outs["widened"][0])
    assert torch.equal(outs["bf16_dot"][1], outs["widened"][1])


# ---- decoding ---------------------------------------------------------------------------------------

# (B, S_max, H, Hkv, D, Sq_new, rank, topk, local)
DECODE_CASES = [
    (3, 300, 8, 8, 64, 1, 16, 37, 0),
    (3, 257, 8, 2, 128, 3, 32, 40, 8),
    (2, 200, 16, 1, 40, 16, 10, 25, 5),
    (2, 190, 4, 4, 96, 2, 24, 190, 0),
]
DECODE_INTERPRET = [(2, 90, 4, 2, 64, 2, 16, 20, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", DECODE_CASES + DECODE_INTERPRET,
                         ids=["B{}-S{}-H{}-Hkv{}-D{}-new{}-r{}-k{}-l{}".format(*c) for c in DECODE_CASES + DECODE_INTERPRET])
def test_lowrank_decode_matches_reference(case, dtype, fwd_impl):
    if fwd_impl.interpreted and case not in DECODE_INTERPRET:
        pytest.skip("interpreter: the small shapes only")
    B, S, H, Hkv, D, Sq, rank, topk, local = case
    dev = fwd_impl.device
    proj = signed_permutation(Hkv, D, seed=1)
    q = dyadic(B, Sq, H, D, dtype=dtype, device=dev)
    k_cache = proj.rotate(dyadic(B, S, Hkv, D, dtype=dtype, device=dev))  # the cache holds rotated keys
    v_cache = torch.randn(B, S, Hkv, D, dtype=dtype, device=dev)
    lens = torch.tensor([0, S, S // 2 + 1][:B], dtype=torch.int32, device=dev)
    out, lse = attnops.decode_attention(q, k_cache, v_cache, lens, return_lse=True, lowrank=proj, rank=rank, topk=topk,
                                        local=local, backend=fwd_impl.backend)

    def ref(dt):
        qr = proj.rotate(q.cpu().to(dt))
        kc, vc = k_cache.cpu().to(dt), v_cache.cpu().to(dt)
        return lowrank_reference.lowrank_key_attention(qr, kc, vc, qr[..., :rank], kc[..., :rank], lens.cpu(), topk=topk,
                                               local=local, causal=True, softmax_scale=D ** -0.5)

    ref64, refT = ref(torch.float64), ref(dtype)
    assert_accurate("out", out.cpu(), ref64[0], refT[0])
    assert_accurate("lse", lse.cpu(), ref64[1], refT[1])
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))  # the empty sequence


def test_lowrank_decode_with_full_rank_and_topk_is_dense_decode():
    B, S, H, Hkv, D = 2, 300, 8, 2, 64
    q, k, v = torch.randn(B, 3, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    lens = torch.tensor([S, 171], dtype=torch.int32)
    proj = random_orthonormal(Hkv, D)
    dense = attnops.decode_attention(q, k, v, lens)
    low = attnops.decode_attention(q, proj.rotate(k), v, lens, lowrank=proj, rank=D, topk=S)
    torch.testing.assert_close(low, dense, rtol=0, atol=2e-6)


# ---- calibration and the projection -----------------------------------------------------------------

def low_rank_keys(B, S, Hkv, D, true_rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(Hkv, true_rank, D, generator=g)
    coeff = torch.randn(B, S, Hkv, true_rank, generator=g) * torch.linspace(3, 1, true_rank)
    return torch.einsum("bshr,hrd->bshd", coeff, mix) + noise * torch.randn(B, S, Hkv, D, generator=g)


def test_calibrated_projection_is_orthonormal_and_sorted():
    keys = low_rank_keys(2, 500, 3, 64, 8, 0.05)
    proj = lowrank.calibrate([keys[:1], keys[1:]], rank=8)
    eye = torch.eye(64).expand(3, 64, 64)
    torch.testing.assert_close(proj.basis.transpose(1, 2) @ proj.basis, eye, rtol=0, atol=1e-5)
    assert torch.all(proj.eigenvalues[:, :-1] >= proj.eigenvalues[:, 1:])
    curve = proj.explained_variance
    assert torch.all(curve[:, 1:] >= curve[:, :-1] - 1e-6) and torch.allclose(curve[:, -1], torch.ones(3))
    assert float(curve[:, 7].min()) > 0.99  # 8 true dims carry nearly all of it
    assert proj.rank_for(0.99) <= 8
    q = torch.randn(2, 10, 6, 64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys[:, :10].repeat_interleave(2, dim=2))
    rotated = torch.einsum("bqhd,bkhd->bhqk", proj.rotate(q), proj.rotate(keys[:, :10]).repeat_interleave(2, dim=2))
    torch.testing.assert_close(rotated, scores, rtol=1e-4, atol=1e-4)  # orthonormal: dot products kept


def test_recall_of_the_true_topk_grows_with_rank():
    """Loki's premise on low-rank-plus-noise keys: low-rank scores find the true top-k keys."""
    B, S, Hkv, D, topk = 1, 512, 2, 64, 64
    keys = low_rank_keys(B, S, Hkv, D, true_rank=8, noise=0.1, seed=3)
    proj = lowrank.calibrate(keys)
    q = low_rank_keys(B, S, Hkv, D, true_rank=8, noise=0.1, seed=4)  # queries in the same subspace
    recalls = {r: lowrank.recall(q, keys, proj, r, topk) for r in (1, 2, 4, 8, 16, 64)}
    print("recall of the true top-%d keys vs rank:" % topk, {r: round(x, 3) for r, x in recalls.items()})
    assert recalls[64] == 1.0
    assert recalls[8] >= 0.9 > recalls[1]
    assert recalls[16] >= recalls[4] >= recalls[1]


def test_calibrate_a_model_and_save_load(tmp_path):
    model = torch.nn.Sequential(attnops.nn.Attention(64, 4, 2, rope=10000.0), attnops.nn.Attention(64, 4, 2))
    batches = [torch.randn(2, 30, 64) for _ in range(3)]
    post = lowrank.calibrate(model, rank=8, inputs=batches)
    pre = lowrank.calibrate(model, rank=8, inputs=batches, rotary="pre")
    assert set(post) == {"0", "1"} and post["0"].basis.shape == (2, 16, 16)
    assert not torch.allclose(post["0"].eigenvalues, pre["0"].eigenvalues)  # layer 0 has rotary
    torch.testing.assert_close(post["1"].eigenvalues, pre["1"].eigenvalues)  # layer 1 has none
    assert "_qkv" not in model[0].__dict__ and "_project" not in model[0].__dict__  # hooks removed
    lowrank.save(post, tmp_path / "p.pt")
    loaded = lowrank.load(tmp_path / "p.pt")
    assert set(loaded) == set(post) and torch.equal(loaded["0"].basis, post["0"].basis) and loaded["0"].rank == 8
    lowrank.save(post["1"], tmp_path / "one.pt")
    assert torch.equal(lowrank.load(tmp_path / "one.pt").eigenvalues, post["1"].eigenvalues)


# ---- modules ----------------------------------------------------------------------------------------

def generate(model, prompt, steps, caches):
    x = model(prompt, caches)
    outs = [x]
    for _ in range(steps):
        x = model(x[:, -1:], caches)
        outs.append(x)
    return torch.cat(outs, 1)


class TinyDecoder(torch.nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2, layers=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(attnops.nn.Attention(dim, heads, kv_heads, rope=10000.0)
                                          for _ in range(layers))

    def forward(self, x, caches=None):
        for i, layer in enumerate(self.layers):
            x = x + layer(x, cache=None if caches is None else caches[i])
        return x


def test_lowrank_decoding_in_modules():
    torch.manual_seed(0)
    model = TinyDecoder()
    prompt = torch.randn(2, 80, 64)
    dense = generate(model, prompt, 10, [layer.make_cache(2, 100) for layer in model.layers])
    projs = lowrank.calibrate(model, inputs=prompt)
    assert lowrank.apply(model, {"layers." + k.split(".")[-1]: p for k, p in projs.items()}, rank=16, topk=100) == 2
    exact = generate(model, prompt, 10, [layer.make_cache(2, 100) for layer in model.layers])
    torch.testing.assert_close(exact, dense, rtol=0, atol=1e-5)  # full rank, every key: the same
    lowrank.apply(model, projs, rank=4, topk=24, local=4)
    approx = generate(model, prompt, 10, [layer.make_cache(2, 100) for layer in model.layers])
    assert approx.shape == dense.shape and torch.isfinite(approx).all()
    torch.testing.assert_close(approx[:, :80], dense[:, :80], rtol=0, atol=1e-5)  # the long prompt is exact
    assert not torch.allclose(approx[:, 80:], dense[:, 80:], atol=1e-6)  # decoding used 24 of up to 90 keys
    mqa = attnops.nn.MultiQueryAttention(64, 8, 1, lowrank=KeyProjection.identity(1, 8), rank=4, topk=8)
    assert mqa.lowrank.rank == 4
    with pytest.raises(ValueError, match="rank"):
        mqa.set_lowrank(KeyProjection.identity(1, 8), rank=9, topk=8)


def test_lowrank_key_spec():
    from attnops.nn import LowRankKeySpec

    B, S, H, D = 1, 120, 4, 32
    q, k, v = dyadic(B, S, H, D), dyadic(B, S, H, D), torch.randn(B, S, H, D)
    proj = signed_permutation(H, D)
    spec = LowRankKeySpec(proj, rank=8, topk=16, local=4)
    out = spec.attend(q, k, v)
    torch.testing.assert_close(out, attnops.lowrank_key_attention(q, k, v, projection=proj, rank=8, topk=16, local=4), rtol=0, atol=0)
    layer = attnops.nn.Attention(128, 4, attention=spec)
    assert layer.lowrank.topk == 16  # the spec's settings drive the cached steps too
    with pytest.raises(ValueError, match="rank"):
        LowRankKeySpec(proj, rank=33, topk=4)
    with pytest.raises(ValueError, match="local"):
        LowRankKeySpec(proj, rank=4, topk=4, local=5)
    out_map, block_map = spec.attend(q, k, v, return_block_map=True)
    torch.testing.assert_close(out_map, out, rtol=0, atol=0)
    assert block_map.shape == (B, H, 2, 2)


# ---- registration, bad input ------------------------------------------------------------------------

def test_opcheck_compile_meta_and_no_backward():
    B, S, H, Hkv, D, R = 1, 40, 4, 2, 32, 8
    q, k, v = dyadic(B, S, H, D), dyadic(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    for indices in (False, True):
        torch.library.opcheck(torch.ops.attnops.lowrank_attn_fwd,
                              (q, k, v, q[..., :R], k[..., :R], None, 9, 2, True, 0.2, indices))
    proj = signed_permutation(Hkv, D)
    fn = torch.compile(lambda q, k, v: attnops.lowrank_key_attention(q, k, v, projection=proj, rank=R, topk=9, local=2), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attnops.lowrank_key_attention(q, k, v, projection=proj, rank=R, topk=9, local=2))
    meta = attnops.lowrank_key_attention(*(t.to("meta") for t in (q, k, v)), projection=proj.to("meta"), rank=R, topk=9)
    assert meta.shape == q.shape and meta.device.type == "meta"
    qg = q.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="forward-only"):
        attnops.lowrank_key_attention(qg, k, v, projection=proj, rank=R, topk=9).sum().backward()


def test_bad_input_is_a_clear_error():
    q, k, v = torch.randn(1, 10, 4, 32), torch.randn(1, 10, 2, 32), torch.randn(1, 10, 2, 32)
    proj = signed_permutation(2, 32)
    cases = [
        (dict(rank=0, topk=4), ValueError, "rank"),
        (dict(rank=33, topk=4), ValueError, "rank"),
        (dict(rank=4, topk=0), ValueError, "topk"),
        (dict(rank=4, topk=4, local=5), ValueError, "local"),
        (dict(rank=4, topk=4, local=2, causal=False), ValueError, "causal"),
        (dict(rank=4.0, topk=4), ValueError, "rank must be an int .* or a float in \\(0, 1\\)"),
        (dict(rank=0.5, topk=1.5), ValueError, "topk must be an int >= 1 or a float in \\(0, 1\\]"),
        (dict(rank="4", topk=4), TypeError, "rank must be an int"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            attnops.lowrank_key_attention(q, k, v, projection=proj, **kw)
    with pytest.raises(ValueError, match="fractional rank needs projection"):
        attnops.lowrank_key_attention(q, k, v, projection=None, rank=0.5, topk=4)
    with pytest.raises(ValueError, match=r"\(Hkv, D\)"):
        attnops.lowrank_key_attention(q, k, v, projection=signed_permutation(4, 32), rank=4, topk=4)
    with pytest.raises(TypeError, match="KeyProjection"):
        attnops.lowrank_key_attention(q, k, v, projection=torch.eye(32), rank=4, topk=4)
    with pytest.raises(ValueError, match="multiple"):
        attnops.lowrank_key_attention(torch.randn(1, 10, 3, 32), k, v, projection=proj, rank=4, topk=4)
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="together"):
        attnops.decode_attention(q[:, :1], k, v, lens, lowrank=proj, rank=4)
    with pytest.raises(ValueError, match="block_mask"):
        attnops.decode_attention(q[:, :1], k, v, lens, window_size=(4, 0), lowrank=proj, rank=4, topk=4)
    with pytest.raises(ValueError, match="KeyProjection.basis"):
        KeyProjection(torch.randn(2, 3, 4), torch.randn(2, 3))


@pytest.mark.parametrize("plane_dtype", [None, torch.bfloat16, torch.float16], ids=["same", "bf16", "f16"])
def test_decode_reads_the_score_plane(plane_dtype, fwd_impl):
    """KVCache(score_dim=R) keeps the first R components contiguous (optionally half-width): the
    decode kernels read them there and choose the same keys as from the cache rows."""
    B, S, H, Hkv, D, rank, topk = 2, 90 if fwd_impl.interpreted else 257, 8, 2, 64, 16, 30
    dev = fwd_impl.device
    proj = signed_permutation(Hkv, D, seed=2)
    cache = attnops.KVCache(B, S, Hkv, D, device=dev, score_dim=24, score_dtype=plane_dtype)
    k_view, v_view, lens = cache.append(proj.rotate(dyadic(B, S - 5, Hkv, D, device=dev)),
                                        torch.randn(B, S - 5, Hkv, D, device=dev))
    plane = cache.score_view()
    assert plane.shape == (B, S - 5, Hkv, 24) and plane.dtype == (plane_dtype or torch.float32)
    assert torch.equal(plane.float(), k_view[..., :24])  # dyadic values: exact in half width
    k_view, v_view, lens = cache.append(proj.rotate(dyadic(B, 2, Hkv, D, device=dev)),  # ragged: the plane too
                                        torch.randn(B, 2, Hkv, D, device=dev), lengths=[2, 1])
    plane = cache.score_view()
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(plane[b, :n].float(), k_view[b, :n, :, :24])
    q = dyadic(B, 3, H, D, device=dev)
    kw = dict(lowrank=proj, rank=rank, topk=topk, local=3, backend=fwd_impl.backend, return_lse=True)
    from_plane = attnops.decode_attention(q, k_view, v_view, lens, k_score=plane, **kw)
    from_rows = attnops.decode_attention(q, k_view, v_view, lens, **kw)
    torch.testing.assert_close(from_plane.out, from_rows.out, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_plane.lse, from_rows.lse, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="k_score"):
        attnops.decode_attention(q, k_view, v_view, lens, k_score=plane[..., :8], **kw)
    with pytest.raises(ValueError, match="low-rank decoding"):
        attnops.decode_attention(q, k_view, v_view, lens, k_score=plane)
    with pytest.raises(ValueError, match="score_dim"):
        attnops.KVCache(B, S, Hkv, D, score_dim=D + 1)



@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_block_maps_of_the_chosen_keys(reduce, fwd_impl):
    """The map of Loki attention (probability on the chosen keys, 0 elsewhere) against the pooled
    float64 reference, prefill and decoding; the output is the same with or without the map."""
    dev = fwd_impl.device
    B, S, H, Hkv, D = 2, 70 if fwd_impl.interpreted else 203, 4, 2, 32
    proj = signed_permutation(Hkv, D, seed=4)
    q, k = dyadic(B, S, H, D, device=dev), dyadic(B, S, Hkv, D, device=dev)
    v = torch.randn(B, S, Hkv, D, device=dev)
    request = reference.MapRequest(32, 16, reduce)
    res = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=8, topk=19, local=3, return_block_map=True, map_block_size=(32, 16),
                                        reduce=reduce, backend=fwd_impl.backend)
    cast = [t.cpu().double() for t in (q, k, v)]
    ref = lowrank_reference.lowrank_key_attention(*cast, proj.rotate(cast[0], 8), proj.rotate(cast[1], 8), None, topk=19,
                                          local=3, causal=True, softmax_scale=D ** -0.5, block_map=request)
    refT = lowrank_reference.lowrank_key_attention(*(t.float() for t in cast), proj.rotate(cast[0].float(), 8),
                                           proj.rotate(cast[1].float(), 8), None, topk=19, local=3, causal=True,
                                           softmax_scale=D ** -0.5, block_map=request)
    assert_accurate("map", res.block_map.cpu(), ref[2], refT[2])
    plain = attnops.lowrank_key_attention(q, k, v, projection=proj, rank=8, topk=19, local=3, backend=fwd_impl.backend)
    torch.testing.assert_close(res.out, plain, rtol=0, atol=0)
    if reduce == "mean":
        sums = res.block_map.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    lens = torch.tensor([S, S // 2], dtype=torch.int32, device=dev)  # decoding: 3 new tokens
    kc = proj.rotate(k)
    dec = attnops.decode_attention(q[:, :3], kc, v, lens, lowrank=proj, rank=8, topk=19, return_block_map=True,
                                   map_block_size=(16, 16), reduce=reduce, backend=fwd_impl.backend)
    qr = proj.rotate(q[:, :3].cpu().double())
    kr = kc.cpu().double()
    ref_dec = lowrank_reference.lowrank_key_attention(qr, kr, v.cpu().double(), qr[..., :8], kr[..., :8], lens.cpu(),
                                              topk=19, local=0, causal=True, softmax_scale=D ** -0.5,
                                              block_map=reference.MapRequest(16, 16, reduce))
    torch.testing.assert_close(dec.block_map.cpu().double(), ref_dec[2], rtol=0, atol=2e-6)


# ---- fidelity to Loki's code: centred PCA, fractional rank and topk -----------------------------------

def anisotropic_keys(B, S, Hkv, D, seed=0, offset=2.0):
    """Keys with distinct variances along random axes (a well-defined PCA basis) and a mean far from 0,
    where centring changes the basis."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.linalg.qr(torch.randn(Hkv, D, D, generator=g, dtype=torch.float64))[0].float()
    spread = torch.linspace(3.0, 0.2, D) ** 2
    coeff = torch.randn(B, S, Hkv, D, generator=g) * spread
    mean = offset * torch.randn(Hkv, D, generator=g)
    return torch.einsum("bshd,hed->bshe", coeff, axes) + mean


def test_centered_calibration_is_lokis_sklearn_pca():
    """calibrate(centered=True) gives the basis and explained-variance curve of Loki's pca.py
    (sklearn PCA per head, port in tests/authors_ref.py), column for column up to sign."""
    keys = anisotropic_keys(2, 1500, 2, 40)
    proj = lowrank.calibrate([keys[:1], keys[1:]], centered=True)
    assert proj.centered and proj.state_dict()["centered"] is True
    for h in range(2):
        ratio, components, _ = sklearn_pca(keys[:, :, h].reshape(-1, 40))
        overlap = (proj.basis[h].double().T @ components.T).abs()  # |<ours_i, theirs_j>|
        torch.testing.assert_close(overlap, torch.eye(40, dtype=torch.float64), rtol=0, atol=2e-3)
        torch.testing.assert_close(proj.explained_variance[h].double(), ratio.cumsum(0), rtol=0, atol=1e-5)
    plain = lowrank.calibrate(keys)  # uncentred: the mean direction leads
    assert not plain.centered
    assert float((plain.basis[0, :, 0] @ proj.basis[0, :, 0]).abs()) < 0.99
    restored = KeyProjection.from_state_dict(proj.state_dict())
    assert restored.centered and torch.equal(restored.basis, proj.basis)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_fractional_rank_is_lokis_top_r(fraction):
    keys = anisotropic_keys(1, 2000, 3, 64, seed=1)
    proj = lowrank.calibrate(keys, centered=True, rank=fraction)
    ratios = torch.stack([sklearn_pca(keys[0, :, h])[0] for h in range(3)]).float()
    expected = max(1, loki_top_r(ratios, fraction))
    assert proj.rank == proj.loki_rank(fraction) == expected
    assert proj.loki_rank(fraction) <= proj.rank_for(fraction)  # Loki stops before the crossing component


@pytest.mark.parametrize("causal", [True, False])
def test_fractional_topk_and_rank_choose_lokis_keys(causal):
    """End to end as Loki runs it: a centred basis, top_r = 0.7 and top_k = 0.25: the op attends to the keys
    Loki's mask_attn_pca_topk keeps, so its output is exact attention over them."""
    B, S, H, Hkv, D = 2, 203, 4, 2, 64
    keys = anisotropic_keys(B, S, Hkv, D, seed=2)
    proj = lowrank.calibrate(keys, centered=True)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, S, H, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    out = attnops.lowrank_key_attention(q, keys, v, projection=proj, rank=0.7, topk=0.25, causal=causal)
    ratios = torch.stack([sklearn_pca(keys[:, :, h].reshape(-1, D))[0] for h in range(Hkv)]).float()
    r = loki_top_r(ratios, 0.7)
    assert 1 < r < D and r == proj.loki_rank(0.7)
    comps = proj.basis[:, :, :r].double().repeat_interleave(H // Hkv, dim=0)  # repeat_kv of Loki's components
    chosen = loki_chosen(q.double().transpose(1, 2), keys.double().repeat_interleave(H // Hkv, dim=2).transpose(1, 2),
                         comps, 0.25, causal=causal)
    assert int(chosen[0, 0, -1].sum()) == int(0.25 * S)
    from attnops.ops.softmax.reference import masked_attention
    ref = masked_attention(q.double(), keys.double(), v.double(), chosen, D ** -0.5)[0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)


def test_fractional_topk_in_decoding_and_modules():
    """A fractional topk resolves against the batch's key length per step (Loki's padded length): the same
    output as the count it comes to; modules keep the fraction and resolve it at every step."""
    B, S, Hkv, H, D = 2, 160, 2, 4, 32
    proj = random_orthonormal(Hkv, D, seed=3)
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    q = torch.randn(B, 1, H, D, generator=g)
    lens = torch.tensor([150, 97], dtype=torch.int32)
    frac = attnops.decode_attention(q, k_cache, v_cache, lens, lowrank=proj, rank=0.5, topk=0.2)
    count = attnops.decode_attention(q, k_cache, v_cache, lens, lowrank=proj, rank=proj.loki_rank(0.5), topk=30)
    assert torch.equal(frac, count)  # int(0.2 * 150) = 30
    layer = attnops.nn.Attention(H * D, H, num_kv_heads=Hkv, lowrank=proj, rank=0.5, topk=0.2)
    assert layer.lowrank.topk == 0.2 and layer.lowrank.rank == proj.loki_rank(0.5)
    with pytest.raises(ValueError, match="topk must be"):
        layer.set_lowrank(proj, rank=4, topk=1.2)
