"""Randomly drawn configurations of the softmax core, packed batches and decoding against their float64
references, with the accuracy rule (helpers.assert_accurate). The hand-written tests pair the options one or two at
a time; here shapes (odd lengths, Sq != Sk, GQA and MQA ratios, head dims 16-128) and options (causal, windows,
softcap, ALiBi, sinks, float and boolean biases, block masks of every constructor and block size, packed documents,
varlen layouts, paged and left-padded caches, split keys) are drawn together from fixed seeds, at every ISA level
this CPU runs. A failure names its configuration; its seed reproduces it (``_core_case(seed)`` and friends)."""

import random

import pytest
import torch

import attnops
from attnops import BlockMask
from decode.test_paged import paged_copy
from helpers import assert_accurate, compare_with_reference

CORE_SEEDS = range(24)
MASK_SEEDS = range(16)
DECODE_SEEDS = range(16)
# The first draws again through the other implementations (the `impl` fixture: the C++ backward's fused and two-pass
# algorithms, the Triton kernels, the PyTorch fallback); the interpreter takes seconds a draw.
OTHER_IMPL_SEEDS = range(12)


def _options(rng: random.Random, H: int, B: int) -> dict:
    """Score modifiers shared by the core's and the block masks' cases."""
    opts = {}
    if rng.random() < 0.3:
        opts["softcap"] = rng.choice([5.0, 30.0])
    if rng.random() < 0.3:
        opts["alibi_slopes"] = torch.rand(H) * 0.5 if rng.random() < 0.5 else torch.rand(B, H) * 0.5
    if rng.random() < 0.3:
        opts["sinks"] = torch.randn(H)
    if rng.random() < 0.3:
        opts["softmax_scale"] = rng.choice([0.05, 0.3, 1.0])
    return opts


def _documents(rng: random.Random, B: int, S: int) -> torch.Tensor:
    """(B, S) document ids: up to three cuts at random positions, the same for every batch row."""
    ids = torch.zeros(S, dtype=torch.long)
    for cut in rng.sample(range(1, S), min(3, S - 1)) if S > 1 else []:
        ids[cut:] += 1
    return ids.expand(B, S).clone()


def _describe(shape: str, dtype: torch.dtype, opts: dict) -> str:
    return f"{shape} {str(dtype)[6:]} " + " ".join(
        f"{name}={'tensor' + str(tuple(v.shape)) if isinstance(v, torch.Tensor) else v}" for name, v in opts.items())


def _core_case(seed: int):
    """-> (q, k, v, options of attnops.attention, description)."""
    rng = random.Random(seed)
    B, Hkv = rng.choice([1, 2]), rng.choice([1, 2, 3])
    H, D = Hkv * rng.choice([1, 2, 4]), rng.choice([16, 40, 64, 96, 128])
    Sq = rng.randint(1, 300)
    Sk = Sq if rng.random() < 0.5 else rng.randint(1, 300)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    opts = _options(rng, H, B)
    if rng.random() < 0.5:
        opts["causal"] = True
    if rng.random() < 0.4:
        opts["window_size"] = (rng.choice([-1, 0, 5, 63, 200]), rng.choice([-1, 0, 7, 100]))
    if rng.random() < 0.2:
        opts["attn_bias"] = torch.randn(1, H, Sq, Sk) if rng.random() < 0.5 else torch.rand(B, 1, Sq, Sk) > 0.3
    if Sq == Sk and rng.random() < 0.3:
        opts["document_ids"] = _documents(rng, B, Sq)
    qkv = [torch.randn(B, S, heads, D) * scale for S, heads, scale in
           ((Sq, H, rng.choice([0.5, 1.0, 3.0])), (Sk, Hkv, 1.0), (Sk, Hkv, 1.0))]
    return [t.to(dtype) for t in qkv], opts, _describe(f"B{B} Sq{Sq} Sk{Sk} H{H}/{Hkv} D{D}", dtype, opts)


def _mask_case(seed: int):
    """-> (q, k, v, block mask, options of attnops.block_sparse_attention, description)."""
    rng = random.Random(1000 + seed)
    B, Hkv = rng.choice([1, 2]), rng.choice([1, 2])
    H, D, S = Hkv * rng.choice([1, 2, 3]), rng.choice([16, 40, 64, 96]), rng.randint(1, 400)
    block, causal = rng.choice([16, 32, 64, 128]), rng.random() < 0.5
    dtype = rng.choice([torch.float32, torch.bfloat16])
    n = -(-S // block)
    kind = rng.choice(["from_dense", "dilated", "random", "sliding_window"])
    if kind == "from_dense":
        shape = rng.choice([(n, n), (H, n, n), (B, H, n, n)])
        generator = torch.Generator().manual_seed(seed)
        mask = BlockMask.from_dense(torch.rand(shape, generator=generator) < rng.choice([0.2, 0.5, 0.9]), S,
                                    block_size=block, causal=causal)
    elif kind == "dilated":
        mask = BlockMask.dilated(S, rng.randint(1, 6), rng.randint(1, 4), causal=causal, block_size=block)
    elif kind == "random":
        mask = BlockMask.random(S, rng.choice([0.1, 0.4]), seed=seed, batch=B, num_heads=H, causal=causal,
                                block_size=block)
    else:
        mask = BlockMask.sliding_window(S, rng.choice([1, 17, 100, 300]), causal=causal, block_size=block)
    opts = _options(rng, H, B)
    if rng.random() < 0.3:
        opts["document_ids"] = _documents(rng, B, S)
    qkv = [torch.randn(B, S, heads, D).to(dtype) for heads in (H, Hkv, Hkv)]
    desc = _describe(f"{kind} block {block} causal={causal} B{B} S{S} H{H}/{Hkv} D{D}", dtype, opts)
    return qkv, mask, opts, desc


def _decode_case(seed: int):
    """-> (q, k, v, cache_seqlens, options, paged (k, v, block_table) or None, description): caches unpaged for the
    reference, and the same rows in shuffled pages where paged (decode.test_paged.paged_copy)."""
    rng = random.Random(2000 + seed)
    B, Hkv = rng.choice([1, 2, 3]), rng.choice([1, 2])
    H, D = Hkv * rng.choice([1, 4, 8, 16]), rng.choice([32, 40, 64, 128])
    S_max, Sq = rng.randint(16, 700), rng.choice([1, 1, 2, 5, 16])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    seqlens = torch.tensor([rng.randint(Sq, S_max) for _ in range(B)], dtype=torch.int32)
    opts = {}
    if rng.random() < 0.3:
        opts["window_size"] = (rng.choice([0, 10, 200]), rng.choice([-1, 0]))
    if rng.random() < 0.3:
        opts["softcap"] = 15.0
    if rng.random() < 0.3:
        opts["sinks"] = torch.randn(H)
    if rng.random() < 0.3:
        opts["alibi_slopes"] = torch.rand(H) * 0.2
    if rng.random() < 0.3:
        opts["cache_leftpad"] = torch.tensor([rng.randint(0, int(s) - Sq) for s in seqlens], dtype=torch.int32)
    split = {"num_splits": rng.choice([1, 2, 5])} if rng.random() < 0.3 else {}
    q, k, v = (torch.randn(B, S, heads, D).to(dtype) for S, heads in ((Sq, H), (S_max, Hkv), (S_max, Hkv)))
    paged = paged_copy(k, v, seqlens, rng.choice([1, 16, 64]), seed=seed) if rng.random() < 0.4 else None
    desc = _describe(f"B{B} Sq{Sq} S_max{S_max} H{H}/{Hkv} D{D} paged={paged is not None}", dtype, {**opts, **split})
    return (q, k, v, seqlens), opts, split, paged, desc


def _double(opts: dict) -> dict:
    return {name: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for name, v in opts.items()}


def _on_cpu(impl) -> None:
    """The draws build CPU tensors (options, masks, caches and offsets included): an implementation on another device
    runs the hand-written suites, which move their inputs."""
    if impl.device != "cpu":
        pytest.skip("the drawn configurations are CPU tensors; on a GPU the hand-written suites run the kernels")


def _factor(impl) -> float:
    """The accuracy rule's multiple of the reference's error: 2, but 16 for the Triton kernels under the interpreter.
    There numpy's sgemm runs tl.dot and rounds a score by the tile's shape, so the backward's P = exp2(s - lse) stops
    cancelling the forward's rounding at large logits (softmax_scale=1.0: dv up to 9x the reference's error;
    DESIGN.md, "Where the rule is too strict"). The interpreter checks the kernels' logic (a wrong window, mask or
    modifier is off by orders of magnitude more); compiled on a GPU the hand-written suites hold them to 2x."""
    return 16.0 if impl.interpreted else 2.0


@pytest.mark.parametrize("seed", CORE_SEEDS)
def test_random_core_configs(seed, cpu_impl):
    """attnops.attention, forward and backward, against the float64 reference."""
    _check_core(seed, cpu_impl)


@pytest.mark.parametrize("seed", OTHER_IMPL_SEEDS)
def test_random_core_configs_every_impl(seed, impl):
    """The first draws through every other implementation: the C++ backward's two algorithms, the Triton kernels
    and the PyTorch fallback."""
    _on_cpu(impl)
    _check_core(seed, impl)


def _compare_op(impl, op, qkv, opts, desc):
    """``op(q, k, v, backend=, return_lse=True, **opts)`` at ``impl`` against the float64 reference, forward and
    backward (the options' tensors in float64 for the float64 run)."""
    def run(backend):
        def call(q, k, v):
            res = op(q, k, v, return_lse=True, backend=backend, **(_double(opts) if q.dtype == torch.float64 else opts))
            return res.out, res.lse
        return call

    compare_with_reference(run(impl.backend), run("reference"), list(qkv), qkv[0].dtype, name=desc,
                           factor=_factor(impl))


def _check_core(seed, impl):
    qkv, opts, desc = _core_case(seed)
    _compare_op(impl, attnops.attention, qkv, opts, desc)


@pytest.mark.parametrize("seed", MASK_SEEDS)
def test_random_block_mask_configs(seed, cpu_impl):
    """attnops.block_sparse_attention on drawn masks, forward and backward, against the float64 reference."""
    _check_block_mask(seed, cpu_impl)


@pytest.mark.parametrize("seed", OTHER_IMPL_SEEDS[:6])
def test_random_block_mask_configs_every_impl(seed, impl):
    _on_cpu(impl)
    _check_block_mask(seed, impl)


def _check_block_mask(seed, impl):
    qkv, mask, opts, desc = _mask_case(seed)
    _compare_op(impl, lambda q, k, v, **kw: attnops.block_sparse_attention(q, k, v, mask, **kw), qkv, opts, desc)


@pytest.mark.parametrize("seed", DECODE_SEEDS)
def test_random_decode_configs(seed, cpu_impl):
    """attnops.decode_attention (paged or not, split or not) against the float64 reference on the unpaged cache."""
    _check_decode(seed, cpu_impl)


@pytest.mark.parametrize("seed", OTHER_IMPL_SEEDS[:6])
def test_random_decode_configs_every_impl(seed, fwd_impl):
    if fwd_impl.backend == "cpu":
        pytest.skip("the C++ levels run in test_random_decode_configs (decoding has no backward algorithms)")
    _on_cpu(fwd_impl)
    _check_decode(seed, fwd_impl)


def _check_decode(seed, impl):
    (q, k, v, seqlens), opts, split, paged, desc = _decode_case(seed)
    k_cache, v_cache, table = paged if paged is not None else (k, v, None)
    extra = {**split, **({"block_table": table} if table is not None else {})}
    got = attnops.decode_attention(q, k_cache, v_cache, seqlens, return_lse=True, backend=impl.backend,
                                   **opts, **extra)
    ref64 = attnops.decode_attention(q.double(), k.double(), v.double(), seqlens, return_lse=True,
                                     backend="reference", **_double(opts))
    ref_lp = attnops.decode_attention(q, k, v, seqlens, return_lse=True, backend="reference", **opts)
    assert got.out.dtype == q.dtype
    assert_accurate(f"{desc} out", got.out, ref64.out, ref_lp.out, _factor(impl))
    assert_accurate(f"{desc} lse", got.lse, ref64.lse, ref_lp.lse, _factor(impl))


VARLEN_SEEDS = range(12)


def _varlen_case(seed: int):
    """-> (q, k, v packed, cu_seqlens_q, cu_seqlens_k, options, description): 1-4 sequences of 0-200 tokens, the key
    layout the query's or its own (ALiBi in either: distances from each sequence's own bottom-right corner)."""
    rng = random.Random(3000 + seed)
    count, Hkv = rng.randint(1, 4), rng.choice([1, 2])
    H, D = Hkv * rng.choice([1, 3]), rng.choice([32, 40, 64])
    len_q = [rng.randint(1 if i == 0 else 0, 200) for i in range(count)]
    len_k = len_q if rng.random() < 0.5 else [rng.randint(1, 200) for _ in range(count)]
    dtype = rng.choice([torch.float32, torch.bfloat16])
    opts = {}
    if rng.random() < 0.5:
        opts["causal"] = True
    if rng.random() < 0.3:
        opts["window_size"] = (rng.choice([0, 9, 60]), rng.choice([-1, 0, 5]))
    if rng.random() < 0.3:
        opts["softcap"] = 10.0
    if rng.random() < 0.3:
        opts["sinks"] = torch.randn(H)
    if rng.random() < 0.3:
        opts["alibi_slopes"] = torch.rand(H) * 0.3
    q, k, v = (torch.randn(sum(lengths), heads, D).to(dtype) for lengths, heads in
               ((len_q, H), (len_k, Hkv), (len_k, Hkv)))
    cu_q, cu_k = (torch.tensor([0] + lengths).cumsum(0).to(torch.int32) for lengths in (len_q, len_k))
    return (q, k, v), cu_q, cu_k, opts, _describe(f"lengths q {len_q} k {len_k} H{H}/{Hkv} D{D}", dtype, opts)


@pytest.mark.parametrize("seed", VARLEN_SEEDS)
def test_random_varlen_configs(seed, cpu_impl):
    """attnops.varlen_attention, forward and backward, against the float64 reference of the packed batch."""
    _check_varlen(seed, cpu_impl)


@pytest.mark.parametrize("seed", OTHER_IMPL_SEEDS[:6])
def test_random_varlen_configs_every_impl(seed, impl):
    _on_cpu(impl)
    _check_varlen(seed, impl)


def _check_varlen(seed, impl):
    qkv, cu_q, cu_k, opts, desc = _varlen_case(seed)
    _compare_op(impl, lambda q, k, v, **kw: attnops.varlen_attention(q, k, v, cu_q, cu_k, None, None, **kw), qkv, opts,
                desc)
