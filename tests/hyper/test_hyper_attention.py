"""HyperAttention (Han et al. 2023): the op against its float64 oracle (the dense weighted softmax of the same codes
and draws; forward and the gradients of q, k, v) over odd shapes, GQA, causal and not, on every backend; against a
port of the authors' code (insuhan/hyper-attn) with the same LSH directions and samples; the large entries found;
the exact regimes; the spec, the family name, and the refusals."""

import copy

import pytest
import torch

import attnops
from attnops.ops.hyper import lsh_codes, reference
from attnops.ops.hyper.lsh import draw_samples, lsh_projections
from authors_ref import hyper_attention_port
from helpers import DTYPE_IDS, assert_op_matches_oracle

# (B, Sq, Sk, H, Hkv, D, causal): lengths off the block size, odd lengths through the causal halving, GQA
SHAPES = [(2, 333, 333, 4, 2, 40, True), (1, 200, 250, 3, 3, 96, False), (2, 130, 130, 2, 1, 64, True),
          (1, 301, 180, 2, 2, 16, False)]
SMALL = dict(block_size=32, sample_size=24, min_seq_len=64, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Sq{}-Sk{}-H{}-Hkv{}-D{}-causal{}".format(*s))
def test_matches_the_float64_oracle(shape, dtype, fwd_impl):
    B, Sq, Sk, H, Hkv, D, causal = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, generator=g) for s, h in ((Sq, H), (Sk, Hkv), (Sk, Hkv)))
    proj = lsh_projections(torch.Generator().manual_seed(SMALL["seed"]), D, 7)
    q_codes, k_codes = lsh_codes(q.to(dtype), proj), lsh_codes(k.to(dtype), proj)  # the oracle hashes what we hash

    def ours(q, k, v):
        return attnops.hyper_attention(q, k, v, causal=causal, backend=fwd_impl.backend, **SMALL)

    def oracle(q, k, v):
        return reference.hyper_attention(q, k, v, q_codes, k_codes, causal=causal, **SMALL)

    dout = torch.randn(B, Sq, H, D, generator=g)
    assert_op_matches_oracle(ours, oracle, [q, k, v], dout, dtype, fwd_impl.device, ("dq", "dk", "dv"))


def _authors_sampler(generator, num_heads, num_kv_heads):
    """The authors draw ``(B, heads, m)`` per query head, their causal halves as extra heads (head ``h * 2^L +
    path``); attnops draws ``(B * 2^L, Hkv, m)`` per kv head, halves as batch entries (``b * 2^L + path``): the
    same numbers, rearranged (and repeated over a kv head's group, which the authors' code sees as repeated kv)."""
    def sample(n_key, batch, heads, m):
        halves = heads // num_heads
        x = draw_samples(generator, n_key, batch * halves, num_kv_heads, m, torch.device("cpu"))
        x = x.repeat_interleave(num_heads // num_kv_heads, dim=1).view(batch, halves, num_heads, m)
        return x.transpose(1, 2).reshape(batch, heads, m)
    return sample


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
def test_equals_the_authors_code(causal, heads):
    """Lengths whose every level is a multiple of the block: the authors pad a short last block with zero keys that
    then take attention weight; attnops' last block is just shorter (the oracle test covers those lengths)."""
    H, Hkv = heads
    B, S, D, seed = 2, 1024, 32, 11
    params = dict(block_size=64, sample_size=48, min_seq_len=128)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, S, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = attnops.hyper_attention(q, k, v, causal=causal, seed=seed, return_lse=True, **params)

    gen = torch.Generator().manual_seed(seed)
    proj = lsh_projections(gen, D, 7)
    group = H // Hkv
    to_heads = lambda t: t.repeat_interleave(group, dim=2).transpose(1, 2)  # noqa: E731
    ref, ref_lse = hyper_attention_port(q.transpose(1, 2), to_heads(k), to_heads(v), proj.view(1, 1, D, 7),
                                        _authors_sampler(gen, H, Hkv), causal=causal, **params)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, ref_lse[..., 0], rtol=1e-9, atol=1e-9)
    dense = attnops.attention(q, k, v, causal=causal)
    assert (out - dense).abs().max() > 1e-3  # an approximation at this length, not exact attention by accident


def test_finds_the_large_entries():
    """Peaked attention (each query equals one key, large scale): the query and its key share a code and a sorted
    place, so the block holds the entry that carries the row's mass; HyperAttention is then close to exact."""
    g = torch.Generator().manual_seed(2)
    B, S, H, D = 1, 2048, 2, 32
    k = torch.nn.functional.normalize(torch.randn(B, S, H, D, generator=g), dim=-1)
    v = torch.randn(B, S, H, D, generator=g)
    q = k.clone()
    for causal in (False, True):
        out = attnops.hyper_attention(q, k, v, causal=causal, softmax_scale=30.0, block_size=64, sample_size=64,
                                      min_seq_len=256)
        exact = attnops.attention(q, k, v, causal=causal, softmax_scale=30.0)
        assert (out - exact).norm() / exact.norm() < 0.05, causal


def test_exact_regimes():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        exact = attnops.attention(q, k, v, causal=causal)
        torch.testing.assert_close(attnops.hyper_attention(q, k, v, causal=causal), exact)  # below min_seq_len
    # one block holds every key: sortLSH's block is the whole attention
    torch.testing.assert_close(attnops.hyper_attention(q, k, v, block_size=512, min_seq_len=8),
                               attnops.attention(q, k, v))
    # a decoding step against a longer cache: exact, bottom-right aligned
    torch.testing.assert_close(attnops.hyper_attention(q[:, -3:], k, v, causal=True, min_seq_len=8),
                               attnops.attention(q[:, -3:], k, v, causal=True))


def test_long_sequence_in_linear_memory():
    """64K tokens causal: an N x N float would need 16 GiB per head; the op runs in O(N)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 65536, 1, 16, generator=g) for _ in range(3))
    out = attnops.hyper_attention(q, k, v, causal=True, min_seq_len=2048)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_refusals():
    q = torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        attnops.hyper_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="sample_size"):
        attnops.hyper_attention(q, q, q, sample_size=-1)
    with pytest.raises(ValueError, match="num_projections"):
        attnops.hyper_attention(q, q, q, num_projections=31)
    with pytest.raises(ValueError, match="min_seq_len"):
        attnops.hyper_attention(q, q, q, min_seq_len=True)
    with pytest.raises(TypeError, match="seed"):
        attnops.hyper_attention(q, q, q, seed=1.0)
    with pytest.raises(TypeError, match="causal"):
        attnops.hyper_attention(q, q, q, causal=1)
    with pytest.raises(NotImplementedError, match="square"):
        attnops.hyper_attention(q, torch.randn(1, 80, 2, 8), torch.randn(1, 80, 2, 8), causal=True, min_seq_len=16)
    with pytest.raises(TypeError):
        attnops.hyper_attention(q, q, q, True)  # keyword-only after q, k, v
    with pytest.raises(ValueError, match="num_projections"):
        attnops.nn.HyperSpec(num_projections=0)
    with pytest.raises(NotImplementedError, match="no block map"):
        attnops.nn.HyperSpec().attend(q, q, q, return_block_map=True)


def test_nan_in_nan_out():
    q = torch.randn(1, 256, 1, 16)
    q[0, 7, 0, 3] = float("nan")
    out = attnops.hyper_attention(q, q, q, block_size=32, sample_size=16, min_seq_len=64)
    assert torch.isnan(out[0, 7]).all() and torch.isfinite(out).sum() > 0


def _port_forward(spec):
    """transformers' eager contract, computing the authors' code with the spec's parameters (a fresh generator per
    call, as the op's ``seed``); causal, no padding."""
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        H, Hkv, D = query.shape[1], key.shape[1], query.shape[-1]
        gen = torch.Generator().manual_seed(spec.seed)
        proj = lsh_projections(gen, D, spec.num_projections).view(1, 1, D, -1)
        group = H // Hkv
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        out, _ = hyper_attention_port(query, key, value, proj, _authors_sampler(gen, H, Hkv), scale=scaling,
                                      causal=True, block_size=spec.block_size, sample_size=spec.sample_size,
                                      min_seq_len=spec.min_seq_len)
        return out.transpose(1, 2).contiguous(), None
    return forward


def test_family_name_equals_the_authors_code_in_a_model():
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    spec = attnops.nn.HyperSpec(block_size=8, sample_size=6, min_seq_len=16, seed=3)
    name = attnops.integrations.transformers.register("attnops_hyper_small", spec)
    AttentionInterface.register("port_hyper", _port_forward(spec))
    AttentionMaskInterface.register("port_hyper", sdpa_mask)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=name).double().eval()
    theirs = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="port_hyper").double().eval()
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (2, 128))  # 128 -> 64 -> 32 -> 16: every level a multiple of the block
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-9, atol=1e-9)
    out = ours(ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    assert ours.generate(ids[:, :40], max_new_tokens=3, do_sample=False).shape == (2, 43)  # cached steps exact
    # the default family name: the authors' defaults, exact below 4096 tokens
    default = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="attnops_hyper").double().eval()
    # (against SDPA: Llama's eager softmax runs in float32 even for a float64 model)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").double().eval()
    default.load_state_dict(ours.state_dict())
    sdpa.load_state_dict(ours.state_dict())
    torch.testing.assert_close(default(ids).logits, sdpa(ids).logits, rtol=1e-9, atol=1e-9)
    assert transformers is not None


def test_module_runs_the_spec():
    spec = attnops.nn.HyperSpec(block_size=16, sample_size=8, min_seq_len=32)
    torch.manual_seed(0)
    block = attnops.nn.Attention(64, 4, num_kv_heads=2, attention=spec, causal=True)
    x = torch.randn(2, 99, 64, requires_grad=True)
    y = block(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    q, k, v = block._qkv(x.detach(), None)
    torch.testing.assert_close(block._output(attnops.hyper_attention(q, k, v, causal=True, block_size=16,
                                                                     sample_size=8, min_seq_len=32)), y.detach())
