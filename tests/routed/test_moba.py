"""MoBASpec: the router kernels against the float64 routing reference, moba_attention (fwd + bwd) against
the float64 reference of its definition, the token- and tile-level references, bad input."""

import functools

import pytest
import torch

import attnops
from attnops import BlockMask, dispatch
from attnops.ops.routed import reference as routed_reference
from attnops.ops.softmax import reference
from helpers import DTYPE_IDS, assert_accurate, compare_with_reference, skip_fallback

ROUTE = 64


def moba_inputs(B, S, H, Hkv, D, dtype, block_size, device="cpu"):
    """Random q, k, v with a random offset per key block, so that the block gates are spread out and
    the float32 and float64 routers meet no near-ties (a tie flips a choice, not an error bound)."""
    nb = -(-S // block_size)
    q = torch.randn(B, S, H, D, dtype=torch.float64)
    offset = torch.randn(B, nb, 1, Hkv, D, dtype=torch.float64).expand(B, nb, block_size, Hkv, D)
    k = torch.randn(B, S, Hkv, D, dtype=torch.float64) + offset.reshape(B, nb * block_size, Hkv, D)[:, :S]
    v = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def reference_mask(q, k, block_size, topk, causal):
    counts, indices = routed_reference.moba_route(q.detach().cpu().double(), k.detach().cpu().double(),
                                           block_size=block_size, topk=topk, causal=causal, route_block=ROUTE)
    return BlockMask(counts, indices, q.shape[1], ROUTE, causal=causal)


# (B, S, H, Hkv, D, block_size, topk)
ROUTER_CASES = [
    (2, 300, 4, 2, 40, 64, 2),
    (1, 1000, 4, 1, 64, 128, 3),
    (2, 64, 2, 2, 16, 64, 3),
    (1, 257, 6, 3, 96, 192, 2),
    (1, 700, 2, 1, 24, 64, 100),
    (1, 520, 2, 2, 32, 64, 1),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "B{}-S{}-H{}-Hkv{}-D{}-bs{}-k{}".format(*c))
def test_router_matches_reference(case, dtype, causal, fwd_impl):
    B, S, H, Hkv, D, bs, topk = case
    q, k, _ = moba_inputs(B, S, H, Hkv, D, dtype, bs, fwd_impl.device)
    route = dispatch.resolve("moba_route", q.device, fwd_impl.backend)
    counts, indices = route(q, k, block_size=bs, topk=topk, causal=causal, route_block=ROUTE)
    ref_counts, ref_indices = routed_reference.moba_route(q.cpu().double(), k.cpu().double(), block_size=bs, topk=topk,
                                                   causal=causal, route_block=ROUTE)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(indices.cpu(), ref_indices)
    BlockMask(counts.cpu(), indices.cpu(), S, ROUTE, causal=causal)  # a valid LUT (the validating constructor)


def test_router_rules_by_hand():
    """Own block always on, later blocks never (causal), the best gates win, ties to the lower index."""
    S, bs, D = 512, 64, 8
    q = torch.zeros(1, S, 1, D)
    k = torch.zeros(1, S, 1, D)
    q[..., 0] = 1.0
    gate = torch.tensor([0.0, 5.0, 1.0, 5.0, 3.0, 9.0, 2.0, 7.0])  # the mean key's channel 0 per block
    k[0, :, 0, 0] = gate.repeat_interleave(bs)
    for backend in ("cpu", "reference"):
        mask = attnops.moba_block_mask(q, k, block_size=bs, topk=3, causal=True, backend=backend)
        blocks = mask.to_dense()[0, 0]  # tiles = MoBA blocks here
        chosen = [torch.nonzero(row).flatten().tolist() for row in blocks]
        # tiles 6 and 7: blocks 1 and 3 tie at 5 behind block 5 (9): the lower index wins
        assert chosen == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [1, 3, 4], [1, 3, 5], [1, 5, 6], [1, 5, 7]], backend
        mask = attnops.moba_block_mask(q, k, block_size=bs, topk=2, causal=False, backend=backend)
        assert torch.nonzero(mask.to_dense()[0, 0, 5]).flatten().tolist() == [5, 7]  # best other than own
        assert torch.nonzero(mask.to_dense()[0, 0, 0]).flatten().tolist() == [0, 5]


CASES = [  # (B, S, H, Hkv, D, block_size, topk)
    (2, 300, 4, 2, 40, 64, 2),
    (1, 333, 4, 1, 96, 128, 2),
    (2, 200, 2, 2, 64, 64, 3),
    (1, 150, 2, 1, 512, 64, 2),  # the widest head dim
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-S{}-H{}-Hkv{}-D{}-bs{}-k{}".format(*c))
def test_moba_matches_reference(case, dtype, causal, impl):
    if impl.interpreted and (CASES.index(case) + (dtype == torch.bfloat16) + causal) % 2:
        pytest.skip("interpreter: half of the grid, in turn, to keep CI under its budget")
    B, S, H, Hkv, D, bs, topk = case
    inputs = moba_inputs(B, S, H, Hkv, D, dtype, bs, impl.device)
    mask = reference_mask(*inputs[:2], bs, topk, causal)  # the float64 routing of these very inputs

    def kernel(q, k, v):
        return attnops.moba_attention(q, k, v, routing="tile", block_size=bs, topk=topk, causal=causal, return_lse=True,
                                      backend=impl.backend)

    def ref(q, k, v):
        return reference.block_sparse_attention(q, k, v, mask, causal=causal, window_size=(-1, -1),
                                                softmax_scale=D ** -0.5)

    compare_with_reference(kernel, ref, inputs, dtype, name=f"moba causal={causal}")


@pytest.mark.parametrize("causal", [True, False])
def test_tile_reference_is_the_routed_block_sparse_reference(causal):
    q, k, v = moba_inputs(2, 300, 4, 2, 32, torch.float64, 64)
    a = routed_reference.moba_attention(q, k, v, block_size=64, topk=2, causal=causal, softmax_scale=0.2, route_rows=ROUTE)
    b = reference.block_sparse_attention(q, k, v, reference_mask(q, k, 64, 2, causal), causal=causal,
                                         window_size=(-1, -1), softmax_scale=0.2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_token_reference_routes_every_query():
    """The paper's token-level routing: a query aligned with block 1's mean key picks block 1, one
    aligned with block 2's picks block 2, within one tile; with every query of a tile equal, token
    and tile routing agree exactly."""
    S, bs, D = 256, 64, 4
    k = torch.zeros(1, S, 1, D, dtype=torch.float64)
    for j in range(3):
        k[0, j * bs:(j + 1) * bs, 0, j] = 1.0
    q = torch.zeros(1, S, 1, D, dtype=torch.float64)
    q[0, 192:224, 0, 1] = 1.0  # tile 3 (own block 3): first half prefers block 1
    q[0, 224:256, 0, 2] = 1.0  # second half prefers block 2
    chosen = routed_reference.moba_selection(q, k, block_size=bs, topk=2, causal=True, route_rows=1)[0, 0]
    assert chosen[200].tolist() == [False, True, False, True]
    assert chosen[230].tolist() == [False, False, True, True]
    q_tiles = torch.randn(1, S // ROUTE, 2, D, dtype=torch.float64).repeat_interleave(ROUTE, dim=1)
    k2 = torch.randn(1, S, 1, D, dtype=torch.float64)
    v2 = torch.randn(1, S, 1, D, dtype=torch.float64)
    a = routed_reference.moba_attention(q_tiles, k2, v2, block_size=bs, topk=2, causal=True, softmax_scale=0.5)
    b = routed_reference.moba_attention(q_tiles, k2, v2, block_size=bs, topk=2, causal=True, softmax_scale=0.5,
                                 route_rows=ROUTE)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_covering_every_block_is_dense_attention(causal, fwd_impl):
    q, k, v = moba_inputs(1, 300, 4, 2, 32, torch.float32, 64, fwd_impl.device)
    a = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=5, causal=causal, return_lse=True, backend=fwd_impl.backend)
    b = attnops.attention(q, k, v, causal=causal, return_lse=True, backend=fwd_impl.backend)
    torch.testing.assert_close(a.out, b.out, rtol=0, atol=2e-6)
    torch.testing.assert_close(a.lse, b.lse, rtol=0, atol=2e-6)
    ref = reference.block_sparse_attention(*(t.cpu().double() for t in (q, k, v)), None, causal=causal,
                                           window_size=(-1, -1), softmax_scale=32 ** -0.5)
    assert_accurate("moba topk=all", a.out.cpu(), ref[0], ref[0].float())


def test_nan_query_gives_nan_rows_only(fwd_impl):
    q, k, v = moba_inputs(1, 256, 2, 1, 32, torch.float32, 64, fwd_impl.device)
    q[0, 130, 1] = float("nan")  # its tile's gates are all NaN: a deterministic choice, no crash
    out = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2, backend=fwd_impl.backend)
    assert torch.isnan(out[0, 130, 1]).all()
    nan = torch.isnan(out)
    nan[0, 130, 1] = False
    assert not nan.any()


def test_block_map_of_the_routed_mask(fwd_impl):
    q, k, v = moba_inputs(1, 300, 4, 2, 32, torch.float32, 64, fwd_impl.device)
    res = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2, return_block_map=True, map_block_size=64,
                                 backend=fwd_impl.backend)
    mask = attnops.moba_block_mask(q, k, block_size=64, topk=2, backend=fwd_impl.backend)
    assert torch.all(res.block_map[~mask.to_dense().expand_as(res.block_map)] == 0)
    torch.testing.assert_close(res.block_map.sum(-1), torch.ones_like(res.block_map.sum(-1)))
    ref = reference.block_sparse_attention(*(t.cpu().double() for t in (q, k, v)), mask.to("cpu"), causal=True,
                                           window_size=(-1, -1), softmax_scale=32 ** -0.5,
                                           block_map=attnops.core.block_map.MapRequest(64, 64, "mean"))
    torch.testing.assert_close(res.block_map.cpu().double(), ref[2], rtol=0, atol=1e-5)


def test_gradients_flow_through_the_chosen_blocks_only():
    q, k, v = (t.requires_grad_() for t in moba_inputs(1, 256, 1, 1, 16, torch.float64, 64))
    out = attnops.moba_attention(q, k, v, routing="tile", block_size=64, topk=2)
    out[:, 192:].sum().backward()  # the last tile: its own block 3 and one other
    mask = attnops.moba_block_mask(q, k, block_size=64, topk=2)
    kept = torch.nonzero(mask.to_dense()[0, 0, 3]).flatten().tolist()
    touched = [j for j in range(4) if k.grad[0, j * 64:(j + 1) * 64].abs().sum() > 0]
    assert touched == kept and len(kept) == 2


BAD = {
    "block_size not a multiple of 64": (dict(block_size=96), ValueError, "multiple of the kernel block"),
    "block_size below 64": (dict(block_size=32), ValueError, "multiple of the kernel block"),
    "block_size float": (dict(block_size=64.0), ValueError, "block_size must be an int"),
    "routing unknown": (dict(routing="row"), ValueError, "routing must be one of"),
    "topk 0": (dict(topk=0), ValueError, "topk must be an int >= 1"),
    "topk bool": (dict(topk=True), ValueError, "topk must be an int >= 1"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments(name):
    kwargs, exc, match = BAD[name]
    q, k, v = moba_inputs(1, 128, 2, 1, 16, torch.float32, 64)
    with pytest.raises(exc, match=match):
        attnops.moba_attention(q, k, v, **{"routing": "tile", "block_size": 64, "topk": 2, **kwargs})


def test_bad_shapes():
    q, k, v = moba_inputs(1, 128, 2, 1, 16, torch.float32, 64)
    with pytest.raises(ValueError, match="lengths differ"):
        attnops.moba_attention(q[:, :100], k, v, routing="tile", block_size=64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attnops.moba_attention(q[:, :, :1], torch.cat([k, k], 2), torch.cat([v, v], 2), routing="tile", block_size=64)
    with pytest.raises(ValueError, match="dimensions"):
        attnops.moba_attention(q[0], k, v, routing="tile", block_size=64)


def test_meta_tensors_and_opcheck():
    q, k, v = moba_inputs(2, 300, 4, 2, 32, torch.float16, 64, "meta")
    out, lse = attnops.moba_attention(q, k, v, routing="tile", block_size=128, topk=2, return_lse=True)
    assert out.shape == q.shape and out.device.type == "meta" and lse.shape == (2, 4, 300)
    q, k, _ = moba_inputs(2, 300, 4, 2, 32, torch.float32, 64)
    torch.library.opcheck(torch.ops.attnops.moba_route, (q, k, 128, 2, True, ROUTE))


def test_torch_compile_inference_fullgraph(fwd_impl):
    skip_fallback(fwd_impl)
    q, k, v = moba_inputs(1, 256, 2, 1, 32, torch.float32, 64, fwd_impl.device)
    fn = functools.partial(attnops.moba_attention, routing="tile", block_size=64, topk=2, backend=fwd_impl.backend)
    explanation = torch._dynamo.explain(fn)(q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), rtol=0, atol=0)


# ---- modules ------------------------------------------------------------------------------------

def test_moba_spec_in_attention_block():
    torch.manual_seed(0)
    dense = attnops.nn.Attention(64, 4, 2, attention=attnops.nn.SoftmaxSpec(causal=True))
    routed = attnops.nn.Attention(64, 4, 2, attention=attnops.nn.MoBASpec(routing="tile", block_size=64, topk=2, causal=True))
    every = attnops.nn.Attention(64, 4, 2, attention=attnops.nn.MoBASpec(routing="tile", block_size=64, topk=4, causal=True))
    routed.load_state_dict(dense.state_dict())
    every.load_state_dict(dense.state_dict())
    x = torch.randn(2, 250, 64, requires_grad=True)
    torch.testing.assert_close(every(x), dense(x), rtol=0, atol=2e-6)  # topk covers all 4 blocks
    out = routed(x)
    assert not torch.allclose(out, dense(x), atol=1e-3)  # routing dropped blocks
    torch.testing.assert_close(out[:, :128], dense(x)[:, :128], rtol=0, atol=2e-6)  # <= 2 blocks seen anyway
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs,match", [(dict(block_size=100, routing="tile"), "multiple of 64"), (dict(topk=0), "topk"),
                                          (dict(causal=1), "bool"), (dict(routing="rows"), "routing"),
                                          (dict(block_size=0), "block_size")])
def test_moba_spec_validates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attnops.nn.MoBASpec(**kwargs)


def test_moba_in_a_transformers_model_prefill_and_cached_generation():
    transformers = pytest.importorskip("transformers")
    from attnops.integrations import transformers as hf_attnops

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=hf_attnops.register()).eval()
    name = hf_attnops.register("attnops_moba", attnops.nn.MoBASpec(routing="tile", block_size=64, topk=2))
    routed = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).eval()
    routed.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 97, (1, 200))
    with torch.no_grad():
        a, b = dense(ids).logits, routed(ids).logits
        torch.testing.assert_close(b[:, :128], a[:, :128], rtol=0, atol=1e-4)  # the first two blocks: all seen
        with attnops.maps.capture(routed, map_block_size=64) as cap:
            routed(ids)
    assert len(cap) == 2
    for block_map in cap.maps.values():  # (1, 4, 4, 4): query blocks 2 and 3 see two blocks each
        assert torch.equal((block_map[0, :, 2:] > 0).sum(-1), torch.full((4, 2), 2))
    with torch.no_grad():
        generated = routed.generate(ids, max_new_tokens=5, do_sample=False)  # decode steps: exact, whole cache
    assert generated.shape == (1, 205)


def test_no_sequence_squared_memory():
    """Routing, mask and attention at S = 8192: an S x S float32 matrix alone would be 256 MiB."""
    from attnops.bench.timer import peak_memory_mb

    q, k, v = moba_inputs(1, 8192, 1, 1, 16, torch.float32, 512)
    peak = peak_memory_mb(lambda: attnops.moba_attention(q, k, v, routing="tile", block_size=512, topk=2), "cpu")
    assert peak is not None and peak < 16, f"peak {peak:.1f} MiB"
    peak = peak_memory_mb(lambda: attnops.predict_block_mask(q, k, 64, cdf_threshold=0.9, causal=True), "cpu")
    assert peak is not None and peak < 16, f"peak {peak:.1f} MiB"


def test_cu_seqlens_routes_within_each_sequence(impl):
    """MoBA's varlen layout (moba_attn_varlen): blocks restart at every sequence; each sequence's rows and
    gradients equal moba_attention on that sequence alone, under the accuracy rule against the float64 routed
    reference."""
    lengths, H, Hkv, D, bs = [130, 0, 64, 200, 7], 4, 2, 32, 64
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    torch.manual_seed(7)
    q, k, v = (x[0] for x in moba_inputs(1, T, H, Hkv, D, torch.float32, bs))
    dout = torch.randn(T, H, D, dtype=torch.float64)

    def packed(q, k, v):
        return attnops.moba_attention(q.to(impl.device), k.to(impl.device), v.to(impl.device), routing="tile", block_size=bs, topk=2,
                                      cu_seqlens=cu.to(impl.device), max_seqlen=max(lengths), return_lse=True,
                                      backend=impl.backend)

    def alone(q, k, v):
        outs, lses = [], []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if a == b:
                continue
            mask = reference_mask(q[None, a:b], k[None, a:b], bs, 2, True)
            o, lse = reference.block_sparse_attention(q[None, a:b], k[None, a:b], v[None, a:b], mask, causal=True,
                                                      window_size=(-1, -1), softmax_scale=D ** -0.5)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    results = []
    for fn, dtype in ((packed, torch.float32), (alone, torch.float64), (alone, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dout.to(out))
        results.append([out.detach().cpu(), lse.detach().cpu(), *(g.cpu() for g in grads)])
    for name, a, b, c in zip(["out", "lse", "dq", "dk", "dv"], *results):
        assert_accurate(f"moba varlen {name}", a, b, c)
    with pytest.raises(NotImplementedError, match="attn_bias"):
        attnops.moba_attention(q, k, v, routing="tile", block_size=bs, cu_seqlens=cu, return_block_map=True)
    with pytest.raises(ValueError, match="3 dimensions"):
        attnops.moba_attention(q[None], k[None], v[None], routing="tile", block_size=bs, cu_seqlens=cu)
