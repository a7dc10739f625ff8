"""Decoding with score modifiers (softcap, ALiBi, sinks) on every implementation, against the float64
reference and against the softmax core on the same positions; block maps included."""

import pytest
import torch

import attnops
from attnops import BlockMask, dispatch
from attnops.core.block_map import MapRequest
from attnops.lowrank import KeyProjection
from attnops.ops.decode import reference
from helpers import DTYPE_IDS, assert_accurate, make_decode_inputs

# (B, S_max, H, Hkv, D, Sq_new)
SHAPES = [(3, 300, 8, 2, 64, 1), (2, 190, 16, 2, 40, 3), (2, 131, 6, 3, 100, 1)]
SHAPE_IDS = ["B{}-S{}-H{}-Hkv{}-D{}-new{}".format(*s) for s in SHAPES]
MODS = {
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi="H"),
    "alibi_batch": dict(alibi="BH"),
    "sinks": dict(sinks=True),
    "all_window": dict(softcap=2.0, alibi="BH", sinks=True, window=(50, 0)),
    "all_block_mask": dict(softcap=2.0, alibi="H", sinks=True, mask=True),
}


def _mods(name, B, H, device):
    spec = dict(MODS[name])
    kw = {}
    if "softcap" in spec:
        kw["softcap"] = spec["softcap"]
    kind = spec.get("alibi")
    if kind:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        kw["alibi_slopes"] = (slopes if kind == "H" else slopes * torch.rand(B, 1) * 2).to(device)
    if spec.get("sinks"):
        kw["sinks"] = (torch.randn(H) * 2).to(device)
    return kw, spec.get("window", (-1, -1)), spec.get("mask", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_score_mods_match_reference(shape, mods, num_splits, dtype, fwd_impl):
    B, S, H, Hkv, D, Sq = shape
    dev = fwd_impl.device
    q, k, v, lens = make_decode_inputs(shape, dtype, dev)
    kw, window, with_mask = _mods(mods, B, H, dev)
    mask = BlockMask.random((Sq, S), 0.5, seed=1, batch=B, num_heads=H, block_size=(64, 32), device=dev) \
        if with_mask else None
    out, lse, bmap = attnops.decode_attention(q, k, v, lens, block_mask=mask, window_size=window, return_lse=True,
                                              return_block_map=True, map_block_size=(64, 32), num_splits=num_splits,
                                              backend=fwd_impl.backend, **kw)
    cpu_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    cpu = [t.cpu() for t in (q, k, v)]
    mask_cpu = None if mask is None else mask.to("cpu")
    request = MapRequest(64, 32, "mean")
    ref64 = reference.decode_attention(*(t.double() for t in cpu), lens.cpu(), mask_cpu, window_size=(window[0], 0),
                                       softmax_scale=D ** -0.5, block_map=request,
                                       **{n: (t.double() if isinstance(t, torch.Tensor) else t)
                                          for n, t in cpu_kw.items()})
    refT = reference.decode_attention(*cpu, lens.cpu(), mask_cpu, window_size=(window[0], 0), softmax_scale=D ** -0.5,
                                      block_map=request, **cpu_kw)
    assert_accurate(f"{mods} out", out.cpu(), ref64[0], refT[0])
    assert_accurate(f"{mods} lse", lse.cpu(), ref64[1], refT[1])
    torch.testing.assert_close(bmap.cpu().double(), ref64[2], rtol=1e-3, atol=1e-4)
    if "sinks" in kw and B > 1:  # the empty sequence: zeros and lse = the sink
        assert torch.all(out[0] == 0)
        torch.testing.assert_close(lse[0].cpu(), kw["sinks"].cpu().view(H, 1).expand(H, Sq))


def test_decode_equals_the_core_at_full_length(fwd_impl):
    """A full cache: decoding's positions are attention's bottom-right ones, so the two ops agree with every
    modifier (the core is tested against the authors' code)."""
    B, S, H, Hkv, D, Sq = 2, 120, 4, 2, 32, 3
    dev = fwd_impl.device
    q = torch.randn(B, Sq, H, D, device=dev)
    k, v = torch.randn(B, S, Hkv, D, device=dev), torch.randn(B, S, Hkv, D, device=dev)
    kw, _, _ = _mods("all_window", B, H, dev)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    out, lse = attnops.decode_attention(q, k, v, lens, window_size=(40, 0), return_lse=True, backend=fwd_impl.backend,
                                        **kw)
    # the core itself: attnops.attention would run this decode-shaped call on the decode kernel (runs_as_decode)
    core = dispatch.resolve("block_sparse_attention", q.device, fwd_impl.backend)
    want, want_lse = core(q, k, v, None, causal=True, window_size=(40, 0), softmax_scale=D ** -0.5, **kw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_lowrank_decoding_refuses_modifiers():
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16)
    proj = KeyProjection.identity(num_kv_heads=1, head_dim=16)
    with pytest.raises(NotImplementedError, match="sinks"):
        attnops.decode_attention(q, k, v, torch.tensor([64]), lowrank=proj, rank=8, topk=16,
                                 sinks=torch.zeros(2))
