"""Benchmark cases of KV-cache decoding: ``decode_attention`` (family "mqa").

Shape keys: B, H, Hkv, D, Sk (cache length; every sequence full), Sq (new tokens, default 1).
With ``block_map = true`` the op runs with ``return_block_map=True`` against itself without (the
block-map issue's <= 1.6x target). Cache layouts, against the op on the contiguous cache holding the same keys
(prepared outside the timed region): ``leftpad = f`` left-pads each sequence by a pad drawn in ``[0, f * Sk)``
(``cache_leftpad``; against the keys moved to the cache's start, or flash_attn with the same pads on a GPU);
``page = p`` reads the cache from ``p``-row pages shuffled in a pool (``block_table``).
Baseline: ``flash_attn.flash_attn_with_kvcache`` on a GPU when importable, else torch SDPA on the
same cache (pre-transposed to SDPA's (B, H, S, D) layout outside the timed region). The harness
reports the K/V bytes read per second and, for memory-bound cases, the fraction of the copy
bandwidth it measures in the same run.
"""

from __future__ import annotations

import torch

import attnops
from attnops.core import dispatch
from attnops.bench import baselines
from attnops.bench.registry import DTYPES, CaseSpec, Prepared, Provider, register_op
from attnops.ops.decode import reference


def build_decode(spec: CaseSpec) -> Prepared:
    s, dtype = spec.shape, DTYPES[spec.dtype]
    B, Sq, H, Hkv, S, D = s["B"], s["Sq"], s["H"], s["Hkv"], s["Sk"], s["D"]
    splits = int(spec.params.get("num_splits", 0))

    def make():
        q = torch.randn(B, Sq, H, D, dtype=dtype, device=spec.device)
        k = torch.randn(B, S, Hkv, D, dtype=dtype, device=spec.device)
        v = torch.randn(B, S, Hkv, D, dtype=dtype, device=spec.device)
        return q, k, v, torch.full((B,), S, dtype=torch.int32, device=spec.device)

    op = Provider(name="attnops", run=lambda st: attnops.decode_attention(*st, num_splits=splits))
    notes = []
    baseline = None
    layout = _layout(spec, make, splits)
    pads = None
    if layout is not None:
        make, op, baseline, pads = layout
    elif spec.params.get("block_map"):
        baseline = Provider(name="no map", run=op.run)
        op = Provider(name="attnops", run=lambda st: attnops.decode_attention(*st, num_splits=splits,
                                                                              return_block_map=True),
                      output=lambda st, r: r.out)
    elif spec.device.startswith("cuda"):
        try:
            from flash_attn import flash_attn_with_kvcache

            baseline = Provider(name="flash_attn", run=lambda st: flash_attn_with_kvcache(
                st[0], st[1], st[2], cache_seqlens=st[3], causal=True))
        except ImportError:
            notes.append("flash_attn not importable")
    if baseline is None:
        sdpa, _ = baselines.sdpa_provider(False, spec.device, False, same_function=Sq == 1)
        baseline = Provider(name=sdpa.name, run=sdpa.run, prepare=lambda st: sdpa.prepare(st[:3]),
                            output=sdpa.output, same_function=Sq == 1)

    def ref(inputs, rows, dtype_):
        # one sequence and kv head at a time: a float64 copy of a 128K-token MHA cache is 8.6 GB per
        # sequence, and with the reference's own copies the whole-sequence form ran out of memory
        q, k, v, lens = inputs[:4]
        G = H // Hkv
        outs = []
        for b in range(B):
            heads = []
            left = None if pads is None else pads[b:b + 1]
            for hk in range(Hkv):
                cast = [t[b:b + 1, :, hk * n:(hk + 1) * n].detach().cpu().to(dtype_)
                        for t, n in ((q, G), (k, 1), (v, 1))]
                heads.append(reference.decode_attention(*cast, lens[b:b + 1].cpu(), None, window_size=(-1, -1),
                                                        softmax_scale=D ** -0.5, cache_leftpad=left)[0][:, rows])
            outs.append(torch.cat(heads, dim=2))
        return torch.cat(outs)

    keys = B * S - (0 if pads is None else int(pads.sum()))  # the keys the sequences hold
    kv_bytes = 2.0 * keys * Hkv * D * torch.tensor([], dtype=dtype).element_size()
    flops = 4.0 * H * Sq * keys * D
    extras = []
    if spec.device.startswith("cuda") and dispatch.is_available("cuda") and layout is None:
        # The GPU default is the Triton kernel; the hand-written CUDA kernel is the extra column.
        extras.append(Provider(name="attnops-cuda", run=lambda st: attnops.decode_attention(
            *st, num_splits=splits, backend="cuda")))
    return Prepared(make_inputs=make, op=op, baseline=baseline, extras=extras, reference=ref,
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=Sq, flops_dense=flops,
                    flops_actual=flops, bytes_moved=kv_bytes, notes=notes)


def _layout(spec: CaseSpec, make, splits):
    """``(make, op, baseline, pads)`` of a cache-layout case (``leftpad``, ``page``), else None. The inputs are the
    contiguous cache's ``(q, k, v, lens)`` plus the layout's own tensors; the baseline reads the contiguous cache
    with the same keys, so both compute one function (the reference reads the contiguous form)."""
    frac, page = float(spec.params.get("leftpad", 0)), int(spec.params.get("page", 0))
    if not frac and not page:
        return None
    B, S = spec.shape["B"], spec.shape["Sk"]
    g = torch.Generator().manual_seed(0)
    pads = (torch.rand(B, generator=g) * frac * S).to(torch.int32) if frac else None

    def make_layout():
        q, k, v, lens = make()
        if pads is None:  # pages of the contiguous cache, in a shuffled pool
            per_seq = -(-S // page)
            order = torch.randperm(B * per_seq, generator=g).to(spec.device)
            table = order.view(B, per_seq).to(torch.int32)

            def pool(t):
                padded = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, per_seq * page - S))
                out = torch.empty_like(padded).view(B * per_seq, page, *t.shape[2:])
                out[order] = padded.reshape(B * per_seq, page, *t.shape[2:])
                return out

            return q, k, v, lens, pool(k), pool(v), table
        return q, k, v, lens, pads.to(spec.device)

    if pads is None:
        op = Provider(name="attnops", run=lambda st: attnops.decode_attention(
            st[0], st[4], st[5], st[3], block_table=st[6], num_splits=splits))
        baseline = Provider(name="contiguous", run=lambda st: attnops.decode_attention(*st[:4], num_splits=splits))
        return make_layout, op, baseline, None

    def compact(st):  # each sequence's keys moved to the cache's start (the baseline's cache)
        q, k, v, lens, left = st
        kc, vc = torch.zeros_like(k), torch.zeros_like(v)
        for b in range(k.shape[0]):
            n = int(lens[b] - left[b])
            kc[b, :n], vc[b, :n] = k[b, int(left[b]):int(lens[b])], v[b, int(left[b]):int(lens[b])]
        return q, kc, vc, lens - left

    op = Provider(name="attnops", run=lambda st: attnops.decode_attention(*st[:4], cache_leftpad=st[4],
                                                                          num_splits=splits))
    baseline = Provider(name="keys at start", prepare=compact,
                        run=lambda st: attnops.decode_attention(*st, num_splits=splits))
    if spec.device.startswith("cuda"):
        try:
            from flash_attn import flash_attn_with_kvcache

            baseline = Provider(name="flash_attn", run=lambda st: flash_attn_with_kvcache(
                st[0], st[1], st[2], cache_seqlens=st[3], cache_leftpad=st[4], causal=True))
        except ImportError:
            pass
    return make_layout, op, baseline, pads


register_op("decode_attention", "mqa", build_decode, "split-KV decoding against a KV cache (MQA/GQA)")
