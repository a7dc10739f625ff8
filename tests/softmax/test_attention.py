"""Dense / causal / windowed attention (the block-sparse core without a LUT) against the float64
reference, under the DESIGN.md accuracy rule: forward, lse and gradients, on every implementation
(C++ in both backward algorithms, Triton on CUDA or under the interpreter)."""

import pytest
import torch

import attnops
from attnops.ops.softmax import reference
from helpers import CPU_BACKWARD_FORMS, DTYPE_IDS, compare_with_reference, cpu_backward_form, make_qkv

# (B, Sq, Sk, H, Hkv, D): lengths off the block grid, Sq != Sk both ways, head dims 32..512
# including 40 and 96, GQA ratios 1/2/8 and MQA, a single decode-like query. Lengths stay <= ~300
# so that the Triton interpreter runs them in CI.
SHAPES = [
    (2, 63, 63, 4, 4, 32),
    (1, 130, 100, 4, 2, 40),
    (2, 100, 300, 8, 1, 64),
    (1, 257, 257, 8, 8, 96),
    (1, 200, 200, 16, 2, 128),
    (1, 1, 333, 4, 4, 64),
    (1, 70, 90, 4, 2, 264),  # head dims past 256 (up to 512: Gemma 4's global layers)
    (2, 33, 65, 2, 1, 512),
]
SHAPE_IDS = ["B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}".format(*s) for s in SHAPES]

MASKS = {
    "full": dict(causal=False, window_size=(-1, -1)),
    "causal": dict(causal=True, window_size=(-1, -1)),
    "window": dict(causal=False, window_size=(20, 7)),
    "causal_window": dict(causal=True, window_size=(48, -1)),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check_cpu(shape, dtype, opts, name):
    """The C++ kernels against the reference on a (B, Sq, Sk, H, Hkv, D) shape under mask options ``opts``."""
    inputs = make_qkv(*shape, dtype)

    def kernel(q, k, v):
        return attnops.attention(q, k, v, return_lse=True, backend="cpu", **opts)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, None, softmax_scale=shape[-1] ** -0.5, **opts)

    compare_with_reference(kernel, ref, inputs, dtype, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attention_matches_reference(shape, mask, dtype, impl):
    B, Sq, Sk, H, Hkv, D = shape
    opts = MASKS[mask]
    scale = D ** -0.5
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype, device=impl.device)

    def kernel(q, k, v):
        return attnops.attention(q, k, v, return_lse=True, backend=impl.backend, **opts)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, None, softmax_scale=scale, **opts)

    compare_with_reference(kernel, ref, inputs, dtype, name=f"{mask}")


def test_float64_is_exact():
    q, k, v = make_qkv(2, 77, 90, 6, 3, 40, torch.float64)
    out, lse = attnops.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = reference.block_sparse_attention(
        q, k, v, None, causal=True, window_size=(-1, -1), softmax_scale=40 ** -0.5
    )
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_softmax_scale_and_return_type(fwd_impl):
    q, k, v = make_qkv(1, 50, 50, 2, 2, 32, torch.float32, device=fwd_impl.device)
    out = attnops.attention(q, k, v, softmax_scale=0.3, backend=fwd_impl.backend)
    assert isinstance(out, torch.Tensor)
    res = attnops.attention(q, k, v, softmax_scale=0.3, return_lse=True, backend=fwd_impl.backend)
    assert isinstance(res, attnops.AttentionOutput) and res.out.shape == q.shape and res.lse.shape == (1, 2, 50)
    ref, _ = reference.block_sparse_attention(*(t.double().cpu() for t in (q, k, v)), None, causal=False,
                                              window_size=(-1, -1), softmax_scale=0.3)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=1e-5)


def test_strided_inputs_and_expanded_grad(impl):
    """(B, H, S, D) tensors passed as transposed views, and the stride-0 gradient of .sum()."""
    B, H, S, D = 2, 4, 150, 64
    base = [torch.randn(B, H, S, D, dtype=torch.float32, device=impl.device, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)  # (B, S, H, D) views, no copy
    out = attnops.attention(q, k, v, causal=True, backend=impl.backend)
    out.sum().backward()
    grads = [t.grad.cpu() for t in base]
    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in base]
    ref_out, _ = reference.block_sparse_attention(*(t.transpose(1, 2) for t in ref_in), None, causal=True,
                                                  window_size=(-1, -1), softmax_scale=D ** -0.5)
    ref_out.sum().backward()
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=1e-5, atol=2e-5)
    for g, r in zip(grads, ref_in):
        torch.testing.assert_close(g.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_lse_gradient_flows(impl):
    """A loss that uses lse (ring attention, log-likelihoods) gets its gradient."""
    dtype = torch.float64 if impl.backend == "cpu" else torch.float32
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    q, k, v = make_qkv(1, 70, 90, 4, 2, 32, dtype, requires_grad=True, device=impl.device)
    out, lse = attnops.attention(q, k, v, causal=True, return_lse=True, backend=impl.backend)
    loss = (out * out).sum() + (torch.where(torch.isinf(lse), 0, lse) ** 2).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    qr, kr, vr = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    ro, rl = reference.block_sparse_attention(qr, kr, vr, None, causal=True, window_size=(-1, -1),
                                              softmax_scale=32 ** -0.5)
    rloss = (ro * ro).sum() + (torch.where(torch.isinf(rl), 0, rl) ** 2).sum()
    rgrads = torch.autograd.grad(rloss, (qr, kr, vr))
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_gradient_of_lse_alone(impl, with_sinks):
    """A loss of lse alone: the output gets no gradient (the autograd Function sees None for it, not zeros), and
    q, k (and the sinks) still get theirs; v's is zero."""
    dtype = torch.float64 if impl.backend == "cpu" else torch.float32
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    q, k, v = make_qkv(1, 37, 53, 4, 2, 40, dtype, requires_grad=True, device=impl.device)
    sinks = torch.randn(4, dtype=torch.float32, device=impl.device, requires_grad=True) if with_sinks else None
    _, lse = attnops.attention(q, k, v, causal=True, return_lse=True, sinks=sinks, backend=impl.backend)
    inputs = (q, k, v) + ((sinks,) if with_sinks else ())
    grads = torch.autograd.grad((torch.where(torch.isinf(lse), 0, lse) ** 2).sum(), inputs, materialize_grads=True)
    refs = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    _, rl = reference.block_sparse_attention(*refs[:3], None, causal=True, window_size=(-1, -1),
                                             softmax_scale=40 ** -0.5, sinks=refs[3] if with_sinks else None)
    rgrads = torch.autograd.grad((torch.where(torch.isinf(rl), 0, rl) ** 2).sum(), refs, materialize_grads=True)
    assert torch.all(grads[2] == 0)
    for g, r in zip(grads, rgrads):
        at = max(tol, 2e-5) if g.dtype == torch.float32 else tol  # the sinks' gradient: float32, as they are
        torch.testing.assert_close(g.cpu().double(), r, rtol=at, atol=at)


def test_rows_with_nothing_to_attend_give_zeros(impl):
    """Causal with Sq > Sk: the first Sq - Sk queries see no key; their output is 0, lse -inf,
    gradients finite."""
    q, k, v = make_qkv(1, 120, 40, 4, 4, 32, torch.float32, requires_grad=True, device=impl.device)
    out, lse = attnops.attention(q, k, v, causal=True, return_lse=True, backend=impl.backend)
    assert torch.all(out[:, :80] == 0) and torch.all(torch.isneginf(lse[:, :, :80]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 80:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :80] == 0)
    empty = attnops.attention(q, k[:, :0], v[:, :0], return_lse=True, backend=impl.backend)
    assert torch.all(empty.out == 0) and torch.all(torch.isneginf(empty.lse))


def test_nan_in_gives_nan_out_in_affected_rows(fwd_impl):
    q, k, v = make_qkv(1, 100, 100, 2, 2, 32, torch.float32, device=fwd_impl.device)
    q[0, 10, 1, 3] = float("nan")
    out = attnops.attention(q, k, v, causal=True, backend=fwd_impl.backend)
    assert torch.isnan(out[0, 10, 1]).all()
    nan_rows = torch.isnan(out).any(-1)
    assert int(nan_rows.sum()) == 1, "only the row holding the NaN query may be NaN"
    k2 = k.clone()
    k2[0, 50, 0, 0] = float("nan")
    out = attnops.attention(q.nan_to_num(), k2, v, causal=True, backend=fwd_impl.backend)
    # Queries that can see key 50 (head 0, positions >= 50) are NaN, the earlier ones are not.
    assert torch.isnan(out[0, 50:, 0]).all(-1).all()
    assert not torch.isnan(out[0, :50, 0]).any() and not torch.isnan(out[0, :, 1]).any()


def test_gqa_backward_is_deterministic(impl):
    """dk/dv of a kv head sum over its 8 query heads inside one task/program (no atomics): two
    runs give bitwise equal gradients."""
    q, k, v = make_qkv(1, 200, 200, 16, 2, 64, torch.float32, device=impl.device)
    dout = torch.randn_like(q)

    def grads():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = attnops.attention(qq, kk, vv, causal=True, backend=impl.backend)
        return torch.autograd.grad(out, (qq, kk, vv), dout)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 300, 300, 8, 1, 64), (3, 190, 260, 4, 1, 40), (1, 200, 200, 4, 4, 96)],
                         ids=["mqa", "B3-mqa", "B1-mha"])
def test_backward_split_over_key_tiles(shape, threads):
    """The automatic CPU backward at thread counts that B * Hkv tasks cannot fill: the fused pass splits each
    (batch, kv head)'s key tiles into runs of equal cost with their own dq accumulators (2-4 runs here, 1 at one
    thread), whose sums match the reference under every mask."""
    from attnops import _C

    previous_mode, previous_threads = _C._set_backward_mode(0), torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for mask in ("causal", "window", "full"):
            _check_cpu(shape, torch.float32, MASKS[mask], f"{mask} threads={threads}")
    finally:
        torch.set_num_threads(previous_threads)
        _C._set_backward_mode(previous_mode)


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
def test_wide_query_tiles(dtype, threads):
    """Without a block LUT or map the CPU forward takes query tiles of up to 256 rows while every thread keeps four
    tasks (csrc/cpu/kernels/block_sparse_attention.cpp: forward_tile_rows): 700 rows x 8 heads run as two 256-row
    tiles and a ragged 188-row one at 1-2 threads, as 128-row tiles at 8; every mask, GQA, D = 40, against the
    reference, output, lse and gradients."""
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for mask, opts in MASKS.items():
            _check_cpu((1, 700, 700, 8, 2, 40), dtype, opts, f"{mask} threads={threads}")
    finally:
        torch.set_num_threads(threads_before)


# 1100 tokens: the backward's key tiles are 256 keys under "full" (a ragged fifth of 76), 128 under "causal" and
# the wide window (a key's queries span ~550 / ~750), 64 under the narrow window (backward_tiles in
# csrc/cpu/kernels/block_sparse_attention.cpp); its S^T tiles 256 queries, 128 at 64 keys
_WIDE_MASKS = {
    "full": dict(causal=False, window_size=(-1, -1)),
    "causal": dict(causal=True, window_size=(-1, -1)),
    "wide_window": dict(causal=False, window_size=(600, 150)),
    "causal_window": dict(causal=True, window_size=(100, -1)),
}


@pytest.mark.parametrize("mode", list(CPU_BACKWARD_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("mask", list(_WIDE_MASKS))
def test_wide_backward_tiles(mask, dtype, mode):
    """Long sequences take the CPU backward's wider tiles: each form, GQA 2, D = 40, against the reference, at the
    default ISA level (tests/softmax/test_bf16_dot.py runs the bf16 products' forms on such shapes)."""
    with cpu_backward_form(mode):
        _check_cpu((1, 1100, 1100, 4, 2, 40), dtype, _WIDE_MASKS[mask], f"{mask} {mode}")


@pytest.mark.parametrize("mode", list(CPU_BACKWARD_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("block", [(64, 64), (128, 256)], ids=["blocks64", "blocks128x256"])
def test_wide_backward_tiles_on_block_masks(block, dtype, mode):
    """With a block LUT the backward's key tile is at most the LUT's key block (64 or 256 keys here) while its S^T
    tiles take 256 queries at 1100 tokens: random block masks, per head, against the reference."""
    from attnops import BlockMask

    mask = BlockMask.random((1100, 1100), 0.4, seed=5, num_heads=4, block_size=block)

    def kernel(q, k, v):
        return attnops.block_sparse_attention(q, k, v, mask, return_lse=True, backend="cpu")

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, mask, causal=mask.causal, window_size=mask.window_size,
                                                softmax_scale=40 ** -0.5)

    with cpu_backward_form(mode):
        compare_with_reference(kernel, ref, make_qkv(1, 1100, 1100, 4, 2, 40, dtype), dtype, name=f"{block} {mode}")


def _check_modifiers(backend, dtype, mask_opts, name):
    """softcap, ALiBi, sinks, a float attn_bias with its gradient and dropout (the reference given the kernels'
    mask: the same seed from a generator in the same state) at 1100 tokens under ``mask_opts``, against the
    reference; the float32 sinks' and bias's gradients are checked with float32 inputs."""
    B, S, H, Hkv, D = 1, 1100, 2, 1, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, dtype)
    sinks = torch.randn(H)
    bias = torch.randn(B, H, S, S)
    opts = dict(softcap=5.0, alibi_slopes=torch.tensor([0.01, 0.002]), dropout_p=0.2, **mask_opts)

    def call(backend, q, k, v, sinks, bias):
        gen = torch.Generator().manual_seed(7)
        return attnops.attention(q, k, v, sinks=sinks, attn_bias=bias, generator=gen, return_lse=True,
                                 backend=backend, **opts)

    labels = ("dq", "dk", "dv") + (("dsinks", "dbias") if dtype == torch.float32 else ())
    compare_with_reference(lambda *t: call(backend, *t), lambda *t: call("reference", *t), [q, k, v, sinks, bias],
                           dtype, name=name, labels=labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ["moba_self", "documents", "causal_modifiers", "window_modifiers"])
def test_staircase_tiles(case, dtype, cpu_impl):
    """The CPU forward's 256-row tasks take a staircase tile (a causal diagonal, a window's edges, per-row key
    bounds) in groups of 64 rows, each over its own columns only (for_each_row_group in
    csrc/cpu/kernels/block_sparse_attention.cpp): 1100 tokens at each ISA level, against the reference, output,
    lse and gradients. Key bounds: MoBA's self pass over 300-key blocks (every block edge and diagonal cuts a
    256-row tile) and packed documents (rectangles whose edges fall inside a tile, so its row groups start at
    different columns). The score modifiers take their keys from the group's first column."""
    from attnops.core.segments import from_cu_seqlens
    from attnops.ops.routed.token import _own_block_bounds
    from attnops.ops.softmax.bounded import bounded_attention

    if case == "causal_modifiers":
        _check_modifiers(cpu_impl.backend, dtype, dict(causal=True), case)
        return
    if case == "window_modifiers":
        _check_modifiers(cpu_impl.backend, dtype, dict(window_size=(300, 100)), case)
        return
    B, S, H, Hkv, D = 1, 1100, 2, 1, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, dtype)
    sinks = torch.randn(H)
    if case == "moba_self":
        bounds = _own_block_bounds([0, S], 300, True, q.device)
    else:
        cu = torch.tensor([0, 130, 600, S])
        bounds = from_cu_seqlens(cu, cu, S, S, causal=False, window_size=(-1, -1)).key_bounds[0]

    def call(backend, q, k, v, sinks):
        gen = torch.Generator().manual_seed(3)
        return bounded_attention(q, k, v, bounds, softmax_scale=D ** -0.5, api="test", backend=backend,
                                 softcap=4.0 if case == "documents" else 0.0, sinks=sinks, dropout_p=0.1,
                                 generator=gen)

    labels = ("dq", "dk", "dv") + (("dsinks",) if dtype == torch.float32 else ())
    compare_with_reference(lambda *t: call(cpu_impl.backend, *t), lambda *t: call("reference", *t),
                           [q, k, v, sinks], dtype, name=case, labels=labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ["dilated", "causal", "window"])
def test_row_reductions_match_the_per_row_softmax(case, dtype, cpu_impl):
    """The CPU forward's softmax takes the rows' max and sum W rows at a time (softmax_rows, softmax_rows_to_bf16:
    one shuffle tree for W rows, csrc/cpu/softmax.h and gemm_bf16.h) and, with a score modifier, row by row
    (softmax_row_exp: one hmax / hsum tree a row). A float bias of zeros changes no score and sends the same call
    down the per-row path: output and lse agree bit for bit, at 1100 tokens (groups of rows cut short at every task's
    end), on 64-key block-mask tiles and 256-row tasks, with a NaN query row and an infinite key (rows whose max is
    +inf, the exact rerun)."""
    B, S, H, Hkv, D = 1, 1100, 2, 1, 40
    q, k, v = make_qkv(B, S, S, H, Hkv, D, dtype)
    q[0, 70, 1] = float("nan")
    k[0, 333, 0, 5] = float("inf")
    if case == "dilated":
        mask = attnops.BlockMask.dilated(S, 6, 2, causal=True, block_size=64)

        def call(bias):
            return attnops.block_sparse_attention(q, k, v, mask, attn_bias=bias, return_lse=True,
                                                  backend=cpu_impl.backend)
    else:
        opts = dict(causal=True) if case == "causal" else dict(window_size=(300, 100))

        def call(bias):
            return attnops.attention(q, k, v, attn_bias=bias, return_lse=True, backend=cpu_impl.backend, **opts)

    batched, per_row = call(None), call(torch.zeros(1, 1, 1, S))
    for name, a, b in (("out", batched[0], per_row[0]), ("lse", batched[1], per_row[1])):
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(0.0, 1e30, -1e30), b.nan_to_num(0.0, 1e30, -1e30)), name
    assert batched[0].isnan().any() and not batched[0].isnan().all()  # the NaN row (and the +inf rows) reached out


@pytest.mark.parametrize("mode", list(CPU_BACKWARD_FORMS))
def test_wide_backward_tiles_with_modifiers(mode):
    """The wide tiles' per-query buffers (softcap's derivative, the bias columns, dropout's keep mask) in each
    backward form: :func:`_check_modifiers` on full attention, float32 (256-key tiles)."""
    with cpu_backward_form(mode):
        _check_modifiers("cpu", torch.float32, {}, f"modifiers {mode}")
