"""What `albert-kernels bench` and `bench --latency` leave behind: the line naming the machine,
the plot of the speed-ups, and the files, by default in a results folder named after the machine
and the date (tools/bench.py describes the JSON fields)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from . import timing
from .info import machine_slug


def cell(value: Optional[float], spec: str, width: int, suffix: str = "") -> str:
    """`value` formatted with `spec` (and `suffix`), right-aligned in `width`; "-" for None."""
    return f"{format(value, spec) + suffix if value is not None else '-':>{width}s}"

RESULTS_DIR = os.path.join("benchmarks", "results")


def describe_machine(m: dict) -> str:
    """One line naming the machine (:func:`info.machine`'s dict) the figures belong to."""
    gpu = f"GPU {', '.join(m['gpus'])}; " if m.get("gpus") else ""
    isa = ", ".join(m["cpu_isa"]) or "no AVX2/AVX-512/AMX"
    return (f"machine: {gpu}CPU {m['cpu']}, {m['cores']} cores ({isa}), torch {m['torch']} on "
            f"{m['torch_threads']} threads; figures hold for this machine only")


def dtype_note(precision: str) -> Optional[str]:
    """One line for a bfloat16 run on an x86-64 CPU without bf16 instructions (neither
    AVX512-BF16 nor AMX-BF16, from ``backends/cpp/isa.py``'s cpu_isa): its bf16 products have no
    hardware path, so its figures say little about a bf16-capable CPU. None otherwise."""
    import platform
    if precision != "bfloat16" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    from ..backends.cpp.isa import cpu_isa
    isa = cpu_isa()
    if isa.avx512_bf16 or isa.amx:
        return None
    return ("note: this CPU has no bf16 instructions (no AVX512-BF16, no AMX-BF16): bf16 matrix "
            "products run without hardware support, far slower than float32 "
            "(docs/performance.md), so float32 is the faster choice here")


def plot(rows: list[dict], machine_info: dict, path: str, title: str = "albert_kernels bench"
         ) -> None:
    """Bar chart of each row's speed-up over its group's baseline, on a log scale, one block per
    group headed by the group and the baseline its ratios are against. Error bars: the
    speed-up's interquartile interval (``speedup_low``..``speedup_high``); hatched bars: rows
    flagged noisy. `rows` as written to --json (the latency rows carry the same keys)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.patches import Patch

    kinds = {"ours": ("tab:green", "ours"),
             "compiled": ("yellowgreen", "torch.compile(ours)"),
             "ceiling": ("tab:blue", "ceiling / floor (limit, not a contender)"),
             "other": ("tab:gray", "other baselines")}

    def kind(r):
        if r.get("ceiling"):
            return "ceiling"
        if r["name"].startswith("ours"):
            return "ours"
        return "compiled" if "(ours" in r["name"] else "other"

    labels, bars = [], []          # one entry per y position; bars: None for a group's heading
    for r in rows:
        if r["baseline"] or not r.get("speedup_vs_baseline"):
            continue
        heading = f"{r['group']}: against {r['baseline_name']} (= 1x)"
        if heading not in labels:
            labels.append(heading)
            bars.append(None)
        labels.append(r["name"])
        bars.append(r)
    if not bars:
        raise ValueError("nothing to plot: no row has a speed-up against a baseline")
    longest = max(len(t) for t in labels)
    fig, ax = plt.subplots(figsize=(max(10.0, 5.0 + 0.07 * longest), 0.3 * len(labels) + 2.2))
    for y, r in enumerate(bars):
        if r is None:
            continue
        color, _ = kinds[kind(r)]
        x = r["speedup_vs_baseline"]
        low, high = r.get("speedup_low"), r.get("speedup_high")
        err = [[x - low], [high - x]] if low and high else None
        # bars start at 1x: faster to the right, slower to the left
        ax.barh(y, x - 1.0, left=1.0, color=color, hatch="///" if r.get("noisy") else None,
                alpha=0.45 if r.get("noisy") else 1.0, edgecolor="black", linewidth=0.4)
        if err:
            ax.errorbar(x, y, xerr=err, fmt="none", ecolor="black", capsize=2, linewidth=0.8)
        ax.annotate(f"{x:.2f}x" + ("  noisy" if r.get("noisy") else ""),
                    (max(x, high or x, 1.0), y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    xmax = max(max(r["speedup_vs_baseline"], r.get("speedup_high") or 0) for r in bars if r)
    xmin = min(min(r["speedup_vs_baseline"], r.get("speedup_low") or 1e9) for r in bars if r)
    ax.set_xlim(min(0.5, xmin / 1.3), max(2.0, xmax * 2.5))
    ticks = [t for t in (0.03125, 0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
             if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for tick, r in zip(ax.get_yticklabels(), bars):
        if r is None:
            tick.set_fontweight("bold")
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("speed-up over the group's baseline (its median time / the row's; log scale, "
                  "higher is faster)\nerror bars: the interquartile interval of the speed-up")
    used = {kind(r) for r in bars if r}
    handles = [Patch(color=kinds[k][0], label=kinds[k][1]) for k in kinds if k in used]
    if any(r.get("noisy") for r in bars if r):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label=timing.NOISY))
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.9)
    machine_line = describe_machine(machine_info).replace(", torch", ",\ntorch", 1)
    ax.set_title(f"{title}\n{machine_line}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def output_paths(args, kind: str, m: dict) -> tuple[Optional[str], Optional[str]]:
    """(JSON path, plot path) this run writes, either None: --json / --plot as given; neither
    given, both under --results-dir in a folder named after the machine and today's date;
    --no-save: none. `kind` names the benchmark in the file names."""
    if getattr(args, "no_save", False):
        return None, None
    if args.json or args.plot:
        return args.json, args.plot
    device = str(args.device or "cpu").split(":")[0]
    folder = os.path.join(args.results_dir,
                          f"{device}_{machine_slug(m, device)}_{time.strftime('%Y-%m-%d')}")
    stem = os.path.join(folder, f"{kind}_{time.strftime('%H%M%S')}")
    return stem + ".json", stem + ".png"


def write_outputs(doc: dict, rows: list[dict], json_path: Optional[str],
                  plot_path: Optional[str], title: str) -> list[str]:
    """Write the JSON document and the plot of `rows`; the lines that say where (printed last).
    The plot is left out, with the reason, when matplotlib is missing or nothing was timed."""
    said = []
    for path in (json_path, plot_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        said.append(f"results: {json_path}")
    if plot_path:
        try:
            plot(rows, doc["machine"], plot_path, title)
            said.append(f"plot:    {plot_path}")
        except ImportError as e:
            said.append(f"plot:    not drawn ({e}; pip install matplotlib)")
        except ValueError as e:
            said.append(f"plot:    not drawn ({e})")
    return said
