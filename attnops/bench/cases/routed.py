"""Benchmark cases of block-routed and content-routed attention (family "routed"): ``moba_attention`` here,
``sea_attention``, ``hyper_attention`` and ``landmark_attention`` below (parameters in their builders' docstrings).

MoBA's parameters (suite ``params`` or case keys): block_size (default 512), topk (default 3), causal (default
true), routing (``"token"``, the op's default, or ``"tile"``). Shape keys as for attention, with Sq = Sk. The
baseline is *dense* attention of the same causality (FlashAttention on a GPU, else torch SDPA): MoBA's claim
is that speed. The extra column ``routing`` times the tile router alone (``moba_block_mask``: pooled keys,
gates, top-k, LUT), so ``routing_speedup_of_attnops`` in the JSON is its share of a tile-routed op's time; token
cases add ``tile``, the tile-routed op on the same inputs (``tile_speedup_of_attnops``: tile time / token time).
The accuracy gate checks the attention on the selection the router chose (routing decisions are tested against
the authors' code in tests/routed/).
"""

from __future__ import annotations

import torch

import attnops
from attnops.bench import baselines
from attnops.bench.cases.attention import _flops, _pairs_blocks, dense_baseline, op_case, qkv_inputs, reference_rows
from attnops.bench.registry import CaseSpec, Prepared, Provider, register_op
from attnops.ops.hyper import lsh_codes
from attnops.ops.hyper import reference as hyper_reference
from attnops.ops.hyper.lsh import lsh_projections
from attnops.ops.landmark import reference as landmark_reference
from attnops.ops.routed.token import route_tokens
from attnops.ops.softmax.reference import masked_attention


def build_moba(spec: CaseSpec) -> Prepared:
    s = spec.shape
    if s["Sq"] != s["Sk"]:
        raise ValueError("moba_attention cases need Sq == Sk")
    block_size = int(spec.params.get("block_size", 512))
    topk = int(spec.params.get("topk", 3))
    causal = bool(spec.params.get("causal", True))
    routing = str(spec.params.get("routing", "token"))
    needs_grad = spec.mode == "fwd+bwd"
    wrap = baselines.with_backward if needs_grad else (lambda p: p)

    def route(st):
        return attnops.moba_block_mask(st[0], st[1], block_size=block_size, topk=topk, causal=causal)

    def run(st, how=routing):
        return attnops.moba_attention(*st, block_size=block_size, topk=topk, causal=causal, routing=how)

    op = wrap(Provider(name="attnops", grad_inputs=lambda st: st, run=run))
    baseline, note = baselines.flash_attn_provider(causal, (-1, -1), spec.device, needs_grad)
    if baseline is None:
        baseline, _ = baselines.sdpa_provider(causal, spec.device, needs_grad, same_function=False)
    baseline.same_function = False
    routing_provider = Provider(name="routing", run=route, output=lambda st, mask: mask.kv_num_blocks.float(),
                                same_function=False)

    def ref(inputs, rows, dtype):
        if routing == "token":
            return _token_reference(inputs, rows, dtype, block_size, topk, causal)
        mask = route(inputs).to("cpu")
        return reference_rows(mask, causal, (-1, -1), s["D"] ** -0.5)(inputs, rows, dtype)

    extras = [routing_provider]
    if routing == "token":
        extras.append(wrap(Provider(name="tile", grad_inputs=lambda st: st, same_function=False,
                                    run=lambda st: run(st, "tile"))))

    make = qkv_inputs(spec)
    sample = route(make())  # routing keeps topk blocks per tile whatever the data: one sample's count
    dense, actual = _flops(spec, _pairs_blocks(sample))  # the router's masks are (B, H): no broadcast
    return Prepared(make_inputs=make, op=op, baseline=wrap(baseline), extras=extras, reference=ref,
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=s["Sq"],
                    flops_dense=dense, flops_actual=actual, density=sample.density,
                    notes=[note] if note else [])


def _token_reference(inputs, rows, dtype, block_size: int, topk: int, causal: bool):
    """Token-routed MoBA's rows ``(B, R, H, D)``: the routing of the op's inputs as given, then exact attention in
    ``dtype`` over each row's own block (causal: up to the row) and its chosen blocks (an ``R x S`` mask)."""
    q0, k0 = (t.detach().cpu() for t in inputs[:2])
    q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
    B, S, H, D = q.shape
    rows = rows.cpu()
    keys = torch.arange(S)
    outs = []
    for b in range(B):
        routes = route_tokens(q0[b], k0[b], [0, S], block_size, topk, causal)
        R = rows.numel()
        own = routes.own_block[rows]
        lo, hi = routes.block_start[own], (rows + 1 if causal else routes.block_end[own])
        allowed = ((keys >= lo[:, None]) & (keys < hi[:, None])).expand(H, -1, -1).reshape(H * R, S).to(torch.uint8)
        slot = torch.full((S,), -1, dtype=torch.int64)
        slot[rows] = torch.arange(R)
        pick = slot[routes.token] >= 0
        blk = routes.block[pick]
        seen = ((keys >= routes.block_start[blk, None]) & (keys < routes.block_end[blk, None])).to(torch.uint8)
        flat = (routes.head[pick] * R + slot[routes.token[pick]])[:, None].expand(-1, S)
        allowed = allowed.scatter_reduce(0, flat, seen, reduce="amax").view(H, R, S).bool()
        out, _ = masked_attention(q[b:b + 1, rows], k[b:b + 1], v[b:b + 1], allowed[None], D ** -0.5)
        outs.append(out)
    return torch.cat(outs)


register_op("moba_attention", "routed", build_moba, "MoBA block-routed attention (router + block-sparse core)")


def _dense_rows(shape: dict, causal: bool):
    """The "vs exact" rows of the approximate ops: dense attention of the same causality, in float64."""
    def exact(inputs, rows):
        return reference_rows(None, causal, (-1, -1), shape["D"] ** -0.5)(inputs, rows, torch.float64)
    return exact


def build_sea(spec: CaseSpec) -> Prepared:
    """``sea_attention`` (parameters block_size, default 64; topk, default 8; num_features, default 64; causal,
    default true) against dense attention of the same causality; the accuracy gate checks the attention on the
    blocks chosen, the "vs exact" column its error against dense attention."""
    s = spec.shape
    block = int(spec.params.get("block_size", 64))
    topk = spec.params.get("topk", 8)
    features = int(spec.params.get("num_features", 64))
    causal = bool(spec.params.get("causal", True))

    def mask_of(inputs):
        return attnops.ops.routed.sea_block_mask(inputs[0], inputs[1], block_size=block, topk=topk,
                                                 num_features=features, causal=causal)[0]

    def run(st):
        return attnops.sea_attention(*st, block_size=block, topk=topk, num_features=features, causal=causal)

    def ref(inputs, rows, dtype):
        return reference_rows(mask_of(inputs).to("cpu"), causal, (-1, -1), s["D"] ** -0.5)(inputs, rows, dtype)

    make = qkv_inputs(spec)
    sample = mask_of(make())
    dense, actual = _flops(spec, _pairs_blocks(sample))
    return op_case(spec, make, run, *dense_baseline(causal, spec, spec.mode == "fwd+bwd"), ref, actual, dense,
                   exact=_dense_rows(s, causal), density=sample.density)


def _hyper_pairs(n: int, block: int, samples: int, min_seq_len: int) -> float:
    """(query, key) pairs the causal recursion computes per head: exact causal segments of at most min_seq_len,
    and per level the lower-left quarters' block + sample keys."""
    if n <= min_seq_len:
        return n * (n + 1) / 2
    h = (n + n % 2) // 2
    quarter = h * h if h < min_seq_len else h * (min(block, h) + samples)
    return 2 * _hyper_pairs(h, block, samples, min_seq_len) + quarter


def build_hyper(spec: CaseSpec) -> Prepared:
    """``hyper_attention`` (parameters block_size, sample_size, default 256 each; min_seq_len, default 4096;
    causal, default true; the authors' defaults) against dense attention of the same causality; the accuracy gate
    holds the sampled rows to the float64 oracle of the same codes and draws, the "vs exact" column is the error
    against dense attention."""
    s = spec.shape
    if s["Sq"] != s["Sk"]:
        raise ValueError("hyper_attention cases need Sq == Sk")
    params = dict(block_size=int(spec.params.get("block_size", 256)),
                  sample_size=int(spec.params.get("sample_size", 256)),
                  min_seq_len=int(spec.params.get("min_seq_len", 4096)))
    causal = bool(spec.params.get("causal", True))

    def run(st):
        return attnops.hyper_attention(*st, causal=causal, **params)

    def ref(inputs, rows, dtype):
        proj = lsh_projections(torch.Generator().manual_seed(0), s["D"], 7)
        codes = [lsh_codes(t.detach(), proj) for t in inputs[:2]]  # what the op hashed
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        return torch.cat([hyper_reference.hyper_attention(q, k, v, *codes, causal=causal, rows=rows[i:i + 48],
                                                          **params)
                          for i in range(0, rows.numel(), 48)], dim=1)

    pairs = _hyper_pairs(s["Sq"], params["block_size"], params["sample_size"], params["min_seq_len"]) if causal \
        else s["Sq"] * (params["block_size"] + params["sample_size"])
    dense, actual = _flops(spec, pairs * s["B"] * s["H"])
    if causal:
        dense /= 2
    return op_case(spec, qkv_inputs(spec), run, *dense_baseline(causal, spec, spec.mode == "fwd+bwd"), ref, actual,
                   dense, exact=_dense_rows(s, causal), density=actual / dense)


def build_landmark(spec: CaseSpec) -> Prepared:
    """``landmark_attention`` in its retrieval form (parameters block_size, default 64; topk, default 4) against
    causal dense attention on the same inputs (the landmark positions are every ``block_size``-th key, as a model
    with landmark tokens holds them); the accuracy gate holds the sampled rows to the float64 oracle on the blocks
    the op retrieved, the "vs exact" column is the error against dense causal attention."""
    s = spec.shape
    bs = int(spec.params.get("block_size", 64))
    topk = spec.params.get("topk", 4)
    topk = None if topk in (None, "all") else int(topk)

    def run(st):
        return attnops.landmark_attention(*st, block_size=bs, topk=topk)

    def ref(inputs, rows, dtype):
        _, chosen = attnops.landmark_attention(*(t.detach() for t in inputs), block_size=bs, topk=topk,
                                               return_blocks=True)
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        return landmark_reference.landmark_attention(q, k, v, chosen.cpu(), block_size=bs, rows=rows)

    keep = bs * (topk if topk is not None else s["Sk"] // (2 * bs))  # keys per query: own block + retrieved
    dense, actual = _flops(spec, float(s["Sq"] * min(keep + bs / 2, s["Sk"] / 2)) * s["B"] * s["H"])
    dense /= 2  # causal
    return op_case(spec, qkv_inputs(spec), run, *dense_baseline(True, spec, spec.mode == "fwd+bwd"), ref, actual,
                   dense, exact=_dense_rows(s, True), density=actual / dense)


register_op("sea_attention", "routed", build_sea, "SEA: a Performer-estimated block map picks the blocks, exact core")
register_op("hyper_attention", "routed", build_hyper,
            "HyperAttention: sortLSH blocks + sampled columns, causal by recursive halving")
register_op("landmark_attention", "routed", build_landmark,
            "Landmark attention: grouped softmax over the own block and the retrieved blocks' landmarks")
