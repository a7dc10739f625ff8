"""Benchmark cases of block-routed attention: ``moba_attention`` (family "routed").

Parameters (suite ``params`` or case keys): block_size (default 512), topk (default 3), causal (default
true). Shape keys as for attention, with Sq = Sk. The baseline is *dense* attention of the same
causality (FlashAttention on a GPU, else torch SDPA): MoBA's claim is that speed. The extra column
``routing`` times the router alone (``moba_block_mask``: pooled keys, gates, top-k, LUT), so
``routing_speedup_of_attnops`` in the JSON is the routing share of the op's time. The accuracy gate
checks the attention on the mask the router chose (routing decisions are tested against their own
float64 reference in tests/test_moba.py).
"""

from __future__ import annotations

import attnops
from attnops.bench import baselines
from attnops.bench.cases.attention import _flops, _pairs_blocks, qkv_inputs, reference_rows
from attnops.bench.registry import CaseSpec, Prepared, Provider, register_op


def build_moba(spec: CaseSpec) -> Prepared:
    s = spec.shape
    if s["Sq"] != s["Sk"]:
        raise ValueError("moba_attention cases need Sq == Sk")
    block_size = int(spec.params.get("block_size", 512))
    topk = int(spec.params.get("topk", 3))
    causal = bool(spec.params.get("causal", True))
    needs_grad = spec.mode == "fwd+bwd"
    wrap = baselines.with_backward if needs_grad else (lambda p: p)

    def route(st):
        return attnops.moba_block_mask(st[0], st[1], block_size=block_size, topk=topk, causal=causal)

    op = wrap(Provider(name="attnops", grad_inputs=lambda st: st,
                       run=lambda st: attnops.moba_attention(*st, block_size=block_size, topk=topk, causal=causal)))
    baseline, note = baselines.flash_attn_provider(causal, (-1, -1), spec.device, needs_grad)
    if baseline is None:
        baseline, _ = baselines.sdpa_provider(causal, spec.device, needs_grad, same_function=False)
    baseline.same_function = False
    routing = Provider(name="routing", run=route, output=lambda st, mask: mask.kv_num_blocks.float(),
                       same_function=False)

    def ref(inputs, rows, dtype):
        mask = route(inputs).to("cpu")
        return reference_rows(mask, causal, (-1, -1), s["D"] ** -0.5)(inputs, rows, dtype)

    make = qkv_inputs(spec)
    sample = route(make())  # routing keeps topk blocks per tile whatever the data: one sample's count
    dense, actual = _flops(spec, _pairs_blocks(sample))  # the router's masks are (B, H): no broadcast
    return Prepared(make_inputs=make, op=op, baseline=wrap(baseline), extras=[routing], reference=ref,
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=s["Sq"],
                    flops_dense=dense, flops_actual=actual, density=sample.density,
                    notes=[note] if note else [])


register_op("moba_attention", "routed", build_moba, "MoBA block-routed attention (router + block-sparse core)")
