"""Benchmark cases of low-rank-key attention (Loki): ``lowrank_key_attention`` (family "lowrank").

Shape keys as for decode: B, H, Hkv, D, Sk (cache length, every sequence full), Sq (new tokens,
default 1). Sq < Sk: a decoding step, ``decode_attention(..., lowrank=...)`` against the cache in
the calibrated basis, baseline dense ``decode_attention`` on the same cache (the issue's
"speedup over dense decode"). Sq == Sk: the prefill op against causal dense ``attention``.
Parameters: ``rank_div`` (rank = D / rank_div, default 4), ``topk_div`` (topk = Sk / topk_div,
default 8), ``local`` (default 0), ``score_dtype`` (the score plane's; default bfloat16 for
float32 caches, else the cache's).

A decoding step reads the scores from the cache's contiguous score plane (``KVCache(score_dim=rank)``,
``decode_attention(..., k_score=)``), as :class:`attnops.nn.Attention` does.

Keys are synthetic but shaped like real ones: low-rank plus noise (per-direction scales decaying
from 1 to 0.1 over the head dim, in a random orthonormal frame per kv head), queries from the same
distribution scaled so attention is peaked; the basis is calibrated on separate sample keys. The
accuracy gate checks the op against the float64 reference of the same algorithm; the "vs exact"
column is its error against dense attention (what the approximation costs).
"""

from __future__ import annotations

import torch

import attnops
from attnops import lowrank
from attnops.bench.registry import DTYPES, CaseSpec, Prepared, Provider, register_op
from attnops.ops.lowrank import reference as lowrank_reference
from attnops.ops.softmax import reference

# Query scale: the scores q . k / sqrt(D) get a standard deviation of 4 (peaked attention, as trained
# models have on long contexts; at 1 attention is near uniform and no top-k approximates it).
_LOGIT_STD = 4.0


def synthetic_keys(B: int, S: int, Hkv: int, D: int, frame: torch.Tensor, seed: int, gain: float = 1.0,
                   heads: int = 0) -> torch.Tensor:
    """``(B, S, heads or Hkv, D)`` float32 vectors, variance decaying along ``frame (Hkv, D, D)``'s
    columns; with ``heads`` a multiple of Hkv, query head h uses kv head h // (heads / Hkv)."""
    g = torch.Generator().manual_seed(seed)
    H = heads or Hkv
    scales = torch.logspace(0, -1, D) * gain
    z = torch.randn(B, S, H, D, generator=g) * scales
    return torch.einsum("bshd,hed->bshe", z, frame.repeat_interleave(H // Hkv, dim=0))


def build_lowrank(spec: CaseSpec) -> Prepared:
    s, dtype = spec.shape, DTYPES[spec.dtype]
    B, Sq, H, Hkv, S, D = s["B"], s["Sq"], s["H"], s["Hkv"], s["Sk"], s["D"]
    p = spec.params
    rank = max(1, D // int(p.get("rank_div", 4)))
    topk = max(1, S // int(p.get("topk_div", 8)))
    local = int(p.get("local", 0))
    prefill = Sq == S
    plane = DTYPES[p["score_dtype"]] if "score_dtype" in p else (torch.bfloat16 if dtype == torch.float32 else dtype)
    frame = torch.linalg.qr(torch.randn(Hkv, D, D, generator=torch.Generator().manual_seed(7)))[0]
    proj_cpu = lowrank.calibrate(synthetic_keys(1, 4096, Hkv, D, frame, seed=1))
    proj = proj_cpu.to(spec.device)
    scale = D ** -0.5

    def make():
        gain = _LOGIT_STD * D ** 0.5 / float(torch.logspace(0, -1, D).pow(4).sum().sqrt())
        q = synthetic_keys(B, Sq, Hkv, D, frame, seed=2, gain=gain, heads=H)
        k = synthetic_keys(B, S, Hkv, D, frame, seed=3)
        v = torch.randn(B, S, Hkv, D)
        if not prefill:
            k = proj_cpu.rotate(k)  # the cache holds keys in the basis
        q, k, v = (t.to(dtype=dtype, device=spec.device) for t in (q, k, v))
        lens = torch.full((B,), S, dtype=torch.int32, device=spec.device)
        if prefill:
            return q, k, v, lens
        # the score plane of KVCache(score_dim=rank, score_dtype=...), as nn.Attention keeps it
        return q, k, v, lens, k[..., :rank].to(plane).contiguous()

    if prefill:
        op = Provider(name="attnops", run=lambda st: attnops.lowrank_key_attention(
            st[0], st[1], st[2], projection=proj, rank=rank, topk=topk, local=local))
        baseline = Provider(name="attnops dense", run=lambda st: attnops.attention(st[0], st[1], st[2], causal=True),
                            same_function=False)
    else:
        op = Provider(name="attnops", run=lambda st: attnops.decode_attention(
            *st[:4], lowrank=proj, rank=rank, topk=topk, local=local, k_score=st[4]))
        baseline = Provider(name="dense decode", run=lambda st: attnops.decode_attention(
            proj.rotate(st[0]), st[1], st[2], st[3]), same_function=False)

    def per_sequence(inputs, rows, dtype_, exact: bool):
        q, k, v, lens = inputs[:4]
        kscore = inputs[4] if len(inputs) > 4 else None
        outs = []
        for b in range(B):  # one sequence at a time: a float64 copy of a whole MHA cache is large
            qq, kk, vv = (t[b:b + 1].detach().cpu().to(dtype_) for t in (q, k, v))
            qr = proj_cpu.rotate(qq) if not prefill else qq
            last = int(rows.max()) + 1
            if prefill:  # causal: the keys up to the last sampled row suffice
                qr, kk, vv = qr[:, :last], kk[:, :last], vv[:, :last]
            if prefill:
                qs, ks = proj_cpu.rotate(qr, rank), proj_cpu.rotate(kk, rank)
            else:  # the scores from the plane's rounding, as the op computes them
                qs = qr[..., :rank].to(plane).to(dtype_)
                ks = kscore[b:b + 1].cpu().to(dtype_)
            seqlens = lens[b:b + 1].cpu() if not prefill else None
            if exact:
                allowed = reference.token_mask(qr.shape[1], kk.shape[1], causal=True)
                out = reference.masked_attention(qr, kk, vv, allowed, scale)[0]
            else:
                out = lowrank_reference.lowrank_key_attention(qr, kk, vv, qs, ks, seqlens, topk=topk, local=local,
                                                      causal=True, softmax_scale=scale)[0]
            outs.append(out[:, rows])
        return torch.cat(outs)

    kv_bytes = 2.0 * B * S * Hkv * D * torch.tensor([], dtype=dtype).element_size()
    # bytes a decoding step reads: the score plane, and the chosen K/V rows of every query head
    plane_bytes = B * S * Hkv * rank * torch.tensor([], dtype=plane).element_size()
    read = plane_bytes + kv_bytes * min(1.0, topk / S) * H / Hkv if not prefill else None
    flops = 4.0 * B * H * Sq * S * D / (2 if prefill else 1)
    notes = [f"rank {rank}, topk {topk}" + (f", local {local}" if local else "")]
    return Prepared(make_inputs=make, op=op, baseline=baseline, extras=[],
                    reference=lambda inputs, rows, dt: per_sequence(inputs, rows, dt, exact=False),
                    exact=lambda inputs, rows: per_sequence(inputs, rows, torch.float64, exact=True),
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=Sq, flops_dense=flops,
                    flops_actual=flops * min(1.0, topk / S), bytes_moved=read, notes=notes)


register_op("lowrank_key_attention", "lowrank", build_lowrank,
            "Loki: low-rank scores pick the top-k keys, exact attention over them")
