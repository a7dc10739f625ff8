"""Benchmark cases: what one case is, how op families register their case builders, and how a suite
(a TOML file of case grids, ``attnops/bench/suites/*.toml``, package data) expands into cases.

A family module in ``attnops.bench.cases`` calls :func:`register_op` with a builder that turns a
:class:`CaseSpec` into a :class:`Prepared` case: input factory, the attnops call, the baseline and
extra providers, a float64 reference on sampled query rows, and FLOP/byte counts.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "fwd+bwd")
SHAPE_KEYS = ("B", "H", "Hkv", "Sq", "Sk", "D")


@dataclass(frozen=True)
class CaseSpec:
    """One row of the results table."""

    op: str
    device: str
    dtype: str
    mode: str
    shape: Dict[str, int]  # B, H, Hkv, Sq, Sk, D
    params: Dict[str, Any] = field(default_factory=dict)  # op-specific (causal, mask, ...)

    @property
    def family(self) -> str:
        return OPS[self.op].family

    @property
    def name(self) -> str:
        s = self.shape
        extra = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.params.items()))
        return (f"{self.op}[{extra}] B{s['B']} H{s['H']}/{s['Hkv']} Sq{s['Sq']} Sk{s['Sk']} D{s['D']} "
                f"{self.dtype} {self.mode}")

    @property
    def label(self) -> str:
        """Name for tables and logs: op, parameters, shape, dtype, mode."""
        return self._label(short=False)

    @property
    def short_label(self) -> str:
        """The label for the compact table: mask arguments by value only (``sink_local(8,1)``), ``fwd+bwd`` as
        ``f+b``; the full one is in the wide table, results.json and results.csv."""
        return self._label(short=True)

    def _label(self, short: bool) -> str:
        s = self.shape
        params = []
        for k, v in sorted(self.params.items()):
            if k in ("extras", "mask_args"):
                continue
            if isinstance(v, bool):
                params.append(k if v else "")
            elif k == "mask":
                args = sorted(self.params.get("mask_args", {}).items())
                args = ",".join(_short(b) if short else f"{a}={_short(b)}" for a, b in args)
                params.append(f"{v}({args})")
            else:
                params.append(f"{k}={_short(v)}")
        mode = "f+b" if short and self.mode == "fwd+bwd" else self.mode
        seq = f"N{s['Sq']}" if s["Sq"] == s["Sk"] else f"Sq{s['Sq']} Sk{s['Sk']}"
        heads = f"H{s['H']}" if s["H"] == s["Hkv"] else f"H{s['H']}/{s['Hkv']}"
        dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(self.dtype, self.dtype)
        op = self.op.replace("_attention", "")
        return " ".join(x for x in [op, *params, seq, f"D{s['D']}", heads, f"B{s['B']}", dt, mode] if x)

    def __hash__(self):
        return hash(self.name + self.device)


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_short(x)}" for k, x in sorted(v.items())) + "}"
    return str(v)


@dataclass
class Provider:
    """A way to compute the case: ``prepare(inputs)`` converts one shared input set into what
    ``run`` takes (outside the timed region); ``run(state)`` is timed; ``output(state, result)``
    maps its result back to the op's output layout for the accuracy check. ``same_function``:
    computes what the op computes (so its error against the op's reference is meaningful)."""

    name: str
    run: Callable[[Any], Any]
    prepare: Callable[[Any], Any] = lambda inputs: inputs
    output: Callable[[Any, Any], torch.Tensor] = lambda state, result: result
    same_function: bool = True
    grad_inputs: Callable[[Any], Sequence[torch.Tensor]] = lambda state: ()


@dataclass
class Prepared:
    """A case ready to run."""

    make_inputs: Callable[[], Any]  # one input set (rotated among a few buffers when timing)
    op: Provider  # the attnops call
    baseline: Optional[Provider]  # FlashAttention / SDPA / the family's natural baseline
    extras: List[Provider]  # FlexAttention, xformers, ... where they apply
    # float64 reference of the op's output on the sampled query rows, and the same reference in the
    # case dtype (the yardstick of the DESIGN.md rule): fn(inputs, rows, dtype) -> tensor
    reference: Callable[[Any, torch.Tensor, torch.dtype], torch.Tensor]
    select_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # output, rows -> sampled output
    num_rows: int  # rows to sample from (Sq)
    flops_dense: float  # FLOPs of the dense (unmasked) computation of this shape
    flops_actual: float  # FLOPs the op's pattern really needs
    density: Optional[float] = None
    bytes_moved: Optional[float] = None  # for memory-bound ops (decode): bytes of K/V read
    # approximate ops (low-rank keys): the float64 output of the exact function they stand for on
    # the sampled rows, fn(inputs, rows) -> tensor; the report gives the op's error against it
    exact: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None
    notes: List[str] = field(default_factory=list)  # e.g. why an extra provider is absent


@dataclass
class OpBench:
    family: str
    build: Callable[[CaseSpec], Prepared]
    description: str = ""


OPS: Dict[str, OpBench] = {}


def register_op(name: str, family: str, build: Callable[[CaseSpec], Prepared], description: str = "") -> None:
    OPS[name] = OpBench(family=family, build=build, description=description)


def families() -> List[str]:
    return sorted({o.family for o in OPS.values()})


# ---- suites ---------------------------------------------------------------------------------------

def suites_dir() -> Path:
    env = os.environ.get("ATTNOPS_BENCH_SUITES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "suites"  # shipped in the wheel: works installed


def available_suites() -> List[str]:
    d = suites_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_suite(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = suites_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"unknown suite {name_or_path!r}: no {path}; available: {available_suites()}")
    with open(path, "rb") as f:
        return tomllib.load(f)


def expand_cases(suite: dict, device: Optional[str] = None, dtype: Optional[str] = None,
                 ops: Optional[Sequence[str]] = None, seqlens: Optional[Sequence[int]] = None) -> List[CaseSpec]:
    """Expands the suite's ``[[cases]]`` grids (list values are axes of a Cartesian product) into
    CaseSpecs, applying the CLI overrides. ``N`` sets Sq = Sk; ``params`` holds op-specific keys."""
    out: List[CaseSpec] = []
    for entry in suite.get("cases", []):
        entry = dict(entry)
        op = entry.pop("op")
        if op not in OPS:
            raise ValueError(f"suite case names unknown op {op!r}; registered: {sorted(OPS)}")
        if ops and op not in ops and OPS[op].family not in ops:
            continue
        # params: a dict whose list values are axes, or a list of such dicts (alternatives)
        alternatives = entry.pop("params", {})
        if isinstance(alternatives, dict):
            alternatives = [alternatives]
        axes = {k: v if isinstance(v, list) else [v] for k, v in entry.items()}
        if seqlens:
            axes["N"] = list(seqlens)
            axes.pop("Sq", None), axes.pop("Sk", None)
        keys = list(axes)
        for values in itertools.product(*axes.values()):
            row = dict(zip(keys, values))
            for params in alternatives:
                param_axes = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
                for pvalues in itertools.product(*param_axes.values()):
                    out.append(_spec(op, row, dict(zip(param_axes, pvalues)), device, dtype))
    seen, unique = set(), []
    for c in out:
        if c.name + c.device not in seen:
            seen.add(c.name + c.device)
            unique.append(c)
    return unique


def _spec(op: str, row: dict, params: dict, device: Optional[str], dtype: Optional[str]) -> CaseSpec:
    row = dict(row)
    n = row.pop("N", None)
    if n is not None:
        row.setdefault("Sq", n)
        row.setdefault("Sk", n)
    row.setdefault("Hkv", row.get("H"))
    if op == "decode_attention":  # new tokens default to one decoding step
        row.setdefault("Sq", 1)
    missing = [k for k in SHAPE_KEYS if k not in row]
    if missing:
        raise ValueError(f"case for {op} lacks {missing} (give N or Sq/Sk, and B, H, D)")
    mode = row.pop("mode", "fwd")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    case_dtype = dtype or row.pop("dtype", "float32")
    row.pop("dtype", None)
    if case_dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {case_dtype!r}")
    case_device = device or row.pop("device", "cpu")
    row.pop("device", None)
    shape = {k: int(row.pop(k)) for k in SHAPE_KEYS}
    params = {**row, **params}  # remaining keys (causal, mask, ...) are op parameters
    return CaseSpec(op=op, device=case_device, dtype=case_dtype, mode=mode, shape=shape, params=params)
