"""The pure-PyTorch fallback (``composite``) where the C++ extension is missing: chosen automatically with
one warning, exact against the float64 reference across many query chunks (the kernel tests run it at
test sizes, where one chunk covers every row), and clear errors, naming the op called and the remedy,
where a family has no fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.ops.softmax import composite
from helpers import compare_with_reference, make_qkv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 query rows at these sizes: every call below spans several."""
    monkeypatch.setattr(composite, "_CHUNK_ELEMENTS", 64 * 4 * 300)


CASES = {
    "causal_gqa": dict(causal=True),
    "window": dict(window_size=(70, 20)),
    "softcap_alibi_sinks": dict(causal=True, softcap=3.0, alibi=True, sinks=True),
    "bias": dict(bias=True),
    "documents": dict(causal=True, documents=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_many_chunks_match_the_reference(case, dtype, small_chunks):
    B, Sq, Sk, H, Hkv, D = 2, 300, 300, 4, 2, 40
    spec = dict(CASES[case])
    kw = {k: spec.pop(k) for k in ("causal", "window_size", "softcap") if k in spec}
    if spec.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(H) * 0.3
    if spec.pop("sinks", False):
        kw["sinks"] = torch.randn(H)
    inputs = make_qkv(B, Sq, Sk, H, Hkv, D, dtype)
    if spec.pop("bias", False):
        bias = torch.randn(B, 1, Sq, Sk, dtype=torch.float64)
        inputs.append(bias)
    if spec.pop("documents", False):
        kw["document_ids"] = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 130, 70]))

    def run(backend):
        def fn(q, k, v, *bias):
            extra = {"attn_bias": bias[0].to(torch.float32 if q.dtype != torch.float64 else q.dtype)} if bias else {}
            return attnops.attention(q, k, v, return_lse=True, backend=backend, **kw, **extra)
        return fn

    # the bias's gradient: test_bias_gradient_across_chunks (here it rides along without a check)
    compare_with_reference(run("composite"), run("reference"), inputs, dtype, name=case)


def test_many_chunks_block_mask_map_and_dropout(small_chunks):
    q, k, v = make_qkv(1, 320, 320, 2, 2, 32, torch.float64, requires_grad=True)
    mask = BlockMask.from_dense(torch.rand(1, 2, 5, 5) > 0.4, 320, 64)
    outs = {}
    for backend in ("composite", "reference"):
        res = attnops.block_sparse_attention(q, k, v, mask, return_lse=True, return_block_map=True,
                                             map_block_size=128, dropout_p=0.2,
                                             generator=torch.Generator().manual_seed(7), backend=backend)
        grads = torch.autograd.grad(res.out.sum(), (q, k, v))
        outs[backend] = (res.out, res.lse, res.block_map, *grads)
    for name, a, b in zip(("out", "lse", "map", "dq", "dk", "dv"), outs["composite"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_bias_gradient_across_chunks(small_chunks):
    q, k, v = make_qkv(1, 200, 150, 2, 1, 16, torch.float64)
    bias = torch.randn(1, 2, 200, 150, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(attnops.attention(q, k, v, attn_bias=bias, backend=b).square().sum(), bias)[0]
             for b in ("composite", "reference")]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_chunks_never_span_the_whole_score_matrix(small_chunks):
    """Memory: the largest score block is one chunk's, C x L (here C = 128 rows, L <= C + the window's 100 keys),
    a fraction of Sq x Sk; the backward recomputes chunk by chunk."""
    seen = []
    original = composite.scores

    def spy(q_rows, keys, scale):
        s = original(q_rows, keys, scale)
        seen.append(s.shape[-2] * s.shape[-1])
        return s

    q, k, v = make_qkv(1, 512, 512, 4, 4, 16, torch.float32, requires_grad=True)
    try:
        composite.scores = spy
        attnops.attention(q, k, v, causal=True, window_size=(100, 0), backend="composite").sum().backward()
    finally:
        composite.scores = original
    assert seen and max(seen) <= 128 * (128 + 100), max(seen)


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where ``import attnops._C`` fails, as on an install without it."""
    prelude = "import sys, warnings; sys.modules['attnops._C'] = None; warnings.simplefilter('always')\n"
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNOPS_BACKEND", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_without_the_extension_the_fallback_runs_with_one_warning():
    res = _run_without_extension("""
        import torch, attnops
        from attnops.ops.softmax import reference
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 100, 4, 32) for _ in range(3))
        out = attnops.attention(q, k, v, causal=True)
        ref, _ = reference.block_sparse_attention(q.double(), k.double(), v.double(), None, causal=True,
                                                  window_size=(-1, 0), softmax_scale=32 ** -0.5)
        assert (out.double() - ref).abs().max() < 1e-5
        attnops.moba_attention(q, k, v, block_size=64, topk=2)
        cache = attnops.KVCache(1, 128, 4, 32, dtype=torch.float32)
        kc, vc, lens = cache.append(k[:, :90], v[:, :90])
        attnops.decode_attention(q[:, :1], kc, vc, lens)
        mha = attnops.nn.MultiheadAttention(64, 4, batch_first=True)
        x = torch.randn(2, 50, 64, requires_grad=True)
        mha(x, x, x, need_weights=False)[0].sum().backward()
        try:
            attnops.lowrank_key_attention(q, k, v, rank=8, topk=16)
        except attnops.dispatch.BackendUnavailableError as e:
            print("LOWRANK:", e)
        print("OK")
    """)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    warnings = [line for line in res.stderr.splitlines() if "pure-PyTorch fallback" in line]
    assert len(warnings) == 1, res.stderr
    assert "attnops.attention" in warnings[0] and "pip install --no-build-isolation" in warnings[0]
    assert "circular import" not in res.stderr
    lowrank = [line for line in res.stdout.splitlines() if line.startswith("LOWRANK:")]
    assert lowrank and "attnops.lowrank_key_attention" in lowrank[0] and "--no-build-isolation" in lowrank[0]


def test_forcing_the_missing_backend_names_the_op_and_the_remedy():
    res = _run_without_extension("""
        import torch, attnops
        q = torch.randn(1, 16, 2, 16)
        try:
            attnops.attention(q, q, q, backend="cpu")
        except attnops.dispatch.BackendUnavailableError as e:
            print(e)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("attnops.attention: backend 'cpu' is unavailable")
    assert "not built" in res.stdout and "--no-build-isolation" in res.stdout


def test_many_chunks_block_map_with_a_window(small_chunks):
    """Chunks whose key range starts inside a map block (a window): their tiles pool into the right columns."""
    q, k, v = make_qkv(1, 300, 300, 2, 1, 16, torch.float64)
    maps = [attnops.attention(q, k, v, window_size=(70, 20), return_block_map=True, map_block_size=(64, 32),
                              reduce=reduce, backend=b).block_map
            for reduce in ("mean", "max") for b in ("composite", "reference")]
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps[2], maps[3], rtol=1e-10, atol=1e-12)


def test_attnops_backend_variable_is_read_on_every_call(monkeypatch):
    """``ATTNOPS_BACKEND`` set, changed, emptied or removed while the process runs takes effect on the next call
    (the dispatcher reads os.environ's backing dict, not a copy made at import)."""
    impls = attnops.dispatch._IMPLS["block_sparse_attention"]
    auto = attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu"))
    monkeypatch.setenv("ATTNOPS_BACKEND", "composite")
    assert attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu")) is impls["composite"]
    monkeypatch.setenv("ATTNOPS_BACKEND", "reference")
    assert attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu")) is impls["reference"]
    monkeypatch.setenv("ATTNOPS_BACKEND", "")
    assert attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu")) is auto
    monkeypatch.setenv("ATTNOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu"))
    monkeypatch.delenv("ATTNOPS_BACKEND")
    assert attnops.dispatch.resolve("block_sparse_attention", torch.device("cpu")) is auto
