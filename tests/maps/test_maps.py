"""attnops.maps: capture from unmodified models, need_weights block maps, rollout, PNGs, the CLI."""

import pytest
import torch
from torch import nn

import attnops
from attnops.ops.softmax import reference
from attnops.core.block_map import MapRequest
from attnops.cli.maps import TinyCausalLM, main

REQUEST = MapRequest(64, 64, "mean")


def ref_map(q, k, causal, request=REQUEST):
    q64, k64 = q.detach().double(), k.detach().double()
    return reference.block_sparse_attention(q64, k64, k64, None, causal=causal, window_size=(-1, -1),
                                            softmax_scale=q.shape[-1] ** -0.5, block_map=request)[2]


def test_capture_records_one_map_per_layer():
    model = TinyCausalLM(layers=2, dim=64, heads=4, kv_heads=2, attention=attnops.nn.SoftmaxSpec(causal=True)).eval()
    tokens = torch.randint(0, 256, (2, 150))
    with torch.no_grad():
        plain = model(tokens)
        with attnops.maps.capture(model) as cap:
            logits = model(tokens)
    assert list(cap.maps) == ["blocks.0.attn", "blocks.1.attn"]
    assert torch.equal(plain, logits), "capturing must not change the forward"
    assert cap.stacked().shape == (2, 2, 4, 3, 3)
    # layer 0's map is the map of the q, k that layer computes
    block = model.blocks[0]
    with torch.no_grad():
        q, k, _ = block["attn"]._qkv(block["norm1"](model.embed(tokens)))
    torch.testing.assert_close(cap.maps["blocks.0.attn"].double(), ref_map(q, k, causal=True), rtol=0, atol=1e-5)
    assert not attnops.maps.capturing()


def test_capture_options_and_repeated_calls():
    attn = attnops.nn.Attention(64, 4)
    x = torch.randn(1, 100, 64)
    with attnops.maps.capture(map_block_size=(32, 16), reduce="max") as cap:
        attn(x)
        attn(x)
    assert len(cap) == 2 and all(m.shape == (1, 4, 4, 7) for m in cap.maps.values())
    q, k, _ = attn._qkv(x)
    torch.testing.assert_close(next(iter(cap.maps.values())).double(),
                               ref_map(q, k, True, MapRequest(32, 16, "max")), rtol=0, atol=1e-5)


def test_capture_through_swapped_transformer_encoder():
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    attnops.swap(model, attnops.nn.SoftmaxSpec())
    with torch.no_grad(), attnops.maps.capture(model) as cap:
        model(torch.randn(2, 90, 64))
    assert list(cap.maps) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(m.shape == (2, 4, 2, 2) for m in cap.maps.values())


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_need_weights_is_torchs_weights_pooled(average, padding):
    """Padding anywhere: the map indexes the true key positions (padding reaches the kernels as a key mask)."""
    torch_mha = nn.MultiheadAttention(64, 4, batch_first=True).double().eval()
    ours = attnops.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours.load_state_dict({k: v.float() for k, v in torch_mha.state_dict().items()})
    x = torch.randn(2, 150, 64, dtype=torch.float64)
    kpm = None
    if padding:
        kpm = torch.zeros(2, 150, dtype=torch.bool)
        kpm[1, 90:] = True
        if padding == "left":
            kpm = kpm.flip(-1)
    _, w = torch_mha(x, x, x, key_padding_mask=kpm, average_attn_weights=False)  # (B, H, L, S)
    lse = torch.zeros(w.shape[:3], dtype=w.dtype)
    expect = reference.pool_block_map(w, lse, REQUEST)
    if average:
        expect = expect.mean(1)
    _, got = ours(x.float(), x.float(), x.float(), key_padding_mask=kpm, average_attn_weights=average)
    torch.testing.assert_close(got.double(), expect, rtol=0, atol=1e-5)
    assert ours(x.float(), x.float(), x.float(), need_weights=False)[1] is None


def test_capture_records_maps_with_left_padding():
    mha = attnops.nn.MultiheadAttention(32, 2, batch_first=True)
    x = torch.randn(1, 80, 32)
    kpm = torch.zeros(1, 80, dtype=torch.bool)
    kpm[0, :10] = True
    with attnops.maps.capture() as cap:
        mha(x, x, x, key_padding_mask=kpm)
    assert len(cap.maps) == 1


def test_capture_through_transformers_adapter():
    transformers = pytest.importorskip("transformers")
    from attnops.integrations.transformers import register

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=register()).eval()
    with torch.no_grad(), attnops.maps.capture(model) as cap:
        model(torch.randint(0, 64, (1, 130)))
    assert list(cap.maps) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    rows = cap.maps["model.layers.1.self_attn"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)


def test_rollout():
    torch.manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(3)]
    r = attnops.maps.rollout(maps)
    expect = None
    for m in maps:
        a = 0.5 * m.mean(1) + 0.5 * torch.eye(5)
        expect = a if expect is None else a @ expect
    torch.testing.assert_close(r, expect)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(attnops.maps.rollout(maps[:1], residual=0.0), maps[0].mean(1))
    with pytest.raises(ValueError, match="square"):
        attnops.maps.rollout([torch.rand(1, 1, 2, 3)])
    with pytest.raises(ValueError, match="residual"):
        attnops.maps.rollout(maps, residual=2.0)


def test_pngs_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    maps = {"a": torch.rand(1, 3, 4, 4), "b": torch.rand(1, 3, 4, 4)}
    for path in (attnops.maps.to_heatmap(maps["a"], tmp_path / "one.png", title="a"),
                 attnops.maps.plot_grid(maps, tmp_path / "grid.png", log_scale=True)):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_the_maps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--seq-len", "150", "--layers", "2", "--dim", "32", "--heads", "2", "--attention", "window:70",
                 "--block-size", "32", "--out", str(tmp_path)]) == 0
    for name in ("grid.png", "layer_0.png", "layer_1.png", "rollout.png"):
        assert (tmp_path / name).stat().st_size > 1000
    maps = torch.load(tmp_path / "maps.pt")
    assert [m.shape for m in maps.values()] == [(1, 2, 5, 5)] * 2
    assert all(torch.all(m[..., 0, 3:] == 0) for m in maps.values()), "blocks outside the causal window are 0"
    assert "2 layers" in capsys.readouterr().out


def test_cli_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--text", "--text-file", "--seq-len", "--layers", "--dim", "--heads", "--kv-heads", "--attention",
                 "--hf-config", "--weights", "--block-size", "--reduce", "--log-scale", "--seed", "--out"):
        assert flag in text, flag
    assert text.count("(default:") >= 15


@pytest.mark.parametrize("model_type, bidirectional", [("bert", True), ("llama", False)])
def test_cli_encoder_configs_draw_bidirectional_maps(model_type, bidirectional, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    import json

    config = {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["--hf-config", str(tmp_path / "config.json"), "--seq-len", "200", "--out", str(tmp_path)]) == 0
    maps = list(torch.load(tmp_path / "maps.pt").values())
    assert len(maps) == 2
    above_diagonal = sum(float(m[0].triu(1).sum()) for m in maps)
    assert (above_diagonal > 0) == bidirectional
    assert ("bidirectional" in capsys.readouterr().out) == bidirectional


def _ref_max(q, k, causal):
    """Each row's largest score of q (B, S, H, D) against k (B, S, Hkv, D), in float64."""
    q64 = q.detach().double()
    k64 = k.detach().double().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.amax(-1)


def test_capture_max_scores_while_training():
    """capture(max_scores=True) records each layer's row maxima of the scores during a training step (QK-clip's
    input), equal to those of the q, k the layer computes; the loss and gradients are those of a step without it;
    maps=False records no map."""
    model = TinyCausalLM(layers=2, dim=64, heads=4, kv_heads=2, attention=attnops.nn.SoftmaxSpec(causal=True))
    tokens = torch.randint(0, 256, (2, 150))
    plain = model(tokens).square().mean()
    want = torch.autograd.grad(plain, list(model.parameters()))
    with attnops.maps.capture(model, maps=False, max_scores=True) as cap:
        loss = model(tokens).square().mean()
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(loss, plain) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert cap.maps == {} and list(cap.max_scores) == ["blocks.0.attn", "blocks.1.attn"]
    block = model.blocks[0]
    with torch.no_grad():
        q, k, _ = block["attn"]._qkv(block["norm1"](model.embed(tokens)))
    torch.testing.assert_close(cap.max_scores["blocks.0.attn"].double(), _ref_max(q, k, True), rtol=1e-5, atol=1e-5)
    assert cap.max_per_head()["blocks.1.attn"].shape == (4,)
    with torch.no_grad(), attnops.maps.capture(model, max_scores=True) as both:  # maps and maxima in one call
        model(tokens)
    assert list(both.maps) == list(both.max_scores) == ["blocks.0.attn", "blocks.1.attn"]
    torch.testing.assert_close(both.max_scores["blocks.0.attn"], cap.max_scores["blocks.0.attn"], rtol=0, atol=0)


def test_capture_max_scores_through_transformers_adapter():
    """A left-padded Llama batch through the adapter: each layer's row maxima equal the largest logit eager
    attention forms from the same q, k and mask (recorded by an attention function of this test); rows that see
    nothing (the padding) are -inf in both."""
    transformers = pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from attnops.integrations.transformers import register

    logits = []

    def recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.models.llama.modeling_llama import eager_attention_forward

        keys = repeat_kv(key, query.shape[1] // key.shape[1]).double()
        s = query.double() @ keys.transpose(-1, -2) * scaling
        logits.append(s.masked_fill(~attention_mask, float("-inf")).amax(-1))
        additive = torch.zeros(attention_mask.shape, dtype=query.dtype).masked_fill(~attention_mask, -1e30)
        return eager_attention_forward(module, query, key, value, additive, scaling=scaling, **kwargs)

    AttentionInterface.register("test_recording", recording_attention)
    AttentionMaskInterface.register("test_recording", lambda *a, **kw: sdpa_mask(*a, **dict(kw, allow_is_causal_skip=False)))
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=register()).eval()
    ids = torch.randint(0, 64, (2, 90))
    mask = torch.ones(2, 90, dtype=torch.long)
    mask[1, :30] = 0
    with torch.no_grad(), attnops.maps.capture(model, maps=False, max_scores=True) as cap:
        model(ids, attention_mask=mask)
        model.set_attn_implementation("test_recording")
        model(ids, attention_mask=mask)
    assert list(cap.max_scores) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for got, want in zip(cap.max_scores.values(), logits):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert bool(torch.isneginf(logits[0][1, :, :30]).all())


def test_capture_max_scores_refuses_what_cannot_report_them():
    transformers = pytest.importorskip("transformers")
    from attnops.integrations.transformers import register

    linear = attnops.nn.Attention(64, 4, attention=attnops.nn.LinearAttentionSpec())
    with attnops.maps.capture(max_scores=True), pytest.raises(NotImplementedError, match="LinearAttentionSpec"):
        linear(torch.randn(1, 70, 64))
    moba = attnops.nn.Attention(64, 4, attention=attnops.nn.MoBASpec(block_size=32, topk=2))
    with attnops.maps.capture(maps=False, max_scores=True) as cap:  # MoBA reports them (token routing)
        moba(torch.randn(1, 70, 64))
    assert next(iter(cap.max_scores.values())).shape == (1, 4, 70)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=register("attnops_moba_test", attnops.nn.MoBASpec(block_size=32, topk=2))).eval()
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    with attnops.maps.capture(), pytest.raises(NotImplementedError, match="would miss it"):
        model(torch.randint(0, 64, (2, 40)), attention_mask=mask)  # padded MoBA prefill runs unpadded: no maps
    with pytest.raises(ValueError, match="nothing to record"), attnops.maps.capture(maps=False):
        pass
    with pytest.raises(TypeError, match="max_scores must be a bool"), attnops.maps.capture(max_scores=1):
        pass


def test_modules_outside_attend_record_or_refuse_under_a_capture():
    """A capture records every attnops attention call or refuses it (they were skipped silently): the modules
    whose ops have no block map, a cached step and a resumed linear layer raise inside it, before any state
    changes; ``nn.LinearAttention`` records its map."""
    torch.manual_seed(0)
    x = torch.randn(1, 17, 32)
    modules = [(attnops.nn.LandmarkAttention(32, 4, block_size=8), x), (attnops.nn.MoHAttention(32, 4, 1, 2), x),
               (attnops.nn.RoutingAttention(32, 4, 2), x), (attnops.nn.Aaren(32, 4), x), (attnops.nn.ReGLA(32, 4), x),
               (attnops.nn.AgentAttention(32, 4, agent_num=4, window=2), x[:, :5])]
    for module, inputs in modules:
        module(inputs)  # runs outside a capture
        with attnops.maps.capture(), pytest.raises(NotImplementedError, match="capture would miss"):
            module(inputs)
    block = attnops.nn.Attention(32, 4)
    cache = block.make_cache(1, 32)
    with attnops.maps.capture(), pytest.raises(NotImplementedError, match="cached step"):
        block(x, cache=cache)
    assert cache.host_seqlens.tolist() == [0]
    linear = attnops.nn.LinearAttention(32, 4, normalize=True)
    with attnops.maps.capture(linear, map_block_size=16) as cap:
        y = linear(x)
    torch.testing.assert_close(y, linear(x), rtol=0, atol=0)
    (block_map,) = cap.maps.values()
    assert block_map.shape == (1, 4, 2, 2) and bool((block_map.triu(1) == 0).all())  # causal
    torch.testing.assert_close(block_map.sum(-1), torch.ones(1, 4, 2), rtol=1e-5, atol=1e-5)  # normalised rows
    _, state = linear(x, use_cache=True)
    with attnops.maps.capture(), pytest.raises(NotImplementedError, match="resumed from a state"):
        linear(x, state=state)
    with attnops.maps.capture(maps=False, max_scores=True), pytest.raises(NotImplementedError, match="row maxima"):
        linear(x)
    mha = attnops.nn.MultiheadAttention(32, 4, batch_first=True, attention=attnops.nn.LinearAttentionSpec())
    padding = torch.zeros(1, 17, dtype=torch.bool)
    padding[0, -3:] = True  # each row's tokens run as a sequence, outside attend
    mha(x, x, x, key_padding_mask=padding, need_weights=False)
    with attnops.maps.capture(), pytest.raises(NotImplementedError, match="key padding on the LinearAttentionSpec"):
        mha(x, x, x, key_padding_mask=padding, need_weights=False)
