"""Hardening: arguments that used to be silently misread, forward-mode AD, malformed block masks,
autograd leaks in the KV cache, double backward of linear attention, meta tensors, and results that
do not depend on the thread count. Each test failed before its fix (issue 19)."""

import pytest
import torch

import attnops
from attnops import BlockMask, KVCache
from attnops.ops.softmax import reference


def qkv(B=1, S=128, H=4, Hkv=2, D=32, dtype=torch.float32, requires_grad=False):
    return [torch.randn(B, S, h, D, dtype=dtype, requires_grad=requires_grad) for h in (H, Hkv, Hkv)]


# ---- forward-mode AD: refused, never a silent zero tangent --------------------------------------------

FORWARD_AD_OPS = {
    "attention": lambda q, k, v: attnops.attention(q, k, v, causal=True),
    "block_sparse_attention": lambda q, k, v: attnops.block_sparse_attention(q, k, v, BlockMask.causal(128)),
    "moba_attention": lambda q, k, v: attnops.moba_attention(q, k, v, block_size=64, topk=2),
    "lowrank_key_attention": lambda q, k, v: attnops.lowrank_key_attention(q, k, v, rank=8, topk=16),
    "linear_attention": lambda q, k, v: attnops.linear_attention(q, k, v),
    "decode_attention": lambda q, k, v: attnops.decode_attention(q[:, :1], k, v, torch.tensor([128])),
}


@pytest.mark.parametrize("op", list(FORWARD_AD_OPS))
@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_ad_is_refused(op, mode):
    q, k, v = qkv()
    fn = FORWARD_AD_OPS[op]
    with pytest.raises(NotImplementedError, match="forward-mode"):
        if mode == "jvp":
            torch.func.jvp(lambda x: fn(x, k, v), (q,), (torch.randn_like(q),))
        elif mode == "jacfwd":
            torch.func.jacfwd(lambda x: fn(x, k, v))(q[:, :, :, :])
        else:
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                fn(fwAD.make_dual(q, torch.randn_like(q)), k, v)


@pytest.mark.parametrize("op", list(FORWARD_AD_OPS))
@pytest.mark.parametrize("mode", ["grad", "vjp", "jacrev"])
def test_torch_func_reverse_mode_is_refused_by_name(op, mode):
    """torch.func's reverse-mode transforms cannot run the ops' autograd registration; the op says so by name
    (it was torch's error about ``setup_context`` from deep inside the autograd glue)."""
    q, k, v = qkv(S=128)
    fn = FORWARD_AD_OPS[op]
    with pytest.raises(NotImplementedError, match="torch.func reverse-mode"):
        if mode == "grad":
            torch.func.grad(lambda x: fn(x, k, v).sum())(q)
        elif mode == "vjp":
            torch.func.vjp(lambda x: fn(x, k, v), q)
        else:
            torch.func.jacrev(lambda x: fn(x, k, v).sum())(q)


# ---- windows, scales and flags -----------------------------------------------------------------------

@pytest.mark.parametrize("right", [2 ** 63 - 1, 2 ** 63, 2 ** 70, 129])
def test_huge_windows_mean_unbounded(right):
    q, k, v = qkv()
    want = attnops.attention(q, k, v, window_size=(0, -1))
    torch.testing.assert_close(attnops.attention(q, k, v, window_size=(0, right)), want, rtol=0, atol=0)
    mask = BlockMask(*_lut(BlockMask.full(128)), 128, 64, window_size=(right, 3))
    torch.testing.assert_close(attnops.block_sparse_attention(q, k, v, mask),
                               attnops.attention(q, k, v, window_size=(-1, 3)), rtol=0, atol=0)


def test_huge_window_through_the_operator():
    """The C++ operator clamps windows itself: no int64 overflow for direct calls either."""
    q, k, v = qkv()
    out = torch.ops.attnops.block_sparse_attn_fwd(q, k, v, None, None, None, None, 0, 0, 0.2, False, 0,
                                                  2 ** 63 - 1, 0, 0, False)[0]
    want = attnops.attention(q, k, v, window_size=(0, -1), softmax_scale=0.2)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def _lut(mask):
    return mask.kv_num_blocks, mask.kv_indices


@pytest.mark.parametrize("scale, error", [(1e38, ValueError), (-3e10, ValueError), (True, TypeError),
                                          ("0.1", TypeError), (float("inf"), ValueError)])
def test_bad_softmax_scale(scale, error):
    q, k, v = qkv()
    with pytest.raises(error, match="softmax_scale"):
        attnops.attention(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("causal", ["no", 0.1, 1, None])
def test_causal_must_be_a_bool(causal):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnops.attention(q, k, v, causal=causal)
    with pytest.raises(TypeError, match="causal"):
        attnops.moba_attention(q, k, v, block_size=64, topk=2, causal=causal)
    with pytest.raises(TypeError, match="causal"):
        attnops.predict_block_mask(q, k, topk=1, causal=causal)


def test_flash_attn_positional_dropout_is_refused():
    """flash_attn's order is (q, k, v, dropout_p, ...): a 0.1 there must not run causal attention. After
    q, k, v (and the block mask / cache lengths) every argument is keyword-only."""
    q, k, v = qkv()
    for call in (lambda: attnops.attention(q, k, v, 0.1), lambda: attnops.attention(q, k, v, True),
                 lambda: attnops.block_sparse_attention(q, k, v, BlockMask.causal(128), 0.1),
                 lambda: attnops.linear_attention(q, k, v, "elu"),
                 lambda: attnops.moba_attention(q, k, v, 64),
                 lambda: attnops.lowrank_key_attention(q, k, v, None, 8, 16),
                 lambda: attnops.decode_attention(q[:, :1], k, v, torch.tensor([128]), 0.1)):
        with pytest.raises(TypeError, match="positional argument"):
            call()


@pytest.mark.parametrize("flag", ["return_lse", "return_block_map"])
def test_output_flags_must_be_bools(flag):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=flag):
        attnops.attention(q, k, v, **{flag: "yes"})


def test_threshold_types():
    q, k, _ = qkv()
    for kw in (dict(threshold="0.5"), dict(cdf_threshold="0.9"), dict(topk=1, sim_threshold="0.1")):
        name = [key for key in kw if key != "topk"][0]
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            attnops.predict_block_mask(q, k, **kw, rule="mass" if "threshold" in kw else "sparge")


@pytest.mark.parametrize("kwargs, error", [(dict(head_dim=True), TypeError), (dict(head_dim=520), ValueError),
                                           (dict(head_dim=8, score_dim=True), ValueError),
                                           (dict(head_dim=8.0), TypeError)])
def test_kv_cache_arguments(kwargs, error):
    with pytest.raises(error):
        KVCache(1, 16, 1, **kwargs)


@pytest.mark.parametrize("positions, error", [(torch.tensor([5]), ValueError), (torch.arange(6.0), TypeError),
                                              (torch.arange(12).view(2, 6), ValueError), ([0, 1], TypeError)])
def test_rotary_positions_are_checked(positions, error):
    attn = attnops.nn.Attention(32, 4, rope=10000.0)
    with pytest.raises(error, match="positions"):
        attn(torch.randn(1, 6, 32), positions=positions)


def test_rotary_positions_per_batch_still_work():
    attn = attnops.nn.Attention(32, 4, rope=10000.0)
    x = torch.randn(2, 6, 32)
    a = attn(x, positions=torch.arange(6))
    b = attn(x, positions=torch.arange(6).expand(2, 6))
    torch.testing.assert_close(a, b)


# ---- block masks ------------------------------------------------------------------------------------

def test_unvalidated_mask_with_misfit_lut_is_an_error_not_a_crash():
    q = torch.randn(1, 1024, 2, 16)
    with pytest.raises(ValueError, match="shapes do not fit"):
        mask = BlockMask(torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32), 1024,
                         16, validate=False)
        attnops.block_sparse_attention(q, q, q, mask)


def test_unvalidated_mask_values_are_checked_on_first_use():
    q = torch.randn(1, 256, 2, 16)
    counts = torch.full((1, 1, 4), 3, dtype=torch.int32)  # wider than the LUT
    mask = BlockMask(counts, torch.zeros(1, 1, 4, 2, dtype=torch.int32), 256, 64, validate=False)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        attnops.block_sparse_attention(q, q, q, mask)
    bad_index = BlockMask(torch.ones(1, 1, 4, dtype=torch.int32), torch.full((1, 1, 4, 1), 9, dtype=torch.int32),
                          256, 64, validate=False)
    with pytest.raises(ValueError, match="out of range"):
        attnops.block_sparse_attention(q, q, q, bad_index)


def test_mask_tensors_swapped_after_construction_are_checked():
    q = torch.randn(1, 256, 2, 16)
    mask = BlockMask.causal(256)
    mask.kv_indices = mask.kv_indices[:, :, :2].contiguous()  # shapes: checked on every use
    with pytest.raises(ValueError, match="shapes do not fit"):
        attnops.block_sparse_attention(q, q, q, mask)
    mask = BlockMask.causal(256)
    mask.kv_indices = torch.full_like(mask.kv_indices, 7)  # values of a checked mask: the operator's check
    with pytest.raises(RuntimeError, match="out of range"):
        attnops.block_sparse_attention(q, q, q, mask)


def test_from_dense_needs_every_key_block():
    with pytest.raises(ValueError, match="Nq, Nk"):
        BlockMask.from_dense(torch.ones(4, 3, dtype=torch.bool), 256, 64)
    with pytest.raises(ValueError, match="Nq, Nk"):
        BlockMask.from_dense(torch.ones(2, 4, 5, dtype=torch.bool), 256, 64)


def test_int64_lut_values_are_checked_before_the_cast():
    with pytest.raises(ValueError, match="int32"):
        BlockMask(torch.ones(1, 1, 1, dtype=torch.int64), torch.tensor([[[[2 ** 32]]]]), 64, 64)
    with pytest.raises(ValueError, match="int32"):
        BlockMask(torch.ones(1, 1, 1, dtype=torch.int64), torch.tensor([[[[2 ** 32]]]]), 64, 64, validate=False)


# ---- KV cache under autograd -----------------------------------------------------------------------

def test_kv_cache_refuses_tensors_that_require_grad():
    cache = KVCache(1, 16, 1, 8)
    k = torch.randn(1, 2, 1, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        cache.append(k, k)
    assert cache.host_seqlens.tolist() == [0]
    with torch.no_grad():
        cache.append(k, k)
    cache.append(k.detach(), k.detach())
    assert cache.host_seqlens.tolist() == [4]
    assert cache.k.grad_fn is None


def test_cached_decoding_builds_no_graph_on_the_cache():
    """nn.Attention's cached steps under grad mode: the cache gets values, never autograd history
    (3000 steps used to chain 3000 IndexPut nodes onto the buffers)."""
    attn = attnops.nn.Attention(64, 4, num_kv_heads=1)
    cache = attn.make_cache(1, 32)
    for _ in range(3):
        y = attn(torch.randn(1, 1, 64), cache=cache)
        assert y.requires_grad  # through the projections of this step
    assert cache.k.grad_fn is None and cache.v.grad_fn is None and not cache.k.requires_grad


def test_cached_prompt_backward_reaches_its_own_keys():
    """A prompt longer than a decode step goes through attention over the cache: its gradient equals
    the uncached forward's (the step's own k/v, not the cache's detached copy)."""
    torch.manual_seed(0)
    attn = attnops.nn.Attention(64, 4, num_kv_heads=2, rope=10000.0)
    x = torch.randn(2, 80, 64)
    attn(x).sum().backward()
    want = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    attn(x, cache=attn.make_cache(2, 100)).sum().backward()
    for a, b in zip((p.grad for p in attn.parameters()), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- linear attention double backward ----------------------------------------------------------------

@pytest.mark.parametrize("gate_shape, normalize", [("head", False), ("channel", True)])
def test_linear_attention_double_backward_with_gates(gate_shape, normalize):
    torch.manual_seed(0)
    B, S, H, D = 1, 21, 1, 3
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    shape = (B, S, H) if gate_shape == "head" else (B, S, H, D)
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, dtype=torch.float64)).requires_grad_(True)
    fn = lambda q, k, v, g: attnops.linear_attention(q, k, v, gate=g, chunk_size=16, normalize=normalize,  # noqa
                                                     feature_map="elu" if normalize else "identity")
    assert torch.autograd.gradgradcheck(fn, (q, k, v, g))


# ---- meta tensors -----------------------------------------------------------------------------------

def test_masks_and_ops_on_meta_tensors():
    meta = torch.device("meta")
    for build in (lambda: BlockMask.causal(256, device=meta), lambda: BlockMask.sliding_window(256, 64, device=meta),
                  lambda: BlockMask.random(256, 0.5, device=meta), lambda: BlockMask.sink_local(256, 1, 2, device=meta)):
        mask = build()
        assert mask.device.type == "meta" and mask.kv_indices.shape[:3] == (1, 1, 4)
        repr(mask)
    q = torch.randn(1, 256, 4, 32, device=meta, requires_grad=True)
    k = torch.randn(1, 256, 2, 32, device=meta)
    mask = attnops.predict_block_mask(q, k, topk=2)
    assert mask.shape == (1, 4, 256, 256)
    out = attnops.block_sparse_attention(q, k, k, BlockMask.sliding_window(256, 64, device=meta))
    out.sum().backward()
    assert q.grad.shape == q.shape and q.grad.device.type == "meta"
    q.grad = None
    attnops.moba_attention(q, k, k, block_size=64, topk=2, routing="tile").sum().backward()
    assert q.grad.shape == q.shape
    with pytest.raises(NotImplementedError, match="routing='tile'"):
        attnops.moba_attention(q, k, k, block_size=64, topk=2)


# ---- determinism across thread counts ---------------------------------------------------------------

@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
    torch.set_num_threads(threads)


def test_results_do_not_depend_on_the_thread_count(deterministic):
    from attnops import _C

    previous = _C._set_backward_mode(0)  # the automatic choice, which the thread count steers otherwise
    try:
        runs = []
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            q, k, v = qkv(S=300, H=8, Hkv=1, D=64, dtype=torch.bfloat16, requires_grad=True)
            out = attnops.attention(q, k, v, causal=True)
            out.backward(torch.randn_like(out))
            qd = torch.randn(2, 1, 8, 64)
            kc, vc = torch.randn(2, 5000, 2, 64), torch.randn(2, 5000, 2, 64)
            dec = attnops.decode_attention(qd, kc, vc, torch.tensor([5000, 4000]))
            # a window: the forward's query tile (up to 256 rows) sets where each row's key tiles start
            qw, kw, vw = qkv(S=700, H=8, Hkv=2, D=40)
            windowed = attnops.attention(qw, kw, vw, window_size=(300, 7), return_lse=True)
            runs.append([out.detach(), q.grad, k.grad, v.grad, dec, *windowed])
    finally:
        _C._set_backward_mode(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_reference_is_unchanged_on_finite_inputs():
    """The convention-following reference equals plain softmax attention on finite inputs."""
    q, k, v = (t.double() for t in qkv(S=50))
    out, _ = reference.block_sparse_attention(q, k, v, None, causal=True, window_size=(-1, -1), softmax_scale=0.2)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                                            is_causal=True, scale=0.2).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_autocast_casts_like_sdpa():
    """Under torch.autocast, q / k / v of mixed dtypes meet the kernels in the autocast dtype (SDPA's
    behaviour) instead of raising."""
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnops.attention(q, k.bfloat16(), v, causal=True)
        masked = attnops.block_sparse_attention(q, k, v.bfloat16(), BlockMask.causal(128))
    assert out.dtype == torch.bfloat16 and masked.dtype == torch.bfloat16
    want = attnops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="share a dtype"):
        attnops.attention(q, k.bfloat16(), v)  # outside autocast: still an error


# ---- the no-gradient call path (attnops.core.library.call_op skips the autograd layer) ----------------

def test_calls_without_gradients_match_the_autograd_path():
    """Without a gradient to track the operators go straight to the kernels; under vmap (a torch.func transform)
    and in inference mode they must still compute the same thing, and a call whose input needs a gradient must
    still record one."""
    torch.manual_seed(0)
    q, k, v = qkv(B=3, S=40, dtype=torch.float64)
    want = attnops.attention(q, k, v, causal=True)
    looped = torch.vmap(lambda x, y, z: attnops.attention(x[None], y[None], z[None], causal=True)[0])(q, k, v)
    torch.testing.assert_close(looped, want, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(attnops.attention(q, k, v, causal=True), want, rtol=0, atol=0)
    qg = q.clone().requires_grad_()
    out = attnops.attention(qg, k, v, causal=True)
    assert out.grad_fn is not None
    with torch.no_grad():
        assert attnops.attention(qg, k, v, causal=True).grad_fn is None
