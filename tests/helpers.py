"""Shared test helpers: the DESIGN.md accuracy rule and input factories."""

from __future__ import annotations

import contextlib

import pytest
import torch

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}

# The C++ backward's forms (_C._set_backward_mode): 1 the fused pass (its waves), 3 fused with each (b, kv head)'s
# keys split in 3 chunks, 2 two passes (a dq pass over query tiles, then the key tiles)
CPU_BACKWARD_FORMS = {"fused": 1, "chunks": 3, "two_pass": 2}


@contextlib.contextmanager
def cpu_backward_form(name):
    """Runs the C++ backward in the form CPU_BACKWARD_FORMS[name] for the duration."""
    from attnops import _C

    previous = _C._set_backward_mode(CPU_BACKWARD_FORMS[name])
    try:
        yield name
    finally:
        _C._set_backward_mode(previous)


def _finite_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float64, with equal infinities (lse = -inf of empty rows) and shared NaNs
    counting as 0 and any other non-finite mismatch as +inf."""
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = (a - b).abs()
    diff = torch.where(same, torch.zeros_like(diff), diff)
    return torch.nan_to_num(diff, nan=float("inf"))


def assert_accurate(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lp: torch.Tensor,
                    factor: float = 2.0, atol: float = 1e-5) -> None:
    """DESIGN.md: ``max|out - ref64| <= factor * max|ref_T - ref64| + atol``, where ``ref_T`` is the
    reference run in the kernel's dtype. NaN where the reference has none (an unwritten, poisoned
    element) always fails."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    err = _finite_diff(out, ref64)
    base = _finite_diff(ref_lp, ref64)
    base_max = float(base.max()) if base.numel() else 0.0
    if base_max == float("inf"):
        base_max = 0.0
    tol = factor * base_max + atol
    worst = float(err.max()) if err.numel() else 0.0
    if worst > tol:
        idx = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        bad = int((err > tol).sum())
        raise AssertionError(
            f"{name}: max error {worst:.3e} > tolerance {tol:.3e} (= {factor} * {base_max:.3e} + {atol}); "
            f"{bad} of {err.numel()} elements off; worst at {idx}: got {out[idx].item()!r}, "
            f"reference {ref64[idx].item()!r}"
        )


def make_qkv(B, Sq, Sk, H, Hkv, D, dtype, requires_grad=False, device="cpu"):
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, Hkv, D, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def output_and_grads(fn, inputs, dout):
    """(output, grads of inputs) for ``fn(*inputs) -> tensor`` with ``dout`` on the output (ops that return one
    tensor, no lse)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def assert_op_matches_oracle(ours, oracle, inputs, dout, dtype, device, names):
    """``ours(*inputs)`` in ``dtype`` on ``device`` against ``oracle`` in float64 and in ``dtype`` (the accuracy rule),
    output and the gradients of every input (``names`` label them); returns our output (on the CPU)."""
    out64, g64 = output_and_grads(oracle, [t.double() for t in inputs], dout.double())
    outT, gT = output_and_grads(oracle, [t.to(dtype) for t in inputs], dout)
    out, grads = output_and_grads(ours, [t.to(dtype).to(device) for t in inputs], dout.to(device))
    assert out.dtype == dtype
    assert_accurate("out", out.cpu(), out64, outT)
    for name, a, b, c in zip(names, grads, g64, gT, strict=True):
        assert a.shape == b.shape, name
        assert_accurate(name, a.cpu(), b, c)
    return out.cpu()


def run_with_grads(fn, inputs, dout):
    """(output, lse, grads of inputs) for fn(*inputs) -> AttentionOutput, with dout on the output."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    res = fn(*inputs)
    out, lse = res
    grads = torch.autograd.grad(out, inputs, dout.to(out.device, out.dtype))
    return out.detach(), lse.detach(), grads


def compare_with_reference(kernel, ref, inputs, dtype, check_grads=True, name="", labels=("dq", "dk", "dv"),
                           factor=2.0):
    """Runs kernel and reference (float64 and dtype) with the same upstream gradient and checks
    out, lse and the gradients of the inputs named in ``labels`` (in order) with the accuracy rule (``factor``:
    its multiple of the reference's error, 2 but where a test says why). The reference runs on the CPU."""
    cpu_inputs = [t.detach().cpu() for t in inputs]
    dout = torch.randn_like(cpu_inputs[0], dtype=torch.float64)
    out64, lse64, g64 = run_with_grads(ref, [t.double() for t in cpu_inputs], dout)
    outT, lseT, gT = run_with_grads(ref, cpu_inputs, dout)
    if check_grads:
        out, lse, g = run_with_grads(kernel, inputs, dout.to(inputs[0].device))
    else:
        out, lse = kernel(*inputs)
        g = ()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_accurate(f"{name} out", out.cpu(), out64, outT, factor)
    assert_accurate(f"{name} lse", lse.cpu(), lse64, lseT, factor)
    for label, a, b, c in zip(labels, g, g64, gT):
        assert a.dtype == dtype
        assert_accurate(f"{name} {label}", a.cpu(), b, c, factor)


def make_decode_inputs(shape, dtype, device):
    """q (B, Sq_new, H, D), caches (B, S, Hkv, D) and ragged lengths for a decode SHAPES entry
    ``(B, S, H, Hkv, D, Sq_new)``."""
    B, S, H, Hkv, D, Sq = shape
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device)
    return q, k, v, ragged_lengths(B, S).to(device)


def ragged_lengths(B, S):
    """Decode cache lengths of a ragged batch: an empty sequence, a full one, one half full."""
    return torch.tensor([0, S, S // 2 + 1][:B] if B > 1 else [S], dtype=torch.int32)


def same_mask_dropout(monkeypatch):
    """Makes torch's own dropout (``torch.nn.functional.dropout``, which eager attention and
    ``torch.nn.MultiheadAttention`` call on their weights) apply the mask attnops' kernels draw: one seed per
    call from the default generator as the ops draw it, the reference hash's pairs, the kernels' scale. The
    weights arrive as ``(B, H, Sq, Sk)`` or ``(B * H, Sq, Sk)``: the hash's head index is ``b * H + h`` either
    way. Callers zero every other dropout, so the calls with ``p > 0`` in training are attention weights."""
    from attnops.core.checks import draw_dropout_seed
    from attnops.ops.softmax.reference import dropout_keep

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        Sq, Sk = input.shape[-2:]
        seed = int(draw_dropout_seed(None, input.device))
        keep, scale = dropout_keep(seed, p, 1, input.numel() // (Sq * Sk), Sq, Sk)
        return torch.where(keep.view(input.shape), input * scale, torch.zeros((), dtype=input.dtype))

    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)


def skip_fallback(impl) -> None:
    """The pure-PyTorch fallback is eager code, not a registered operator: opcheck and fullgraph compilation
    do not apply to it (README, "What the fallback does not do")."""
    if impl.backend == "composite":
        pytest.skip("the composite fallback is eager PyTorch, not an operator (no opcheck, no fullgraph compile)")


def sdpa_and_attnops(model_cls, config, **kwargs):
    """(SDPA, attnops) float64 models of a transformers ``model_cls`` with one set of random weights (seed 0):
    transformers' SDPA path is exact to float64 rounding (eager's softmax runs in float32 even there)."""
    import copy

    from attnops.integrations import transformers as hf_attnops

    torch.manual_seed(0)
    ref, ours = (model_cls._from_config(copy.deepcopy(config), attn_implementation=impl, **kwargs).double()
                 for impl in ("sdpa", hf_attnops.register()))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def left_padded_batch(vocab: int = 97, length: int = 40):
    """``ids (3, length)`` and their attention mask: one full row and two left-padded by 8 and 3 tokens."""
    ids = torch.randint(3, vocab, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    mask[2, :3] = 0
    return ids, mask
