"""SEA-style estimated-mask attention: exact attention on the chosen blocks (forward and backward, accuracy rule,
every backend), the Performer estimate converging to the true block map, the spec in a model, and refusals."""

import copy

import pytest
import torch

import attnops
from attnops.ops.routed import estimate_block_map, sea_block_mask
from attnops.ops.softmax import reference
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D, block, topk)
SHAPES = [(2, 333, 333, 4, 2, 40, 64, 2), (1, 200, 328, 3, 3, 96, 32, 3), (1, 256, 256, 2, 1, 64, 16, 0.25)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-bs{}-k{}".format(*s))
def test_exact_attention_on_the_estimated_blocks(shape, dtype, causal, fwd_impl):
    B, Sq, Sk, H, Hkv, D, block, topk = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    mask, est = sea_block_mask(q.to(dtype), k.to(dtype), block_size=block, topk=topk, causal=causal)
    assert est.shape == (B, H, -(-Sq // block), -(-Sk // block))
    allowed = reference.token_mask(Sq, Sk, mask, causal)

    def ours(q, k, v):
        return attnops.sea_attention(q, k, v, block_size=block, topk=topk, causal=causal, backend=fwd_impl.backend)

    def oracle(q, k, v):
        return reference.masked_attention(q, k, v, allowed, D ** -0.5)[0]

    dout = torch.randn(B, Sq, H, D, generator=g)
    assert_op_matches_oracle(ours, oracle, [q, k, v], dout, dtype, fwd_impl.device, ("dq", "dk", "dv"))


def test_estimate_converges_to_the_block_map():
    """Keys attended 200 positions back: more random features, a closer estimate of the true (causal) block map;
    at 8192 features the largest estimated block is the true one for most query blocks (Performer's estimate of
    peaked attention is noisy: that is the price of O(N))."""
    g = torch.Generator().manual_seed(1)
    B, S, H, D = 1, 512, 2, 32
    k = torch.randn(B, S, H, D, generator=g)
    q = torch.randn(B, S, H, D, generator=g) * 0.5 + k.roll(200, 1)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    exact = s.softmax(-1).view(B, H, 8, 64, 8, 64).sum(-1).mean(-2)
    errors, agree = [], []
    for m in (64, 1024, 8192):
        est = estimate_block_map(q, k, block_size=64, num_features=m, causal=True)
        torch.testing.assert_close(est.sum(-1), torch.ones(B, H, 8))
        assert (est.triu(1) == 0).all()  # nothing on future blocks
        errors.append(float((est - exact).abs().mean()))
        agree.append(float((est.argmax(-1) == exact.argmax(-1)).float().mean()))
    assert errors[0] > errors[1] > errors[2] and agree[2] >= 0.75 and agree[2] > agree[0]


def test_same_seed_same_mask_and_spec_in_a_model():
    q = torch.randn(1, 256, 2, 32)
    m1, _ = sea_block_mask(q, q, topk=1, seed=3)
    m2, _ = sea_block_mask(q, q, topk=1, seed=3)
    assert torch.equal(m1.to_dense(), m2.to_dense())
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnops").eval()
    sea = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnops_sea").eval()
    sea.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 97, (1, 200))
    with torch.no_grad():  # 4 blocks of 64 and top-8: every visible block is kept, so it is dense attention
        torch.testing.assert_close(sea(ids).logits, dense(ids).logits, rtol=0, atol=1e-4)
        assert sea.generate(ids[:, :20], max_new_tokens=3, do_sample=False).shape == (1, 23)
    block = attnops.nn.Attention(64, 4, attention=attnops.nn.SEASpec(block_size=16, topk=1))
    x = torch.randn(1, 128, 64, requires_grad=True)
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_refusals():
    q = torch.randn(1, 128, 2, 32)
    with pytest.raises(ValueError, match="num_features"):
        attnops.sea_attention(q, q, q, num_features=0)
    with pytest.raises(ValueError, match="topk"):
        attnops.sea_attention(q, q, q, topk=0)
    with pytest.raises(ValueError, match="block"):
        attnops.sea_attention(q, q, q, block_size=50)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnops.sea_attention(q, q, q, causal=1)
    with pytest.raises(TypeError, match="positional"):
        attnops.sea_attention(q, q, q, 64)
    with pytest.raises(NotImplementedError, match="one key block"):
        attnops.sea_attention(q, q, q, block_size=(64, 32), causal=True)
    with pytest.raises(ValueError):
        attnops.nn.SEASpec(topk=0)


def test_long_sequence_without_n_by_n():
    g = torch.Generator().manual_seed(2)
    S = 65536
    q, k, v = (torch.randn(1, S, 1, 16, generator=g) for _ in range(3))
    out, est = attnops.sea_attention(q, k, v, block_size=256, topk=2, num_features=32, causal=True,
                                     return_estimate=True)
    assert out.shape == q.shape and torch.isfinite(out).all() and est.shape == (1, 1, 256, 256)
