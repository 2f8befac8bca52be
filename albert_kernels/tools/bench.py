"""`albert-kernels bench`: op and model benchmarks against the baselines of docs/performance.md.

Every figure is reported beside baselines measured in the same process and run, as a ratio:
median time over repeats after warm-up (CUDA events on GPU), with the spread (min-max); and peak
memory (docs/performance.md): on GPU `torch.cuda.max_memory_allocated()` over the timed
calls, on CPU (model workloads, `--memory`) the peak resident set of a fresh process that builds
that workload alone and calls it twice (tools/memory.py).

`--json FILE` writes {"machine", "date", "config", "results"} (config: the options, --dropout and
--autocast included, which the model rows' group names also carry); each result row has:
  group, name, unit          what is measured, who does it, the throughput unit
  work_per_call              bytes, FLOPs or real tokens per call
  median_s, min_s, max_s     call time over `repeats` timed calls after warm-up (null: --memory-only)
  first_call_s               the first call alone (compilation, caches)
  throughput                 work_per_call / median_s in `unit`
  baseline, ceiling          whether the row is its group's baseline / a hardware ceiling
  speedup_vs_baseline        baseline median_s / median_s (null without timing)
  fraction_of_ceiling        throughput / the ceiling row's throughput
  baseline_name, ceiling_name
  peak_mem_mb                MiB. GPU: torch.cuda.max_memory_allocated() over the timed calls.
                             CPU: peak resident set (VmHWM) of a fresh process that imports the
                             modules, builds the inputs and this workload alone, and calls it twice;
                             null where not measured (op rows; --no-memory, the default with --quick)
  base_mem_mb                CPU: peak resident set of a fresh process that imports the same modules
                             and builds the same inputs, but no workload, and runs nothing; the
                             workload's own memory is peak_mem_mb - base_mem_mb. null on GPU
  mem_vs_baseline            peak_mem_mb / the group baseline's peak_mem_mb (transformers sdpa for
                             the model rows: the target, docs/performance.md, is <= 0.75 for
                             ours (cpp) in training)
  own_mem_vs_baseline        (peak_mem_mb - base_mem_mb) / the same for the group's baseline
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..dtypes import DTYPES
from . import memory
from .info import machine
from .model_workloads import AUTOCAST_DTYPES, model_workloads
from .workloads import (Workload, add_layer_norm_workloads, attention_workloads,
                        bias_gelu_workloads, linear_gelu_workloads)



@dataclass
class Result:
    """Times (None when not timed: --memory-only) and peak memory (None when not measured)."""
    workload: Workload
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    repeats: int = 0
    first_call_s: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    base_mem_mb: Optional[float] = None

    @property
    def throughput(self) -> Optional[float]:
        if self.median_s is None:
            return None
        scale = 1e9 if self.workload.unit in ("GB/s", "GFLOP/s") else 1.0
        return self.workload.work / self.median_s / scale

    @property
    def own_mem_mb(self) -> Optional[float]:
        """CPU: the workload's own memory, its process's peak minus the baseline process's."""
        if self.peak_mem_mb is None or self.base_mem_mb is None:
            return None
        return self.peak_mem_mb - self.base_mem_mb

    def as_dict(self) -> dict:
        w = self.workload
        return {"group": w.group, "name": w.name, "unit": w.unit, "work_per_call": w.work,
                "median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "repeats": self.repeats, "first_call_s": self.first_call_s,
                "throughput": self.throughput, "baseline": w.baseline, "ceiling": w.ceiling,
                "peak_mem_mb": self.peak_mem_mb, "base_mem_mb": self.base_mem_mb}


MIN_REPEATS, MAX_REPEATS = 3, 50


def _timed_call(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _wants_more(times: list[float], min_time_s: float, min_repeats: int, max_repeats: int) -> bool:
    """Whether a workload needs more timed calls: `min_repeats`, then up to `min_time_s` of
    timing, never more than `max_repeats`."""
    return len(times) < min_repeats or (sum(times) < min_time_s and len(times) < max_repeats)


def measure(fn: Callable, device: str, min_time_s: float = 1.0, min_repeats: int = MIN_REPEATS,
            max_repeats: int = MAX_REPEATS, warmup: int = 1) -> tuple[list[float], float]:
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
    times = []
    while _wants_more(times, min_time_s, min_repeats, max_repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(_timed_call(fn))
    return times, first


def run_workload(w: Workload, device: str, min_time_s: float) -> Result:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, first = measure(w.fn, device, min_time_s=min_time_s)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Result(w, statistics.median(times), min(times), max(times), len(times), first, peak)


def run_interleaved(workloads: list[Workload], min_time_s: float, min_repeats: int = MIN_REPEATS,
                    max_repeats: int = MAX_REPEATS, say: Callable[[str], None] = lambda what: None
                    ) -> list[Result]:
    """CPU: time a group's workloads round-robin, one call of each per round, so that a slow
    phase of a shared machine (run-to-run spread 10-30% here) falls on every workload alike and
    the ratios stay fair. Each workload's first call is timed on its own, then one warm-up call;
    rounds go on until every workload has `min_repeats` calls and `min_time_s` of timed calls
    (or `max_repeats`)."""
    first = []
    for w in workloads:
        say(f"first call + warm-up: {w.name}")
        first.append(_timed_call(w.fn))
        w.fn()
    times: list[list[float]] = [[] for _ in workloads]
    wanted = lambda ts: _wants_more(ts, min_time_s, min_repeats, max_repeats)
    rounds = 0
    while any(wanted(ts) for ts in times):
        rounds += 1
        for w, ts in zip(workloads, times):
            if wanted(ts):
                ts.append(_timed_call(w.fn))
        say(f"round {rounds} done")
    return [Result(w, statistics.median(ts), min(ts), max(ts), len(ts), f)
            for w, ts, f in zip(workloads, times, first)]


def collect(args) -> list[Workload]:
    """The workloads the arguments select, built lazily group by group."""
    device, dtype = args.device, DTYPES[args.dtype]
    builders = []
    if args.model:
        builders.append(lambda: model_workloads(args.preset, args.batch, args.seq, args.padding,
                                                args.mode, dtype, device,
                                                compile_baseline=not args.no_compile,
                                                dropout=args.dropout, autocast=args.autocast))
    if args.ops:
        tokens = args.batch * args.seq
        builders += [lambda: add_layer_norm_workloads(tokens, 768, dtype, device),
                     lambda: linear_gelu_workloads(tokens, 768, 3072, dtype, device),
                     lambda: bias_gelu_workloads(tokens, 3072, dtype, device),
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "realistic", dtype, device),
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "none", dtype, device)]
    return builders


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def ratios(results: list[Result]) -> dict[int, dict]:
    """Per result: time and memory ratios against its group's baseline, fraction of the group's
    ceiling (None where a figure is missing)."""
    out = {}
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.workload.group, []).append(r)
    for rs in groups.values():
        base = next((r for r in rs if r.workload.baseline), None)
        ceil = next((r for r in rs if r.workload.ceiling), None)
        for r in rs:
            out[id(r)] = {
                "speedup_vs_baseline": _ratio(base.median_s, r.median_s) if base else None,
                "fraction_of_ceiling": _ratio(r.throughput, ceil.throughput) if ceil else None,
                "baseline_name": base.workload.name if base else None,
                "ceiling_name": ceil.workload.name if ceil else None,
                "mem_vs_baseline": _ratio(r.peak_mem_mb, base.peak_mem_mb) if base else None,
                "own_mem_vs_baseline": _ratio(r.own_mem_mb, base.own_mem_mb) if base else None,
            }
    return out


def _fmt(value: Optional[float], spec: str, width: int, suffix: str = "") -> str:
    return f"{format(value, spec) + suffix if value is not None else '-':>{width}s}"


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def format_table(results: list[Result]) -> str:
    """One block per group; memory columns when any row has a peak (own = peak - baseline process,
    the ratios against the group's baseline row)."""
    rat = ratios(results)
    mem = any(r.peak_mem_mb is not None for r in results)
    lines, group = [], None
    for r in results:
        w = r.workload
        if w.group != group:
            group = w.group
            base_mem = next((x.base_mem_mb for x in results
                             if x.workload.group == group and x.base_mem_mb is not None), None)
            lines.append(f"\n{group}" + (f"  [memory: a process with the imports and inputs "
                                          f"alone peaks at {base_mem:.0f} MiB]"
                                          if base_mem is not None else ""))
            lines.append(f"  {'':44s} {'median':>10s} {'min-max':>19s} {'throughput':>16s} "
                         f"{'vs base':>8s} {'of ceil':>8s} {'1st call':>9s}"
                         + (f" {'peak MiB':>9s} {'own MiB':>8s} {'peak/base':>9s} "
                            f"{'own/base':>8s}" if mem else ""))
        x = rat[id(r)]
        ceil = x["fraction_of_ceiling"]
        mark = " (ceiling)" if w.ceiling else (" (baseline)" if w.baseline else "")
        spread = (f"{_ms(r.min_s):8.2f}-{_ms(r.max_s):8.2f}ms" if r.median_s is not None
                  else f"{'-':>19s}")
        line = (f"  {(w.name + mark)[:44]:44s} {_fmt(_ms(r.median_s), '.2f', 10, 'ms')} {spread} "
                f"{_fmt(r.throughput, '.1f', 10)} {w.unit:8s} "
                f"{_fmt(x['speedup_vs_baseline'], '.2f', 6, 'x')} "
                f"{_fmt(None if ceil is None else 100 * ceil, '.0f', 8, '%')} "
                f"{_fmt(r.first_call_s, '.2f', 9, 's')}")
        if mem:
            line += (f" {_fmt(r.peak_mem_mb, '.0f', 9)} {_fmt(r.own_mem_mb, '.0f', 8)} "
                     f"{_fmt(x['mem_vs_baseline'], '.2f', 9, 'x')} "
                     f"{_fmt(x['own_mem_vs_baseline'], '.2f', 8, 'x')}")
        lines.append(line)
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


def dropout_probability(text: str) -> float:
    """argparse type of --dropout: a float in [0, 1)."""
    try:
        p = float(text)
    except ValueError:
        p = None
    if p is None or not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return p


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu, or cuda if present)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--preset", default="base", help="ALBERT v2 size: base|large|xlarge|xxlarge")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--padding", default="realistic", choices=["none", "realistic"])
    p.add_argument("--mode", default="forward", choices=["forward", "train"])
    p.add_argument("--dropout", type=dropout_probability, default=0.0, metavar="P",
                   help="model benchmarks: hidden_dropout_prob and attention_probs_dropout_prob "
                   "of every contender, transformers' and ours (default 0, as the v2 presets; "
                   "acts in --mode train)")
    p.add_argument("--autocast", default=None, choices=list(AUTOCAST_DTYPES),
                   help="model benchmarks: run every contender's call (forward, or the whole "
                   "training step) under torch.autocast(device type, this dtype), with float32 "
                   "parameters; the GEMM floor multiplies in this dtype")
    p.add_argument("--ops", action="store_true", help="only the op benchmarks")
    p.add_argument("--model", action="store_true", help="only the model benchmarks")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per workload")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short timings (a smoke run)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: peak resident memory of each model workload, each in a fresh process "
                   "that builds it alone and calls it twice (a process start, ~5-10 s, plus two "
                   "calls per workload; default: on for the model benchmarks on CPU, off with "
                   "--quick). GPU: the peak allocated memory is always reported")
    p.add_argument("--memory-only", action="store_true",
                   help="CPU model benchmarks: measure memory, skip the timing")
    p.add_argument("--json", metavar="FILE", help="write machine, configurations and results")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios vs the baselines")
    p.add_argument("--quiet", action="store_true", help="no progress, just the table")
    p.add_argument("--latency", action="store_true",
                   help="one short request at a time instead (tools/latency.py): batch 1 and 4, "
                   "L = 8, 32, 128, fp32 on CPU, ours vs transformers sdpa, torch.compile, "
                   "ONNX Runtime, OpenVINO (the `bench` extra), and the floors; uses --preset, "
                   "--min-time, --no-compile, --quick, --json, --quiet")


def _memory_options(args) -> Optional[str]:
    """Resolve --memory's default; the reason the options conflict, if they do."""
    cpu = torch.device(args.device).type == "cpu"
    if args.memory_only:
        if not cpu:
            return ("--memory-only measures CPU memory in fresh processes; on cuda the peak "
                    "allocated memory comes with the timing")
        if args.memory is False:
            return "--memory-only and --no-memory contradict each other"
        if args.ops:
            return "--memory-only measures the model workloads only: add --model (and no --ops)"
        if args.plot:
            return "--plot draws time ratios: --memory-only has none"
        args.memory = True
    if args.memory is None:
        args.memory = cpu and args.model and not args.quick and memory.supported()
    if args.memory and cpu and not args.model:
        return "--memory on CPU measures the model workloads: add --model"
    args.memory = args.memory and cpu    # on GPU, the peak comes with the timing
    return None


def _run(w: Workload, args, base_mem: dict[str, float], say: Callable[[str], None],
         timed: Optional[Result] = None) -> Result:
    """Time `w` (unless --memory-only or already `timed`), then measure its CPU memory (with
    --memory)."""
    if timed is not None:
        r = timed
    else:
        r = Result(w) if args.memory_only else run_workload(w, args.device, args.min_time)
    if args.memory and w.rebuild is not None:
        if w.group not in base_mem:
            say("memory: a fresh process with the imports and inputs alone")
            base_mem[w.group] = memory.baseline_peak_mib(w)
        say("memory: a fresh process with this workload alone")
        r.peak_mem_mb, r.base_mem_mb = memory.workload_peak_mib(w), base_mem[w.group]
    return r


def _model_options(args) -> Optional[str]:
    """--dropout / --autocast apply to the model benchmarks (alone when neither --ops nor --model
    is given); the reason the options conflict, if they do."""
    asked = [f for f, on in (("--dropout", args.dropout), ("--autocast", args.autocast)) if on]
    if not asked:
        return None
    if getattr(args, "latency", False):
        return f"{' and '.join(asked)}: --latency runs float32 inference only"
    if args.ops and not args.model:
        return f"{' and '.join(asked)} set the model benchmarks: add --model (the ops run neither)"
    if args.ops:
        return f"{' and '.join(asked)} set the model benchmarks only: drop --ops"
    args.model = True
    if args.autocast and (args.dtype or "float32") != "float32":
        return (f"--autocast {args.autocast} runs float32 models under autocast: --dtype must be "
                f"float32, got {args.dtype}")
    if args.autocast:
        args.dtype = "float32"
    return None


def main(args) -> int:
    conflict = _model_options(args)
    if conflict:
        print(conflict, file=sys.stderr)
        return 1
    if getattr(args, "latency", False):
        from .latency import main as latency_main
        return latency_main(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 1
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if not args.ops and not args.model:
        args.ops, args.model = not args.memory_only, True
    if args.quick:
        args.batch, args.seq, args.min_time = min(args.batch, 2), min(args.seq, 32), 0.05
        args.no_compile = True
    conflict = _memory_options(args)
    if conflict:
        print(conflict, file=sys.stderr)
        return 1
    results, base_mem = [], {}
    builders = collect(args)
    for i, build in enumerate(builders, 1):
        workloads = build()
        progress = lambda tag: (lambda what: None) if args.quiet else (
            lambda what: print(f"{tag} {what}", file=sys.stderr, flush=True))
        timed = [None] * len(workloads)
        # CPU model benchmarks: calls of seconds each, on a noisy shared machine: round-robin
        if (workloads and not args.memory_only and torch.device(args.device).type == "cpu"
                and all(w.unit == "tokens/s" for w in workloads)):
            group_say = progress(f"[{i}/{len(builders)}] {workloads[0].group[:90]} ::")
            group_say(f"timing {len(workloads)} workloads round-robin")
            timed = run_interleaved(workloads, args.min_time, say=group_say)
        for j, w in enumerate(workloads, 1):
            say = progress(f"[{i}/{len(builders)}] {w.group[:90]} :: {w.name} "
                           f"({j}/{len(workloads)})")
            if not args.memory_only and timed[j - 1] is None:
                say("timing")
            results.append(_run(w, args, base_mem, say, timed[j - 1]))
    print(format_table(results))
    rat = ratios(results)
    rows = [{**r.as_dict(), **rat[id(r)]} for r in results]
    if args.json:
        doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "config": {k: getattr(args, k) for k in ("device", "dtype", "preset", "batch", "seq",
                                                         "padding", "mode", "dropout", "autocast",
                                                         "min_time", "quick", "no_compile",
                                                         "memory", "memory_only")},
               "results": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if args.plot:
        plot(rows, machine(), args.plot)
    return 0
