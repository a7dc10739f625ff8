"""Benchmark cases of linear attention: ``linear_attention`` (family "linear").

Parameters (suite ``params`` or case keys): feature_map (default "elu"), causal (default true),
decay (None, "retnet", "lightning"), gate (None, "head", "channel"), normalize (default false),
chunk_size (default 64), growth (default false), block_map (default false). Shape keys as for
attention, with Sq = Sk. The baseline is *dense softmax* attention of the same causality
(FlashAttention on a GPU, else torch SDPA): where linear attention overtakes it is the crossover
length. With ``growth = true`` the baseline is the same op on the first N/2 tokens instead, timed
interleaved with the op at N, so time(N) / time(N/2) (= 1 / speedup; the family's CPU target is
<= 2.1) is measured side by side, not across cases run minutes apart on a machine whose speed
drifts. With ``block_map = true`` the op runs with ``return_block_map=True`` against itself without
(the block-map issue's <= 1.6x target). The accuracy gate checks the op against the float64
token-by-token recurrence on sampled rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnops
from attnops.bench import baselines
from attnops.bench.cases.attention import qkv_inputs
from attnops.bench.registry import CaseSpec, Prepared, Provider, register_op


def build_linear(spec: CaseSpec) -> Prepared:
    s = spec.shape
    if s["Sq"] != s["Sk"]:
        raise ValueError("linear_attention cases need Sq == Sk")
    p = spec.params
    causal = bool(p.get("causal", True))
    gate_kind = p.get("gate")
    kw = dict(feature_map=p.get("feature_map", "elu"), causal=causal, decay=p.get("decay"),
              normalize=bool(p.get("normalize", False)), chunk_size=int(p.get("chunk_size", 64)))
    needs_grad = spec.mode == "fwd+bwd"
    make_qkv = qkv_inputs(spec)

    def make():
        inputs = make_qkv()
        if gate_kind is None:
            return inputs
        shape = (s["B"], s["Sq"], s["H"]) + ((s["D"],) if gate_kind == "channel" else ())
        gate = F.logsigmoid(torch.randn(shape, device=spec.device) + 2.0).requires_grad_(needs_grad)
        return (*inputs, gate)

    def run(st, **extra):
        gate = st[3] if len(st) > 3 else None
        return attnops.linear_attention(st[0], st[1], st[2], gate=gate, **kw, **extra)

    wrap = baselines.with_backward if needs_grad else (lambda prov: prov)
    op = wrap(Provider(name="attnops", run=run, grad_inputs=lambda st: st))
    notes = []
    if p.get("block_map"):
        if needs_grad:
            raise ValueError("block_map cases time the forward (mode = 'fwd')")
        op = Provider(name="attnops", run=lambda st: run(st, return_block_map=True), output=lambda st, r: r.out)
        baseline = Provider(name="no map", run=run)
    elif p.get("growth"):
        half = s["Sq"] // 2

        def first_half(st):
            return tuple(t.detach()[:, :half].clone().requires_grad_(needs_grad) for t in st)

        baseline = Provider(name="attnops N/2", run=run, prepare=first_half, grad_inputs=lambda st: st,
                            same_function=False)
    else:
        inner, note = baselines.flash_attn_provider(causal, (-1, -1), spec.device, needs_grad)
        if inner is None:
            notes.append(note)
            inner, _ = baselines.sdpa_provider(causal, spec.device, needs_grad, same_function=False)
        baseline = Provider(name=inner.name, run=inner.run, prepare=lambda st: inner.prepare(st[:3]),
                            output=inner.output, same_function=False, grad_inputs=inner.grad_inputs)

    def ref(inputs, rows, dtype):
        cast = [t.detach().cpu().to(dtype if i < 3 else torch.promote_types(dtype, torch.float32))
                for i, t in enumerate(inputs)]
        last = int(rows.max()) + 1 if causal else s["Sq"]  # the recurrence up to the last sampled row
        cast = [t[:, :last] for t in cast]
        return run(cast, backend="reference")[:, rows]

    # FLOPs of the chunk form per head and token: intra 2C(Dk + Dv), state and inter 4 Dk Dv
    C, D = kw["chunk_size"], s["D"]
    per_token = (2 * C * 2 * D + 4 * D * D) if causal else 4 * D * D
    factor = 3.0 if needs_grad else 1.0
    actual = factor * per_token * s["B"] * s["H"] * s["Sq"]
    dense = factor * 4.0 * D * s["B"] * s["H"] * s["Sq"] * s["Sk"] * (0.5 if causal else 1.0)
    return Prepared(make_inputs=make, op=op, baseline=wrap(baseline), extras=[],
                    reference=ref, select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=s["Sq"],
                    flops_dense=dense, flops_actual=actual, notes=notes)


register_op("linear_attention", "linear", build_linear, "linear attention (chunk form) vs dense softmax attention")
