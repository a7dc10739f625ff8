"""Benchmark cases of packed sequences: ``varlen_attention`` (family "varlen").

``N`` tokens (Sq = Sk) are cut into ``docs`` sequences of random lengths (fixed by ``seed``), packed as
flash_attn's varlen layout. The baseline is the sum of per-sequence ``attnops.attention`` calls on the
same tokens (issue 20's target: varlen within 1.15x of it); the extra provider is torch SDPA on the padded
batch (each sequence padded to the longest; target: faster than it by at least 0.8 x the padding ratio).

Parameters: docs (int, default 8), seed (int, default 0), causal (bool, default true).
"""

from __future__ import annotations

from typing import List

import torch

import attnops
from attnops.bench import baselines
from attnops.bench.registry import DTYPES, CaseSpec, Prepared, Provider, register_op
from attnops.ops.softmax import reference


def doc_lengths(total: int, docs: int, seed: int) -> List[int]:
    """``docs`` positive lengths summing to ``total``: cuts drawn uniformly without repeats."""
    if not 1 <= docs <= total:
        raise ValueError(f"docs must lie in [1, N], got {docs} for N = {total}")
    g = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(total - 1, generator=g)[:docs - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


def build_varlen(spec: CaseSpec) -> Prepared:
    s = spec.shape
    if s["B"] != 1 or s["Sq"] != s["Sk"]:
        raise ValueError("varlen cases pack one row: B = 1 and Sq = Sk (N)")
    causal = bool(spec.params.get("causal", True))
    lengths = doc_lengths(s["Sq"], int(spec.params.get("docs", 8)), int(spec.params.get("seed", 0)))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_dev, longest = cu.to(spec.device), max(lengths)
    dtype, needs_grad = DTYPES[spec.dtype], spec.mode == "fwd+bwd"
    wrap = baselines.with_backward if needs_grad else (lambda p: p)

    def make():
        q = torch.randn(s["Sq"], s["H"], s["D"], dtype=dtype, device=spec.device)
        k = torch.randn(s["Sk"], s["Hkv"], s["D"], dtype=dtype, device=spec.device)
        v = torch.randn(s["Sk"], s["Hkv"], s["D"], dtype=dtype, device=spec.device)
        return tuple(t.requires_grad_(needs_grad) for t in (q, k, v))

    def packed(st):
        q, k, v = st
        return attnops.varlen_attention(q, k, v, cu_dev, cu_dev, longest, longest, causal=causal)

    def per_document(st):
        q, k, v = st
        return torch.cat([attnops.attention(q[None, a:a + n], k[None, a:a + n], v[None, a:a + n], causal=causal)[0]
                          for a, n in zip(starts, lengths)])

    def padded(inputs):
        """(docs, H, longest, D) leaves, and the key mask of a non-causal call (causal: right padding sits
        after every valid query, so causal alone already hides it)."""
        out = []
        for t in inputs:
            x = t.detach().new_zeros(len(lengths), longest, *t.shape[1:])
            for i, (a, n) in enumerate(zip(starts, lengths)):
                x[i, :n] = t.detach()[a:a + n]
            out.append(x.transpose(1, 2).requires_grad_(needs_grad))
        return tuple(out)

    valid = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    key_mask = None if causal else valid[:, None, None, :].to(spec.device)

    def sdpa_padded(st):
        q, k, v = st
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=causal,
                                                                enable_gqa=q.shape[1] != k.shape[1])

    def unpad(st, out):
        return out.transpose(1, 2)[valid.to(out.device)]

    def ref(inputs, rows, dtype_):
        q, k, v = (t.detach().to("cpu", dtype_) for t in inputs)
        doc = torch.searchsorted(cu[1:].to(torch.int64), rows.to(torch.int64), right=True)
        out = q.new_empty(rows.numel(), *q.shape[1:])
        for d in doc.unique().tolist():
            pick = (doc == d).nonzero().flatten()
            a, n = starts[d], lengths[d]
            o, _ = reference.block_sparse_attention_rows(q[None, a:a + n], k[None, a:a + n], v[None, a:a + n], None,
                                                         rows[pick] - a, causal=causal, window_size=(-1, -1),
                                                         softmax_scale=s["D"] ** -0.5)
            out[pick] = o[0]
        return out

    grads = lambda st: st  # noqa: E731
    op = wrap(Provider(name="attnops", run=packed, grad_inputs=grads))
    base = wrap(Provider(name="per-document", run=per_document, grad_inputs=grads))
    sdpa = wrap(Provider(name="sdpa (padded)", prepare=padded, run=sdpa_padded, output=unpad, grad_inputs=grads))
    factor = 3.5 if needs_grad else 1.0
    per_pair = 4.0 * s["D"] * factor * s["H"]
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lengths)
    padding = len(lengths) * longest / s["Sq"]
    return Prepared(
        make_inputs=make, op=op, baseline=base, extras=[sdpa], reference=ref,
        select_rows=lambda out, rows: out[rows.to(out.device)], num_rows=s["Sq"],
        flops_dense=per_pair * s["Sq"] * s["Sk"], flops_actual=per_pair * pairs,
        notes=[f"{len(lengths)} sequences, longest {longest}, padding ratio {padding:.2f} "
               f"(padded tokens / packed tokens)"],
    )


register_op("varlen_attention", "varlen", build_varlen,
            "packed sequences (cu_seqlens) against per-sequence calls and padded SDPA")
