"""Benchmark output: the terminal table, results.json / results.csv with the environment, PNG plots."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch

from attnops.bench.plots import machine_name
from attnops.bench.runner import OP, CaseResult


def environment(device: str, threads: int) -> dict:
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "attnops": _attnops_version(),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": _device_name(device),
        "threads": threads,
        "timing": ("torch.utils.benchmark, providers interleaved, median of repeats after warm-up"
                   if not device.startswith("cuda") else "triton.testing.do_bench (median)"),
    }
    if not device.startswith("cuda"):
        from attnops.core.backends import cpu_isa

        isa = cpu_isa()
        env["cpu_kernels_isa"] = isa["kernels"]
        env["cpu_bf16_dot"] = isa["bf16_dot"] and isa["kernels"] in ("avx512", "amx")  # bf16 products (AVX512-BF16)
        env["cpu_bf16_brgemm"] = isa["bf16_brgemm"]  # ... through oneDNN's brgemm (the amx level)
        env["cpu_flags"] = " ".join(isa["cpu"])
    return env


def _attnops_version() -> str:
    import attnops

    return attnops.__version__


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


# ---- files -----------------------------------------------------------------------------------------

def write_results(results: List[CaseResult], env: dict, out_dir: Path, plots: bool = True) -> Dict[str, Path]:
    """results.json and results.csv (and the plots unless ``plots=False``: the runner rewrites the
    tables after every case, so a run cut short still leaves what it measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv"}
    with open(paths["json"], "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1, default=str)
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(paths["csv"], "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in env.items()))
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
    if plots:
        from attnops.bench.plots import write_plots  # matplotlib only when plotting

        paths.update(write_plots(results, env, out_dir))
    return paths


# ---- terminal ----------------------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


# The compact table's widths: it fits a 100-column terminal (case names longer than this are cut with an ellipsis).
COMPACT_WIDTH = 100
_CASE_WIDTH = 52


def render_table(results: List[CaseResult], env: dict, console=None, wide: bool = False):
    """The results table: compact by default (case, ms, baseline ms, speedup, error ratio: fits
    :data:`COMPACT_WIDTH` columns), every column with ``wide`` (``--wide``). results.json / .csv hold all."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        import shutil

        # Logs and CI are not terminals: rich would wrap the wide table at 80 columns.
        console = Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160 if wide else COMPACT_WIDTH))
    isa = f" (CPU: {env.get('cpu_flags') or '?'})" if env.get("cpu_kernels_isa") and wide else ""
    title = (f"attnops {env['attnops']} ({env['git_commit']}) — {machine_name(env)}{isa}, "
             f"torch {env['torch']}, {env['threads']} threads")
    if not wide:
        return _render_compact(results, title, console)
    table = Table(title=title, show_lines=False)
    extras = sorted({e for r in results for e in r.extras})
    approx = any(r.approx_err is not None for r in results)  # approximate ops: error vs the exact function
    for col in ["case", "status", "ms", "baseline", "base ms", "speedup", *[f"{e} ms" for e in extras],
                "TF/s eq/act", "GB/s (% copy)", "MiB", "max err", "err/base", *(["vs exact"] if approx else [])]:
        table.add_column(col, justify="left" if col in ("case", "status", "baseline") else "right")
    for r in results:
        acc = r.accuracy
        status = {"ok": "[green]ok[/]", "FAILED": "[red]FAILED[/]", "error": "[red]error[/]"}[r.status]
        ok = r.status == "ok"
        table.add_row(
            r.spec.label, status,
            _fmt(r.ms(OP)) if ok else "—",
            r.baseline or "—",
            _fmt(r.ms(r.baseline)) if ok and r.baseline else "—",
            f"[bold]{r.speedup:.2f}x[/]" if r.speedup else "—",
            *[_fmt(r.ms(e)) if ok else "—" for e in extras],
            f"{_fmt(r.tflops('dense'), '.2f')}/{_fmt(r.tflops('actual'), '.2f')}" if ok else "—",
            (f"{r.gbps:.1f} ({100 * r.bandwidth_fraction:.0f}%)" if r.bandwidth_fraction else _fmt(r.gbps, ".1f")),
            _fmt(r.memory_mb.get(OP), ".1f"),
            _fmt(acc.err_max if acc else None, ".1e"),
            _fmt(acc.ratio_to(r.baseline) if acc and r.baseline else None, ".2f"),
            *([_fmt(r.approx_err, ".1e")] if approx else []),
        )
    console.print(table)
    _print_failures_and_notes(results, console)
    return table


def _speedup_cell(r: CaseResult) -> str:
    if r.status != "ok":
        return {"FAILED": "[red]FAILED[/]", "error": "[red]error[/]"}[r.status]
    return f"[bold]{r.speedup:.2f}x[/]" if r.speedup else "—"


def _render_compact(results: List[CaseResult], title: str, console):
    from rich.table import Table

    table = Table(title=title, width=COMPACT_WIDTH, show_lines=False, pad_edge=False)
    table.add_column("case", justify="left", max_width=_CASE_WIDTH, no_wrap=True, overflow="ellipsis")
    for col in ("ms", "base ms", "speedup", "err/base"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        ok, acc = r.status == "ok", r.accuracy
        table.add_row(r.spec.short_label, _fmt(r.ms(OP)) if ok else "—",
                      _fmt(r.ms(r.baseline)) if ok and r.baseline else "—", _speedup_cell(r),
                      _fmt(acc.ratio_to(r.baseline) if acc and r.baseline else None, ".2f"))
    console.print(table)
    baselines = sorted({r.baseline for r in results if r.baseline})
    console.print(f"baseline: {', '.join(baselines) or '—'}; err/base: max error over the baseline's (both against "
                  "float64); --wide: every column (extras, TF/s, GB/s, MiB); results.json / .csv: everything")
    _print_failures_and_notes(results, console)
    return table


def _print_failures_and_notes(results: List[CaseResult], console) -> None:
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        console.print(f"[red]{r.status}[/] {r.spec.label}: {r.message.splitlines()[0] if r.message else ''}")
    notes = sorted({n for r in results for n in r.notes if n})
    if notes:
        console.print("notes: " + "; ".join(notes))
