"""Shared test helpers: the DESIGN.md accuracy rule and input factories."""

from __future__ import annotations

import torch

DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


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


def run_with_grads(fn, inputs, dout):
    """(output, lse, grads of inputs) for fn(*inputs) -> AttentionOutput, with dout on the output."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    res = fn(*inputs)
    out, lse = res
    grads = torch.autograd.grad(out, inputs, dout.to(out.device, out.dtype))
    return out.detach(), lse.detach(), grads
