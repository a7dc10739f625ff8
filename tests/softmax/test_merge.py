"""merge_partials: two partial softmaxes over disjoint keys -> the softmax over their union (the value, its
gradients, and rows empty on one or both sides)."""

import torch

from attnops.ops.softmax.merge import merge_partials


def _attend(s, v):
    """Softmax rows of scores ``s (B, H, S, K)`` over ``v (B, K, H, D)`` -> (out (B, S, H, D), lse (B, H, S))."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhsk,bkhd->bshd", p, v), lse


def test_merge_equals_the_softmax_over_the_union_with_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, 11, generator=g, dtype=torch.float64)
    s[0, 0, 1, 6:] = float("-inf")  # a row empty on the second side
    v = torch.randn(2, 11, 3, 4, generator=g, dtype=torch.float64)
    s.requires_grad_(True)
    whole = _attend(s, v)
    merged = merge_partials(_attend(s[..., :6], v[:, :6]), *_attend(s[..., 6:], v[:, 6:]), torch.float64)
    for a, b in zip(merged, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(whole[0])
    g1 = torch.autograd.grad((merged[0] * dout).sum() + merged[1].sum(), s)[0]
    g2 = torch.autograd.grad((whole[0] * dout).sum() + whole[1].sum(), s)[0]
    seen = torch.isfinite(s.detach())  # (a masked score's gradient is the helper's NaN on both sides)
    torch.testing.assert_close(g1[seen], g2[seen], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, c, d: merge_partials((a, b), c, d, torch.float64),
                                    [t.detach().requires_grad_(True) for t in (*merged, *whole)])


def test_rows_empty_on_both_sides_stay_zero_without_nan_gradients():
    out = torch.zeros(1, 2, 1, 3, dtype=torch.float64, requires_grad=True)
    lse = torch.full((1, 1, 2), float("-inf"), dtype=torch.float64, requires_grad=True)
    other_lse = torch.tensor([[[float("-inf"), 0.5]]], dtype=torch.float64, requires_grad=True)
    other = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1).repeat(1, 1, 1, 3)  # empty rows are 0
    other.requires_grad_(True)
    o, m = merge_partials((out, lse), other, other_lse, torch.float64)
    assert torch.equal(o[0, 0], torch.zeros(1, 3, dtype=torch.float64)) and torch.isneginf(m[0, 0, 0])
    torch.testing.assert_close(o[0, 1], torch.ones(1, 3, dtype=torch.float64))
    (o.sum() + m[torch.isfinite(m)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (out, lse, other, other_lse))
