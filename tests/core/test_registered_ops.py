"""Every registered operator passes ``torch.library.opcheck`` (schema, fake implementation, autograd
registration, AOT dispatch), and its schema is the one built from its argument list. A new operator
without a sample call here fails ``test_every_operator_has_a_sample``."""

import pytest
import torch

import attnops
from attnops import BlockMask
from attnops.core import backends
from attnops.core.library import OPS

B, S, H, HKV, D = 1, 128, 2, 1, 16


def _qkv(grad=False, s=S):
    return [torch.randn(B, s, h, D, requires_grad=grad) for h in (H, HKV, HKV)]


def _lut():
    m = BlockMask.causal(S, 32)
    return [m.kv_num_blocks, m.kv_indices, m.q_num_blocks, m.q_indices, 32, 32]


def block_sparse_fwd():
    q, k, v = _qkv(grad=True)
    return (q, k, v, *_lut(), 0.25, True, -1, -1)


def block_sparse_fwd_map():
    q, k, v = _qkv()
    return (q, k, v, *_lut(), 0.25, True, -1, -1, 16, 32, False)


def block_sparse_fwd_mods():
    """softcap, ALiBi and learnable sinks: the sinks' gradient goes through the autograd registration."""
    q, k, v = _qkv(grad=True)
    return (q, k, v, *_lut(), 0.25, True, -1, -1, 0, 0, False, 5.0, torch.rand(H), torch.randn(H, requires_grad=True),
            torch.randn(1, H, S, S, requires_grad=True))


def block_sparse_fwd_max():
    """each row's largest score (return_max), with a sink, which it leaves out"""
    q, k, v = _qkv(grad=True)
    return (q, k, v, *_lut(), 0.25, True, -1, -1, 0, 0, False, 0.0, None, torch.randn(H), None, 0.0, None, None, None,
            None, True)


def _varlen_alibi_bounds():
    """key_bounds, query_bounds and ALiBi's per-query offsets of two packed sequences whose layouts differ"""
    from attnops.core.segments import from_cu_seqlens
    cu_q, cu_k = torch.tensor([0, 20, S], dtype=torch.int32), torch.tensor([0, 50, S], dtype=torch.int32)
    seg = from_cu_seqlens(cu_q, cu_k, S, S, True, (-1, -1), alibi=True)
    return seg.key_bounds, seg.query_bounds, seg.alibi_offsets


def block_sparse_fwd_varlen_alibi():
    """ALiBi with each query's own offset (varlen layouts that differ), through the autograd registration"""
    q, k, v = _qkv(grad=True)
    return (q, k, v, None, None, None, None, 0, 0, 0.25, False, -1, -1, 0, 0, False, 0.0, torch.rand(H), None, None,
            0.0, None, *_varlen_alibi_bounds())


def block_sparse_bwd(name):
    def build():
        q, k, v = _qkv()
        fwd = getattr(torch.ops.attnops, name.replace("_bwd", "_fwd"))
        out, lse, *_ = fwd(q, k, v, *_lut(), 0.25, True, -1, -1)
        return (torch.randn_like(out), None, q, k, v, out, lse, *_lut(), 0.25, True, -1, -1, 3.0, torch.rand(B, H),
                torch.randn(B, 1, 1, S), True)
    return build


def block_sparse_bwd_varlen_alibi(name):
    def build():
        q, k, v = _qkv()
        fwd = getattr(torch.ops.attnops, name.replace("_bwd", "_fwd"))
        bounds, slopes = _varlen_alibi_bounds(), torch.rand(H)
        args = (None, None, None, None, 0, 0, 0.25, False, -1, -1)
        out, lse, *_ = fwd(q, k, v, *args, 0, 0, False, 0.0, slopes, None, None, 0.0, None, *bounds)
        return (torch.randn_like(out), None, q, k, v, out, lse, *args, 0.0, slopes, None, False, 0.0, None, *bounds)
    return build


def decode(fused_map, triton=False):
    def build():
        q = torch.randn(2, 3, H, D)
        k, v = torch.randn(2, 100, HKV, D), torch.randn(2, 100, HKV, D)
        args = (q, k, v, torch.tensor([100, 37], dtype=torch.int32), None, 0, 0, 0.25, -1, 0)
        mods = (4.0, torch.rand(H))  # softcap, ALiBi slopes
        if triton:  # no fused-map arguments
            return args + mods
        return args + ((32, False) if fused_map else (0, False)) + mods
    return build


def lowrank():
    q, k, v = _qkv()
    return (q, k, v, q[..., :4], k[..., :4], None, 24, 4, True, 0.25, True)


def moba_route():
    q, k, _ = _qkv()
    return (q, k, 64, 2, True, 64)


def moba_token_select():
    gate = torch.randn(H, S, 2)
    gate[0, 100, 0] = float("nan")  # a row left to torch.topk
    return (gate, 64, 2, True, 1)


def moba_token_pairs():
    chosen = torch.randint(-1, 3, (H, S, 2), dtype=torch.int32)
    return (chosen, torch.tensor([0, 64, 128]), torch.tensor([64, 128, S]), H)


def moba_token_merge():
    out = torch.randn(S, H, D)
    return (out, torch.rand(S), torch.randn(10, D), torch.rand(10), torch.randint(0, S, (10,)), 1, 1)


def linear_fwd():
    q, k, v = _qkv(grad=True, s=40)
    g = torch.nn.functional.logsigmoid(torch.randn(B, 40, H, 1)).requires_grad_(True)
    return (q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), g, None, 0.25, 16)


def linear_bwd():
    q, k, v, g, _, scale, chunk = linear_fwd()
    q, k, v, g = (t.detach() for t in (q, k, v, g))
    out, final, hs = torch.ops.attnops.linear_attn_fwd_triton(q, k, v, g, None, scale, chunk)
    return (torch.randn_like(out), None, q, k, v, g, final, hs, scale, chunk)


def linear_recurrent():
    q, k, v, g, _, scale, _ = linear_fwd()
    return tuple(t.detach()[:, :5] for t in (q, k, v, g)) + (None, scale)


SAMPLES = {
    "block_sparse_attn_fwd": [block_sparse_fwd, block_sparse_fwd_map, block_sparse_fwd_mods, block_sparse_fwd_max,
                              block_sparse_fwd_varlen_alibi],
    "block_sparse_attn_bwd": [block_sparse_bwd("block_sparse_attn_bwd"),
                              block_sparse_bwd_varlen_alibi("block_sparse_attn_bwd")],
    "block_sparse_attn_fwd_triton": [block_sparse_fwd, block_sparse_fwd_map, block_sparse_fwd_mods,
                                     block_sparse_fwd_max, block_sparse_fwd_varlen_alibi],
    "block_sparse_attn_bwd_triton": [block_sparse_bwd("block_sparse_attn_bwd_triton"),
                                     block_sparse_bwd_varlen_alibi("block_sparse_attn_bwd_triton")],
    "decode_attn_fwd": [decode(False), decode(True)],
    "decode_attn_fwd_triton": [decode(False, triton=True)],
    "lowrank_attn_fwd": [lowrank],
    "lowrank_attn_fwd_triton": [lowrank],
    "moba_route": [moba_route],
    "moba_route_triton": [moba_route],
    "moba_token_select": [moba_token_select],
    "moba_token_pairs": [moba_token_pairs],
    "moba_token_merge": [moba_token_merge],
    "linear_attn_fwd_triton": [linear_fwd],
    "linear_attn_bwd_triton": [linear_bwd],
    "linear_attn_recurrent_triton": [linear_recurrent],
}
TRITON_ONLY = backends.TRITON and backends.INTERPRET  # Triton operators run on CPU tensors here


def test_every_operator_has_a_sample():
    assert set(OPS) == set(SAMPLES), f"operators without a sample: {set(OPS) - set(SAMPLES)}; stale: " \
                                     f"{set(SAMPLES) - set(OPS)}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    if name.endswith("_triton") and not TRITON_ONLY:
        pytest.skip("the Triton operators run on CPU tensors only under TRITON_INTERPRET=1")
    if not name.endswith("_triton") and not backends.EXTENSION:
        pytest.skip(backends.EXTENSION_REASON)
    op = getattr(torch.ops.attnops, name).default
    for build in SAMPLES[name]:
        torch.manual_seed(0)
        torch.library.opcheck(op, build())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_schema_is_the_argument_list(name):
    """The registered schema is the one built from the operator's argument list (C++ kernels only
    register implementations; their signatures are checked against it when the extension loads)."""
    if name not in OPS:
        pytest.skip("not registered here")
    schema = getattr(torch.ops.attnops, name).default._schema
    opdef = OPS[name]
    assert [a.name for a in schema.arguments] == list(opdef.names)
    assert str(schema).endswith(opdef.signature.split(" -> ")[1])


def test_public_ops_are_importable():
    assert callable(attnops.attention) and callable(attnops.decode_attention)


def test_opdef_binds_by_name_in_argument_order():
    """Wrappers call operators by name; the values reach the schema in its order, defaults filled in,
    whatever order the names came in (a dummy argument added at the end of a list once arrived as
    the first defaulted one)."""
    from attnops.core.library import Arg, OpDef

    d = OpDef("not_registered", [Arg("a", "Tensor"), Arg("b", "int"), Arg("c", "int", "0"), Arg("d", "int", "5")],
              "Tensor")
    assert list(d.bind((), dict(d=1, b=2, a="x")).items()) == [("a", "x"), ("b", 2), ("c", 0), ("d", 1)]
    assert d.bind(("x", 2)) == {"a": "x", "b": 2, "c": 0, "d": 5}
    with pytest.raises(TypeError, match="missing argument 'b'"):
        d.bind(("x",))
    with pytest.raises(TypeError, match="unknown arguments"):
        d.bind(("x", 1), dict(e=3))
    assert d.grads(c=1) == (None, None, 1, None)
    assert d.signature == "(Tensor a, int b, int c=0, int d=5) -> Tensor"


def test_opdef_call_routes_by_requires_grad():
    """call_op takes the autograd path exactly when a tensor argument (Tensor, Tensor?, aliased) requires a
    gradient under grad mode; an operator with a tensor-list argument, whose tensors that scan would miss, is
    refused at definition."""
    from attnops.core.library import Arg, OpDef, call_op

    d = OpDef("not_registered", [Arg("a", "Tensor"), Arg("b", "Tensor?"), Arg("c", "Tensor(a!)"), Arg("n", "int")],
              "Tensor")
    assert d._tensors == (0, 1, 2)
    seen = []

    def op(*args):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality))
        return args

    x, w = torch.ones(2), torch.ones(2, requires_grad=True)
    call_op(op, [x, None, x, 1], d._tensors)
    for args in ([w, None, x, 1], [x, w, x, 1], [x, None, w, 1]):
        call_op(op, args, d._tensors)
    with torch.no_grad():
        call_op(op, [w, w, w, 1], d._tensors)
    assert seen == [True, False, False, False, True]  # below autograd unless a gradient can flow
    with pytest.raises(ValueError, match="tensor-list"):
        OpDef("not_registered_list", [Arg("xs", "Tensor[]")], "Tensor")
