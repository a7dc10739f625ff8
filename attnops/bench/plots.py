"""The harness's PNG plots: time against sequence length per case group, and sparse speedup against
block density. Made to be read at a glance: one colour per provider across every panel, one legend
outside the data, short panel titles (the full case is in results.json), log axes with plain tick
labels."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from attnops.bench.runner import OP, CaseResult


def machine_name(env: dict) -> str:
    """The device's name, with the C++ kernels' ISA level on CPU (table titles and plot titles)."""
    level = env.get("cpu_kernels_isa")
    if not level:
        return env["device_name"]
    products = (" + bf16 brgemm" if env.get("cpu_bf16_brgemm") else " + bf16 dot") if env.get("cpu_bf16_dot") else ""
    return f"{env['device_name']}, kernels {level}{products}"


def _plain(value, _pos=None) -> str:
    """Tick labels as numbers people read: 0.5, 3, 120, 4K."""
    if value >= 1024 and value == int(value) and int(value) % 1024 == 0:
        return f"{int(value) // 1024}K"
    return f"{value:g}"


# Tick positions for log axes that span less than a decade or two: labelled, never crowded.
_NICE = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100)


def _colours(names) -> Dict[str, str]:
    """One colour per provider for the whole figure (attnops always the first)."""
    palette = [f"C{i}" for i in range(10)]
    ordered = [OP] + sorted(n for n in set(names) if n != OP)
    return {name: palette[i % len(palette)] for i, name in enumerate(ordered)}


def _panel_title(r: CaseResult) -> str:
    """The case without its sequence length (the x axis), wrapped to the panel's width."""
    words = [w for w in r.spec.short_label.split() if not (w[0] in "NS" and w[1:].isdigit()) and not w.startswith("Sq")
             and not w.startswith("Sk")]
    return "\n".join(textwrap.wrap(" ".join(words), 38))


def _time_vs_seqlen(plt, ok: List[CaseResult], env: dict, path: Path) -> bool:
    groups = defaultdict(list)
    for r in ok:
        s = r.spec
        groups[(s.op, repr(sorted(s.params.items())), s.mode, s.dtype, s.shape["B"], s.shape["H"], s.shape["Hkv"],
                s.shape["D"], s.shape["Sq"] == s.shape["Sk"])].append(r)
    groups = [sorted(v, key=lambda r: r.spec.shape["Sk"]) for v in groups.values()
              if len({r.spec.shape["Sk"] for r in v}) >= 2]
    if not groups:
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator

    names = {n for rs in groups for r in rs for n in [OP, *([r.baseline] if r.baseline else []), *r.extras]}
    colours = _colours(names)
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.9), squeeze=False)
    for ax, rs in zip(axes.flat, groups):
        xs = [r.spec.shape["Sk"] for r in rs]
        for name in [OP] + sorted(n for n in names if n != OP):
            pts = [(x, r.ms(name)) for x, r in zip(xs, rs) if r.ms(name)]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=4, color=colours[name],
                        linewidth=2.4 if name == OP else 1.3, label=name)
        ax.set_title(_panel_title(rs[0]), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(set(xs)))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("sequence length (keys)", fontsize=8)
        ax.set_ylabel("ms per call", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker="o", linewidth=2, label=n) for n, c in colours.items()
               if any(r.ms(n) for rs in groups for r in rs)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"time vs sequence length — {machine_name(env)}, {env['threads']} threads, "
                 f"attnops {env['git_commit']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.9 / (3.3 * rows + 0.9), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _speedup_vs_density(plt, ok: List[CaseResult], env: dict, path: Path) -> bool:
    # the map cases' baseline is the same op without the map (their speedup is the map's cost, not sparsity)
    sparse = [r for r in ok if r.density is not None and r.speedup and not r.spec.params.get("block_map")]
    if not sparse:
        return False
    from matplotlib.ticker import FuncFormatter

    kind = lambda r: r.spec.params.get("mask", r.spec.op.replace("_attention", ""))  # noqa: E731
    kinds = sorted({kind(r) for r in sparse})
    colours = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    markers = {"fwd": "o", "fwd+bwd": "s"}
    fig, ax = plt.subplots(figsize=(7.8, 4.4))
    for r in sparse:
        ax.scatter(r.density, r.speedup, s=36, color=colours[kind(r)], marker=markers.get(r.spec.mode, "^"),
                   edgecolors="black", linewidths=0.4, zorder=3)
    d = sorted({r.density for r in sparse})
    lo, hi = min(d) * 0.8, max(d) * 1.25
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    ax.plot(grid, [1 / x for x in grid], "k--", linewidth=0.8)
    ax.plot(grid, [0.8 / x for x in grid], "k:", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_plain))
        axis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xticks([t for t in _NICE if lo <= t <= hi])
    speeds = [r.speedup for r in sparse] + [1 / hi, 1 / lo]
    ax.set_yticks([t for t in _NICE if min(speeds) <= t <= max(speeds)])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("block density d (fraction of blocks computed)", fontsize=8)
    ax.set_ylabel("speedup over dense attention", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[k], marker="o", linestyle="", label=k) for k in kinds]
    handles += [plt.Line2D([], [], color="gray", marker=m, linestyle="", label=mode) for mode, m in markers.items()
                if any(r.spec.mode == mode for r in sparse)]
    handles += [plt.Line2D([], [], color="black", linestyle="--", label="1/d (ideal)"),
                plt.Line2D([], [], color="black", linestyle=":", label="0.8/d")]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    ax.set_title(f"sparse speedup vs density — {machine_name(env)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: List[CaseResult], env: dict, out_dir: Path) -> Dict[str, Path]:
    """time_vs_seqlen.png and speedup_vs_density.png (each where the results have something to show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.ms(OP)]
    paths: Dict[str, Path] = {}
    for name, draw in (("time_vs_seqlen", _time_vs_seqlen), ("speedup_vs_density", _speedup_vs_density)):
        path = out_dir / f"{name}.png"
        if draw(plt, ok, env, path):
            paths[name] = path
    return paths
