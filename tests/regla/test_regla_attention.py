"""ReGLA on the linear core against the paper's equations run step by step (float64 oracle), forward and the
gradients of q, k, v and both gate logits, over odd shapes, GQA and a value width of its own; the refining gate in
log space against its closed form; split-and-resume; the layer's decoding."""

import math

import pytest
import torch

import attnops
from helpers import DTYPE_IDS, assert_accurate, output_and_grads
from attnops.ops.regla import ReGLAState, refined_log_gate, variance_reduction_scale
from attnops.ops.regla.reference import regla_reference

# (B, S, H, Hkv, D, Dv): lengths that are not multiples of the chunk, head dims 40 / 96, GQA and MQA
SHAPES = [(2, 133, 4, 2, 40, 40), (1, 70, 2, 2, 96, 32), (2, 33, 3, 1, 16, 16)]


def _inputs(shape, seed=0, gate_scale=3.0):
    B, S, H, Hkv, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, Dv, generator=g)
    gate = gate_scale * torch.randn(B, S, H, D, generator=g)
    refine = gate_scale * torch.randn(B, S, H, D, generator=g)
    return [q, k, v, gate, refine], torch.randn(B, S, H, Dv, generator=g)


def _backend(impl):
    return None if impl.backend == "cpu" else impl.backend


@pytest.mark.parametrize("key_shift", ["running", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-S{}-H{}-Hkv{}-D{}-Dv{}".format(*s))
def test_matches_the_papers_equations(shape, dtype, key_shift, fwd_impl):
    if fwd_impl.interpreted and (dtype != torch.float32 or shape != SHAPES[2]):
        pytest.skip("the Triton interpreter runs one shape and dtype (time)")
    inputs, dout = _inputs(shape)
    inputs[1][:, shape[1] // 2:] += 1.0  # the running max grows mid-sequence: the state is rescaled there

    def oracle(*t):
        return regla_reference(*t, key_shift=key_shift)[0]

    def ours(*t):
        return attnops.regla_attention(*t, key_shift=key_shift, chunk_size=16, backend=_backend(fwd_impl))

    out64, g64 = output_and_grads(oracle, [t.double() for t in inputs], dout.double())
    # the baseline: the equations in the kernel's dtype, the logits in float32 (what any ReGLA layer feeds its gates)
    lp = [t.to(dtype) for t in inputs[:3]] + inputs[3:]
    outT, gT = output_and_grads(oracle, lp, dout)
    out, grads = output_and_grads(ours, lp, dout)
    assert out.dtype == dtype and out.shape == out64.shape
    assert_accurate("out", out, out64, outT)
    for name, a, b, c in zip(("dq", "dk", "dv", "dgate", "drefine"), grads, g64, gT):
        assert_accurate(name, a, b, c)


def test_refined_gate_is_the_papers_in_log_space():
    """``exp(refined_log_gate)`` is ``(1 - r) g^2 + r (1 - (1 - g)^2)``; where g saturates the log stays exact (the
    direct formula underflows to log 0 or rounds 1 - F away), and it is never positive."""
    a = torch.linspace(-30, 30, 121, dtype=torch.float64)
    a, b = a.view(-1, 1).expand(121, 121), a.view(1, -1).expand(121, 121)
    g, r = torch.sigmoid(a), torch.sigmoid(b)
    paper = (1 - r) * g ** 2 + r * (1 - (1 - g) ** 2)
    # the closed form itself rounds 1 - (1 - g)^2 for tiny g: absolute 1e-16 there
    torch.testing.assert_close(refined_log_gate(a, b).exp(), paper, rtol=1e-12, atol=1e-15)
    log32 = refined_log_gate(a.float(), b.float())
    assert log32.dtype == torch.float32 and bool((log32 <= 0).all())
    # float32: the error is float32's on the log itself (absolute near |log F| <= 1, relative beyond), never the
    # 1 - F lost by rounding F
    exact = refined_log_gate(a, b)
    assert bool(((log32.double() - exact).abs() <= 4e-7 * exact.abs().clamp(min=1.0)).all())
    # g = sigmoid(-200): log F = log g + log(g + 2 r (1 - g)) ~ -200 + log(2 r), far below float's exp range
    deep = refined_log_gate(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert deep.item() == pytest.approx(-200.0 + math.log(1.0), abs=1e-4)
    # g = sigmoid(20), r = 0: 1 - F = 1 - g^2 ~ 2 e^-20 = 4.1e-9, which a float32 log(F) rounds to 0
    near_one = refined_log_gate(torch.tensor([20.0]), torch.tensor([-40.0]))
    assert near_one.item() == pytest.approx(math.log(torch.sigmoid(torch.tensor(20.0, dtype=torch.float64)).item() ** 2),
                                            rel=1e-5)


def test_refined_gate_gradients():
    """The written-out backward of the refined gate: float64 gradcheck, and equal to autograd through the closed
    form away from saturation; finite (and right) where the gates saturate."""
    g = torch.Generator().manual_seed(2)
    a, b = (4 * torch.randn(3, 70, dtype=torch.float64, generator=g) for _ in range(2))
    assert torch.autograd.gradcheck(refined_log_gate, (a.requires_grad_(), b.requires_grad_()))
    a, b = (3 * torch.randn(70000, generator=g).requires_grad_() for _ in range(2))  # float32, two segments
    ga, gb = torch.autograd.grad(refined_log_gate(a, b).sum(), (a, b))
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    s, r = torch.sigmoid(a64), torch.sigmoid(b64)
    ea, eb = torch.autograd.grad(((1 - r) * s ** 2 + r * (1 - (1 - s) ** 2)).log().sum(), (a64, b64))
    torch.testing.assert_close(ga.double(), ea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), eb, rtol=1e-5, atol=1e-6)
    sat = torch.tensor([-200.0, -200.0, 200.0, 40.0]), torch.tensor([-300.0, 200.0, -200.0, 40.0])
    da, db = torch.autograd.grad(refined_log_gate(*(t.requires_grad_() for t in sat)).sum(), sat)
    assert bool(torch.isfinite(da).all() and torch.isfinite(db).all())
    # g -> 0, r << g: log F ~ 2 a, slope 2; g -> 0, r -> 1: log F ~ a + log 2, slope 1; g -> 1: slope 0
    torch.testing.assert_close(da, torch.tensor([2.0, 1.0, 0.0, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key_shift", ["running", "sequence"])
def test_split_and_resume(key_shift):
    """Running shift: a sequence split in two gives one call's outputs and state. Sequence shift (the paper's): the
    second part equals one call's; the first, one call's times exp(max_first - max_all) per (batch, kv head)."""
    shape = (2, 90, 4, 2, 24, 24)
    (q, k, v, gate, refine), _ = _inputs(shape, seed=3)
    q, k, v, gate, refine = (t.double() for t in (q, k, v, gate, refine))
    k[:, 60:] += 1.5  # the second part holds the keys' max: the state must be rescaled
    kw = dict(key_shift=key_shift, output_final_state=True)
    whole, final = attnops.regla_attention(q, k, v, gate, refine, **kw)
    first, state = attnops.regla_attention(q[:, :50], k[:, :50], v[:, :50], gate[:, :50], refine[:, :50], **kw)
    second, state2 = attnops.regla_attention(q[:, 50:], k[:, 50:], v[:, 50:], gate[:, 50:], refine[:, 50:],
                                             initial_state=state, **kw)
    torch.testing.assert_close(second, whole[:, 50:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state2.state, final.state, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state2.key_max, final.key_max, rtol=0, atol=0)
    factor = torch.exp(state.key_max - final.key_max).repeat_interleave(2, dim=1)  # (B, H)
    assert bool((factor < 1).all())
    if key_shift == "running":
        torch.testing.assert_close(first, whole[:, :50], rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(first * factor[:, None, :, None], whole[:, :50], rtol=1e-10, atol=1e-12)
    # the reference's own resume agrees
    ref2, _ = regla_reference(q[:, 50:], k[:, 50:], v[:, 50:], gate[:, 50:], refine[:, 50:], key_shift=key_shift,
                              initial_state=tuple(state))
    torch.testing.assert_close(second, ref2, rtol=1e-10, atol=1e-12)


def test_running_shift_is_the_papers_output_scaled_per_row():
    """The running shift's output is the paper's times exp(M - m_t) per (row, head): causal, same direction."""
    (q, k, v, gate, refine), _ = _inputs((2, 70, 4, 2, 16, 16), seed=4)
    q, k, v, gate, refine = (t.double() for t in (q, k, v, gate, refine))
    running = attnops.regla_attention(q, k, v, gate, refine)
    paper = attnops.regla_attention(q, k, v, gate, refine, key_shift="sequence")
    m = torch.cummax(k.amax(dim=-1), dim=1).values  # (B, S, Hkv)
    factor = torch.exp(k.amax(dim=(1, 3)).unsqueeze(1) - m).repeat_interleave(2, dim=2).unsqueeze(-1)
    torch.testing.assert_close(running, paper * factor, rtol=1e-10, atol=1e-13)


def test_scale_and_nan():
    (q, k, v, gate, refine), _ = _inputs((1, 40, 2, 2, 16, 16), seed=5)
    ref = regla_reference(*(t.double() for t in (q, k, v, gate, refine)), softmax_scale=0.3)[0]
    out = attnops.regla_attention(q, k, v, gate, refine, softmax_scale=0.3)
    assert_accurate("out", out, ref, regla_reference(q, k, v, gate, refine, softmax_scale=0.3)[0])
    assert variance_reduction_scale(64) == pytest.approx(1 / (math.e * math.sqrt(64 * (math.e ** 2 - 1))))
    q[0, 10, 1, 3] = float("nan")  # a query: its own row
    out = attnops.regla_attention(q, k, v, gate, refine)
    assert bool(out[0, 10, 1].isnan().all()) and int(out.isnan().sum()) == out.shape[-1]
    k[0, 20, 0, 2] = float("nan")  # a key: every later row of its kv head (the running shift: none before)
    out = attnops.regla_attention(q.nan_to_num(), k, v, gate, refine)
    assert bool(out[0, 20:, 0].isnan().all()) and not bool(out[0, :20].isnan().any())
    assert not bool(out[0, :, 1].isnan().any())


@pytest.mark.parametrize("key_shift", ["running", "sequence"])
def test_empty_and_single_steps(key_shift):
    """An empty call returns an empty output and leaves a state that resumes exactly; one token at a time equals
    one call (running shift) or its output up to the shift's factor (sequence)."""
    (q, k, v, gate, refine), _ = _inputs((2, 12, 4, 2, 8, 8), seed=9)
    q, k, v, gate, refine = (t.double() for t in (q, k, v, gate, refine))
    kw = dict(key_shift=key_shift, output_final_state=True)
    empty = attnops.regla_attention(q[:, :0], k[:, :0], v[:, :0], gate[:, :0], refine[:, :0], **kw)
    assert empty.out.shape == (2, 0, 4, 8) and bool((empty.final_state.key_max == float("-inf")).all())
    whole = attnops.regla_attention(q, k, v, gate, refine, **kw)
    state, outs = empty.final_state, []
    for t in range(12):
        out, state = attnops.regla_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], gate[:, t:t + 1],
                                             refine[:, t:t + 1], initial_state=state, **kw)
        outs.append(out)
    again = attnops.regla_attention(q[:, :0], k[:, :0], v[:, :0], gate[:, :0], refine[:, :0], initial_state=state,
                                    **kw)
    torch.testing.assert_close(again.final_state.state, whole.final_state.state, rtol=1e-10, atol=1e-12)
    if key_shift == "running":
        torch.testing.assert_close(torch.cat(outs, 1), whole.out, rtol=1e-10, atol=1e-12)
    else:  # each step shifted by the max so far: the paper's output times exp(m_t - M) per row and head
        m = torch.cummax(k.amax(dim=-1), dim=1).values
        factor = torch.exp(m - k.amax(dim=(1, 3)).unsqueeze(1)).repeat_interleave(2, dim=2).unsqueeze(-1)
        torch.testing.assert_close(torch.cat(outs, 1) * factor, whole.out, rtol=1e-10, atol=1e-12)


def test_refusals():
    (q, k, v, gate, refine), _ = _inputs((1, 20, 2, 2, 8, 8))
    with pytest.raises(ValueError, match="gate must be"):
        attnops.regla_attention(q, k, v, gate[..., :4], refine)
    with pytest.raises(ValueError, match="refine must be"):
        attnops.regla_attention(q, k, v, gate, refine[:, :10])
    with pytest.raises(ValueError, match="one length"):
        attnops.regla_attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1), gate, refine)
    with pytest.raises(TypeError, match="ReGLAState"):
        attnops.regla_attention(q, k, v, gate, refine, initial_state=torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="another batch"):
        attnops.regla_attention(q, k, v, gate, refine,
                                initial_state=ReGLAState(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2)))
    with pytest.raises(TypeError, match="positional"):
        attnops.regla_attention(q, k, v, gate, refine, None)
    with pytest.raises(ValueError, match="key_shift"):
        attnops.regla_attention(q, k, v, gate, refine, key_shift="max")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attnops.regla_attention(torch.randn(1, 20, 3, 8), k, v, torch.randn(1, 20, 3, 8), torch.randn(1, 20, 3, 8))


def test_layer_equals_its_equations_and_decodes():
    """``nn.ReGLA`` is its projections, the reference, a per-head norm and the output projection; prefill plus
    token-by-token decoding equals one call (the key shift's factor only, removed by the norm); it trains."""
    torch.manual_seed(0)
    layer = attnops.nn.ReGLA(64, 4, num_kv_heads=2).double()
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    y = layer(x)
    B, T = 2, 45
    q = layer.q_proj(x).view(B, T, 4, 16)
    k, v = (p(x).view(B, T, 2, 16) for p in (layer.k_proj, layer.v_proj))
    gate, refine = layer.regla(x)
    ref = layer.out_proj(layer.regla.norm(regla_reference(q, k, v, gate, refine)[0]).reshape(B, T, 64))
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    y1, state = layer(x[:, :30], use_cache=True)
    steps = [y1]
    for t in range(30, T):
        yt, state = layer(x[:, t:t + 1], state=state, use_cache=True)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-9, atol=1e-10)
    y.square().mean().backward()
    for p in (layer.regla.gate_proj, layer.regla.refine_proj, layer.q_proj, layer.k_proj):
        grad = p.weight.grad
        assert grad is not None and bool(grad.abs().sum() > 0), p
    with pytest.raises(ValueError, match="output_norm"):
        attnops.nn.ReGLA(64, 4, output_norm="groupnorm")
    with pytest.raises(ValueError, match="key_shift"):
        attnops.nn.ReGLA(64, 4, key_shift="token")
