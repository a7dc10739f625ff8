"""Benchmark cases of the block-sparse core: ``attention`` (family "dense": full, causal, window)
and ``block_sparse_attention`` (family "sparse": any BlockMask constructor).

Parameters (suite ``params`` or case keys):
  attention:              causal (bool), window ([left, right], default [-1, -1])
  block_sparse_attention: mask (a BlockMask constructor name), mask_args (dict), block_size (int)
  both:                   block_map (bool): time the forward with its block map (return_block_map)
                          against the same forward without it (the block-map issue's <= 1.6x target)
                          score_mod ("softcap" | "alibi" | "sinks" | "dropout"): time the op with that
                          modifier (dropout: p = 0.1, the mask of a fixed seed) against the same op
                          without it (issue 21: within 1.10x; dropout fwd+bwd within 1.3x)
  attention:              attn_bias ("float" | "bool"): a (1, H, Sq, Sk) additive bias / mask, against
                          SDPA with the same attn_mask (issue 21: at least as fast)
The baseline of a sparse case is *dense* non-causal FlashAttention / SDPA of the same shape: the
speedup then reads against the density of the mask (the target of the core issue is >= 0.8 / d).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import attnops
from attnops import BlockMask
from attnops.bench import baselines
from attnops.bench.registry import DTYPES, CaseSpec, Prepared, Provider, register_op
from attnops.core.checks import additive_mask, draw_dropout_seed
from attnops.ops.softmax import reference

# Float64 reference rows are computed in chunks of at most this many scores.
_REF_CHUNK_SCORES = 1 << 23


def qkv_inputs(spec: CaseSpec):
    s, dtype = spec.shape, DTYPES[spec.dtype]
    needs_grad = spec.mode == "fwd+bwd"

    def make():
        q = torch.randn(s["B"], s["Sq"], s["H"], s["D"], dtype=dtype, device=spec.device)
        k = torch.randn(s["B"], s["Sk"], s["Hkv"], s["D"], dtype=dtype, device=spec.device)
        v = torch.randn(s["B"], s["Sk"], s["Hkv"], s["D"], dtype=dtype, device=spec.device)
        return tuple(t.requires_grad_(needs_grad) for t in (q, k, v))

    return make


def dense_baseline(causal: bool, spec: CaseSpec, needs_grad: bool, inputs_of=lambda st: st):
    """The dense attention an approximate or composed op stands against (FlashAttention on a GPU, else torch SDPA),
    on ``inputs_of(state)`` (the q, k, v among the op's inputs): ``(provider, notes)``; not the same function."""
    inner, note = baselines.flash_attn_provider(causal, (-1, -1), spec.device, needs_grad)
    notes = [note] if inner is None else []
    if inner is None:
        inner, _ = baselines.sdpa_provider(causal, spec.device, needs_grad, same_function=False)
    return Provider(name=inner.name, run=inner.run, prepare=lambda st: inner.prepare(inputs_of(st)),
                    output=inner.output, same_function=False, grad_inputs=inner.grad_inputs), notes


def op_case(spec: CaseSpec, make, run, baseline: Provider, notes, ref, actual: float, dense: float, *,
            exact=None, density: Optional[float] = None) -> Prepared:
    """The case from its pieces: the op timed (with its backward for fwd+bwd) beside the dense baseline;
    ``exact``: for approximate ops, the exact function's float64 rows (the "vs exact" column)."""
    wrap = baselines.with_backward if spec.mode == "fwd+bwd" else (lambda prov: prov)
    return Prepared(make_inputs=make, op=wrap(Provider(name="attnops", run=run, grad_inputs=lambda st: st)),
                    baseline=wrap(baseline), extras=[], reference=ref, exact=exact,
                    select_rows=lambda out, rows: out[:, rows.to(out.device)], num_rows=spec.shape["Sq"],
                    flops_dense=dense, flops_actual=actual, density=density, notes=notes)


def reference_rows(mask: Optional[BlockMask], causal: bool, window: Tuple[int, int], scale: float,
                   mods: Optional[dict] = None):
    """fn(inputs, rows, dtype) -> reference output rows (B, R, H, D), in row chunks; ``mods``: the op's
    score modifiers."""
    mods = {n: (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for n, t in (mods or {}).items()}

    def ref(inputs, rows, dtype):
        q, k, v = (t.detach().to("cpu", dtype) for t in inputs)
        m = None if mask is None else mask.to("cpu")
        B, _, H, _ = q.shape
        chunk = max(1, _REF_CHUNK_SCORES // max(1, B * H * k.shape[1]))
        outs = [reference.block_sparse_attention_rows(q, k, v, m, rows[i:i + chunk], causal=causal,
                                                      window_size=window, softmax_scale=scale, **mods)[0]
                for i in range(0, rows.numel(), chunk)]
        return torch.cat(outs, dim=1)

    return ref


def _pairs_dense(Sq: int, Sk: int, causal: bool, window: Tuple[int, int]) -> float:
    """Exact number of (query, key) pairs the predicates keep."""
    left, right = window
    if causal:
        right = 0
    pos = torch.arange(Sq, dtype=torch.float64) + (Sk - Sq)
    lo = torch.zeros(Sq, dtype=torch.float64) if left < 0 else (pos - left).clamp(0, Sk)
    hi = torch.full((Sq,), float(Sk), dtype=torch.float64) if right < 0 else (pos + right + 1).clamp(0, Sk)
    return float((hi - lo).clamp(min=0).sum())


def _pairs_blocks(mask: BlockMask) -> float:
    """(query, key) pairs inside the listed blocks (what the kernel computes), summed over B and H."""
    (sq, sk), (bq, bk) = mask.seq_lengths, mask.block_size
    nq, nk = mask.num_blocks
    rows = torch.clamp(sq - torch.arange(nq) * bq, max=bq).double()
    cols = torch.clamp(sk - torch.arange(nk) * bk, max=bk).double()
    return float((mask.to_dense().cpu().double() * rows[:, None] * cols[None, :]).sum())


def _flops(spec: CaseSpec, pairs_per_head: float) -> Tuple[float, float]:
    s = spec.shape
    factor = 3.5 if spec.mode == "fwd+bwd" else 1.0  # bwd = 2.5 x fwd (flash_attn's convention)
    per_pair = 4.0 * s["D"] * factor
    return per_pair * s["B"] * s["H"] * s["Sq"] * s["Sk"], per_pair * pairs_per_head


def _providers(spec: CaseSpec, op_run, mask, causal, window, baseline_causal, same_function):
    needs_grad = spec.mode == "fwd+bwd"
    wrap = baselines.with_backward if needs_grad else (lambda p: p)
    op = wrap(Provider(name="attnops", run=op_run, grad_inputs=lambda st: st))
    notes = []
    baseline, note = baselines.flash_attn_provider(baseline_causal, (-1, -1), spec.device, needs_grad)
    if baseline is None:
        notes.append(note)
        baseline, _ = baselines.sdpa_provider(baseline_causal, spec.device, needs_grad, same_function)
    else:
        baseline.same_function = same_function
    extras = []
    if spec.params.get("extras", True):
        for factory in (
            lambda: baselines.flex_provider(mask, causal, window, spec.shape, spec.device, needs_grad),
            lambda: baselines.xformers_provider(causal, spec.device, needs_grad, spec.shape),
        ):
            p, note = factory()
            if p is None:
                notes.append(note)
            else:
                extras.append(wrap(p))
    return op, wrap(baseline), extras, notes


def _map_overhead(spec: CaseSpec, op_run):
    """Providers of a block_map case: the op with its map, baseline the op without it."""
    if spec.mode != "fwd":
        raise ValueError("block_map cases time the forward (mode = 'fwd')")
    with_map = Provider(name="attnops", run=lambda st: op_run(st, return_block_map=True),
                        output=lambda st, result: result.out)
    return with_map, Provider(name="no map", run=op_run), [], []


def _reference_bias(bias: Optional[torch.Tensor]) -> dict:
    """The reference's additive form of a case's attn_bias."""
    if bias is None:
        return {}
    if bias.dtype == torch.bool:
        bias = additive_mask(bias, torch.float32)
    return {"attn_bias": bias.double()}


_DROPOUT_SEED = 0


def _dropout_generator(device) -> torch.Generator:
    """A generator in the state every timed call starts from: each call drops the same pairs, the ones the
    reference is given."""
    return torch.Generator(device=device).manual_seed(_DROPOUT_SEED)


def score_mods(spec: CaseSpec) -> dict:
    """The case's ``score_mod`` as op arguments, fixed by the seed: softcap 5 (scores of unit inputs are
    O(1): the cap bites), ALiBi's geometric slopes, sinks N(0, 1), dropout 0.1."""
    name = spec.params.get("score_mod")
    H = spec.shape["H"]
    if name is None:
        return {}
    if name == "softcap":
        return dict(softcap=5.0)
    if name == "alibi":
        return dict(alibi_slopes=torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=spec.device))
    if name == "sinks":
        return dict(sinks=torch.randn(H, generator=torch.Generator().manual_seed(0)).to(spec.device))
    if name == "dropout":
        return dict(dropout_p=0.1)
    raise ValueError(f"unknown score_mod {name!r}: softcap, alibi, sinks or dropout")


def _reference_mods(spec: CaseSpec, mods: dict) -> dict:
    """The reference's form of the op's modifiers: dropout as the seed the op draws."""
    if "dropout_p" not in mods:
        return mods
    return dict(mods, dropout_seed=draw_dropout_seed(_dropout_generator(spec.device), torch.device("cpu")))


def _call_mods(spec: CaseSpec, mods: dict) -> dict:
    """The op's modifiers for one call (dropout: a generator in the fixed state)."""
    return dict(mods, generator=_dropout_generator(spec.device)) if "dropout_p" in mods else mods


def attn_bias_of(spec: CaseSpec) -> Optional[torch.Tensor]:
    """The case's ``attn_bias``: a (1, H, Sq, Sk) float bias N(0, 1), or a bool mask keeping 70% of the
    pairs (and every diagonal, so no row is empty), fixed by the seed."""
    kind = spec.params.get("attn_bias")
    if kind is None:
        return None
    s = spec.shape
    g = torch.Generator().manual_seed(0)
    if kind == "float":
        return torch.randn(1, s["H"], s["Sq"], s["Sk"], generator=g).to(spec.device)
    if kind == "bool":
        keep = torch.rand(1, s["H"], s["Sq"], s["Sk"], generator=g) < 0.7
        return (keep | torch.eye(s["Sq"], s["Sk"], dtype=torch.bool)).to(spec.device)
    raise ValueError(f"unknown attn_bias {kind!r}: float or bool")


def _bias_providers(spec: CaseSpec, op_run, bias: torch.Tensor, causal: bool):
    """The op with ``attn_bias`` against SDPA with the same ``attn_mask`` (bool: True attends in both)."""
    needs_grad = spec.mode == "fwd+bwd"
    wrap = baselines.with_backward if needs_grad else (lambda p: p)
    op = wrap(Provider(name="attnops", run=lambda st: op_run(st, attn_bias=bias), grad_inputs=lambda st: st))
    base, _ = baselines.sdpa_provider(causal, spec.device, needs_grad, True, attn_mask=bias)
    return op, wrap(base), [], []


def _mod_overhead(spec: CaseSpec, op_run, mods: dict):
    """Providers of a score_mod case: the op with the modifier, baseline the op without it."""
    wrap = baselines.with_backward if spec.mode == "fwd+bwd" else (lambda p: p)
    grads = lambda st: st  # noqa: E731
    return (wrap(Provider(name="attnops", run=lambda st: op_run(st, **_call_mods(spec, mods)), grad_inputs=grads)),
            wrap(Provider(name="no modifier", run=op_run, grad_inputs=grads, same_function=False)), [], [])


def build_attention(spec: CaseSpec) -> Prepared:
    s = spec.shape
    causal = bool(spec.params.get("causal", False))
    window = tuple(spec.params.get("window", (-1, -1)))
    scale = s["D"] ** -0.5
    mods = score_mods(spec)
    bias = attn_bias_of(spec)
    op_run = lambda st, **kw: attnops.attention(*st, causal=causal, window_size=window, **kw)  # noqa: E731
    # SDPA/FA have no window here; a windowed case still compares with dense attention of the
    # same causality. SDPA aligns causal top-left, so Sq != Sk is a different function there.
    same = window == (-1, -1) and (not causal or s["Sq"] == s["Sk"])
    if spec.params.get("block_map"):
        op, base, extras, notes = _map_overhead(spec, op_run)
    elif mods:
        op, base, extras, notes = _mod_overhead(spec, op_run, mods)
    elif bias is not None:
        op, base, extras, notes = _bias_providers(spec, op_run, bias, causal)
    else:
        op, base, extras, notes = _providers(spec, op_run, None, causal, window, causal, same)
    dense, actual = _flops(spec, _pairs_dense(s["Sq"], s["Sk"], causal, window) * s["B"] * s["H"])
    return Prepared(
        make_inputs=qkv_inputs(spec), op=op, baseline=base, extras=extras,
        reference=reference_rows(None, causal, window, scale,
                                 dict(_reference_mods(spec, mods), **_reference_bias(bias))),
        select_rows=lambda out, rows: out[:, rows.to(out.device)],
        num_rows=s["Sq"], flops_dense=dense, flops_actual=actual, notes=notes,
    )


def build_mask(spec: CaseSpec) -> BlockMask:
    s = spec.shape
    name = spec.params.get("mask", "causal")
    args = dict(spec.params.get("mask_args", {}))
    block = spec.params.get("block_size", 64)
    ctor = getattr(BlockMask, name, None)
    if ctor is None or name.startswith("_") or name in ("to", "from_dense", "to_dense"):
        raise ValueError(f"unknown BlockMask constructor {name!r}")
    if name == "random":
        args.setdefault("num_heads", s["H"])
        args.setdefault("batch", s["B"])
    return ctor((s["Sq"], s["Sk"]), **args, block_size=block, device=spec.device)


def build_block_sparse(spec: CaseSpec) -> Prepared:
    s = spec.shape
    mask = build_mask(spec)
    if spec.mode == "fwd+bwd":
        mask.q_num_blocks  # the transpose is part of building a mask, not of each call
    scale = s["D"] ** -0.5
    op_run = lambda st, **kw: attnops.block_sparse_attention(*st, mask, **kw)  # noqa: E731
    if spec.params.get("block_map"):
        op, base, extras, notes = _map_overhead(spec, op_run)
    else:
        op, base, extras, notes = _providers(spec, op_run, mask, mask.causal, mask.window_size, False, False)
    dense, actual = _flops(spec, _pairs_blocks(mask) * (s["B"] // mask.shape[0]) * (s["H"] // mask.shape[1]))
    return Prepared(
        make_inputs=qkv_inputs(spec), op=op, baseline=base, extras=extras,
        reference=reference_rows(mask, mask.causal, mask.window_size, scale),
        select_rows=lambda out, rows: out[:, rows.to(out.device)],
        num_rows=s["Sq"], flops_dense=dense, flops_actual=actual, density=mask.density, notes=notes,
    )


register_op("attention", "dense", build_attention, "exact attention: full, causal, sliding window; GQA/MQA")
register_op("block_sparse_attention", "sparse", build_block_sparse, "exact attention on a BlockMask")
