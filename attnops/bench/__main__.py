"""``python -m attnops.bench``: run a benchmark suite and write its table, JSON, CSV and plots."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from attnops.bench import registry
from attnops.bench.registry import DTYPES, OPS, available_suites, expand_cases, load_suite


def _csv_ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sequence lengths must be positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnops.bench",
                                description="Benchmark attnops ops against FlashAttention / SDPA: speed and accuracy.")
    p.add_argument("--suite", default="quick", help=f"suite name or .toml path (available: {available_suites()})")
    p.add_argument("--ops", default=None, help="comma-separated op names or families to keep")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the suite's)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="override every case's dtype")
    p.add_argument("--seqlens", type=_csv_ints, default=None, help="override sequence lengths, e.g. 1024,4096")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: the suite's, else 2)")
    p.add_argument("--repeats", type=_positive, default=None, help="timed repeats per provider")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per provider")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<suite>-<device> in a "
                                               "source checkout, else ./attnops-bench-results/<suite>-<device>)")
    p.add_argument("--wide", action="store_true", help="every column in the terminal table (default: a compact "
                                                       "table that fits 100 columns; results.json / .csv hold all)")
    p.add_argument("--list", action="store_true", help="list suites, ops and the suite's cases, then exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        suite = load_suite(args.suite)
    except ValueError as e:
        parser.error(str(e))
    from attnops.bench import context_parallel

    if context_parallel.is_cp_suite(suite):  # launches its own ranks: not the per-op harness
        if args.list:
            print(f"suite {args.suite}: {len(context_parallel.expand(suite))} context-parallel cases")
            for case in context_parallel.expand(suite):
                print("  " + context_parallel.label(case))
            return 0
        return context_parallel.main(suite, Path(args.suite).stem, Path(args.out) if args.out else None, args.repeats,
                                     args.device or suite.get("device", "cpu"))
    device = args.device or suite.get("device", "cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available() and not args.list:  # listing needs no GPU
        parser.error(f"--device {device}: CUDA is not available on this machine")
    ops = [o.strip() for o in args.ops.split(",")] if args.ops else None
    families = registry.families()
    if ops:
        unknown = [o for o in ops if o not in OPS and o not in families]
        if unknown:
            parser.error(f"--ops: unknown {unknown}; ops: {sorted(OPS)}; families: {families}")
    try:
        cases = expand_cases(suite, device=device, dtype=args.dtype, ops=ops, seqlens=args.seqlens)
    except ValueError as e:
        parser.error(f"suite {args.suite}: {e}")
    threads = args.threads or suite.get("threads", 2)
    repeats = args.repeats or suite.get("repeats", 7)
    warmup = args.warmup if args.warmup is not None else suite.get("warmup", 1)

    if args.list:
        print("suites:", ", ".join(available_suites()))
        print("ops:")
        for name, o in sorted(OPS.items()):
            print(f"  {name:28s} family={o.family:10s} {o.description}")
        print(f"suite {args.suite}: {len(cases)} cases on {device}")
        for c in cases:
            print("  " + c.label)
        return 0
    if not cases:
        parser.error("no cases left after --ops / --device filters")

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnops.bench.report import environment, render_table, write_results
    from attnops.bench.runner import attach_copy_bandwidth, run_case

    from attnops.bench.report import COMPACT_WIDTH

    # a terminal's own width; logs and CI (not terminals) get the table's
    console = Console(width=None if sys.stdout.isatty() else (160 if args.wide else COMPACT_WIDTH))
    env = environment(device, threads)
    env["suite"] = args.suite
    out_dir = Path(args.out) if args.out else _default_out(args.suite, device)
    results = []
    start = time.time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[case]}"), console=console, transient=False) as progress:
        task = progress.add_task(f"suite {args.suite}", total=len(cases), case="")
        for spec in cases:
            progress.update(task, case=spec.short_label)
            results.append(run_case(spec, threads=threads, repeats=repeats, warmup=warmup))
            write_results(results, env, out_dir, plots=False)
            progress.advance(task)
    copy = attach_copy_bandwidth(results, threads)
    if copy:
        env["copy_bandwidth_gbps"] = round(copy, 2)
    render_table(results, env, console, wide=args.wide)
    paths = write_results(results, env, out_dir)
    console.print(f"{len(results)} cases in {time.time() - start:.0f} s; files:")
    for kind, path in paths.items():
        console.print(f"  {kind:20s} {path}")
    return 1 if any(r.status != "ok" for r in results) else 0


def _default_out(suite: str, device: str) -> Path:
    """benchmarks/results/ in a source checkout; ./attnops-bench-results/ for an installed package."""
    tree = Path(__file__).resolve().parents[2]
    checkout = (tree / "setup.py").is_file() and (tree / "benchmarks").is_dir()
    base = tree / "benchmarks" / "results" if checkout else Path.cwd() / "attnops-bench-results"
    return base / f"{Path(suite).stem}-{device.replace(':', '')}"


if __name__ == "__main__":
    sys.exit(main())
