"""Linear attention: outputs, final states and every gradient against the float64 token-by-token
reference (DESIGN.md rule), over feature maps, decay presets, gate shapes, normalisation, causal
and not, GQA, odd lengths and head dims; split-and-resume; NaN; bad input; memory."""

import pytest
import torch
import torch.nn.functional as F

import attnops
from attnops.core import backends
from attnops.ops.linear import chunk, decay_preset, focused_feature_map
from helpers import DTYPE_IDS, assert_accurate

# (B, S, H, Hkv, D, Dv): lengths off every chunk grid, head dims 40/100, GQA and MQA, Dv != D
SHAPES = [(2, 63, 4, 2, 40, 40), (1, 150, 3, 1, 16, 24)]
LONG = (1, 500, 2, 2, 100, 100)


def hedgehog_like(x):  # a callable feature map that changes the feature dim (D -> 2D)
    return torch.cat([F.softmax(x, dim=-1), F.softmax(-x, dim=-1)], dim=-1)


# name -> keyword arguments of linear_attention (gate/decay tensors are built per shape below)
CONFIGS = {
    "elu": dict(),
    "elu-noncausal": dict(causal=False),
    "identity": dict(feature_map="identity"),
    "relu": dict(feature_map="relu"),
    "focused": dict(feature_map="focused"),
    "focused-p2-noncausal": dict(feature_map=focused_feature_map(2), causal=False),
    "callable": dict(feature_map=hedgehog_like),
    "retnet": dict(decay="retnet"),
    "lightning": dict(decay="lightning", feature_map="identity"),
    "decay-tensor": dict(decay="tensor"),
    "gate-head": dict(gate="head"),
    "gate-channel": dict(gate="channel"),
    "gate-channel+decay": dict(gate="channel", decay="retnet", feature_map="relu"),
    "normalize": dict(normalize=True),
    "normalize-noncausal": dict(normalize=True, causal=False),
    "normalize-gate-head": dict(normalize=True, gate="head"),
    "normalize-gate-channel": dict(normalize=True, gate="channel", feature_map="focused"),
}


def feature_dim(cfg, D):
    return 2 * D if cfg.get("feature_map") is hedgehog_like else D


def make_inputs(shape, cfg, with_state):
    """float64 leaves: q, k, v, then gate / decay / initial state as the config asks."""
    B, S, H, Hkv, D, Dv = shape
    inputs = {"q": torch.randn(B, S, H, D), "k": torch.randn(B, S, Hkv, D), "v": torch.randn(B, S, Hkv, Dv)}
    Dk = feature_dim(cfg, D)
    if cfg.get("gate") == "head":
        inputs["gate"] = F.logsigmoid(torch.randn(B, S, H) + 2.0)
    elif cfg.get("gate") == "channel":
        inputs["gate"] = F.logsigmoid(3 * torch.randn(B, S, H, Dk) + 1.0)  # some strong, some none
    if cfg.get("decay") == "tensor":
        inputs["decay"] = -torch.rand(H) * 0.2
    if with_state and cfg.get("causal", True):
        inputs["initial_state"] = torch.randn(B, H, Dk, Dv) * 0.3
        if cfg.get("normalize"):
            inputs["initial_z"] = torch.rand(B, H, Dk)
    return {name: t.double() for name, t in inputs.items()}


def backend_of(impl):
    """The conftest implementation as a linear_attention backend: on CPU tensors the automatic choice
    (the chunk form, ``composite``), else Triton (compiled on a GPU, interpreted on CPU tensors)."""
    return None if impl.backend == "cpu" else impl.backend


def run(inputs, cfg, dtype, backend=None, chunk_size=16, device="cpu"):
    """(out, final_state S, grads by input name) with fixed upstream gradients on out and S, on the CPU."""
    leaves = {}
    for n, t in inputs.items():  # gates, decays and states are float32 (float64 in the reference run)
        t = t.to(dtype if n in "qkv" or dtype == torch.float64 else torch.float32)
        leaves[n] = t.to(device).requires_grad_()
    kw = {k: v for k, v in cfg.items() if k not in ("gate", "decay")}
    if "decay" in cfg:
        kw["decay"] = leaves["decay"] if cfg["decay"] == "tensor" else cfg["decay"]
    if "gate" in leaves:
        kw["gate"] = leaves["gate"]
    if "initial_state" in leaves:
        kw["initial_state"] = ((leaves["initial_state"], leaves["initial_z"]) if cfg.get("normalize")
                               else leaves["initial_state"])
    res = attnops.linear_attention(leaves["q"], leaves["k"], leaves["v"], output_final_state=True,
                                   chunk_size=chunk_size, backend=backend, **kw)
    out, state = res
    s_main = state[0] if cfg.get("normalize") else state
    gen = torch.Generator().manual_seed(1)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    d_state = torch.randn(s_main.shape, generator=gen, dtype=torch.float64).to(s_main.device, s_main.dtype)
    loss = (out * d_out).sum() + (s_main * d_state).sum()
    if cfg.get("normalize"):
        loss = loss + (state[1] * 0.5).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return out.detach().cpu(), s_main.detach().cpu(), {n: g.cpu() for n, g in zip(names, grads)}


def check_against_reference(shape, cfg, dtype, with_state=True, chunk_size=16, impl=None):
    inputs = make_inputs(shape, cfg, with_state)
    out, state, grads = run(inputs, cfg, dtype, chunk_size=chunk_size,
                            backend=None if impl is None else backend_of(impl),
                            device="cpu" if impl is None else impl.device)
    ref_out, ref_state, ref_grads = run(inputs, cfg, torch.float64, backend="reference")
    lp_out, lp_state, lp_grads = run(inputs, cfg, dtype, backend="reference")
    assert out.dtype == dtype and out.shape == shape[:3] + (shape[5],)
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_accurate("out", out, ref_out, lp_out)
    assert_accurate("final_state", state, ref_state, lp_state)
    for name in ref_grads:
        assert_accurate(f"d{name}", grads[name], ref_grads[name], lp_grads[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_H{}-{}_D{}-{}".format(*s))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(config, shape, dtype, fwd_impl):
    check_against_reference(shape, CONFIGS[config], dtype, impl=fwd_impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("config", ["elu", "retnet", "gate-channel", "normalize", "gate-head"])
def test_long_sequence_wide_heads(config, dtype):
    """Full 64-step chunks: bfloat16 inputs multiply in bfloat16 there (chunk.product_dtype). float32 with
    per-head gates needs the intra-chunk products in float64 when the gate's gradient is wanted
    (chunk._intra_dtype): in float32 dgate came out 2.0-2.8x the float32 recurrence's error here."""
    check_against_reference(LONG, CONFIGS[config], dtype, with_state=False, chunk_size=64)


def test_cpu_bf16_matmul_reads_the_cpu():
    """bf16 products where the CPU has bf16 dot-product units (AVX512-BF16 or AMX on x86): elsewhere ATen's bf16
    bmm is a scalar loop, ~18x slower than float32 (backends.cpu_bf16_matmul)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags are x86's")
    units = bool({"avx512_bf16", "amx_bf16"} & backends.cpu_flags())
    assert backends.cpu_bf16_matmul() == units
    assert chunk.product_dtype(torch.bfloat16, torch.device("cpu")) == (torch.bfloat16 if units else torch.float32)
    assert chunk.product_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16  # a GPU's, say
    assert chunk.product_dtype(torch.float16, torch.device("cpu")) == torch.float32
    # a constant to torch.compile: no /proc/cpuinfo read inside a compiled region
    torch._dynamo.reset()
    q = torch.randn(1, 40, 2, 16, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(lambda q: attnops.linear_attention(q, q, q, gate=q[..., 0].sigmoid().log()))(q)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("bf16_matmul", [False, True], ids=["float32-products", "bf16-products"])
@pytest.mark.parametrize("config", ["elu", "gate-head", "gate-channel"])
def test_bf16_inputs_with_either_product_dtype(config, bf16_matmul, monkeypatch):
    """bfloat16 inputs on the CPU multiply in bf16 or in float32 (chunk.product_dtype, from the CPU's units):
    both within the accuracy rule, on any machine, and the choice reaches the products (the outputs differ)."""
    outs, inputs = {}, make_inputs((1, 200, 2, 2, 48, 48), CONFIGS[config], False)
    for units in (bf16_matmul, not bf16_matmul):
        monkeypatch.setattr(backends, "cpu_bf16_matmul", lambda units=units: units)
        outs[units] = run(inputs, CONFIGS[config], torch.bfloat16, chunk_size=64)[0]
    monkeypatch.setattr(backends, "cpu_bf16_matmul", lambda: bf16_matmul)
    assert not torch.equal(outs[True], outs[False])
    check_against_reference(LONG, CONFIGS[config], torch.bfloat16, with_state=False, chunk_size=64)


@pytest.mark.parametrize("config", ["elu", "gate-head", "gate-channel+decay", "normalize-gate-channel"])
def test_float64_is_exact_and_chunk_size_free(config):
    """In float64 the chunk form equals the recurrence to rounding, for every chunk size."""
    shape = (2, 100, 2, 1, 24, 8)
    inputs = make_inputs(shape, CONFIGS[config], with_state=True)
    ref, ref_state, _ = run(inputs, CONFIGS[config], torch.float64, backend="reference")
    for chunk in (16, 64, 256):
        cfg = dict(CONFIGS[config])
        kw = {k: v for k, v in cfg.items() if k not in ("gate", "decay")}
        if "gate" in inputs:
            kw["gate"] = inputs["gate"]
        if "decay" in cfg:
            kw["decay"] = cfg["decay"]
        state0 = inputs["initial_state"]
        if cfg.get("normalize"):
            state0 = (state0, inputs["initial_z"])
        out, state = attnops.linear_attention(inputs["q"], inputs["k"], inputs["v"], chunk_size=chunk,
                                              initial_state=state0, output_final_state=True, **kw)
        state = state[0] if cfg.get("normalize") else state
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state, ref_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", ["elu", "retnet", "gate-head", "gate-channel", "normalize",
                                    "normalize-gate-channel"])
@pytest.mark.parametrize("split", [1, 37, 64, 99])
def test_split_and_resume_equals_one_call(config, split, fwd_impl):
    """Two calls carrying the state give one call's output and state: the decoding API (a one-token
    call runs the recurrent kernel on Triton)."""
    cfg = CONFIGS[config]
    B, S, H, Hkv, D, Dv = 2, 100, 4, 2, 16, 16
    dev = fwd_impl.device
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, Dv)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    kw = {n: x for n, x in cfg.items() if n not in ("gate",)}
    kw["backend"] = backend_of(fwd_impl)
    gate = None
    if cfg.get("gate") == "head":
        gate = F.logsigmoid(torch.randn(B, S, H) + 2).to(dev)
    elif cfg.get("gate") == "channel":
        gate = F.logsigmoid(torch.randn(B, S, H, D) + 2).to(dev)

    def call(a, b, state):
        g = None if gate is None else gate[:, a:b]
        return attnops.linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], gate=g, initial_state=state,
                                        output_final_state=True, **kw)

    whole, whole_state = call(0, S, None)
    first, state = call(0, split, None)
    second, state = call(split, S, state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=2e-5, atol=2e-5)
    states = zip(state, whole_state) if cfg.get("normalize") else [(state, whole_state)]
    for got, want in states:
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("gate_shape", ["head", "channel"])
def test_token_by_token_decoding_equals_prefill(gate_shape, fwd_impl):
    """One token per call (the recurrent form) reproduces the chunked prefill, and the reference."""
    B, S, H, D = 1, 40, 4, 32
    q, k, v = (torch.randn(B, S, H, D, device=fwd_impl.device) for _ in range(3))
    gate = F.logsigmoid(torch.randn(B, S, H, *((D,) if gate_shape == "channel" else ())) + 2).to(fwd_impl.device)
    kw = dict(decay="retnet", backend=backend_of(fwd_impl))
    whole = attnops.linear_attention(q, k, v, gate=gate, **kw)
    state, outs = None, []
    for t in range(S):
        out, state = attnops.linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], gate=gate[:, t:t + 1],
                                              initial_state=state, output_final_state=True, **kw)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=2e-5, atol=2e-5)
    ref = attnops.linear_attention(*(t.cpu().double() for t in (q, k, v)), gate=gate.cpu().double(),
                                   decay="retnet", backend="reference")
    torch.testing.assert_close(whole.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_decay_presets():
    torch.testing.assert_close(decay_preset("retnet", 3),
                               torch.log(1 - torch.tensor([2.0 ** -5, 2.0 ** -6, 2.0 ** -7], dtype=torch.float64)))
    torch.testing.assert_close(decay_preset("lightning", 8), -torch.tensor([2.0 ** -(h + 1) for h in range(8)],
                                                                           dtype=torch.float64))
    slopes = -decay_preset("lightning", 6)  # not a power of two: ALiBi's interleaving, all in (0, 1)
    assert slopes.shape == (6,) and bool(((slopes > 0) & (slopes < 1)).all()) and len(set(slopes.tolist())) == 6


def _fla_lightning_g_gamma(H: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """A port of flash-linear-attention's per-layer Lightning decay (fla-org/flash-linear-attention,
    commit 0315a70ea55304398ad372e56cdd211ce0119571, fla/ops/lightning_attn/chunk.py, chunk_lightning_attn):
    ``g_gamma = -(8 / H * (1 - layer_idx / num_layers)) * range(H)``, float32 there."""
    return -(8 / H * (1 - layer_idx / num_layers)) * torch.tensor(range(H), dtype=torch.float)


@pytest.mark.parametrize("H, layer_idx, num_layers", [(8, 0, 24), (6, 5, 12), (16, 23, 24), (1, 0, 1)])
def test_per_layer_lightning_preset_matches_fla(H, layer_idx, num_layers):
    ours = decay_preset("lightning", H, layer_idx=layer_idx, num_layers=num_layers)
    torch.testing.assert_close(ours.float(), _fla_lightning_g_gamma(H, layer_idx, num_layers), rtol=1e-6, atol=0)
    assert ours.dtype == torch.float64 and float(ours[0]) == 0.0  # head 0 does not decay in fla's preset
    q, k, v = (torch.randn(1, 40, H, 8, dtype=torch.float64) for _ in range(3))  # usable as the op's decay
    by_decay = attnops.linear_attention(q, k, v, decay=ours)
    by_gate = attnops.linear_attention(q, k, v, gate=ours.view(1, 1, H).expand(1, 40, H))
    torch.testing.assert_close(by_decay, by_gate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, error", [(dict(layer_idx=1), ValueError), (dict(num_layers=4), ValueError),
                                           (dict(layer_idx=4, num_layers=4), ValueError),
                                           (dict(layer_idx=1.0, num_layers=4), TypeError)])
def test_per_layer_lightning_preset_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        decay_preset("lightning", 4, **kwargs)
    with pytest.raises(ValueError):
        decay_preset("retnet", 4, layer_idx=0, num_layers=2)


def test_decay_is_the_same_as_a_constant_gate():
    B, S, H, D = 1, 70, 4, 16
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    by_decay = attnops.linear_attention(q, k, v, decay="retnet")
    gate = decay_preset("retnet", H).view(1, 1, H).expand(B, S, H)
    torch.testing.assert_close(attnops.linear_attention(q, k, v, gate=gate), by_decay)


@pytest.mark.parametrize("gate_kind", [None, "head", "channel"])
@pytest.mark.parametrize("where", ["v", "k"])
def test_nan_in_gives_nan_from_its_step_on(fwd_impl, where, gate_kind):
    """A NaN value or key at step t reaches every later output of its head (a value: of its channel), never an
    earlier one, its chunk's included, with every gate kind, on every backend; other heads stay finite."""
    B, S, H, D = 1, 150, 2, 16
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    {"v": v, "k": k}[where][0, 70, 1, 3] = float("nan")
    gate = {None: None, "head": (B, S, H), "channel": (B, S, H, D)}[gate_kind]
    gate = None if gate is None else F.logsigmoid(torch.randn(gate)).to(fwd_impl.device)
    q, k, v = (t.to(fwd_impl.device) for t in (q, k, v))
    kw = dict(backend=backend_of(fwd_impl), chunk_size=64)
    out = attnops.linear_attention(q, k, v, gate=gate, **kw).cpu()
    assert torch.isfinite(out[:, :70]).all() and torch.isfinite(out[:, :, 0]).all()
    assert torch.isnan(out[0, 70:, 1, 3 if where == "v" else slice(None)]).all()


@pytest.mark.parametrize("gate_kind", ["head", "channel"])
def test_nan_gate_gives_nan_from_its_step_on(fwd_impl, gate_kind):
    """A NaN gate at step t: NaN from t on in its head, every earlier row finite; non-causal, a NaN value reaches
    every row of its channel."""
    B, S, H, D = 1, 150, 2, 16
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    gate = F.logsigmoid(torch.randn((B, S, H) if gate_kind == "head" else (B, S, H, D)))
    gate[0, 100, 0] = float("nan")
    q, k, v = (t.to(fwd_impl.device) for t in (q, k, v))
    kw = dict(backend=backend_of(fwd_impl), chunk_size=64)
    out = attnops.linear_attention(q, k, v, gate=gate.to(fwd_impl.device), **kw).cpu()
    assert torch.isfinite(out[:, :100]).all() and torch.isnan(out[0, 100:, 0]).all()
    assert torch.isfinite(out[:, :, 1]).all()
    v = v.clone()
    v[0, 70, 1, 3] = float("nan")
    out = attnops.linear_attention(q, k, v, causal=False, **kw).cpu()
    assert torch.isnan(out[0, :, 1, 3]).all() and torch.isfinite(out[:, :, 0]).all()


@pytest.mark.parametrize("where", ["v", "k", "gate"])
@pytest.mark.parametrize("gate", [None, "head", "channel"])
def test_nan_value_does_not_reach_earlier_rows_of_its_chunk(gate, where):
    """The chunk form's intra-chunk products skip the masked pairs (0 * NaN would be NaN): a NaN value, key or
    gate at step t leaves the rows before t finite, as the recurrence and the reference do, with every gate kind
    (a NaN key once reached the rows of its gated chunk through the masked weights and the diagonal blocks'
    placement; a NaN per-channel gate, the earlier rows of its sub-chunk through the gate-sum product)."""
    if where == "gate" and gate is None:
        pytest.skip("no gate")
    B, S, H, D = 1, 150, 2, 16
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    shape = {None: None, "head": (B, S, H), "channel": (B, S, H, D)}[gate]
    log_gate = None if shape is None else F.logsigmoid(torch.randn(shape))
    {"v": v, "k": k, "gate": log_gate}[where][0, 70, 1, ...] = float("nan")
    if where == "v":
        v[0, 70, 1] = torch.randn(D)
        v[0, 70, 1, 3] = float("nan")
    out = attnops.linear_attention(q, k, v, gate=log_gate, chunk_size=64)
    ref = attnops.linear_attention(q, k, v, gate=log_gate, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isfinite(out[0, :70]).all() and torch.isnan(out[0, 70:, 1, 3]).all()
    assert torch.isfinite(out[0, :, 0]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-5)


def test_zero_log_gate_resets_the_state():
    """A log-gate of -inf (a gate of 0) forgets everything before it, without NaN."""
    B, S, H, D = 1, 64, 1, 8
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    gate = torch.zeros(B, S, H, D, dtype=torch.float64)
    gate[:, 30] = float("-inf")
    out = attnops.linear_attention(q, k, v, gate=gate)
    fresh = attnops.linear_attention(q[:, 30:], k[:, 30:], v[:, 30:])
    torch.testing.assert_close(out[:, 30:], fresh, rtol=1e-10, atol=1e-10)


def test_triton_operators_opcheck():
    from conftest import INTERPRET, TRITON

    if not (TRITON and INTERPRET):
        pytest.skip("opcheck of the Triton operators runs under the interpreter (CPU tensors)")

    q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 24)
    for g in (None, F.logsigmoid(torch.randn(1, 40, 2, 1)), F.logsigmoid(torch.randn(1, 40, 2, 16))):
        h0 = torch.randn(1, 2, 16, 24)
        torch.library.opcheck(torch.ops.attnops.linear_attn_fwd_triton, (q, k, v, g, h0, 0.25, 16),
                              test_utils=("test_schema", "test_faketensor"))
        short = (q[:, :3], k[:, :3], v[:, :3], None if g is None else g[:, :3], h0, 0.25)
        torch.library.opcheck(torch.ops.attnops.linear_attn_recurrent_triton, short)


def test_meta_tensors():
    q, k, v = (torch.randn(2, 100, 4, 32, device="meta") for _ in range(3))
    out, state = attnops.linear_attention(q, k, v, gate=torch.zeros(2, 100, 4, device="meta"),
                                          output_final_state=True)
    assert out.shape == (2, 100, 4, 32) and state.shape == (2, 4, 32, 32) and state.dtype == torch.float32


def test_output_layout_and_transposed_inputs():
    """(B, H, S, D) tensors passed as transposed views give the same result (no copy needed)."""
    q, k, v = (torch.randn(2, 4, 77, 32) for _ in range(3))
    a = attnops.linear_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    b = attnops.linear_attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))
    torch.testing.assert_close(a, b)


BAD = [
    (dict(gate=torch.zeros(1, 32, 3)), ValueError, "gate must have shape"),
    (dict(gate=torch.full((1, 32, 2), 0.1)), ValueError, "must be <= 0"),
    (dict(decay=torch.tensor([-0.1, 0.2])), ValueError, "must be <= 0"),
    (dict(decay=torch.zeros(3)), ValueError, r"shape \(2,\)"),
    (dict(decay="alibi"), ValueError, "retnet"),
    (dict(chunk_size=48), ValueError, "power of two"),
    (dict(chunk_size=8), ValueError, "power of two"),
    (dict(feature_map="softmax"), ValueError, "feature_map"),
    (dict(feature_map=lambda x: x[..., 0]), ValueError, "feature_map must map"),
    (dict(causal=False, decay="retnet"), ValueError, "causal=True"),
    (dict(initial_state=torch.zeros(1, 2, 16, 8)), ValueError, "initial_state must have shape"),
    (dict(normalize=True, initial_state=torch.zeros(1, 2, 16, 16)), TypeError, "pair"),
    (dict(causal=1), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments(kwargs, error, match):
    q, k, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 1, 16), torch.randn(1, 32, 1, 16)
    with pytest.raises(error, match=match):
        attnops.linear_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q = torch.randn(1, 32, 3, 16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attnops.linear_attention(q, torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16))
    with pytest.raises(ValueError, match="self-attention"):
        attnops.linear_attention(q, torch.randn(1, 31, 3, 16), torch.randn(1, 31, 3, 16))
    with pytest.raises(ValueError, match="dimensions"):
        attnops.linear_attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="share a dtype"):
        attnops.linear_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="head dim"):
        attnops.linear_attention(q, q, torch.randn(1, 32, 3, 300))


def test_no_sequence_squared_memory():
    """Causal, gated, fwd at S = 16384: an S x S float32 matrix alone would be 1 GiB; the inputs
    and output are 4 MiB each."""
    from attnops.bench.timer import peak_memory_mb

    q, k, v = (torch.randn(1, 16384, 1, 64) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, 16384, 1))
    peak = peak_memory_mb(lambda: attnops.linear_attention(q, k, v, gate=gate), "cpu")
    assert peak is not None and peak < 48, f"peak {peak:.1f} MiB"


# ---- block maps ---------------------------------------------------------------------------------

MAP_CONFIGS = ["elu", "elu-noncausal", "retnet", "gate-head", "gate-channel", "normalize", "normalize-gate-channel",
               "normalize-noncausal", "callable"]


def map_log_gate(inputs, cfg):
    """The config's gate or decay as the block-map functions take it: ``(B, S, H, 1 | Dk)`` or None."""
    if "gate" in inputs:
        return inputs["gate"] if inputs["gate"].dim() == 4 else inputs["gate"].unsqueeze(-1)
    if cfg.get("decay") == "retnet":
        B, S, H, _ = inputs["q"].shape
        return decay_preset("retnet", H).to(inputs["q"].dtype).view(1, 1, -1, 1).expand(B, S, -1, 1)
    return None


@pytest.mark.parametrize("block_size", [16, 64, (128, 32), (32, 128)], ids=str)
@pytest.mark.parametrize("config", MAP_CONFIGS)
def test_block_map_matches_the_pooled_weight_matrix(config, block_size, fwd_impl):
    """The map against the float64 reference that builds the full weight matrix and pools it."""
    from attnops.core.block_map import check_request
    from attnops.ops.linear import reference
    from attnops.ops.linear import resolve_feature_map

    if fwd_impl.backend == "triton" and block_size != 64:
        pytest.skip("the map is computed alike on every backend (Triton gives the denominator): one block size")
    cfg = CONFIGS[config]
    shape = (2, 150, 4, 2, 16, 24)
    inputs = make_inputs(shape, cfg, with_state=False)
    if not cfg.get("causal", True):  # non-causal maps may cross-attend: keys of their own length
        inputs["k"], inputs["v"] = inputs["k"][:, :97], inputs["v"][:, :97]
    kw = {n: x for n, x in cfg.items() if n not in ("gate", "decay")}
    if "decay" in cfg:
        kw["decay"] = cfg["decay"]
    request = check_request(block_size, "mean", (64, 64))
    phi = resolve_feature_map(cfg.get("feature_map", "elu"))
    log_gate = map_log_gate(inputs, cfg)

    def ref(dtype):
        cast = [inputs[n].to(dtype) for n in ("q", "k")]
        return reference.linear_block_map(*cast, None if log_gate is None else log_gate.to(
            torch.promote_types(dtype, torch.float32)), feature_map=phi, causal=cfg.get("causal", True),
            normalize=cfg.get("normalize", False), softmax_scale=feature_dim(cfg, 16) ** -0.5, request=request)

    dev = fwd_impl.device
    gate = inputs["gate"].float().to(dev) if "gate" in inputs else None
    out, block_map = attnops.linear_attention(*(inputs[n].float().to(dev) for n in "qkv"), gate=gate,
                                              return_block_map=True, map_block_size=block_size,
                                              backend=backend_of(fwd_impl), **kw)
    assert block_map.dtype == torch.float32 and block_map.shape == (2, 4, -(-150 // request.block_q),
                                                                    -(-inputs["k"].shape[1] // request.block_k))
    assert_accurate("block_map", block_map.cpu(), ref(torch.float64), ref(torch.float32))
    plain = attnops.linear_attention(*(inputs[n].float().to(dev) for n in "qkv"), gate=gate,
                                     backend=backend_of(fwd_impl), **kw)
    assert torch.equal(out, plain)  # the map is a readout: the output does not change
    if cfg.get("normalize") and cfg.get("feature_map", "elu") == "elu":  # rows sum to den / (den + 1e-6)
        torch.testing.assert_close(block_map.sum(-1).cpu(), torch.ones(block_map.shape[:3]), rtol=1e-4, atol=1e-4)
    if cfg.get("causal", True) and request.block_q == request.block_k:
        assert bool((block_map.triu(1) == 0).all())  # key blocks after the query block: exactly 0


@pytest.mark.parametrize("block_size", [16, (64, 16), (16, 128)], ids=str)
@pytest.mark.parametrize("gate", ["channel", "head"])
def test_block_map_over_several_row_chunks(gate, block_size):
    """A longer sequence cut into several row chunks (the cumulative gate carried between them), with
    enough key blocks that the per-channel off-band factors around groups of blocks and sums the
    rest of the nearest group directly."""
    from attnops.core.block_map import check_request
    from attnops.ops.linear import reference
    from attnops.ops.linear.map import linear_block_map
    from attnops.ops.linear import resolve_feature_map

    torch.manual_seed(5)
    B, S, H, D = 1, 700, 2, 8
    q, k = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(2))
    width = D if gate == "channel" else 1
    log_gate = F.logsigmoid(3 * torch.randn(B, S, H, width, dtype=torch.float64) + 2.0)
    request = check_request(block_size, "mean", (64, 64))
    phi = resolve_feature_map("elu")
    got = linear_block_map(q.float(), k.float(), log_gate.float(), None, causal=True, softmax_scale=0.3,
                           request=request, feature_map=phi, chunk_elements=4096)
    refs = [reference.linear_block_map(q.to(dt), k.to(dt), log_gate.to(dt), feature_map=phi, causal=True,
                                       normalize=False, softmax_scale=0.3, request=request)
            for dt in (torch.float64, torch.float32)]
    assert_accurate("block_map", got, *refs)


@pytest.mark.parametrize("config", ["elu", "retnet", "gate-head", "gate-channel", "normalize",
                                    "normalize-gate-channel"])
def test_map_read_off_the_chunk_forward_equals_the_separate_map(config):
    """At the chunk's granularity the CPU chunk form reads the map off its own intermediates
    (ChunkSums); over several segments of the sequence and a partial last chunk it equals the map
    computed separately, in float64."""
    from attnops.core.block_map import check_request
    from attnops.ops.linear.map import linear_block_map
    from attnops.ops.linear import resolve_feature_map

    cfg = CONFIGS[config]
    torch.manual_seed(11)
    inputs = make_inputs((1, 2100, 4, 4, 64, 64), cfg, with_state=False)  # segments of ~1000 rows
    kw = {n: x for n, x in cfg.items() if n not in ("gate", "decay")}
    if "decay" in cfg:
        kw["decay"] = cfg["decay"]
    q, k, v = (inputs[n] for n in "qkv")
    out, fused = attnops.linear_attention(q, k, v, gate=inputs.get("gate"), return_block_map=True, map_block_size=16,
                                          chunk_size=16, **kw)
    log_gate = map_log_gate(inputs, cfg)
    denominator = None
    if cfg.get("normalize"):
        plain = attnops.linear_attention(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1), gate=inputs.get("gate"),
                                         chunk_size=16, **{n: x for n, x in kw.items() if n != "normalize"})
        denominator = plain[..., -1]
    separate = linear_block_map(q, k, log_gate, denominator, causal=True, softmax_scale=64 ** -0.5,
                                request=check_request(16, "mean", (64, 64)),
                                feature_map=resolve_feature_map(cfg.get("feature_map", "elu")))
    assert fused.dtype == torch.float64 and fused.shape == separate.shape == (1, 4, 132, 132)
    torch.testing.assert_close(fused, separate, rtol=1e-9, atol=1e-12)


def test_block_map_with_the_final_state_and_bad_requests():
    q, k, v = (torch.randn(1, 70, 2, 16) for _ in range(3))
    out, state, block_map = attnops.linear_attention(q, k, v, output_final_state=True, return_block_map=True)
    out2, block_map2 = attnops.linear_attention(q, k, v, return_block_map=True)
    assert torch.equal(out, out2) and torch.equal(block_map, block_map2) and state.shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match="mean"):
        attnops.linear_attention(q, k, v, return_block_map=True, reduce="max")
    with pytest.raises(ValueError, match="power of two"):
        attnops.linear_attention(q, k, v, return_block_map=True, map_block_size=48)
    with pytest.raises(ValueError, match="initial_state"):
        attnops.linear_attention(q, k, v, return_block_map=True, initial_state=state)


def test_block_map_memory_stays_far_below_s_squared():
    """S = 16384, gated: an S x S float32 matrix alone would be 1 GiB."""
    from attnops.bench.timer import peak_memory_mb

    q, k, v = (torch.randn(1, 16384, 1, 32) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, 16384, 1))
    peak = peak_memory_mb(lambda: attnops.linear_attention(q, k, v, gate=gate, return_block_map=True), "cpu")
    assert peak is not None and peak < 64, f"peak {peak:.1f} MiB"


def test_empty_sequence_passes_the_state_through(fwd_impl):
    q = torch.randn(1, 0, 2, 16, device=fwd_impl.device)
    state = torch.randn(1, 2, 16, 16, device=fwd_impl.device)
    out, final = attnops.linear_attention(q, q, q, initial_state=state, output_final_state=True,
                                          backend=backend_of(fwd_impl))
    assert out.shape == (1, 0, 2, 16) and torch.equal(final, state)


VARLEN_LENGTHS = [5, 0, 70, 1, 33]


@pytest.mark.parametrize("config", ["gate-channel", "normalize-gate-head", "elu-noncausal"])
def test_cu_seqlens_resets_the_state_at_every_sequence(config, fwd_impl):
    """fla's varlen convention: one packed row, the state per sequence (initial and final, (N, H, Dk, Dv)),
    forward and backward equal to each sequence run alone by the float64 reference."""
    cfg = CONFIGS[config]
    T, H, D = sum(VARLEN_LENGTHS), 3, 16
    N = len(VARLEN_LENGTHS)
    cu = torch.tensor([0, *VARLEN_LENGTHS]).cumsum(0).to(torch.int32)
    torch.manual_seed(6)
    inputs = make_inputs((1, T, H, H, D, D), cfg, with_state=False)
    causal = cfg.get("causal", True)
    if causal:  # one state per sequence
        inputs["initial_state"] = torch.randn(N, H, D, D, dtype=torch.float64) * 0.3
        if cfg.get("normalize"):
            inputs["initial_z"] = torch.rand(N, H, D, dtype=torch.float64)

    def call(leaves, backend, device, dtype, per_sequence):
        kw = {k: v for k, v in cfg.items() if k not in ("gate", "decay")}
        state = None
        if "initial_state" in leaves:
            state = (leaves["initial_state"], leaves["initial_z"]) if cfg.get("normalize") else leaves["initial_state"]
        if not per_sequence:
            return attnops.linear_attention(leaves["q"], leaves["k"], leaves["v"], gate=leaves.get("gate"),
                                            initial_state=state, cu_seqlens=cu.to(device), output_final_state=True,
                                            backend=backend, **kw)
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            init = None if state is None else (tuple(t[n:n + 1] for t in state) if cfg.get("normalize")
                                               else state[n:n + 1])
            gate = leaves.get("gate")
            res = attnops.linear_attention(leaves["q"][:, a:b], leaves["k"][:, a:b], leaves["v"][:, a:b],
                                           gate=None if gate is None else gate[:, a:b], initial_state=init,
                                           output_final_state=True, backend=backend, **kw)
            outs.append(res.out)
            finals.append(res.final_state[0] if cfg.get("normalize") else res.final_state)
        return torch.cat(outs, dim=1), torch.cat(finals)

    def run_one(dtype, backend, device, per_sequence):
        leaves = {n: t.to(device, dtype if n in "qkv" or dtype == torch.float64 else torch.float32)
                  .requires_grad_() for n, t in inputs.items()}
        out, state = call(leaves, backend, device, dtype, per_sequence)
        if isinstance(state, tuple):
            state = state[0]
        gen = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)).sum() + \
            (state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return [out.detach().cpu(), state.detach().cpu(), *(g.cpu() for g in grads)]

    got = run_one(torch.float32, backend_of(fwd_impl), fwd_impl.device, False)
    want = run_one(torch.float64, "reference", "cpu", True)
    yard = run_one(torch.float32, "reference", "cpu", True)
    for name, a, b, c in zip(["out", "final_state", *("d" + n for n in inputs)], got, want, yard):
        assert_accurate(f"{config} {name}", a, b, c)


def test_cu_seqlens_bad_input():
    q = torch.randn(1, 10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="one packed row"):
        attnops.linear_attention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                                 cu_seqlens=cu)
    with pytest.raises(ValueError, match="end at the total"):
        attnops.linear_attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="one state per sequence"):
        attnops.linear_attention(q, q, q, cu_seqlens=cu, initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(NotImplementedError, match="return_block_map"):
        attnops.linear_attention(q, q, q, cu_seqlens=cu, return_block_map=True)


def test_channel_gates_keep_small_decays_exact_after_strong_ones():
    """Per-channel gates of -0.01 with a -60 every 7 steps: inside a chunk the cumulative log-gates reach -500
    while the weights that matter are e^(-0.01 n); a difference of two float32 prefix sums would lose them (1e-4
    relative), the sums of the gates in (j, i] that the chunk form takes do not."""
    g = torch.Generator().manual_seed(7)
    B, S, H, D = 1, 200, 2, 16
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    gate = torch.full((B, S, H, D), -0.01)
    gate[:, ::7] = -60.0
    out32 = attnops.linear_attention(q, k, v, gate=gate, feature_map="identity")
    out64 = attnops.linear_attention(q.double(), k.double(), v.double(), gate=gate.double(), feature_map="identity")
    err = (out32.double() - out64).abs().max() / out64.abs().max()
    assert err < 2e-6, err


def test_channel_gates_every_path_of_the_chunk_form(monkeypatch):
    """The per-channel chunk form's three ways to a chunk's scores, in one call, forward and gradients against
    the float64 recurrence: a chunk whose gates span <= DIAG_SPAN (one factored product), one that spans more but
    whose sub-chunks do not (sub-chunks, factored diagonal blocks), one with a sub-chunk beyond it (the exact sums
    of the gates), and a partial last chunk of random gates. Spans near the bound: factors near e^+-27, whose
    exponents taken in float32 would be off by 2e-6 relative (caught here), so they are exponentiated in float64."""
    from attnops.ops.linear import chunk as chunk_form

    calls = {"sub_chunk": 0, "exact_diagonal": 0}
    for name in calls:
        original = getattr(chunk_form, f"_{name}_scores")

        def counted(*args, _original=original, _name=name):
            calls[_name] += args[0].shape[0]
            return _original(*args)
        monkeypatch.setattr(chunk_form, f"_{name}_scores", counted)
    g = torch.Generator().manual_seed(11)
    B, S, H, D = 1, 64 * 3 + 37, 2, 16
    q, k, v = (torch.randn(B, S, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    v = 30 * v  # large outputs: the accuracy rule's absolute term does not hide a relative error
    gate = torch.full((B, S, H, D), -0.85, dtype=torch.float64)  # chunk 0: span 54 (factors up to e^27)
    gate[:, 64:128] = -3.5  # chunk 1: span 224 over the chunk, 56 over a sub-chunk
    gate[:, 128:192] = -0.3
    gate[:, 160:176, 1, 5] = -8.0  # chunk 2 (span 19 elsewhere): one sub-chunk of one head spans 128
    gate[:, 192:] = F.logsigmoid(3 * torch.randn(B, S - 192, H, D, generator=g, dtype=torch.float64) + 1.0)
    gate = gate + 0.01 * torch.rand(B, S, H, D, generator=g, dtype=torch.float64) * gate
    inputs = {"q": q, "k": k, "v": v, "gate": gate}
    cfg = dict(gate="channel", feature_map="identity")
    out, state, grads = run(inputs, cfg, torch.float32, chunk_size=64)
    assert calls["sub_chunk"] >= 2 and calls["exact_diagonal"] >= 1, calls
    monkeypatch.undo()
    ref_out, ref_state, ref_grads = run(inputs, cfg, torch.float64, backend="reference")
    lp_out, lp_state, lp_grads = run(inputs, cfg, torch.float32, backend="reference")
    assert_accurate("out", out, ref_out, lp_out)
    assert_accurate("final_state", state, ref_state, lp_state)
    for name in ref_grads:
        assert_accurate(f"d{name}", grads[name], ref_grads[name], lp_grads[name])
