"""`albert-kernels bench`: op and model benchmarks against the baselines of PERF.md.

Every figure is reported beside baselines measured in the same process and run, as a ratio:
median time over repeats after warm-up (CUDA events on GPU), with the spread (min-max).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .info import machine
from .model_workloads import model_workloads
from .workloads import (Workload, add_layer_norm_workloads, attention_workloads,
                        linear_gelu_workloads)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Result:
    workload: Workload
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    first_call_s: float
    peak_mem_mb: Optional[float] = None

    @property
    def throughput(self) -> float:
        scale = 1e9 if self.workload.unit in ("GB/s", "GFLOP/s") else 1.0
        return self.workload.work / self.median_s / scale

    def as_dict(self) -> dict:
        w = self.workload
        return {"group": w.group, "name": w.name, "unit": w.unit, "work_per_call": w.work,
                "median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "repeats": self.repeats, "first_call_s": self.first_call_s,
                "throughput": self.throughput, "baseline": w.baseline, "ceiling": w.ceiling,
                "peak_mem_mb": self.peak_mem_mb}


def measure(fn: Callable, device: str, min_time_s: float = 1.0, min_repeats: int = 3,
            max_repeats: int = 50, warmup: int = 1) -> tuple[list[float], float]:
    """Times of repeated calls after warm-up (the first call is timed on its own: it includes
    compilation and caches). CUDA: events around each call."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    sync()
    times, total = [], 0.0
    while len(times) < min_repeats or (total < min_time_s and len(times) < max_repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return times, first


def run_workload(w: Workload, device: str, min_time_s: float) -> Result:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, first = measure(w.fn, device, min_time_s=min_time_s)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Result(w, statistics.median(times), min(times), max(times), len(times), first, peak)


def collect(args) -> list[Workload]:
    """The workloads the arguments select, built lazily group by group."""
    device, dtype = args.device, DTYPES[args.dtype]
    builders = []
    if args.model:
        builders.append(lambda: model_workloads(args.preset, args.batch, args.seq, args.padding,
                                                args.mode, dtype, device,
                                                compile_baseline=not args.no_compile))
    if args.ops:
        tokens = args.batch * args.seq
        builders += [lambda: add_layer_norm_workloads(tokens, 768, dtype, device),
                     lambda: linear_gelu_workloads(tokens, 768, 3072, dtype, device),
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "realistic", dtype, device),
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "none", dtype, device)]
    return builders


def ratios(results: list[Result]) -> dict[int, dict]:
    """Per result: time ratio against its group's baseline and fraction of the group's ceiling."""
    out = {}
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.workload.group, []).append(r)
    for rs in groups.values():
        base = next((r for r in rs if r.workload.baseline), None)
        ceil = next((r for r in rs if r.workload.ceiling), None)
        for r in rs:
            out[id(r)] = {
                "speedup_vs_baseline": base.median_s / r.median_s if base else None,
                "fraction_of_ceiling": r.throughput / ceil.throughput if ceil else None,
                "baseline_name": base.workload.name if base else None,
                "ceiling_name": ceil.workload.name if ceil else None,
            }
    return out


def format_table(results: list[Result]) -> str:
    rat = ratios(results)
    lines, group = [], None
    for r in results:
        w = r.workload
        if w.group != group:
            group = w.group
            lines.append(f"\n{group}")
            lines.append(f"  {'':44s} {'median':>10s} {'min-max':>19s} {'throughput':>16s} "
                         f"{'vs base':>8s} {'of ceil':>8s} {'1st call':>9s}")
        x = rat[id(r)]
        speed = f"{x['speedup_vs_baseline']:.2f}x" if x["speedup_vs_baseline"] else "-"
        ceil = f"{100 * x['fraction_of_ceiling']:.0f}%" if x["fraction_of_ceiling"] else "-"
        mark = " (ceiling)" if w.ceiling else (" (baseline)" if w.baseline else "")
        lines.append(f"  {(w.name + mark)[:44]:44s} {1e3 * r.median_s:8.2f}ms "
                     f"{1e3 * r.min_s:8.2f}-{1e3 * r.max_s:8.2f}ms "
                     f"{r.throughput:10.1f} {w.unit:8s} {speed:>6s} {ceil:>8s} "
                     f"{r.first_call_s:8.2f}s")
    return "\n".join(lines)


def plot(rows: list[dict], machine_info: dict, path: str) -> None:
    """Bar chart of each row's speed-up vs its group's baseline (rows as written to --json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["speedup_vs_baseline"] and not r["baseline"]]
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["speedup_vs_baseline"] for r in rows],
            color=["tab:green" if r["name"].startswith("ours") else "tab:gray" for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['group'].split(' (')[0]} | {r['name']}" for r in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up vs the group's baseline (time ratio, higher is faster)")
    device = machine_info["gpus"][0] if machine_info["gpus"] else machine_info["cpu"]
    ax.set_title(f"albert_kernels bench - {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu, or cuda if present)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--preset", default="base", help="ALBERT v2 size: base|large|xlarge|xxlarge")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--padding", default="realistic", choices=["none", "realistic"])
    p.add_argument("--mode", default="forward", choices=["forward", "train"])
    p.add_argument("--ops", action="store_true", help="only the op benchmarks")
    p.add_argument("--model", action="store_true", help="only the model benchmarks")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per workload")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short timings (a smoke run)")
    p.add_argument("--json", metavar="FILE", help="write machine, configurations and results")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios vs the baselines")
    p.add_argument("--quiet", action="store_true", help="no progress, just the table")


def main(args) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 1
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not args.ops and not args.model:
        args.ops = args.model = True
    if args.quick:
        args.batch, args.seq, args.min_time = min(args.batch, 2), min(args.seq, 32), 0.05
        args.no_compile = True
    results = []
    builders = collect(args)
    for i, build in enumerate(builders, 1):
        workloads = build()
        for j, w in enumerate(workloads, 1):
            if not args.quiet:
                print(f"[{i}/{len(builders)}] {w.group[:60]} :: {w.name} ({j}/{len(workloads)})",
                      file=sys.stderr, flush=True)
            results.append(run_workload(w, args.device, args.min_time))
    print(format_table(results))
    rat = ratios(results)
    rows = [{**r.as_dict(), **rat[id(r)]} for r in results]
    if args.json:
        doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "config": {k: getattr(args, k) for k in ("device", "dtype", "preset", "batch", "seq",
                                                         "padding", "mode", "min_time", "quick")},
               "results": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(rows, machine(), args.plot)
    return 0
