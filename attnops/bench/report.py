"""Benchmark output: the terminal table, results.json / results.csv with the environment, PNG plots."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

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
        env["cpu_bf16_dot"] = isa["bf16_dot"] and isa["kernels"] == "avx512"  # bf16 products on AVX512-BF16
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
        paths.update(write_plots(results, env, out_dir))
    return paths


def write_plots(results: List[CaseResult], env: dict, out_dir: Path) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: Dict[str, Path] = {}
    ok = [r for r in results if r.status == "ok" and r.ms(OP)]
    # time vs sequence length, one panel per (op, params, mode, dtype) group with >= 2 lengths
    groups = defaultdict(list)
    for r in ok:
        s = r.spec
        key = (s.op, json.dumps(s.params, sort_keys=True), s.mode, s.dtype, s.shape["B"], s.shape["H"],
               s.shape["Hkv"], s.shape["D"])
        groups[key].append(r)
    groups = {k: v for k, v in groups.items() if len({r.spec.shape["Sk"] for r in v}) >= 2}
    if groups:
        n = len(groups)
        cols = min(3, n)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, (key, rs) in zip(axes.flat, groups.items()):
            rs = sorted(rs, key=lambda r: r.spec.shape["Sk"])
            xs = [r.spec.shape["Sk"] for r in rs]
            names = [OP] + sorted({n for r in rs for n in ([r.baseline] if r.baseline else []) + r.extras})
            for name in names:
                pts = [(x, r.ms(name)) for x, r in zip(xs, rs) if r.ms(name)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name == OP else 1.2)
            op, params, mode, dtype = key[:4]
            ax.set_title(f"{op} {params} {mode} {dtype}", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"attnops {env['git_commit']} on {_machine(env)}, {env['threads']} threads", fontsize=9)
        fig.tight_layout()
        paths["time_vs_seqlen"] = out_dir / "time_vs_seqlen.png"
        fig.savefig(paths["time_vs_seqlen"], dpi=110)
        plt.close(fig)
    sparse = [r for r in ok if r.density is not None and r.speedup]
    if sparse:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in sparse:
            ax.scatter(r.density, r.speedup, s=30)
            label = r.spec.params.get("mask", r.spec.op)
            ax.annotate(f"{label} N={r.spec.shape['Sk']} {r.spec.mode}", (r.density, r.speedup), fontsize=6)
        d = sorted({r.density for r in sparse})
        lo, hi = min(d) * 0.8, max(d) * 1.2
        grid = [lo + (hi - lo) * i / 50 for i in range(51)]
        ax.plot(grid, [1 / x for x in grid], "k--", linewidth=0.8, label="1/d (ideal)")
        ax.plot(grid, [0.8 / x for x in grid], "k:", linewidth=0.8, label="0.8/d")
        ax.set_xscale("log")
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter

        ax.xaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
        ax.set_xlabel("block density d")
        ax.set_ylabel("speedup over dense baseline")
        ax.legend(fontsize=7)
        ax.set_title(f"sparse speedup vs density ({_machine(env)})", fontsize=8)
        fig.tight_layout()
        paths["speedup_vs_density"] = out_dir / "speedup_vs_density.png"
        fig.savefig(paths["speedup_vs_density"], dpi=110)
        plt.close(fig)
    return paths


# ---- terminal ----------------------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _machine(env: dict) -> str:
    """The device's name, with the C++ kernels' ISA level on CPU."""
    level = env.get("cpu_kernels_isa")
    if not level:
        return env["device_name"]
    return f"{env['device_name']}, kernels {level}{' + bf16 dot' if env.get('cpu_bf16_dot') else ''}"


def render_table(results: List[CaseResult], env: dict, console=None):
    from rich.console import Console
    from rich.table import Table

    if console is None:
        import shutil

        # Logs and CI are not terminals: rich would wrap the table at 80 columns.
        console = Console(width=max(shutil.get_terminal_size((160, 40)).columns, 160))
    isa = f" (CPU: {env.get('cpu_flags') or '?'})" if env.get("cpu_kernels_isa") else ""
    table = Table(title=f"attnops {env['attnops']} ({env['git_commit']}) — {_machine(env)}{isa}, "
                        f"torch {env['torch']}, {env['threads']} threads", show_lines=False)
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
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        console.print(f"[red]{r.status}[/] {r.spec.label}: {r.message.splitlines()[0] if r.message else ''}")
    notes = sorted({n for r in results for n in r.notes if n})
    if notes:
        console.print("notes: " + "; ".join(notes))
    return table
