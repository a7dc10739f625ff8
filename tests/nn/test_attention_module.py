"""attnops.nn.Attention (GQA/MQA, QK-norm, rotary) against an independent float64 implementation
(SDPA math on repeated kv heads, rotary in complex form), fwd and bwd; Rotary; bad arguments."""

import copy

import pytest
import torch
import torch.nn.functional as F

from attnops.nn import Attention, BlockSparseSpec, SoftmaxSpec, Rotary
import attnops
from attnops import BlockMask
from attnops.lowrank import KeyProjection
from helpers import assert_accurate


def rotary_complex(x, positions, theta):
    """(B, T, H, D): channel pairs (d, d + D/2) as complex numbers times exp(i * pos * theta^(-2d/D))."""
    D, real = x.shape[-1], x.dtype  # computed in x's precision (the float32 yardstick stays float32)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    freq = theta ** (-torch.arange(0, D, 2, dtype=real) / D)
    rot = torch.polar(torch.ones((), dtype=real), positions.to(real)[:, None] * freq)[None, :, None, :]
    z = z * rot
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def independent(block: Attention, x, theta):
    B, T, _ = x.shape
    H, Hkv, D = block.num_heads, block.num_kv_heads, block.head_dim
    q = block.q_proj(x).view(B, T, H, D)
    k = block.k_proj(x).view(B, T, Hkv, D)
    v = block.v_proj(x).view(B, T, Hkv, D)
    if block.q_norm is not None:
        q, k = block.q_norm(q), block.k_norm(k)
    if theta is not None:
        pos = torch.arange(T)
        q, k = rotary_complex(q, pos, theta), rotary_complex(k, pos, theta)
    k, v = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return block.out_proj(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("theta", [None, 10000.0])
def test_attention_block_matches_independent_reference(heads, qk_norm, theta):
    H, Hkv = heads
    dim = 40 * H // 2  # head dim 20 for H=... keeps dims small and even
    block = Attention(dim, H, Hkv, qk_norm=qk_norm, rope=theta, bias=True)
    block64, block_lp = copy.deepcopy(block).double(), copy.deepcopy(block)
    x = torch.randn(2, 45, dim, dtype=torch.float64)
    xs = [x.float().clone().requires_grad_(), x.clone().requires_grad_(), x.float().clone().requires_grad_()]
    out = block(xs[0])
    ref = independent(block64, xs[1], theta)
    ref_lp = independent(block_lp, xs[2], theta)
    assert_accurate("out", out.detach(), ref.detach(), ref_lp.detach())
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    ref_lp.backward(g.float())
    assert_accurate("dx", xs[0].grad, xs[1].grad, xs[2].grad)
    for (n, p), (_, p64), (_, plp) in zip(block.named_parameters(), block64.named_parameters(),
                                          block_lp.named_parameters()):
        assert_accurate(f"d_{n}", p.grad, p64.grad, plp.grad)


def test_rotary_positions_and_relative_property():
    rot = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    # the score depends only on the distance between positions
    s1 = (rot(q, torch.tensor([7])) * rot(k, torch.tensor([3]))).sum()
    s2 = (rot(q, torch.tensor([104])) * rot(k, torch.tensor([100]))).sum()
    assert torch.allclose(s1, s2)
    x = torch.randn(2, 5, 3, 16)
    per_batch = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    out = rot(x, per_batch)
    assert torch.allclose(out[1:], rot(x[1:], torch.arange(10, 15)), atol=1e-6)


def test_block_sparse_spec_in_attention_block():
    block = Attention(64, 4, 2, attention=BlockSparseSpec(pattern=lambda sq, sk: BlockMask.sliding_window(sq, window=16,
                                                                                                      block_size=16)))
    x = torch.randn(1, 50, 64, requires_grad=True)
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_attention_block_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(64, 4, 3)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        Attention(65, 4)
    with pytest.raises(TypeError, match="rope"):
        Attention(64, 4, rope="yes")
    with pytest.raises(ValueError, match="even head_dim"):
        Rotary(15)
    with pytest.raises(TypeError, match="attention must be"):
        Attention(64, 4, attention=SoftmaxSpec)
    with pytest.raises(ValueError, match=r"x must be \(B, T, 64\)"):
        Attention(64, 4)(torch.randn(2, 3, 32))


@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("window", [None, (7, 0)])
def test_long_prompt_into_a_ragged_cache(kv_heads, window, page_size):
    """A prompt past the 64-token decode limit into a cache whose sequences differ in length (a ragged
    ``KVCache.append(..., lengths=)``) was refused; each sequence now attends causally at its own length: the
    outputs equal each sequence's own full forward (a PagedKVCache too). With a backward needed it is refused
    clearly."""
    torch.manual_seed(0)
    spec = SoftmaxSpec() if window is None else SoftmaxSpec(window=window)
    block = Attention(64, 4, kv_heads, attention=spec, rope=10000.0).eval()
    cached, T = [5, 30, 0], 70
    xs = [torch.randn(1, c + T, 64) for c in cached]
    with torch.no_grad():
        cache = block.make_cache(batch=3, max_len=max(cached) + T, page_size=page_size)
        k_pad = torch.zeros(3, max(cached), kv_heads, 16)
        v_pad = torch.zeros_like(k_pad)
        for b, (c, x) in enumerate(zip(cached, xs)):  # each prefix's keys at its own positions, left-padded
            _, k, v = block._qkv(x[:, :c], torch.arange(c))
            k_pad[b, max(cached) - c:], v_pad[b, max(cached) - c:] = k[0], v[0]
        cache.append(k_pad, v_pad, lengths=cached)
        out = block(torch.cat([x[:, -T:] for x in xs]), cache=cache)
        for b, x in enumerate(xs):
            torch.testing.assert_close(out[b], block(x)[0, -T:], rtol=1e-5, atol=1e-5)
    assert cache.host_seqlens.tolist() == [c + T for c in cached]
    cache.reset()
    cache.append(k_pad, v_pad, lengths=cached)
    with pytest.raises(NotImplementedError, match="one length"):
        block(torch.randn(3, T, 64), cache=cache)
    assert cache.host_seqlens.tolist() == cached  # the refused call appended nothing


@pytest.mark.parametrize("page_size", [None, 5], ids=["contiguous", "paged5"])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("prompt_len", [10, 70])
def test_sliding_window_cached_steps_equal_the_full_forward(kv_heads, prompt_len, page_size):
    """A SoftmaxSpec with a sliding window decodes from the cache (it was refused): the window reaches the decode
    kernel and the long-prompt path, so a prompt (short or past the 64-token decode limit) then steps of 1 and 3
    tokens give the full forward's outputs, the window (7) much shorter than the cache; from a PagedKVCache of
    5-token pages as well."""
    torch.manual_seed(0)
    block = Attention(64, 4, kv_heads, attention=SoftmaxSpec(window=(7, 0)), rope=10000.0).eval()
    x = torch.randn(2, prompt_len + 13, 64)
    with torch.no_grad():
        full = block(x)
        cache = block.make_cache(batch=2, max_len=x.shape[1], page_size=page_size)
        parts = [block(x[:, :prompt_len], cache=cache)]
        for t in range(prompt_len, x.shape[1], 3):
            parts.append(block(x[:, t:t + 1], cache=cache))
            if t + 1 < x.shape[1]:
                parts.append(block(x[:, t + 1:t + 3], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    unwindowed = Attention(64, 4, kv_heads, rope=10000.0).eval()
    unwindowed.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert (unwindowed(x) - full).abs().max() > 1e-2  # the window matters here


@pytest.mark.parametrize("page_size", [None, 8], ids=["contiguous", "paged8"])
def test_backward_through_a_long_prompt_after_a_cached_prefix(page_size):
    """A prompt past the decode limit with a backward needed, after a cached prefix: the prompt's own keys and
    values get gradients, the prefix's (cache state) none; from pages, the prefix is read through the table. Equals
    the full forward's outputs and the full forward's gradients with the prefix detached."""
    torch.manual_seed(0)
    block = Attention(64, 4, 2, rope=10000.0)
    x = torch.randn(2, 12 + 70, 64)
    cache = block.make_cache(batch=2, max_len=x.shape[1], page_size=page_size)
    with torch.no_grad():
        block(x[:, :12], cache=cache)
    prompt = x[:, 12:].clone().requires_grad_(True)
    out = block(prompt, cache=cache)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [prompt.grad]
    block.zero_grad()
    prompt2 = x[:, 12:].clone().requires_grad_(True)
    q, k, v = block._qkv(torch.cat((x[:, :12], prompt2), 1))
    k = torch.cat((k[:, :12].detach(), k[:, 12:]), 1)
    v = torch.cat((v[:, :12].detach(), v[:, 12:]), 1)
    want = block._output(torch.nn.functional.scaled_dot_product_attention(
        q[:, 12:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
        attn_mask=torch.ones(70, 82, dtype=torch.bool).tril(12)).transpose(1, 2))
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, [p.grad for p in block.parameters()] + [prompt2.grad]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("window", [None, (6, 0)])
def test_continuous_batching_with_lengths(kv_heads, window, page_size):
    """``forward(x, cache=, lengths=)``: each slot takes only the last ``lengths[b]`` rows of ``x[b]``, so one call
    feeds a new prompt to a freed slot (``release``) while the others take one token or none; short calls go through
    the decode kernel, a 70-token prompt through the packed prefill. Every slot's new rows equal its own sequence's
    full forward (rotary positions, window), padding rows are finite, and the cache holds each sequence's length."""
    torch.manual_seed(0)
    spec = SoftmaxSpec() if window is None else SoftmaxSpec(window=window)
    block = Attention(64, 4, kv_heads, attention=spec, rope=10000.0).eval()
    plan = [([9, 3, 0], None), ([1, 1, 5], None), ([1, 1, 1], None), ([70, 1, 2], 0),
            (torch.tensor([1, 0, 1]), None), ([3, 1, 2], 2), ([0, 0, 0], None)]
    seqs = [None, None, None]  # each slot's tokens so far
    with torch.no_grad():
        cache = block.make_cache(batch=3, max_len=80, page_size=page_size)
        for lengths, freed in plan:
            if freed is not None:
                cache.release(freed)
                seqs[freed] = None
            T = max(int(n) for n in lengths) or 1
            x = torch.randn(3, T, 64)
            out = block(x, cache=cache, lengths=lengths)
            assert torch.isfinite(out).all()
            for b, n in enumerate(int(n) for n in lengths):
                if n:
                    new = x[b:b + 1, T - n:]
                    seqs[b] = new if seqs[b] is None else torch.cat((seqs[b], new), 1)
                    torch.testing.assert_close(out[b, T - n:], block(seqs[b])[0, -n:], rtol=1e-5, atol=1e-5)
            assert cache.host_seqlens.tolist() == [0 if s is None else s.shape[1] for s in seqs]


def test_lengths_with_low_rank_decoding_equal_each_sequence_alone():
    """Low-rank-key (Loki) cached steps with ``lengths``: the score plane takes each sequence's own rows, so every
    slot's outputs equal the same block decoding that sequence alone in its own cache (the same keys chosen)."""
    torch.manual_seed(0)
    block = Attention(64, 4, 2, rope=10000.0).eval()
    block.set_lowrank(KeyProjection(torch.linalg.qr(torch.randn(2, 16, 16))[0], torch.ones(2, 16)), rank=8, topk=6,
                      local=2)
    with torch.no_grad():
        cache = block.make_cache(batch=3, max_len=40)
        alone = [block.make_cache(batch=1, max_len=40) for _ in range(3)]
        for lengths in ([9, 3, 0], [1, 1, 5], [1, 0, 1], [3, 1, 2]):
            T = max(lengths)
            x = torch.randn(3, T, 64)
            out = block(x, cache=cache, lengths=lengths)
            assert torch.isfinite(out).all()
            for b, n in enumerate(lengths):
                if n:
                    torch.testing.assert_close(out[b, T - n:], block(x[b:b + 1, T - n:], cache=alone[b])[0],
                                               rtol=1e-5, atol=1e-6)


def test_lengths_arguments():
    """Bad ``lengths`` are refused before the cache changes; a backward through a long prompt with padding rows is
    refused (its keys cannot reach attention as one tensor)."""
    block = Attention(64, 4, 2, rope=10000.0)
    cache = block.make_cache(batch=2, max_len=100)
    with pytest.raises(ValueError, match="pass cache="):
        block(torch.randn(2, 3, 64), lengths=[3, 3])
    with pytest.raises(ValueError, match="pass cache="):  # nor dropped by a context-parallel block
        Attention(64, 4, 2, context_parallel_group=object())(torch.randn(2, 3, 64), lengths=[3, 3])
    with pytest.raises(ValueError, match="in \\[0, T=3\\]"):
        block(torch.randn(2, 3, 64), cache=cache, lengths=[4, 1])
    with pytest.raises(ValueError, match="2 ints"):
        block(torch.randn(2, 3, 64), cache=cache, lengths=[1])
    with pytest.raises(TypeError, match="integer tensor"):
        block(torch.randn(2, 3, 64), cache=cache, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(NotImplementedError, match="no lengths below T"):
        block(torch.randn(2, 70, 64), cache=cache, lengths=[70, 60])
    for B in (1, 3):  # a row of x per slot (it was a broadcasting error from the positions, or the append's check)
        with pytest.raises(ValueError, match=f"x holds {B} sequences, the cache 2"):
            block(torch.randn(B, 3, 64), cache=cache, lengths=[1] * B)
    assert cache.host_seqlens.tolist() == [0, 0]
    out = block(torch.randn(2, 70, 64, requires_grad=True), cache=cache, lengths=[70, 70])  # every row new: allowed
    out.sum().backward()
    assert cache.host_seqlens.tolist() == [70, 70]


def test_paged_cache_arguments():
    block = Attention(64, 4, 2)
    cache = block.make_cache(batch=3, max_len=20, page_size=8)
    assert isinstance(cache, attnops.PagedKVCache) and cache.max_len == 24 and cache.num_pages == 9
    with pytest.raises(TypeError, match="page_size must be an int"):
        block.make_cache(batch=3, max_len=20, page_size=8.0)
    shared = block.make_cache(batch=3, max_len=20, page_size=8, num_pages=4)
    assert shared.num_pages == 4 and shared.max_len == 24
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        block.make_cache(batch=3, max_len=40, page_size=8, num_pages=2)
    with pytest.raises(ValueError, match="pass page_size"):
        block.make_cache(batch=3, max_len=20, num_pages=4)
    with pytest.raises(TypeError, match="cache must be a KVCache or a PagedKVCache"):
        block(torch.randn(3, 1, 64), cache=object())
    block.set_lowrank(KeyProjection(torch.eye(16).expand(2, 16, 16).clone(), torch.ones(2, 16)), rank=8, topk=4)
    with pytest.raises(NotImplementedError, match="contiguous cache"):
        block.make_cache(batch=3, max_len=20, page_size=8)
    with pytest.raises(NotImplementedError, match="contiguous cache"):
        block(torch.randn(3, 1, 64), cache=cache)
    assert cache.host_seqlens.tolist() == [0, 0, 0]
