"""Benchmark cases of the methods composed on the cores (issue 25): ``agent_attention`` (family "agent"),
``aaren`` (family "aaren"), ``flow_attention`` (family "flow"), ``lln_attention`` (family "lln"), ``regla_attention``
(family "regla"), ``moh_attention`` (family "moh") and ``routing_attention`` (family "clustered"), each against the dense softmax attention it
replaces (FlashAttention on a GPU, torch SDPA otherwise; a different function, so no accuracy comparison with
it).

Parameters: ``num_agents`` (agent attention, default 49), ``causal`` (flow and LLN attention, default true),
``diag`` (LLN attention, default false), ``key_shift`` (ReGLA, default "running"; its gate and refining logits
are standard normal, per head and key channel), ``num_shared_heads`` / ``top_k`` (MoH, default ``H / 2`` and ``H / 4``:
MoH-LLaMA3's 75% of the heads, routed by :func:`attnops.ops.moh.query_norm_heads`), ``num_clusters`` (Routing
Transformer, default ``sqrt(N)``; random unit centroids; its "vs exact" column is the error against causal dense
attention, what the clustering costs on these unclustered inputs). Shape keys as for attention with Sq = Sk;
Aaren's learned query is one ``(H, D)`` tensor and its baseline is causal SDPA with that query at every
position (what Aaren computes, by N^2 work). The accuracy gate checks each op against its float64 oracle on
sampled rows.
"""

from __future__ import annotations

import torch

import attnops
from attnops.bench import baselines
from attnops.bench.cases.attention import DTYPES, dense_baseline, op_case, qkv_inputs, reference_rows
from attnops.bench.registry import CaseSpec, Prepared, Provider, register_op
from attnops.ops.aaren.op import CHUNK
from attnops.ops.agent import agent_tokens
from attnops.ops.agent import reference as agent_reference
from attnops.ops.clustered import cluster_assignment
from attnops.ops.moh import query_norm_heads
from attnops.ops.softmax.reference import masked_attention


def build_agent(spec: CaseSpec) -> Prepared:
    s = spec.shape
    n = int(spec.params.get("num_agents", 49))
    needs_grad = spec.mode == "fwd+bwd"

    def run(st, **extra):
        return attnops.agent_attention(st[0], st[1], st[2], num_agents=n, **extra)

    baseline, notes = dense_baseline(False, spec, needs_grad, lambda st: st)

    def ref(inputs, rows, dtype):
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        out = agent_reference.agent_attention(q, k, v, agent_tokens(q, n), softmax_scale=s["D"] ** -0.5)
        return out[:, rows]

    factor = 3.0 if needs_grad else 1.0
    actual = factor * 4.0 * s["D"] * s["B"] * s["H"] * n * (s["Sq"] + s["Sk"])
    dense = factor * 4.0 * s["D"] * s["B"] * s["H"] * s["Sq"] * s["Sk"]
    return op_case(spec, qkv_inputs(spec), run, baseline, notes, ref, actual, dense)


def build_aaren(spec: CaseSpec) -> Prepared:
    s, dtype = spec.shape, DTYPES[spec.dtype]
    if s["Sq"] != s["Sk"]:
        raise ValueError("aaren cases need Sq == Sk")
    needs_grad = spec.mode == "fwd+bwd"
    make_kv = qkv_inputs(spec)

    def make():
        _, k, v = make_kv()
        q = torch.randn(s["H"], s["D"], dtype=dtype, device=spec.device).requires_grad_(needs_grad)
        return q, k, v

    def run(st, **extra):
        return attnops.aaren(st[0], st[1], st[2], **extra)

    def per_position(st):  # the same function by dense causal attention: the learned query at every position
        q, k, v = st
        full = q.detach().expand(k.shape[0], k.shape[1], *q.shape).contiguous().requires_grad_(needs_grad)
        return full, k, v

    baseline, notes = dense_baseline(True, spec, needs_grad, per_position)

    def ref(inputs, rows, dtype):
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        g = q.shape[0] // k.shape[2]
        scores = torch.einsum("hd,bshd->bhs", q, k.repeat_interleave(g, dim=2)) * s["D"] ** -0.5
        seen = torch.arange(k.shape[1]).view(1, -1) <= rows.cpu().view(-1, 1)  # (R, S)
        p = torch.softmax(scores.unsqueeze(2).masked_fill(~seen, float("-inf")), dim=-1)  # (B, H, R, S)
        return torch.einsum("bhrs,bshd->brhd", p, v.repeat_interleave(g, dim=2))

    factor = 3.0 if needs_grad else 1.0
    D = s["D"]
    actual = factor * s["B"] * s["H"] * s["Sq"] * (2.0 * D + 2.0 * CHUNK * (D + 1))
    dense = factor * 4.0 * D * s["B"] * s["H"] * s["Sq"] * s["Sk"] * 0.5
    return op_case(spec, make, run, baseline, notes, ref, actual, dense)


def build_flow(spec: CaseSpec) -> Prepared:
    return _build_linear_core(spec, lambda st, causal, **extra: attnops.flow_attention(*st[:3], causal=causal, **extra))


def build_lln(spec: CaseSpec) -> Prepared:
    diag = bool(spec.params.get("diag", False))
    return _build_linear_core(spec, lambda st, causal, **extra: attnops.lln_attention(*st[:3], causal=causal, diag=diag,
                                                                                      **extra))


def build_regla(spec: CaseSpec) -> Prepared:
    s, dtype = spec.shape, DTYPES[spec.dtype]
    shift = str(spec.params.get("key_shift", "running"))
    make_qkv = qkv_inputs(spec)

    def make():
        logits = [torch.randn(s["B"], s["Sq"], s["H"], s["D"], dtype=dtype, device=spec.device) for _ in range(2)]
        return (*make_qkv(), *(t.requires_grad_(spec.mode == "fwd+bwd") for t in logits))

    return _build_linear_core(spec, lambda st, causal, **extra: attnops.regla_attention(*st[:5], key_shift=shift,
                                                                                        **extra),
                              make=make, causal_only=True)


def _build_linear_core(spec: CaseSpec, call, make=None, causal_only: bool = False) -> Prepared:
    """A method on the linear core: ``call(inputs, causal, **extra)``, against dense attention of its causality;
    ``make``: the inputs when the method takes more than q, k, v (they come first)."""
    s = spec.shape
    causal = bool(spec.params.get("causal", True))
    if causal_only and not causal:
        raise ValueError(f"{spec.op} is causal only")
    if causal and s["Sq"] != s["Sk"]:
        raise ValueError(f"causal {spec.op} cases need Sq == Sk")
    needs_grad = spec.mode == "fwd+bwd"

    def run(st, **extra):
        return call(st, causal, **extra)

    baseline, notes = dense_baseline(causal, spec, needs_grad, lambda st: st[:3])

    def ref(inputs, rows, dtype):
        return run([t.detach().to("cpu", dtype) for t in inputs], backend="reference")[:, rows]

    factor = 3.0 if needs_grad else 1.0
    D = s["D"]
    actual = factor * s["B"] * s["H"] * (s["Sq"] + s["Sk"]) * (4.0 * D * D + 16.0 * D)
    dense = factor * 4.0 * D * s["B"] * s["H"] * s["Sq"] * s["Sk"] * (0.5 if causal else 1.0)
    return op_case(spec, make or qkv_inputs(spec), run, baseline, notes, ref, actual, dense)


def build_moh(spec: CaseSpec) -> Prepared:
    s = spec.shape
    causal = bool(spec.params.get("causal", True))
    shared = int(spec.params.get("num_shared_heads", s["H"] // 2))
    top_k = int(spec.params.get("top_k", s["H"] // 4))
    needs_grad = spec.mode == "fwd+bwd"
    make_qkv = qkv_inputs(spec)

    def make():
        q, k, v = make_qkv()
        return q, k, v, query_norm_heads(q.detach(), shared, top_k)

    def run(st, **extra):
        return attnops.moh_attention(st[0], st[1], st[2], st[3], causal=causal, **extra)

    baseline, notes = dense_baseline(causal, spec, needs_grad, lambda st: st[:3])
    dense_rows = reference_rows(None, causal, (-1, -1), s["D"] ** -0.5)

    def ref(inputs, rows, dtype):  # every head's exact rows, weighted: the oracle's definition, row by row
        weights = inputs[3].detach().to("cpu", dtype)[:, rows.cpu()]
        return dense_rows(inputs[:3], rows, dtype) * weights.unsqueeze(-1)

    factor = 3.0 if needs_grad else 1.0
    dense = factor * 4.0 * s["D"] * s["B"] * s["H"] * s["Sq"] * s["Sk"] * (0.5 if causal else 1.0)
    wrap = baselines.with_backward if needs_grad else (lambda prov: prov)
    return Prepared(make_inputs=make, op=wrap(Provider(name="attnops", run=run, grad_inputs=lambda st: st[:3])),
                    baseline=wrap(baseline), extras=[], reference=ref,
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=s["Sq"],
                    flops_dense=dense, flops_actual=dense * (shared + top_k) / s["H"], notes=notes)


def build_routing(spec: CaseSpec) -> Prepared:
    s = spec.shape
    if s["Sq"] != s["Sk"]:
        raise ValueError("routing_attention cases need Sq == Sk")
    clusters = int(spec.params.get("num_clusters", round(s["Sk"] ** 0.5)))
    needs_grad = spec.mode == "fwd+bwd"
    g = torch.Generator().manual_seed(0)
    centroids = torch.nn.functional.normalize(torch.randn(s["Hkv"], clusters, s["D"], generator=g), dim=-1)
    centroids = centroids.to(spec.device)

    def run(st, **extra):
        return attnops.routing_attention(st[0], st[1], st[2], centroids.to(st[0].dtype), causal=True, **extra)

    baseline, notes = dense_baseline(True, spec, needs_grad, lambda st: st)

    def rows_of(inputs, rows, dtype, same_cluster: bool):
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        rows = rows.cpu()
        seen = torch.arange(k.shape[1]).view(1, -1) <= rows.view(-1, 1)  # (R, S) causal
        allowed = seen.view(1, 1, *seen.shape)
        if same_cluster:  # the clusters of the op's inputs as given
            qc = cluster_assignment(inputs[0].detach().cpu(), centroids.cpu())[:, rows]  # (B, R, H)
            kc = cluster_assignment(inputs[1].detach().cpu(), centroids.cpu())  # (B, S, Hkv)
            kc = kc.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            allowed = allowed & (qc.permute(0, 2, 1).unsqueeze(-1) == kc.permute(0, 2, 1).unsqueeze(-2))
        return masked_attention(q[:, rows], k, v, allowed, s["D"] ** -0.5)[0]

    factor = 3.0 if needs_grad else 1.0
    dense = factor * 4.0 * s["D"] * s["B"] * s["H"] * s["Sq"] * s["Sk"] * 0.5
    return op_case(spec, qkv_inputs(spec), run, baseline, notes,
                   lambda inputs, rows, dtype: rows_of(inputs, rows, dtype, True), dense / clusters, dense,
                   exact=lambda inputs, rows: rows_of(inputs, rows, torch.float64, False))


register_op("agent_attention", "agent", build_agent, "Agent attention: pooled agents, two softmax calls (non-causal)")
register_op("aaren", "aaren", build_aaren, "Aaren: a learned query over every prefix by a prefix scan (causal)")
register_op("flow_attention", "flow", build_flow, "Flowformer's flow attention on the linear core")
register_op("lln_attention", "lln", build_lln, "Linear Log-Normal attention (LLN, LLN+Diag) on the linear core")
register_op("regla_attention", "regla", build_regla, "ReGLA: refined gated linear attention on the linear core (causal)")
register_op("routing_attention", "clustered", build_routing,
            "Routing Transformer attention: shared q/k centroids, attention within the cluster")
register_op("moh_attention", "moh", build_moh, "Mixture-of-Head attention: only the routed (token, head) pairs run")
