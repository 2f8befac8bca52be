"""`albert-kernels bench`: op and model benchmarks against the baselines of docs/performance.md.

Every figure is reported beside baselines measured in the same process and run, as a ratio:
median time over repeats after warm-up (CUDA events on GPU), with the spread (min-max, and the
interquartile range over the median); and peak memory (docs/performance.md): on GPU
`torch.cuda.max_memory_allocated()` over the timed calls, on CPU (model workloads, `--memory`)
the peak resident set of a fresh process that builds that workload alone and calls it twice
(tools/memory.py). A row whose ratio is too uncertain to keep, or that runs above its ceiling, is
flagged "noisy: rerun on a quiet machine" (the rule: tools/timing.py), and a closing line says how
many rows are trustworthy.

Without --json / --plot, the JSON and the plot go to --results-dir (benchmarks/results) in a
folder named after the machine and the date, e.g.
`cpu_intel-xeon-platinum-8480_amx_2core_2026-12-04/ops-model-forward-float32_233012.json`; the
paths are the last lines printed. The JSON holds {"machine", "date", "config", "noisy_spread", "results"}
(machine: CPU model, `cpu_isa` (its AVX2 / AVX-512 / AMX instruction sets), core count, torch
and its threads, GPUs; config: the options, --dropout and --autocast included, which the model
rows' group names also carry); each result row has:
  group, name, unit          what is measured, who does it, the throughput unit
  work_per_call              bytes, FLOPs or real tokens per call
  median_s, min_s, max_s     call time over `repeats` timed calls after warm-up (null: --memory-only)
  q1_s, q3_s, spread         the calls' quartiles, and (q3_s - q1_s) / median_s
  first_call_s               the first call alone (compilation, caches)
  throughput                 work_per_call / median_s in `unit`
  baseline, ceiling          whether the row is its group's baseline / a hardware ceiling
  ceiling_max                a ceiling row: the largest fraction of it another row can honestly reach
  speedup_vs_baseline        baseline median_s / median_s (null without timing)
  speedup_low, speedup_high  the speed-up with the two rows at opposite quartiles (baseline q1 / q3,
                             baseline q3 / q1): its interquartile interval, the plot's error bar
  ratio_spread               the speed-up's spread: this row's spread + the baseline's
  fraction_of_ceiling        throughput / the ceiling row's throughput
  baseline_name, ceiling_name
  noisy, flags               whether the row cannot be trusted, and why (ratio_spread above
                             noisy_spread, or fraction_of_ceiling above the ceiling's ceiling_max)
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
  err_max_abs, err_min_cos   forward model rows: last_hidden_state against float64 transformers
                             on the same weights and inputs, over the real tokens: max |err| and
                             the smallest per-token cosine (tools/accuracy.py; null elsewhere)
  err_budget, over_budget    the budget of the run's dtype (docs/correctness.md: 2 x the error of
                             transformers sdpa in that dtype + 4 ulps of max |gold|) and whether
                             err_max_abs exceeds it (the table marks such a row "over budget")
The file names carry the dtype (e.g. ``model-forward-bfloat16_<time>.json``), and with
``--dtype bfloat16`` on an x86-64 CPU without bf16 instructions the JSON's "notes" and the
screen say that bf16 products have no hardware path there.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..dtypes import DTYPES
from . import memory, timing
from .info import machine
from .model_workloads import AUTOCAST_DTYPES, model_workloads
from . import accuracy
from .report import (RESULTS_DIR, cell as _fmt, describe_machine, dtype_note, output_paths,
                     write_outputs)
from .timing import measure
from .workloads import (Workload, add_layer_norm_workloads, attention_workloads,
                        linear_gelu_workloads)



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
    q1_s: Optional[float] = None
    q3_s: Optional[float] = None
    error: Optional[accuracy.Error] = None   # forward model rows: vs float64 transformers

    @classmethod
    def timed(cls, w: Workload, times: list[float], first: float) -> "Result":
        q1, median, q3 = timing.quartiles(times)
        return cls(w, median, min(times), max(times), len(times), first, q1_s=q1, q3_s=q3)

    @property
    def throughput(self) -> Optional[float]:
        if self.median_s is None:
            return None
        scale = 1e9 if self.workload.unit in ("GB/s", "GFLOP/s") else 1.0
        return self.workload.work / self.median_s / scale

    @property
    def spread(self) -> Optional[float]:
        """Interquartile range of the call times over their median (None when not timed)."""
        return timing.spread(self.q1_s, self.median_s, self.q3_s)

    @property
    def own_mem_mb(self) -> Optional[float]:
        """CPU: the workload's own memory, its process's peak minus the baseline process's."""
        if self.peak_mem_mb is None or self.base_mem_mb is None:
            return None
        return self.peak_mem_mb - self.base_mem_mb

    def as_dict(self) -> dict:
        w, e = self.workload, self.error
        return {"group": w.group, "name": w.name, "unit": w.unit, "work_per_call": w.work,
                "median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "q1_s": self.q1_s, "q3_s": self.q3_s, "spread": self.spread,
                "repeats": self.repeats, "first_call_s": self.first_call_s,
                "throughput": self.throughput, "baseline": w.baseline, "ceiling": w.ceiling,
                "ceiling_max": w.ceiling_max,
                "peak_mem_mb": self.peak_mem_mb, "base_mem_mb": self.base_mem_mb,
                "err_max_abs": e.max_abs if e else None, "err_min_cos": e.min_cos if e else None,
                "err_budget": e.budget if e else None, "over_budget": bool(e and e.over_budget)}


def run_workload(w: Workload, device: str, min_time_s: float) -> Result:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, first = measure(w.fn, device, min_time_s=min_time_s)
    r = Result.timed(w, times, first)
    r.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return r


def run_interleaved(workloads: list[Workload], min_time_s: float,
                    min_repeats: int = timing.MIN_REPEATS, max_repeats: int = timing.MAX_REPEATS,
                    say: Callable[[str], None] = lambda what: None) -> list[Result]:
    """CPU: time a group's workloads round-robin (tools/timing.py ``interleaved``), so that a
    slow phase of a shared machine (run-to-run spread 10-30% here) falls on every workload alike
    and the ratios stay fair."""
    times, first = timing.interleaved([w.fn for w in workloads], min_time_s, min_repeats,
                                      max_repeats, names=[w.name for w in workloads], say=say)
    return [Result.timed(w, ts, f) for w, ts, f in zip(workloads, times, first)]


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
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "realistic", dtype, device),
                     lambda: attention_workloads(args.batch, 12, args.seq, 64, "none", dtype, device)]
    return builders


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def ratios(results: list[Result]) -> dict[int, dict]:
    """Per result: time and memory ratios against its group's baseline, fraction of the group's
    ceiling (None where a figure is missing), the speed-up's interquartile interval and spread,
    and the flags that say it cannot be trusted (tools/timing.py)."""
    out = {}
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.workload.group, []).append(r)
    for rs in groups.values():
        base = next((r for r in rs if r.workload.baseline), None)
        ceil = next((r for r in rs if r.workload.ceiling), None)
        for r in rs:
            fraction = _ratio(r.throughput, ceil.throughput) if ceil else None
            if base is None or base is r:
                spread = r.spread
            else:
                spread = timing.ratio_spread(r.spread, base.spread)
            why = [] if r.median_s is None else timing.flags(
                spread, None if ceil is None or ceil is r else fraction,
                ceil.workload.ceiling_max if ceil else None)
            out[id(r)] = {
                "speedup_vs_baseline": _ratio(base.median_s, r.median_s) if base else None,
                # the speed-up with both rows at opposite quartiles: its interquartile interval
                "speedup_low": _ratio(base.q1_s, r.q3_s) if base else None,
                "speedup_high": _ratio(base.q3_s, r.q1_s) if base else None,
                "ratio_spread": spread,
                "fraction_of_ceiling": fraction,
                "baseline_name": base.workload.name if base else None,
                "ceiling_name": ceil.workload.name if ceil else None,
                "mem_vs_baseline": _ratio(r.peak_mem_mb, base.peak_mem_mb) if base else None,
                "own_mem_vs_baseline": _ratio(r.own_mem_mb, base.own_mem_mb) if base else None,
                "noisy": bool(why),
                "flags": why,
            }
    return out


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def format_table(results: list[Result]) -> str:
    """One block per group, headed by its baseline and ceiling; memory columns when any row has
    a peak (own = peak - baseline process, the ratios against the group's baseline row). The
    spread column is the interquartile range over the median; the last column flags a row whose
    figures cannot be trusted."""
    rat = ratios(results)
    mem = any(r.peak_mem_mb is not None for r in results)
    err = any(r.error is not None for r in results)
    marks = {id(r): " (ceiling)" if r.workload.ceiling else (" (baseline)" if r.workload.baseline
                                                               else "") for r in results}
    width = max([len(r.workload.name) + len(marks[id(r)]) for r in results] + [20])
    lines, group = [], None
    for r in results:
        w, x = r.workload, rat[id(r)]
        if w.group != group:
            group = w.group
            base_mem = next((y.base_mem_mb for y in results
                             if y.workload.group == group and y.base_mem_mb is not None), None)
            against = [f"vs base = against {x['baseline_name']}" if x["baseline_name"] else
                       "no baseline", f"of ceil = of {x['ceiling_name']}" if x["ceiling_name"]
                       else ""]
            lines.append(f"\n{group}  [{'; '.join(a for a in against if a)}]")
            if base_mem is not None:
                lines.append(f"  [memory: a process with the imports and inputs alone peaks at "
                             f"{base_mem:.0f} MiB]")
            checked = next((y for y in results if y.workload.group == group
                            and y.error is not None), None)
            if checked is not None:
                lines.append(f"  [{accuracy.budget_text(checked.workload.check.precision, checked.error.budget)}]")
            lines.append(f"  {'':{width}s} {'median':>10s} {'min-max':>21s} {'spread':>6s} "
                         f"{'throughput':>16s} {'vs base':>8s} {'of ceil':>8s} {'1st call':>9s}"
                         + (f" {'peak MiB':>9s} {'own MiB':>8s} {'peak/base':>9s} "
                            f"{'own/base':>8s}" if mem else "")
                         + (f" {'max |err|':>9s} {'min cos':>9s}" if err else "") + "  note")
        ceil = x["fraction_of_ceiling"]
        spread = (f"{_ms(r.min_s):9.4g}-{_ms(r.max_s):9.4g}ms" if r.median_s is not None
                  else f"{'-':>21s}")
        line = (f"  {w.name + marks[id(r)]:{width}s} {_fmt(_ms(r.median_s), '.4g', 10, 'ms')} "
                f"{spread} {_fmt(None if r.spread is None else 100 * r.spread, '.0f', 6, '%')} "
                f"{_fmt(r.throughput, '.1f', 10)} {w.unit:8s} "
                f"{_fmt(x['speedup_vs_baseline'], '.2f', 8, 'x')} "
                f"{_fmt(None if ceil is None else 100 * ceil, '.0f', 8, '%')} "
                f"{_fmt(r.first_call_s, '.2f', 9, 's')}")
        if mem:
            line += (f" {_fmt(r.peak_mem_mb, '.0f', 9)} {_fmt(r.own_mem_mb, '.0f', 8)} "
                     f"{_fmt(x['mem_vs_baseline'], '.2f', 9, 'x')} "
                     f"{_fmt(x['own_mem_vs_baseline'], '.2f', 8, 'x')}")
        if err:
            e = r.error
            line += (f" {_fmt(e and e.max_abs, '.2e', 9)} {_fmt(e and e.min_cos, '.6f', 9)}")
        notes = ([accuracy.flag_text(r.error)] if r.error and r.error.over_budget else []) \
            + ([f"{timing.NOISY} ({'; '.join(x['flags'])})"] if x["noisy"] else [])
        if notes:
            line += "  " + "; ".join(notes)
        lines.append(line)
    return "\n".join(lines)


def dropout_probability(text: str) -> float:
    """argparse type of --dropout: a float in [0, 1)."""
    try:
        p = float(text)
    except ValueError:
        p = None
    if p is None or not 0.0 <= p < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return p


DESCRIPTION = """\
Op and model benchmarks, each beside baselines measured in the same run (PyTorch eager, SDPA,
torch.compile, transformers) and a ceiling (a copy of the same bytes, the GEMMs alone); every
figure is a median with its spread (interquartile range / median), and a row whose ratio's spread
exceeds 20%, or that runs above its ceiling, is flagged "noisy: rerun on a quiet machine". With
neither --ops nor --model, both run. The results are written as JSON and a plot into a folder
named after the machine and the date under --results-dir (or to --json / --plot), and their paths
are printed last. Figures hold for the machine they were measured on (CPU model and instruction
sets are in the JSON and the plot)."""


def add_arguments(p) -> None:
    """`bench`'s options on parser `p` (its help lists every one with its default)."""
    p.description = DESCRIPTION
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda if a CUDA device is present, else cpu)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="parameter and input dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--preset", default="base", help="ALBERT v2 size: base|large|xlarge|xxlarge")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (ops: batch x seq "
                   "tokens for the per-token ops, batch sequences for attention)")
    p.add_argument("--seq", type=int, default=128, help="padded sequence length")
    p.add_argument("--padding", default="realistic", choices=["none", "realistic"],
                   help="sequence lengths of the model batch: all --seq (none), or uniform in "
                   "[25%%, 100%%] of --seq (realistic)")
    p.add_argument("--mode", default="forward", choices=["forward", "train"],
                   help="model benchmarks: inference forward, or an MLM + SOP training step "
                   "(forward + backward)")
    p.add_argument("--dropout", type=dropout_probability, default=0.0, metavar="P",
                   help="model benchmarks: hidden_dropout_prob and attention_probs_dropout_prob "
                   "of every contender, transformers' and ours (0 as the v2 presets; acts in "
                   "--mode train)")
    p.add_argument("--autocast", default=None, choices=list(AUTOCAST_DTYPES),
                   help="model benchmarks: run every contender's call (forward, or the whole "
                   "training step) under torch.autocast(device type, this dtype), with float32 "
                   "parameters; the GEMM floor multiplies in this dtype (default: no autocast)")
    p.add_argument("--ops", action="store_true", help="the op benchmarks (with --model: both)")
    p.add_argument("--model", action="store_true", help="the model benchmarks (with --ops: both)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--min-time", type=float, default=2.0, metavar="SECONDS",
                   help="seconds of timed calls per workload (at least 3 calls, at most 50)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short timings (a smoke "
                   "run: batch <= 2, seq <= 32, --min-time 0.05, --no-compile, no memory)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: peak resident memory of each model workload, each in a fresh process "
                   "that builds it alone and calls it twice (a process start, ~5-10 s, plus two "
                   "calls per workload; default: on for the model benchmarks on CPU, off with "
                   "--quick). GPU: the peak allocated memory is always reported")
    p.add_argument("--memory-only", action="store_true",
                   help="CPU model benchmarks: measure memory, skip the timing")
    p.add_argument("--results-dir", default=RESULTS_DIR, metavar="DIR",
                   help="where the JSON and the plot go when --json / --plot are not given: "
                   "DIR/<device>_<machine>_<date>/<benchmark>_<time>.{json,png}, the machine "
                   "named by its CPU (or GPU) model, widest instruction set (avx2, avx512, amx) "
                   "and core count")
    p.add_argument("--no-save", action="store_true",
                   help="write no file, print the table only")
    p.add_argument("--json", metavar="FILE", help="write machine, configuration and results "
                   "to FILE instead of the results folder (then no plot unless --plot)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the speed-ups to FILE.png instead "
                   "of the results folder (then no JSON unless --json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, just the table")
    p.add_argument("--family", action="store_true",
                   help="the BERT family instead (tools/family.py): BERT-base and RoBERTa-base "
                   "(random weights, --batch x --seq with --padding) and all-MiniLM-L6-v2 "
                   "(real weights) through sentence-transformers encode at batch 1 and a ragged "
                   "32, fp32 on CPU: ours (patch_hf, freeze where it applies; "
                   "attn_implementation=albert_kernels; quantize_dynamic where present) vs "
                   "transformers sdpa, torch.compile, ONNX Runtime fp32 and int8, OpenVINO at "
                   "its default precision, f32 and int8 (the `bench` extra), each contender's "
                   "error against transformers fp32 beside its time; uses --min-time, "
                   "--no-compile, --quick, --quiet and the output options")
    p.add_argument("--latency", action="store_true",
                   help="one short request at a time instead (tools/latency.py): batch 1 and 4, "
                   "L = 8, 32, 128 on CPU, in --dtype float32 (default) or bfloat16 or under "
                   "--autocast, ours vs transformers sdpa, torch.compile, ONNX Runtime, OpenVINO "
                   "(the `bench` extra; at their own precision), and the floors, every row with "
                   "its error against float64 transformers; uses --preset, --dtype, --autocast, "
                   "--min-time, --no-compile, --quick, --quiet and the output options")


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
    if getattr(args, "family", False):
        return f"{' and '.join(asked)}: --family runs float32 inference only"
    if getattr(args, "latency", False):
        if args.dropout:
            return "--dropout: --latency runs inference only (no dropout)"
        return None         # --autocast: tools/latency.py checks it against --dtype
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
    if getattr(args, "family", False):
        if getattr(args, "latency", False) or args.ops or args.model:
            print("--family runs on its own: drop --latency, --ops and --model", file=sys.stderr)
            return 1
        from .family import main as family_main
        return family_main(args)
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
    note = (dtype_note(args.autocast or args.dtype)
            if torch.device(args.device).type == "cpu" else None)
    if note:
        print(note, file=sys.stderr, flush=True)
    results, base_mem = [], {}
    builders = collect(args)
    for i, build in enumerate(builders, 1):
        workloads = build()
        progress = lambda tag: (lambda what: None) if args.quiet else (
            lambda what: print(f"{tag} {what}", file=sys.stderr, flush=True))
        timed = [None] * len(workloads)
        errors = {}
        if workloads and not args.memory_only:
            errors = accuracy.workload_errors(workloads, progress(
                f"[{i}/{len(builders)}] {workloads[0].group[:90]} ::"))
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
            r = _run(w, args, base_mem, say, timed[j - 1])
            if id(w) in errors:
                # the error's call came first: it is the first call (compilation included)
                r.error, r.first_call_s = errors[id(w)]
            results.append(r)
    m = machine()
    rat = ratios(results)
    rows = [{**r.as_dict(), **rat[id(r)]} for r in results]
    print(describe_machine(m))
    if note:
        print(note)
    print(format_table(results))
    print("\n" + timing.summary([x["noisy"] for r, x in zip(results, rows)
                                 if r.median_s is not None]))
    over = [f"{r.workload.name} ({r.workload.group.split(' (')[0]})" for r in results
            if r.error is not None and r.error.over_budget]
    if over:
        print(f"over their dtype's error budget: {', '.join(over)}")
    kind = "-".join(([] if not args.ops else ["ops"])
                    + ([] if not args.model else [f"model-{args.mode}"
                                                   + ("-memory" if args.memory_only else "")])
                    + [args.dtype] + ([f"autocast-{args.autocast}"] if args.autocast else []))
    json_path, plot_path = output_paths(args, kind, m)
    if args.memory_only and plot_path and not args.plot:
        plot_path = None    # memory only: no time ratios to draw
    doc = {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "config": {k: getattr(args, k) for k in ("device", "dtype", "preset", "batch", "seq",
                                                     "padding", "mode", "dropout", "autocast",
                                                     "min_time", "quick", "no_compile",
                                                     "memory", "memory_only")},
           "notes": [note] if note else [],
           "noisy_spread": timing.NOISY_SPREAD, "results": rows}
    for line in write_outputs(doc, rows, json_path, plot_path,
                              f"albert_kernels bench {kind} ({args.device}, {args.dtype})"):
        print(line)
    return 0
