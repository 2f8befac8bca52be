"""`albert-kernels bench --latency`: one short request at a time (docs/performance.md).

ALBERT fp32 inference on unpadded inputs (batch 1 and 4, L = 8, 32, 128 by default), random
weights, under torch.inference_mode. Contenders, all on the same weights:

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
Before timing, every contender's last_hidden_state is compared with transformers' on the real
tokens (all of them: no padding): max |diff| <= 1e-3 or the row is marked "check FAILED" (it is
still timed; a contender that raises is marked and not timed). Timing: interleaved rounds, one
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

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..model import AlbertConfig, AlbertModel
from ..model.layers import freeze
from . import runtimes, timing

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


@dataclass
class Contender:
    name: str
    call: Callable[[torch.Tensor], torch.Tensor]      # ids [B, L] -> last_hidden_state [B, L, H]
    skip: Optional[str] = None


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
               say) -> list[Contender]:
    """Every contender on `hf`'s weights (skipped ones carry their reason)."""
    out = [Contender(BASELINE, lambda ids: hf(ids).last_hidden_state)]
    out.append(_guarded("ours (cpp)", lambda: _ours(hf, frozen=True)))
    out.append(_guarded("ours (cpp, unfrozen)", lambda: _ours(hf, frozen=False)))
    if compile_baseline:
        compiled = torch.compile(hf, dynamic=False)
        out.append(Contender("torch.compile(transformers sdpa)",
                             lambda ids: compiled(ids).last_hidden_state))
    else:
        out.append(Contender("torch.compile(transformers sdpa)", None, "--no-compile"))
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


def _ours(hf, frozen: bool) -> Contender:
    model = AlbertModel.from_hf(hf, backend="cpp").eval()
    if frozen:
        freeze(model)
    name = "ours (cpp)" if frozen else "ours (cpp, unfrozen)"
    return Contender(name, lambda ids: model(ids).last_hidden_state)


def floor_probes(cfg: AlbertConfig, copy_nbytes: int = 8 << 20
                 ) -> list[tuple[str, Callable[[], object], float]]:
    """The two rate probes, timed in the same rounds as the contenders, as (name, call, work per
    call): torch.mm at M = 512 tokens on the FFN-in shape [512, H] x [H, I] (work: FLOPs), and a
    cache-resident copy of an `copy_nbytes` buffer into another (work: bytes read + written)."""
    a, b = torch.randn(512, cfg.hidden_size), torch.randn(cfg.hidden_size, cfg.intermediate_size)
    src, dst = torch.randn(copy_nbytes // 4), torch.empty(copy_nbytes // 4)
    return [(GEMM_PROBE, lambda: torch.mm(a, b), 2 * 512 * cfg.hidden_size * cfg.intermediate_size),
            (COPY_PROBE, lambda: dst.copy_(src), 2 * copy_nbytes)]


def encoder_flops(cfg: AlbertConfig, tokens: int) -> int:
    """Matrix-product FLOPs of the encoder for `tokens` tokens (as model_workloads.gemm_floor)."""
    E, H, I = cfg.embedding_size, cfg.hidden_size, cfg.intermediate_size
    per_layer = 4 * H * H + 2 * H * I
    return 2 * tokens * (E * H + cfg.num_hidden_layers * cfg.inner_group_num * per_layer)


def weight_bytes(cfg: AlbertConfig) -> int:
    """fp32 bytes of the shared layer's matrices, read once per layer application."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return 4 * (4 * H * H + 2 * H * I) * cfg.num_hidden_layers * cfg.inner_group_num


def _check(c: Contender, ids: torch.Tensor, ref: torch.Tensor, row: Row) -> bool:
    """Call `c` once (its first call at this shape, timed), compare with `ref`; False: it raised."""
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = c.call(ids)
        row.first_call_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (marks the row, the run goes on)
        row.check = f"error: {type(e).__name__}: {str(e)[:120]}"
        return False
    row.max_abs_diff = (out.float() - ref).abs().max().item() if out.shape == ref.shape else None
    ok = row.max_abs_diff is not None and row.max_abs_diff <= TOLERANCE
    row.check = "ok" if ok else (f"FAILED (max |diff| {row.max_abs_diff:.2e} > {TOLERANCE})"
                                 if row.max_abs_diff is not None
                                 else f"FAILED (shape {tuple(out.shape)} != {tuple(ref.shape)})")
    return True


def _shape_rows(cfg, cons: list[Contender], batch: int, seqlen: int, floors: dict,
                min_time_s: float, say) -> list[Row]:
    """Check then time every contender at one (B, L), plus the two floor rows. `floors` holds the
    rates {"gemm_flop_s", "copy_bytes_s"}; an empty dict: measure them here, in the same rounds
    as the contenders (a loaded machine's slow phases then hit rates and contenders alike), and
    fill it in."""
    gen = torch.Generator().manual_seed(batch * 1000 + seqlen)
    ids = torch.randint(5, cfg.vocab_size, (batch, seqlen), generator=gen)
    with torch.inference_mode():
        ref = cons[0].call(ids).float()
    rows, timed = [], []
    for c in cons:
        row = Row(c.name, batch, seqlen, check=f"skipped: {c.skip}" if c.skip else "not run")
        rows.append(row)
        if c.skip is None and _check(c, ids, ref, row):
            def fn(c=c):
                with torch.inference_mode():
                    c.call(ids)
            timed.append((row, fn))
    probes = [] if floors else floor_probes(cfg)
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
    byte_s = weight_bytes(cfg) / floors["copy_bytes_s"]
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
                say: Callable[[str], None] = lambda what: None) -> tuple[list[Row], dict]:
    """The latency table's rows (each (B, L): contenders, then the two floors at the rates
    measured in that shape's rounds) and the rates' medians over the shapes {"gemm_flop_s",
    "copy_bytes_s"}. cfg: an AlbertConfig (fp32, random weights)."""
    hf = _hf_model(cfg)
    rows, rates = [], []
    with tempfile.TemporaryDirectory(prefix="ak_latency_") as tmp:
        cons = contenders(cfg, hf, compile_baseline, runtimes, tmp, say)
        for c in cons:
            if c.skip:
                say(f"skipping {c.name}: {c.skip}")
        for b in batches:
            for n in lengths:
                rates.append({})
                rows += _shape_rows(cfg, cons, b, n, rates[-1], min_time_s, say)
    return rows, {k: statistics.median(r[k] for r in rates) for k in (GEMM_PROBE, COPY_PROBE)}


def _f(v: Optional[float], spec: str, width: int) -> str:
    return f"{format(v, spec) if v is not None else '-':>{width}s}"


def format_latency(rows: list[Row], floors: dict) -> str:
    """The table: contender, B, L, median ms, spread (min-max ms; IQR / median), speed-up vs
    transformers sdpa (its median / the row's; above 1: faster), time ratio vs the floor (the
    larger floor), the first call at that shape (compilation), check, and the noisy flag."""
    lines = [f"large-M GEMM rate {floors['gemm_flop_s'] / 1e9:.1f} GFLOP/s, cache-resident copy "
             f"{floors['copy_bytes_s'] / 1e9:.1f} GB/s (medians over the shapes; each shape's "
             "floors use the rates timed in its own rounds)",
             f"{'contender':40s} {'B':>2s} {'L':>4s} {'median ms':>10s} {'min-max ms':>17s} "
             f"{'spread':>6s} {'x sdpa':>8s} {'vs floor':>8s} {'1st call s':>10s}  check"]
    for r in rows:
        spread = (f"{1e3 * r.min_s:8.2f}-{1e3 * r.max_s:8.2f}" if r.min_s is not None
                  else f"{'-':>17s}")
        lines.append(f"{r.name[:40]:40s} {r.batch:2d} {r.seqlen:4d} "
                     f"{_f(None if r.median_s is None else 1e3 * r.median_s, '.2f', 10)} {spread} "
                     f"{_f(None if r.spread is None else 100 * r.spread, '.0f', 5)}% "
                     f"{_f(r.speedup_vs_sdpa, '.2f', 8)} {_f(r.vs_floor, '.2f', 8)} "
                     f"{_f(r.first_call_s, '.2f', 10)}  {r.check}"
                     + (f"; {timing.NOISY} ({'; '.join(r.flags)})" if r.noisy else ""))
    return "\n".join(lines)


def plot_rows(rows: list[Row]) -> list[dict]:
    """The rows in the form tools/report.py's plot draws: one group per (B, L), its ratios against
    transformers sdpa, the floors drawn as ceilings."""
    return [{"group": f"B{r.batch} L{r.seqlen}", "name": r.name, "baseline": r.name == BASELINE,
             "baseline_name": BASELINE, "ceiling": r.check == "floor",
             "speedup_vs_baseline": r.speedup_vs_sdpa, "speedup_low": r.speedup_low,
             "speedup_high": r.speedup_high, "noisy": r.noisy} for r in rows]


def main(args) -> int:
    """`albert-kernels bench --latency`: CPU, fp32, preset `args.preset`; --quick: L = 8 only,
    batch 1, short timing, no compile. Writes the JSON and the plot as `bench` does."""
    import sys
    from dataclasses import asdict

    from .info import machine
    from .report import describe_machine, output_paths, write_outputs
    if args.device not in (None, "cpu"):
        print(f"--latency runs on the CPU; got --device {args.device}", file=sys.stderr)
        return 1
    say = (lambda what: None) if args.quiet else (
        lambda what: print(f"[latency] {what}", file=sys.stderr, flush=True))
    batches, lengths = ((1,), (8,)) if args.quick else ((1, 4), (8, 32, 128))
    min_time = 0.2 if args.quick else args.min_time
    cfg = AlbertConfig.preset(args.preset)
    rows, floors = run_latency(cfg, batches, lengths, min_time,
                               compile_baseline=not (args.no_compile or args.quick), say=say)
    m = machine()
    print(describe_machine(m))
    print(format_latency(rows, floors))
    print("\n" + timing.summary([r.noisy for r in rows
                                 if r.median_s is not None and r.check != "floor"]))
    json_path, plot_path = output_paths(args, "latency", m)
    doc = {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "config": {"preset": args.preset, "dtype": "float32", "batches": list(batches),
                      "lengths": list(lengths), "min_time": min_time, "padding": "none"},
           "noisy_spread": timing.NOISY_SPREAD, "floors": floors,
           "results": [asdict(r) for r in rows]}
    for line in write_outputs(doc, plot_rows(rows), json_path, plot_path,
                              f"albert_kernels bench --latency (ALBERT-{args.preset}, fp32)"):
        print(line)
    return 0
