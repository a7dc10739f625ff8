"""Landmark attention (Mohtashami and Jaggi 2023): the op against its float64 oracle (dense grouped-softmax weights;
forward and the gradients of q, k, v) over odd shapes, GQA, chunks against a longer cache, the full form and
retrieval, on every backend; against the authors' grouped softmax and their test's reference (epfml/landmark-
attention); retrieval picks the blocks by their landmarks; a decoding step equals the last row of the whole call;
the module; the refusals."""

import pytest
import torch

import attnops
from attnops.ops.landmark import reference
from authors_ref import landmark_attention_port
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D, block_size, topk)
SHAPES = [(2, 200, 200, 4, 2, 40, 16, None), (1, 130, 333, 3, 3, 96, 10, 3), (2, 77, 77, 2, 1, 64, 7, 2),
          (1, 1, 150, 2, 2, 16, 12, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-bs{}-topk{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype, fwd_impl):
    B, Sq, Sk, H, Hkv, D, bs, topk = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    _, chosen = attnops.landmark_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=bs, topk=topk,
                                           return_blocks=True)  # the retrieval the oracle follows

    def ours(q, k, v):
        return attnops.landmark_attention(q, k, v, block_size=bs, topk=topk, backend=fwd_impl.backend)

    def oracle(q, k, v):
        return reference.landmark_attention(q, k, v, chosen, block_size=bs)

    dout = torch.randn(B, Sq, H, D, generator=g)
    assert_op_matches_oracle(ours, oracle, [q, k, v], dout, dtype, fwd_impl.device, ("dq", "dk", "dv"))


@pytest.mark.parametrize("shape", [(2, 256, 256, 2, 2, 16, 16), (1, 100, 300, 4, 2, 8, 10), (2, 77, 77, 3, 3, 40, 7)],
                         ids=["square", "chunk-GQA", "odd"])
def test_equals_the_authors_code(shape):
    B, Sq, Sk, H, Hkv, D, bs = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Sk, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attnops.landmark_attention(q, k, v, block_size=bs)
    rep = lambda t: t.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)  # noqa: E731  (their code has no GQA)
    theirs = landmark_attention_port(q.transpose(1, 2), rep(k), rep(v), mem_freq=bs - 1).transpose(1, 2)
    torch.testing.assert_close(out, theirs, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)),
                    torch.autograd.grad(theirs.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_retrieval_follows_the_landmarks():
    """A query equal to one block's landmark key (large scale) retrieves that block; topk >= the blocks is the full
    form; a decoding step equals the last row of the whole call."""
    g = torch.Generator().manual_seed(2)
    B, S, H, D, bs = 1, 320, 2, 16, 32
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    target = 3
    q[:, -1] = 4.0 * k[:, target * bs + bs - 1]
    _, chosen = attnops.landmark_attention(q, k, v, block_size=bs, topk=1, return_blocks=True)
    assert chosen[0, :, -1].nonzero()[:, -1].tolist() == [target] * H
    full = attnops.landmark_attention(q, k, v, block_size=bs)
    torch.testing.assert_close(attnops.landmark_attention(q, k, v, block_size=bs, topk=S), full)
    for topk in (None, 2):
        whole = attnops.landmark_attention(q, k, v, block_size=bs, topk=topk)
        step = attnops.landmark_attention(q[:, -1:], k, v, block_size=bs, topk=topk)
        torch.testing.assert_close(step, whole[:, -1:])


def test_module_trains_and_keeps_the_token_positions():
    torch.manual_seed(0)
    layer = attnops.nn.LandmarkAttention(64, 4, block_size=8, num_kv_heads=2)
    x = torch.randn(2, 45, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert layer.landmark.grad is not None and torch.isfinite(layer.landmark.grad).all()
    x2 = x.detach().clone()
    x2[:, -1] += 1.0  # causal: earlier outputs do not change
    torch.testing.assert_close(layer(x2)[:, :-1], y.detach()[:, :-1])
    # the layer is the op on the sequence with a landmark after every 7 tokens
    seq = layer.with_landmarks(x.detach())
    assert seq.shape[1] == 45 + 45 // 7 and torch.equal(seq[:, 7], layer.landmark.detach().expand(2, 64))


def test_refusals():
    q = torch.randn(1, 40, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        attnops.landmark_attention(q, q, q, block_size=1)
    with pytest.raises(ValueError, match="topk"):
        attnops.landmark_attention(q, q, q, topk=0)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        attnops.landmark_attention(q, q[:, :10], q[:, :10])
    with pytest.raises(TypeError):
        attnops.landmark_attention(q, q, q, 8)  # keyword-only
    with pytest.raises(ValueError, match="block_size"):
        attnops.nn.LandmarkAttention(64, 4, block_size=1)
