"""`albert-kernels bench --latency`: one short request at a time (docs/performance.md).

ALBERT inference on unpadded inputs (batch 1 and 4, L = 8, 32, 128 by default), random weights,
under torch.inference_mode, in float32 (the default) or bfloat16 (``--dtype``: transformers, ours
and torch.compile run the model converted with ``.to(dtype)``; the GEMM floor multiplies in that
dtype) or under ``torch.autocast`` with float32 parameters (``--autocast bfloat16``). The ONNX
runtimes run the float32 export at their own precision, named in the table's "precision" column.
Contenders, all on the same weights:

  ours (cpp)                    ak.AlbertModel.from_hf(transformers model, backend="cpp"),
                                frozen (ak.freeze: weights packed once for the small-M kernel)
  ours (cpp, unfrozen)          the same model without ak.freeze (the default path)
  transformers sdpa             the baseline of the ratios
  torch.compile(transformers)   dynamic=False; its first call (compilation) reported apart
  onnxruntime                   torch.onnx.export of the transformers model, then the
                                onnxruntime.transformers BERT optimizer (fusions) if it works for
                                the graph, else plain ORT with all graph optimizations
                                (tools/runtimes.py, shared with `bench --family`)
  openvino                      openvino.convert_model of the same ONNX file, compiled for CPU

A contender whose package is absent or whose export fails is skipped with the reason printed.
Before timing, every contender's last_hidden_state is checked (all tokens are real: no padding):
in float32, max |diff| <= 1e-3 against transformers sdpa in float32; in bfloat16 (or under
autocast), within the bfloat16 error budget below; else the row is marked "check FAILED" (it is
still timed; a contender that raises is marked and not timed). Each row also carries its error
against a float64 run of transformers on the same weights and ids (tools/accuracy.py: max |err|,
the smallest per-token cosine, and "over budget" when the max exceeds the budget of the run's
dtype, docs/correctness.md), computed once per shape before timing. Timing: interleaved rounds, one
call of each contender per round (tools/timing.py): median, min-max and the spread (interquartile
range / median); "x sdpa" is the speed-up over transformers sdpa (its median / the row's), "vs
floor" the row's median / floor. A row is flagged "noisy: rerun on a quiet machine" when its
ratio's spread (its own + the baseline's) exceeds 20%, or when it runs faster than the floor
allows (below 1 / 1.5 of the GEMM floor's time, which another library's GEMM cannot honestly
reach; tools/timing.py).

Floors, their rates timed in the same rounds as each shape's contenders: the encoder's
matrix-product FLOPs for the token count (embedding projection, and per layer Q, K, V, attention
output, FFN in/out; attention scores excluded) at the large-M GEMM rate (torch.mm at M = 512),
and the shared layer's weight bytes, streamed once per layer, at the cache-resident copy
bandwidth (an 8 MiB buffer copied into another; bytes read + written per second). "vs floor"
divides by the larger of the two.
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..model import AlbertConfig, AlbertModel
from ..model.layers import freeze
from . import accuracy, runtimes, timing
from .report import cell as _f

TOLERANCE = 1e-3       # max |diff| vs transformers' last_hidden_state, fp32
BASELINE = "transformers sdpa"
GEMM_PROBE, COPY_PROBE = "gemm_flop_s", "copy_bytes_s"


@dataclass
class Row:
    """One contender at one (B, L); median_s etc. None when not timed (skipped or raised)."""
    name: str
    batch: int
    seqlen: int
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    first_call_s: Optional[float] = None
    max_abs_diff: Optional[float] = None
    check: str = "not run"         # "ok", "FAILED (...)", "floor", "error: ..."
    speedup_vs_sdpa: Optional[float] = None  # transformers sdpa median / median (higher: faster)
    vs_floor: Optional[float] = None         # median / the floor
    q1_s: Optional[float] = None             # quartiles of the call times
    q3_s: Optional[float] = None
    spread: Optional[float] = None           # (q3_s - q1_s) / median_s
    ratio_spread: Optional[float] = None     # speedup_vs_sdpa's: this row's + the baseline's
    speedup_low: Optional[float] = None      # speedup_vs_sdpa's interquartile interval
    speedup_high: Optional[float] = None
    noisy: bool = False                      # the row's figures cannot be trusted: `flags` say why
    flags: list = field(default_factory=list)
    precision: Optional[str] = None          # what the contender computes in ("bfloat16", ...)
    err_max_abs: Optional[float] = None      # vs float64 transformers, real tokens (accuracy.py)
    err_min_cos: Optional[float] = None      # smallest per-token cosine to the float64 output
    err_budget: Optional[float] = None       # the run dtype's budget err_max_abs is held to
    over_budget: bool = False                # err_max_abs > err_budget (or NaN/inf)


@dataclass
class Contender:
    name: str
    call: Callable[[torch.Tensor], torch.Tensor]      # ids [B, L] -> last_hidden_state [B, L, H]
    skip: Optional[str] = None
    precision: Optional[str] = None   # what it computes in; None: runtime_precision(name) says


def _hf_model(cfg: AlbertConfig):
    import transformers
    hf_cfg = cfg.to_hf(attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.AlbertModel(hf_cfg).eval()


def _onnx_export(hf, cfg: AlbertConfig, path: str) -> str:
    """transformers model -> ONNX file with dynamic batch and length (input_ids only: the
    tracer first, then the dynamo exporter); the exporter used."""
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    return runtimes.export_onnx(hf, {"input_ids": ids}, path,
                                exporters=("torchscript", "dynamo"))


def _from_runtime(r: runtimes.Runtime) -> Contender:
    return Contender(r.name, None if r.run is None else
                     (lambda ids: r.run({"input_ids": ids})), r.skip)


def _ort(onnx_path: str, cfg: AlbertConfig, tmp: str, say) -> Contender:
    return _from_runtime(runtimes.onnxruntime_fp32(onnx_path, cfg, tmp, say,
                                                   name="onnxruntime")[0])


def _openvino(onnx_path: str) -> Contender:
    return _from_runtime(runtimes.openvino(onnx_path, name="openvino"))


def _guarded(name: str, build: Callable[[], Contender]) -> Contender:
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (an export failure skips the contender)
        return Contender(name, None, f"export/build failed: {type(e).__name__}: {str(e)[:200]}")


def contenders(cfg: AlbertConfig, hf, compile_baseline: bool, runtimes: bool, tmp: str,
               say, dtype: torch.dtype = torch.float32,
               autocast: Optional[torch.dtype] = None) -> list[Contender]:
    """Every contender on `hf`'s weights (skipped ones carry their reason): transformers, ours
    and torch.compile in `dtype` or under autocast (:func:`torch_contenders`), the runtimes on
    the ONNX export of `hf` (float32), at their own precision."""
    out = torch_contenders(hf, compile_baseline, dtype, autocast)
    if runtimes:
        path = os.path.join(tmp, "albert.onnx")
        try:
            say(f"ONNX export: {_onnx_export(hf, cfg, path)}")
        except Exception as e:  # noqa: BLE001
            reason = f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:200]}"
            return out + [Contender("onnxruntime", None, reason),
                          Contender("openvino", None, reason)]
        out.append(_guarded("onnxruntime", lambda: _ort(path, cfg, tmp, say)))
        out.append(_guarded("openvino", lambda: _openvino(path)))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def torch_contenders(hf, compile_baseline: bool, dtype: torch.dtype = torch.float32,
                     autocast: Optional[torch.dtype] = None) -> list[Contender]:
    """transformers sdpa (the baseline), ours (cpp; in float32 frozen and unfrozen, in other
    dtypes unfrozen: the frozen path is float32 only) and torch.compile of transformers, each on
    a copy of `hf` (float32) converted with ``.to(dtype)``, every call under
    ``torch.autocast("cpu", autocast)`` when `autocast` is a dtype (then `dtype` is float32).
    ValueError if both are other than float32."""
    if autocast is not None and dtype != torch.float32:
        raise ValueError(f"autocast: runs float32 models; dtype must be float32, got {dtype}")
    model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
    precision = (f"{dtype_name(autocast)} (autocast)" if autocast is not None
                 else dtype_name(dtype))

    def under_autocast(call):
        if autocast is None:
            return call

        def run(ids):
            with torch.autocast("cpu", dtype=autocast):
                return call(ids)
        return run

    out = [Contender(BASELINE, under_autocast(lambda ids: model(ids).last_hidden_state),
                     precision=precision)]
    names = ["ours (cpp)"] + (["ours (cpp, unfrozen)"] if dtype == torch.float32 else [])
    for name in names:
        c = _guarded(name, lambda name=name: _ours(model, frozen=name == "ours (cpp)"
                                                   and dtype == torch.float32))
        if c.skip is None:
            c.call, c.precision = under_autocast(c.call), precision
        c.name = name
        out.append(c)
    name = "torch.compile(transformers sdpa)"
    if compile_baseline:
        compiled = torch.compile(model, dynamic=False)
        out.append(Contender(name, under_autocast(lambda ids: compiled(ids).last_hidden_state),
                             precision=precision))
    else:
        out.append(Contender(name, None, "--no-compile"))
    return out


def runtime_precision(c: Contender) -> str:
    """What contender `c` computes in: its own `precision` when set, else what its name says
    ("int8", "f32"), else, for a runtime, the precision it runs a float32 model at by default
    (ONNX Runtime's CPU provider: float32; OpenVINO's CPU plugin: its INFERENCE_PRECISION_HINT,
    bf16 on CPUs with AVX512-BF16/AMX)."""
    if c.precision is not None:
        return c.precision
    name = c.name.lower()
    if "int8" in name:
        return "int8"
    if any(word in name for word in ("f32", "fp32", "float32")):
        return "float32"
    if name.startswith("openvino"):
        try:
            import openvino as ov
            hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
            return f"{getattr(hint, 'to_string', lambda: str(hint))()} (its default)"
        except Exception:  # noqa: BLE001 (unknown: say so rather than guess)
            return "unknown"
    return "float32" if name.startswith("onnxruntime") else "unknown"


def _ours(hf, frozen: bool) -> Contender:
    model = AlbertModel.from_hf(hf, backend="cpp").eval()
    if frozen:
        freeze(model)
    name = "ours (cpp)" if frozen else "ours (cpp, unfrozen)"
    return Contender(name, lambda ids: model(ids).last_hidden_state)


def floor_probes(cfg: AlbertConfig, copy_nbytes: int = 8 << 20,
                 dtype: torch.dtype = torch.float32
                 ) -> list[tuple[str, Callable[[], object], float]]:
    """The two rate probes, timed in the same rounds as the contenders, as (name, call, work per
    call): torch.mm at M = 512 tokens on the FFN-in shape [512, H] x [H, I] in `dtype` (work:
    FLOPs), and a cache-resident copy of an `copy_nbytes` buffer into another (work: bytes read
    + written)."""
    a = torch.randn(512, cfg.hidden_size).to(dtype)
    b = torch.randn(cfg.hidden_size, cfg.intermediate_size).to(dtype)
    src, dst = torch.randn(copy_nbytes // 4), torch.empty(copy_nbytes // 4)
    return [(GEMM_PROBE, lambda: torch.mm(a, b), 2 * 512 * cfg.hidden_size * cfg.intermediate_size),
            (COPY_PROBE, lambda: dst.copy_(src), 2 * copy_nbytes)]


def encoder_flops(cfg: AlbertConfig, tokens: int) -> int:
    """Matrix-product FLOPs of the encoder for `tokens` tokens (as model_workloads.gemm_floor)."""
    E, H, I = cfg.embedding_size, cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * H * H + 2 * H * I
    return 2 * tokens * (E * H + cfg.num_hidden_layers * cfg.inner_group_num * per_layer)


def weight_bytes(cfg: AlbertConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the shared layer's matrices in `dtype`, read once per layer application."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    size = torch.empty((), dtype=dtype).element_size()
    return size * (4 * H * H + 2 * H * I) * cfg.num_hidden_layers * cfg.inner_group_num


def _check(c: Contender, ids: torch.Tensor, ref: torch.Tensor, row: Row,
           tolerance: Optional[float] = TOLERANCE) -> Optional[torch.Tensor]:
    """Call `c` once (its first call at this shape, timed), compare with `ref`: max |diff| <=
    `tolerance`, or, with `tolerance` None, only the shape (the caller then gates on the error
    budget). Returns the output; None: it raised."""
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = c.call(ids)
        row.first_call_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (marks the row, the run goes on)
        row.check = f"error: {type(e).__name__}: {str(e)[:120]}"
        return None
    row.max_abs_diff = (out.float() - ref).abs().max().item() if out.shape == ref.shape else None
    ok = row.max_abs_diff is not None and (tolerance is None or row.max_abs_diff <= tolerance)
    row.check = "ok" if ok else (f"FAILED (max |diff| {row.max_abs_diff:.2e} > {tolerance})"
                                 if row.max_abs_diff is not None
                                 else f"FAILED (shape {tuple(out.shape)} != {tuple(ref.shape)})")
    return out


def _shape_rows(cfg, cons: list[Contender], batch: int, seqlen: int, floors: dict,
                min_time_s: float, say, gold: Optional[torch.nn.Module] = None,
                dtype: torch.dtype = torch.float32,
                precision: torch.dtype = torch.float32) -> list[Row]:
    """Check then time every contender at one (B, L), plus the two floor rows. `floors` holds the
    rates {"gemm_flop_s", "copy_bytes_s"}; an empty dict: measure them here, in the same rounds
    as the contenders (a loaded machine's slow phases then hit rates and contenders alike), and
    fill it in. `gold`: the float64 transformers model (accuracy.gold_model) each row's error is
    measured against, before timing (None: no error columns). `dtype`: the models' parameters
    (the GEMM probe's and the weight bytes' dtype); `precision`: what the run computes in
    (`dtype`, or autocast's dtype), whose error budget gates a run other than float32."""
    gen = torch.Generator().manual_seed(batch * 1000 + seqlen)
    ids = torch.randint(5, cfg.vocab_size, (batch, seqlen), generator=gen)
    with torch.inference_mode():
        ref = cons[0].call(ids).float()
    gold_out = None if gold is None else accuracy.gold_output(gold, ids)
    tolerance = TOLERANCE if precision == torch.float32 else None
    rows, timed = [], []
    for c in cons:
        row = Row(c.name, batch, seqlen, check=f"skipped: {c.skip}" if c.skip else "not run",
                  precision=None if c.skip else runtime_precision(c))
        rows.append(row)
        out = None if c.skip is not None else _check(c, ids, ref, row, tolerance)
        if out is None:
            continue
        if gold_out is not None and out.shape == gold_out.shape:
            err = accuracy.measure(out, gold_out, base=ref, dtype=precision)
            row.err_max_abs, row.err_min_cos = err.max_abs, err.min_cos
            row.err_budget, row.over_budget = err.budget, err.over_budget
            if tolerance is None and row.check == "ok" and err.over_budget:
                row.check = (f"FAILED (error {err.max_abs:.2e} over the "
                             f"{dtype_name(precision)} budget {err.budget:.2e})")
        def fn(c=c):
            with torch.inference_mode():
                c.call(ids)
        timed.append((row, fn))
    probes = [] if floors else floor_probes(cfg, dtype=precision)
    say(f"B{batch} L{seqlen}: timing {len(timed)} contenders round-robin")
    times, _ = timing.interleaved([fn for _, fn in timed] + [fn for _, fn, _ in probes],
                                  min_time_s, names=[r.name for r, _ in timed]
                                  + [n for n, _, _ in probes])
    for (row, _), ts in zip(timed, times):
        row.q1_s, row.median_s, row.q3_s = timing.quartiles(ts)
        row.min_s, row.max_s = min(ts), max(ts)
        row.spread = timing.spread(row.q1_s, row.median_s, row.q3_s)
    for (name, _, work), ts in zip(probes, times[len(timed):]):
        floors[name] = work / timing.quartiles(ts)[1]
    tokens = batch * seqlen
    flop_s = encoder_flops(cfg, tokens) / floors["gemm_flop_s"]
    byte_s = weight_bytes(cfg, dtype) / floors["copy_bytes_s"]
    rows.append(Row("floor: GEMM FLOPs at large-M rate", batch, seqlen, flop_s, check="floor"))
    rows.append(Row("floor: weight bytes at cache bandwidth", batch, seqlen, byte_s,
                    check="floor"))
    base = next((r for r in rows if r.name == BASELINE and r.median_s is not None), None)
    floor = max(flop_s, byte_s)
    for r in rows:
        if r.median_s is None:
            continue
        r.vs_floor = r.median_s / floor
        if base is None:
            continue
        r.speedup_vs_sdpa = base.median_s / r.median_s
        if r.check == "floor":
            continue
        r.ratio_spread = r.spread if r is base else timing.ratio_spread(r.spread, base.spread)
        r.speedup_low, r.speedup_high = base.q1_s / r.q3_s, base.q3_s / r.q1_s
        # the floor is a rate of MKL's GEMM and of a copy: the row's throughput over the floor's
        # may exceed 1 by what another GEMM gains on MKL's, not more
        r.flags = timing.flags(r.ratio_spread, 1.0 / r.vs_floor, timing.GEMM_CEILING_MAX)
        r.noisy = bool(r.flags)
    return rows


def run_latency(cfg: AlbertConfig, batches=(1, 4), lengths=(8, 32, 128), min_time_s: float = 2.0,
                compile_baseline: bool = True, runtimes: bool = True,
                say: Callable[[str], None] = lambda what: None,
                dtype: torch.dtype = torch.float32, autocast: Optional[torch.dtype] = None,
                errors: bool = True) -> tuple[list[Row], dict]:
    """The latency table's rows (each (B, L): contenders, then the two floors at the rates
    measured in that shape's rounds) and the rates' medians over the shapes {"gemm_flop_s",
    "copy_bytes_s"}. cfg: an AlbertConfig (random weights, float32, converted to `dtype` for the
    torch contenders; `autocast`: their calls under torch.autocast in that dtype, `dtype` then
    float32). errors: measure every row's error against float64 transformers (tools/accuracy.py).
    ValueError for autocast with a dtype other than float32."""
    if autocast is not None and dtype != torch.float32:
        raise ValueError(f"autocast: runs float32 models; dtype must be float32, got {dtype}")
    hf = _hf_model(cfg)
    gold = accuracy.gold_model(hf) if errors else None
    rows, rates = [], []
    with tempfile.TemporaryDirectory(prefix="ak_latency_") as tmp:
        cons = contenders(cfg, hf, compile_baseline, runtimes, tmp, say, dtype, autocast)
        for c in cons:
            if c.skip:
                say(f"skipping {c.name}: {c.skip}")
        for b in batches:
            for n in lengths:
                rates.append({})
                rows += _shape_rows(cfg, cons, b, n, rates[-1], min_time_s, say, gold, dtype,
                                    autocast or dtype)
    return rows, {k: statistics.median(r[k] for r in rates) for k in (GEMM_PROBE, COPY_PROBE)}


def format_latency(rows: list[Row], floors: dict,
                   precision: torch.dtype = torch.float32) -> str:
    """The table: contender, what it computes in, B, L, median ms, spread (min-max ms; IQR /
    median), speed-up vs transformers sdpa (its median / the row's; above 1: faster), time ratio
    vs the floor (the larger floor), the first call at that shape (compilation), the error
    against float64 transformers (max |err|, min per-token cosine) and the budget of the run's
    `precision` it is held to, check, and the "over budget" and noisy flags."""
    name = dtype_name(precision)
    lines = [f"large-M GEMM rate ({name}) {floors['gemm_flop_s'] / 1e9:.1f} GFLOP/s, "
             f"cache-resident copy {floors['copy_bytes_s'] / 1e9:.1f} GB/s (medians over the "
             "shapes; each shape's floors use the rates timed in its own rounds)",
             f"max |err|, min cos: last_hidden_state vs float64 transformers (eager, the float32 "
             f"weights), all tokens; budget: the {name} error budget (docs/correctness.md): "
             f"2 x max|transformers sdpa {name} - float64| + 4 eps({name}) max|float64|, per shape",
             f"{'contender':40s} {'precision':>18s} {'B':>2s} {'L':>4s} {'median ms':>10s} "
             f"{'min-max ms':>17s} {'spread':>6s} {'x sdpa':>8s} {'vs floor':>8s} "
             f"{'1st call s':>10s} {'max |err|':>9s} {'min cos':>9s} {'budget':>8s}  check"]
    for r in rows:
        spread = (f"{1e3 * r.min_s:8.2f}-{1e3 * r.max_s:8.2f}" if r.min_s is not None
                  else f"{'-':>17s}")
        marks = ([f"{accuracy.OVER_BUDGET} ({dtype_name(precision)})"] if r.over_budget else []) \
            + ([f"{timing.NOISY} ({'; '.join(r.flags)})"] if r.noisy else [])
        lines.append(f"{r.name[:40]:40s} {(r.precision or '')[:18]:>18s} {r.batch:2d} {r.seqlen:4d} "
                     f"{_f(None if r.median_s is None else 1e3 * r.median_s, '.2f', 10)} {spread} "
                     f"{_f(None if r.spread is None else 100 * r.spread, '.0f', 5)}% "
                     f"{_f(r.speedup_vs_sdpa, '.2f', 8)} {_f(r.vs_floor, '.2f', 8)} "
                     f"{_f(r.first_call_s, '.2f', 10)} {_f(r.err_max_abs, '.2e', 9)} "
                     f"{_f(r.err_min_cos, '.6f', 9)} {_f(r.err_budget, '.1e', 8)}  {r.check}"
                     + "".join(f"; {m}" for m in marks))
    return "\n".join(lines)


def plot_rows(rows: list[Row]) -> list[dict]:
    """The rows in the form tools/report.py's plot draws: one group per (B, L), its ratios against
    transformers sdpa, the floors drawn as ceilings."""
    return [{"group": f"B{r.batch} L{r.seqlen}", "name": r.name, "baseline": r.name == BASELINE,
             "baseline_name": BASELINE, "ceiling": r.check == "floor",
             "speedup_vs_baseline": r.speedup_vs_sdpa, "speedup_low": r.speedup_low,
             "speedup_high": r.speedup_high, "noisy": r.noisy} for r in rows]


LATENCY_DTYPES = ("float32", "bfloat16")


def main(args) -> int:
    """`albert-kernels bench --latency`: CPU, preset `args.preset`, `args.dtype` (float32 by
    default, or bfloat16) or float32 under `args.autocast`; --quick: L = 8 only, batch 1, short
    timing, no compile. Writes the JSON and the plot as `bench` does, the file names carrying
    the dtype (``latency-bfloat16_<time>.json``)."""
    import sys
    from dataclasses import asdict

    from .info import machine
    from .report import describe_machine, dtype_note, output_paths, write_outputs
    if args.device not in (None, "cpu"):
        print(f"--latency runs on the CPU; got --device {args.device}", file=sys.stderr)
        return 1
    dtype_arg = args.dtype or "float32"
    if dtype_arg not in LATENCY_DTYPES:
        print(f"--latency runs {' or '.join(LATENCY_DTYPES)}; got --dtype {dtype_arg}",
              file=sys.stderr)
        return 1
    autocast_arg = getattr(args, "autocast", None)
    if autocast_arg and dtype_arg != "float32":
        print(f"--autocast {autocast_arg} runs float32 models under autocast: --dtype must be "
              f"float32, got {dtype_arg}", file=sys.stderr)
        return 1
    dtype = getattr(torch, dtype_arg)
    autocast = getattr(torch, autocast_arg) if autocast_arg else None
    precision = autocast or dtype
    say = (lambda what: None) if args.quiet else (
        lambda what: print(f"[latency] {what}", file=sys.stderr, flush=True))
    batches, lengths = ((1,), (8,)) if args.quick else ((1, 4), (8, 32, 128))
    min_time = 0.2 if args.quick else args.min_time
    cfg = AlbertConfig.preset(args.preset)
    m = machine()
    note = dtype_note(dtype_name(precision))
    if note:
        print(note, file=sys.stderr, flush=True)
    rows, floors = run_latency(cfg, batches, lengths, min_time,
                               compile_baseline=not (args.no_compile or args.quick), say=say,
                               dtype=dtype, autocast=autocast)
    print(describe_machine(m))
    if note:
        print(note)
    print(format_latency(rows, floors, precision))
    print("\n" + timing.summary([r.noisy for r in rows
                                 if r.median_s is not None and r.check != "floor"]))
    over = [f"{r.name} B{r.batch} L{r.seqlen}" for r in rows if r.over_budget]
    if over:
        print(f"over the {dtype_name(precision)} error budget: {', '.join(over)}")
    kind = f"latency-{dtype_arg}" + (f"-autocast-{autocast_arg}" if autocast_arg else "")
    json_path, plot_path = output_paths(args, kind, m)
    doc = {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "config": {"preset": args.preset, "dtype": dtype_arg, "autocast": autocast_arg,
                      "batches": list(batches), "lengths": list(lengths),
                      "min_time": min_time, "padding": "none"},
           "notes": [note] if note else [],
           "error_reference": "float64 transformers (eager) on the float32 weights; budget: "
                              f"the {dtype_name(precision)} one of docs/correctness.md",
           "noisy_spread": timing.NOISY_SPREAD, "floors": floors,
           "results": [asdict(r) for r in rows]}
    what = dtype_arg + (f", autocast {autocast_arg}" if autocast_arg else "")
    for line in write_outputs(doc, plot_rows(rows), json_path, plot_path,
                              f"albert_kernels bench --latency (ALBERT-{args.preset}, {what})"):
        print(line)
    return 0
