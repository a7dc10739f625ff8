"""attnops.nn.MultiheadAttention against torch.nn.MultiheadAttention (same weights, DESIGN.md rule,
fwd and bwd), swap / unswap on nn.Transformer layers, specs and bad input."""

import copy

import pytest
import torch
from torch import nn

import attnops
from attnops import BlockMask
from attnops.nn import BlockSparseSpec, SoftmaxSpec, MultiheadAttention
from helpers import assert_accurate, same_mask_dropout


def _pair(E=48, H=4, batch_first=True, kdim=None, vdim=None, bias=True):
    ref = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first).double()
    ours = MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})  # torch's keys, unchanged
    return ref, ours


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", [(None, None), (24, 40)], ids=["self", "kdim-vdim"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_mha_fwd_bwd(batch_first, dims, causal):
    kdim, vdim = dims
    ref, ours = _pair(batch_first=batch_first, kdim=kdim, vdim=vdim)
    B, L = 3, 37
    S = L if causal else 53
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    x = torch.randn(shape(L, 48), dtype=torch.float64)
    kv = x if causal or kdim is None else None
    key = kv if kv is not None else torch.randn(shape(S, kdim or 48), dtype=torch.float64)
    val = kv if kv is not None else torch.randn(shape(S, vdim or 48), dtype=torch.float64)
    if causal and kdim is not None:
        key, val = torch.randn(shape(S, kdim), dtype=torch.float64), torch.randn(shape(S, vdim), dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64) if causal else None

    inputs64 = [t.clone().requires_grad_() for t in (x, key, val)]
    out64, _ = ref(*inputs64, attn_mask=mask, need_weights=False)
    inputs32 = [t.float().clone().requires_grad_() for t in (x, key, val)]
    out32, w = ours(*inputs32, attn_mask=None if mask is None else mask.float(), is_causal=causal,
                    need_weights=False)
    assert w is None  # need_weights=True gives block maps: test_maps.py
    # the yardstick: torch's module in float32 on the same weights
    ref32 = copy.deepcopy(ref).float()
    inputs_lp = [t.float().clone().requires_grad_() for t in (x, key, val)]
    outr, _ = ref32(*inputs_lp, attn_mask=None if mask is None else mask.float(), need_weights=False)
    assert_accurate("out", out32.detach(), out64.detach(), outr.detach())

    g = torch.randn_like(out64)
    for o, grad in ((out64, g), (out32, g.float()), (outr, g.float())):
        o.backward(grad)
    for i, name in enumerate(("d_query", "d_key", "d_value")):
        if inputs64[i].grad is not None:
            assert_accurate(name, inputs32[i].grad, inputs64[i].grad, inputs_lp[i].grad)
    for (n, p32), (_, p64), (_, plp) in zip(ours.named_parameters(), ref.named_parameters(),
                                            ref32.named_parameters()):
        assert_accurate(f"d_{n}", p32.grad, p64.grad, plp.grad)


def test_unbatched_input():
    ref, ours = _pair(batch_first=False)
    x = torch.randn(21, 48, dtype=torch.float64)
    out, _ = ours(x.float(), x.float(), x.float())
    expect, _ = ref(x, x, x, need_weights=False)
    assert out.shape == (21, 48)
    assert torch.allclose(out.double(), expect, atol=1e-4)


def _encoder(batch_first=True):
    layer = nn.TransformerEncoderLayer(48, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("train", [True, False])
def test_swap_transformer_encoder_and_unswap(train):
    model = _encoder().train(train)
    x = torch.randn(2, 33, 48)
    mask = nn.Transformer.generate_square_subsequent_mask(33)
    with torch.no_grad():
        expect = model(x, mask=mask, is_causal=True)
    report = attnops.swap(model, SoftmaxSpec())
    assert report.swapped == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(isinstance(l.self_attn, MultiheadAttention) for l in model.layers)
    with torch.no_grad():
        got = model(x, mask=mask, is_causal=True)
    assert torch.allclose(got, expect, atol=2e-5), (got - expect).abs().max()
    model(x, mask=mask, is_causal=True).sum().backward()  # trainable through the swapped modules
    assert model.layers[0].self_attn.in_proj_weight.grad is not None
    back = attnops.unswap(model)
    assert len(back) == 2 and all(type(l.self_attn) is nn.MultiheadAttention for l in model.layers)
    with torch.no_grad():
        assert torch.allclose(model(x, mask=mask, is_causal=True), expect, atol=2e-5)


def test_swap_filter_and_decoder():
    model = nn.Transformer(48, 4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64, dropout=0.0,
                           batch_first=True)
    report = attnops.swap(model, filter=lambda name, m: "decoder" in name)
    assert report.swapped == ["decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn"]
    assert report.skipped == ["encoder.layers.0.self_attn"]
    src, tgt = torch.randn(2, 30, 48), torch.randn(2, 17, 48)
    out = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(17), tgt_is_causal=True)
    assert out.shape == (2, 17, 48) and torch.isfinite(out).all()


def test_block_sparse_spec_matches_block_sparse_op():
    E, H, L = 64, 4, 70
    mha = MultiheadAttention(E, H, batch_first=True,
                             attention=BlockSparseSpec(pattern=lambda sq, sk: BlockMask.sliding_window(sq, window=32,
                                                                                                   block_size=16)))
    x = torch.randn(2, L, E)
    out, _ = mha(x, x, x)
    q, k, v = (t.view(2, L, H, E // H) for t in mha._project(x, x, x))
    mask = BlockMask.sliding_window(L, window=32, block_size=16)
    expect = mha.out_proj(attnops.block_sparse_attention(q, k, v, mask).reshape(2, L, E))
    assert torch.equal(out, expect)


def test_specs_validate():
    with pytest.raises(ValueError, match="window"):
        SoftmaxSpec(window=(-2, 0))
    with pytest.raises(TypeError, match="causal"):
        SoftmaxSpec(causal=1)
    with pytest.raises(ValueError, match="exactly one"):
        BlockSparseSpec()
    with pytest.raises(TypeError, match="BlockMask"):
        BlockSparseSpec(block_mask="window")
    with pytest.raises(TypeError, match="attention must be"):
        MultiheadAttention(16, 2, attention="dense")


def test_unsupported_inputs_are_clear_errors():
    mha = MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, -1] = True
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        mha(x, x, x, key_padding_mask=pad[:, :5])
    with pytest.raises(ValueError, match="attn_mask must be"):
        mha(x, x, x, attn_mask=torch.zeros(3, 9, 9, dtype=torch.bool))
    moba = MultiheadAttention(16, 2, batch_first=True, attention=attnops.nn.MoBASpec(block_size=64, topk=1))
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        moba(x, x, x, key_padding_mask=pad)
    with pytest.raises(NotImplementedError, match="SoftmaxSpec"):
        moba(x, x.clone(), x, key_padding_mask=pad, need_weights=False)  # not self-attention
    with pytest.raises(NotImplementedError, match="SoftmaxSpec"):
        moba(x, x, x, attn_mask=torch.eye(9, dtype=torch.bool).roll(1, 1), need_weights=False)
    with pytest.raises(ValueError, match="widths"):
        mha(x, x, torch.randn(2, 9, 8))
    with pytest.raises(ValueError, match="multiple"):
        MultiheadAttention(15, 2)
    drop = MultiheadAttention(16, 2, dropout=0.1, batch_first=True, attention=attnops.nn.LinearAttentionSpec())
    with pytest.raises(NotImplementedError, match="dropout"):
        drop(x, x, x)
    drop.eval()(x, x, x)


@pytest.mark.parametrize("spec", [attnops.nn.MoBASpec(block_size=64, topk=2, causal=True),
                                  attnops.nn.LinearAttentionSpec(causal=True)], ids=["moba", "linear"])
def test_key_padding_on_the_varlen_specs_runs_each_row_as_a_sequence(spec):
    """MoBA and linear attention in self-attention with a bool key_padding_mask: every row's kept tokens run as
    one sequence (their varlen forms), so each kept position equals the module on that row's tokens alone."""
    torch.manual_seed(9)
    mha = MultiheadAttention(32, 4, batch_first=True, attention=spec).double().eval()
    x = torch.randn(3, 150, 32, dtype=torch.float64)
    pad = torch.zeros(3, 150, dtype=torch.bool)
    pad[0, 120:] = True  # right
    pad[1, :70] = True  # left
    out, weights = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert weights is None
    for b in range(3):
        kept = ~pad[b]
        alone, _ = mha(x[b:b + 1, kept], x[b:b + 1, kept], x[b:b + 1, kept], need_weights=False)
        torch.testing.assert_close(out[b, kept], alone[0], rtol=1e-9, atol=1e-9)
    # nn.TransformerEncoder hands the layer its padding mask as 0 / -inf floats: the same
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).double().eval()
    attnops.swap(layer, spec)
    encoded = layer(x, src_key_padding_mask=pad)
    for b in range(3):
        kept = ~pad[b]
        torch.testing.assert_close(encoded[b, kept], layer(x[b:b + 1, kept])[0], rtol=1e-9, atol=1e-9)


def _masks(kind, B, H, L, S, dtype=torch.float64):
    """(attn_mask, key_padding_mask, is_causal) in torch's conventions, with no query fully masked."""
    g = torch.Generator().manual_seed(7)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, S - 6:] = True
    pad[1, 3:S:4] = True  # holes: kept keys that are not one range
    causal = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)
    if kind == "bool_2d":
        m = torch.rand(L, S, generator=g) < 0.3
        m[:, 0] = False
        return m, None, False
    if kind == "float_2d":
        return torch.randn(L, S, generator=g, dtype=dtype), None, False
    if kind == "float_3d_padding":
        return torch.randn(B * H, L, S, generator=g, dtype=dtype), pad, False
    if kind == "causal_padding_holes":
        return causal, pad.clone().index_fill_(1, torch.tensor([0]), False), True
    if kind == "float_padding":
        return None, torch.zeros(B, S, dtype=dtype).masked_fill(pad, float("-inf")), False
    raise ValueError(kind)


@pytest.mark.parametrize("extras", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                    dict(add_bias_kv=True, add_zero_attn=True)],
                         ids=["plain", "bias_kv", "zero_attn", "both"])
@pytest.mark.parametrize("kind", ["bool_2d", "float_2d", "float_3d_padding", "causal_padding_holes", "float_padding"])
def test_masks_match_torch(kind, extras):
    """torch's attn_mask (bool / float, 2-d / 3-d), key_padding_mask (bool / float, anywhere), causality,
    add_bias_kv and add_zero_attn, forward and backward (bias_k / bias_v included), against torch's module
    in float64 with torch's float32 as the yardstick."""
    E, H, B, L = 48, 4, 3, 21
    S = L
    ref = nn.MultiheadAttention(E, H, batch_first=True, **extras).double()
    ours = MultiheadAttention(E, H, batch_first=True, **extras)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = copy.deepcopy(ref).float()
    attn_mask, pad, causal = _masks(kind, B, H, L, S)
    x = torch.randn(B, L, E, dtype=torch.float64)
    kv = torch.randn(B, S, E, dtype=torch.float64)

    def run(module, dtype):
        xs = [t.to(dtype).clone().requires_grad_() for t in (x, kv)]
        am = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        kp = pad if pad is None or pad.dtype == torch.bool else pad.to(dtype)
        out, _ = module(xs[0], xs[1], xs[1], attn_mask=am, key_padding_mask=kp, need_weights=False,
                        is_causal=causal and module is ours)
        out.backward(torch.ones_like(out) * 0.1 + torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        return [out.detach(), xs[0].grad, xs[1].grad] + [p.grad for _, p in module.named_parameters()]

    got, want, base = run(ours, torch.float32), run(ref, torch.float64), run(low, torch.float32)
    names = ["out", "d_query", "d_kv"] + [f"d_{n}" for n, _ in ours.named_parameters()]
    for n, a, b, c in zip(names, got, want, base):
        assert_accurate(f"{kind} {n}", a, b, c)


@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_is_a_hint_the_mask_decides(need_weights):
    """torch calls ``is_causal`` a hint that ``attn_mask`` is causal. With ``L != S`` and torch's top-left causal
    mask (query i sees keys j <= i) the mask decides, as in torch's module; attnops' own causality is
    bottom-right, and taking the hint for it gave outputs 0.85 off."""
    ref, ours = _pair(batch_first=True)
    L, S = 5, 9
    x, kv = torch.randn(2, L, 48, dtype=torch.float64), torch.randn(2, S, 48, dtype=torch.float64)
    top_left = torch.ones(L, S, dtype=torch.bool).triu(1)  # True: not attended
    want, _ = ref(x, kv, kv, attn_mask=top_left, need_weights=need_weights)
    got, _ = ours(x.float(), kv.float(), kv.float(), attn_mask=top_left, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    bottom_right = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)  # attnops' causality: still the causal kernels
    want, _ = ref(x, kv, kv, attn_mask=bottom_right, need_weights=True)
    got, _ = ours(x.float(), kv.float(), kv.float(), attn_mask=bottom_right, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_fully_masked_queries_give_zeros():
    """A query whose keys are all masked gets zero attention (then the output projection's bias), as torch
    2.13's module gives too outside its inference fast path (float64 here; in eval mode on float32 self-attention
    torch gives NaN for that row); the other queries are unaffected."""
    ref, ours = _pair(batch_first=True)
    x = torch.randn(1, 10, 48, dtype=torch.float64)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[3] = True
    out, _ = ours(x.float(), x.float(), x.float(), attn_mask=mask, need_weights=False)
    want, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out[0].double(), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, 3], ours.out_proj.bias.detach())


def test_masks_with_a_block_sparse_spec():
    """A BlockSparseSpec with padding and an attn_mask: the mask's blocks and the bias together."""
    E, H, L = 64, 4, 70
    spec = BlockSparseSpec(pattern=lambda sq, sk: BlockMask.sliding_window(sq, window=32, block_size=16))
    mha = MultiheadAttention(E, H, batch_first=True, attention=spec)
    x = torch.randn(2, L, E)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, 50:] = True
    out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False, is_causal=True)
    q, k, v = (t.view(2, L, H, E // H) for t in mha._project(x, x, x))
    mask = BlockMask.sliding_window(L, window=32, block_size=16)
    expect = attnops.block_sparse_attention(q, k, v, mask, attn_bias=~pad[:, None, None, :], backend="reference")
    torch.testing.assert_close(out, mha.out_proj(expect.reshape(2, L, E)), rtol=1e-5, atol=1e-5)


def test_swap_is_atomic(monkeypatch):
    """An error while building the second replacement leaves every module as it was."""
    model = nn.Transformer(d_model=48, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                           batch_first=True)
    before = [type(m) for m in model.modules()]
    calls = []
    original = MultiheadAttention.load_state_dict

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiheadAttention, "load_state_dict", failing)
    with pytest.raises(RuntimeError, match="boom"):
        attnops.swap(model)
    assert [type(m) for m in model.modules()] == before


def test_swap_with_sparse_spec_matches_the_reference_of_that_spec(monkeypatch):
    import attnops.nn.specs as specs
    from attnops.ops.softmax import reference

    model = _encoder().eval()
    spec = BlockSparseSpec(pattern=lambda sq, sk: BlockMask.sliding_window(sq, window=16, block_size=16))
    attnops.swap(model, spec)
    x = torch.randn(2, 40, 48)

    def reference_op(q, k, v, mask, softmax_scale=None):  # the float64 oracle of the same spec
        out, _ = reference.block_sparse_attention(q.double(), k.double(), v.double(), mask, causal=mask.causal,
                                                  window_size=mask.window_size, softmax_scale=q.shape[-1] ** -0.5)
        return out.to(q.dtype)

    with torch.no_grad():
        got = model(x)
        monkeypatch.setattr(specs, "block_sparse_attention", reference_op)
        expect = model(x)
    assert torch.allclose(got, expect, atol=1e-5), (got - expect).abs().max()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask_matches_torch(kind):
    ref, ours = _pair(batch_first=True)
    B, L, S = 3, 11, 29
    q = torch.randn(B, L, 48, dtype=torch.float64)
    kv = torch.randn(B, S, 48, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 20:] = True  # right padding
    pad[2, ::3] = True  # scattered padding
    mask = pad if kind == "bool" else torch.zeros(B, S, dtype=torch.float64).masked_fill(pad, float("-inf"))
    inputs64 = [t.clone().requires_grad_() for t in (q, kv)]
    expect, _ = ref(inputs64[0], inputs64[1], inputs64[1], key_padding_mask=mask, need_weights=False)
    inputs32 = [t.float().clone().requires_grad_() for t in (q, kv)]
    got, _ = ours(inputs32[0], inputs32[1], inputs32[1], key_padding_mask=mask if kind == "bool" else mask.float())
    ref32 = copy.deepcopy(ref).float()
    inputs_lp = [t.float().clone().requires_grad_() for t in (q, kv)]
    low, _ = ref32(inputs_lp[0], inputs_lp[1], inputs_lp[1], key_padding_mask=mask if kind == "bool" else mask.float(),
                   need_weights=False)
    assert_accurate("out", got.detach(), expect.detach(), low.detach())
    g = torch.randn_like(expect)
    for o, grad in ((expect, g), (got, g.float()), (low, g.float())):
        o.backward(grad)
    assert_accurate("d_query", inputs32[0].grad, inputs64[0].grad, inputs_lp[0].grad)
    assert_accurate("d_kv", inputs32[1].grad, inputs64[1].grad, inputs_lp[1].grad)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_key_padding_mask_matches_torch(kind):
    """Left and right padding with causality."""
    ref, ours = _pair(batch_first=True)
    B, L = 4, 23
    x = torch.randn(B, L, 48, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 15:] = True   # right padding
    pad[1, :6] = True    # left padding
    pad[3, :3] = True    # both
    pad[3, 20:] = True
    mask = pad if kind == "bool" else torch.zeros(B, L, dtype=torch.float64).masked_fill(pad, float("-inf"))
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    sees = (~(torch.ones(L, L, dtype=torch.bool).triu(1).unsqueeze(0) | pad.unsqueeze(1))).any(-1)
    x64 = x.clone().requires_grad_()
    expect, _ = ref(x64, x64, x64, key_padding_mask=mask, attn_mask=causal, need_weights=False)
    x32 = x.float().clone().requires_grad_()
    m32 = mask if kind == "bool" else mask.float()
    got, weights = ours(x32, x32, x32, key_padding_mask=m32, is_causal=True)
    assert weights.shape == (B, 1, 1)  # block maps with padding anywhere now (one 64 x 64 block here)
    xlp = x.float().clone().requires_grad_()
    low, _ = copy.deepcopy(ref).float()(xlp, xlp, xlp, key_padding_mask=m32, attn_mask=causal.float(),
                                        need_weights=False)
    rows = sees.unsqueeze(-1).expand_as(expect)  # torch gives NaN where a query sees no key, attnops zeros
    assert torch.all(got.detach()[~rows] == 0)
    assert_accurate("out", got.detach()[rows], expect.detach()[rows], low.detach()[rows])
    # gradients where every query sees a key (torch's NaN rows would poison its own gradients)
    pad[1:] = False
    pad[2, 18:] = True
    mask = pad if kind == "bool" else torch.zeros(B, L, dtype=torch.float64).masked_fill(pad, float("-inf"))
    m32 = mask if kind == "bool" else mask.float()
    grads, g = [], torch.randn(B, L, 48, dtype=torch.float64)
    for module, dtype, m, kw in ((ref, torch.float64, mask, dict(attn_mask=causal)), (ours, torch.float32, m32,
                                 dict(is_causal=True)), (copy.deepcopy(ref).float(), torch.float32, m32,
                                                         dict(attn_mask=causal.float()))):
        xi = x.to(dtype).clone().requires_grad_()
        out, _ = module(xi, xi, xi, key_padding_mask=m, need_weights=False, **kw)
        out.backward(g.to(dtype))
        grads.append(xi.grad)
    assert_accurate("d_x", grads[1], grads[0], grads[2])


def test_lowrank_key_spec_in_multihead_attention():
    """torch's default need_weights=True returns the block map of the chosen keys."""
    from attnops.lowrank import KeyProjection
    from attnops.nn import LowRankKeySpec

    mha = MultiheadAttention(32, 4, batch_first=True, attention=LowRankKeySpec(KeyProjection.identity(4, 8), rank=4,
                                                                             topk=10, causal=False))
    x = torch.randn(2, 70, 32)
    out, weights = mha(x, x, x)
    assert out.shape == x.shape and weights.shape == (2, 2, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_dropout_in_training_matches_torch_with_the_same_mask(masked, monkeypatch):
    """Attention dropout in training: output and gradients equal torch's module when torch drops the same
    pairs (the kernels' mask handed to torch's dropout); in eval nothing is dropped."""
    ref = nn.MultiheadAttention(48, 4, dropout=0.3, batch_first=True).double()
    ours = MultiheadAttention(48, 4, dropout=0.3, batch_first=True)
    ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    low = copy.deepcopy(ref).float()
    same_mask_dropout(monkeypatch)
    x = torch.randn(2, 33, 48, dtype=torch.float64)
    pad = torch.zeros(2, 33, dtype=torch.bool)
    pad[1, 20:] = masked
    results = []
    for module, dtype in ((ours, torch.float32), (ref, torch.float64), (low, torch.float32)):
        module.train().zero_grad()
        xi = x.to(dtype).clone().requires_grad_()
        torch.manual_seed(7)
        out, _ = module(xi, xi, xi, key_padding_mask=pad if masked else None, need_weights=module is not ours)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xi.grad, module.in_proj_weight.grad))
    for name, a, b, c in zip(("out", "d_x", "d_in_proj"), *results):
        assert_accurate(name, a, b, c)
    ours.eval()
    torch.testing.assert_close(ours(x.float(), x.float(), x.float(), need_weights=False)[0],
                               ref.eval()(x, x, x, need_weights=False)[0].float(), rtol=1e-4, atol=1e-5)


def test_swapped_encoder_with_padding_under_no_grad():
    """nn.TransformerEncoder's inference fast path (nested tensors from the padding mask) used to crash on
    the swapped module: swap turns it off (the padding reaches the module), unswap turns it back on."""
    layer = nn.TransformerEncoderLayer(48, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2).eval()
    x = torch.randn(3, 20, 48)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[0, 12:] = True
    pad[2, 5:] = True
    with torch.no_grad():
        want = enc(x, src_key_padding_mask=pad)
        assert enc.use_nested_tensor
        attnops.swap(enc)
        assert not enc.use_nested_tensor
        got = enc(x, src_key_padding_mask=pad)
    real = ~pad
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    attnops.unswap(enc)
    assert enc.use_nested_tensor
