"""The op rejects bad input with a clear ValueError / TypeError before any kernel runs."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import dispatch


def qkv(B=1, Sq=64, Sk=64, H=4, Hkv=2, D=32, dtype=torch.float32):
    return (torch.randn(B, Sq, H, D, dtype=dtype), torch.randn(B, Sk, Hkv, D, dtype=dtype),
            torch.randn(B, Sk, Hkv, D, dtype=dtype))


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Any kernel launch during these tests is a failure: validation must come first. The dispatcher
    hands out a function that fails in place of every implementation (an unknown or unavailable
    backend still raises its own error)."""
    original = dispatch._load

    def guarded(op, name, device):
        original(op, name, device)

        def boom(*args, **kwargs):
            raise AssertionError(f"a kernel ({name} {op}) ran before validation rejected the input")

        return boom

    monkeypatch.setattr(dispatch, "_load", guarded)


q0, k0, v0 = qkv()
CASES = {
    "q rank 3": (lambda: attnops.attention(q0[0], k0, v0), ValueError, "4 dimensions"),
    "k rank 5": (lambda: attnops.attention(q0, k0[None], v0), ValueError, "4 dimensions"),
    "not a tensor": (lambda: attnops.attention(q0.tolist(), k0, v0), TypeError, "torch.Tensor"),
    "batch mismatch": (lambda: attnops.attention(torch.randn(2, 64, 4, 32), k0, v0), ValueError, "batch"),
    "k/v shapes differ": (lambda: attnops.attention(q0, k0, v0[:, :10]), ValueError, "same shape"),
    "head dims differ": (lambda: attnops.attention(torch.randn(1, 64, 4, 16), k0, v0), ValueError, "head dims"),
    "heads not divisible": (lambda: attnops.attention(torch.randn(1, 64, 3, 32), k0, v0), ValueError, "multiple"),
    "dtypes differ": (lambda: attnops.attention(q0.half(), k0, v0), TypeError, "dtype"),
    "integer dtype": (lambda: attnops.attention(*(t.long() for t in (q0, k0, v0))), TypeError, "dtype"),
    "devices differ": (lambda: attnops.attention(q0, k0.to("meta"), v0), ValueError, "device"),
    "head dim too large": (lambda: attnops.attention(*qkv(D=520)), ValueError, "head dim 520"),
    "bad window": (lambda: attnops.attention(q0, k0, v0, window_size=(-3, 0)), ValueError, "window_size"),
    "window not a pair": (lambda: attnops.attention(q0, k0, v0, window_size=5.0), TypeError, "window_size"),
    "nan scale": (lambda: attnops.attention(q0, k0, v0, softmax_scale=float("nan")), ValueError, "finite"),
    "tensor scale": (lambda: attnops.attention(q0, k0, v0, softmax_scale=torch.tensor(0.1)), TypeError, "number"),
    "unknown backend": (lambda: attnops.attention(q0, k0, v0, backend="tpu"), ValueError, "unknown backend"),
    "backend for another device": (lambda: attnops.attention(q0, k0, v0, backend="cuda"), RuntimeError, "cuda"),
    "mask is not a BlockMask": (lambda: attnops.block_sparse_attention(q0, k0, v0, torch.ones(1, 1, 1, 1)),
                                TypeError, "BlockMask"),
    "mask lengths misfit": (lambda: attnops.block_sparse_attention(q0, k0, v0, BlockMask.causal(128)), ValueError,
                            "(Sq, Sk)"),
    "mask heads misfit": (lambda: attnops.block_sparse_attention(q0, k0, v0, BlockMask.random(64, 0.5, num_heads=3)),
                          ValueError, "heads"),
    "mask batch misfit": (lambda: attnops.block_sparse_attention(q0, k0, v0, BlockMask.random(64, 0.5, batch=2)),
                          ValueError, "batch"),
    "mask on another device": (lambda: attnops.block_sparse_attention(q0, k0, v0, BlockMask.causal(64).to("meta")),
                               ValueError, "device"),
    "softcap < 0": (lambda: attnops.attention(q0, k0, v0, softcap=-1.0), ValueError, "softcap"),
    "softcap NaN": (lambda: attnops.attention(q0, k0, v0, softcap=float("nan")), ValueError, "softcap"),
    "softcap bool": (lambda: attnops.attention(q0, k0, v0, softcap=True), TypeError, "softcap"),
    "softcap tensor": (lambda: attnops.attention(q0, k0, v0, softcap=torch.tensor(2.0)), TypeError, "softcap"),
    "alibi (H + 1,)": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=torch.rand(5)), ValueError, "alibi"),
    "alibi (B + 2, H)": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=torch.rand(3, 4)), ValueError, "alibi"),
    "alibi integer": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=torch.ones(4, dtype=torch.int32)),
                      TypeError, "alibi"),
    "alibi list": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=[0.1] * 4), TypeError, "alibi"),
    "alibi requires grad": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=torch.rand(4, requires_grad=True)),
                            ValueError, "no gradient"),
    "alibi on another device": (lambda: attnops.attention(q0, k0, v0, alibi_slopes=torch.rand(4, device="meta")),
                                ValueError, "device"),
    "sinks (Hkv,)": (lambda: attnops.attention(q0, k0, v0, sinks=torch.rand(2)), ValueError, "sinks"),
    "sinks (1, H)": (lambda: attnops.block_sparse_attention(q0, k0, v0, BlockMask.causal(64), sinks=torch.rand(1, 4)),
                     ValueError, "sinks"),
    "sinks integer": (lambda: attnops.attention(q0, k0, v0, sinks=torch.ones(4, dtype=torch.int64)), TypeError,
                      "sinks"),
    "attn_bias integer": (lambda: attnops.attention(q0, k0, v0, attn_bias=torch.ones(64, 64, dtype=torch.int64)),
                          TypeError, "attn_bias"),
    "attn_bias list": (lambda: attnops.attention(q0, k0, v0, attn_bias=[[0.0] * 64] * 64), TypeError, "attn_bias"),
    "attn_bias wrong keys": (lambda: attnops.attention(q0, k0, v0, attn_bias=torch.zeros(64, 63)), ValueError,
                             "broadcast"),
    "attn_bias heads misfit": (lambda: attnops.attention(q0, k0, v0, attn_bias=torch.zeros(1, 3, 64, 64)),
                               ValueError, "broadcast"),
    "attn_bias 5-d": (lambda: attnops.attention(q0, k0, v0, attn_bias=torch.zeros(1, 1, 1, 64, 64)), ValueError,
                      "broadcast"),
    "attn_bias on another device": (lambda: attnops.attention(q0, k0, v0, attn_bias=torch.zeros(64, 64, device="meta")),
                                    ValueError, "device"),
    "block_sparse attn_bias wrong queries": (lambda: attnops.block_sparse_attention(
        q0, k0, v0, BlockMask.causal(64), attn_bias=torch.zeros(1, 1, 2, 64)), ValueError, "broadcast"),
    "moba softcap < 0": (lambda: attnops.moba_attention(q0, k0, v0, block_size=64, topk=1, softcap=-3.0), ValueError,
                         "softcap"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_before_any_kernel(case):
    call, error, words = CASES[case]
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value), f"message {str(info.value)!r} should mention {words!r}"


def test_backend_override_by_environment(monkeypatch):
    monkeypatch.setenv("ATTNOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        attnops.attention(q0, k0, v0)


def test_the_guard_fires_when_validation_passes():
    """The guard above is real: a valid call reaches it (so a missing check would fail the cases)."""
    with pytest.raises(AssertionError, match="ran before validation"):
        attnops.attention(q0, k0, v0)
    with pytest.raises(AssertionError, match="ran before validation"):
        attnops.block_sparse_attention(q0, k0, v0, BlockMask.causal(64))
