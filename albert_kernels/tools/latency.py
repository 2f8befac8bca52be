"""`albert-kernels bench --latency`: one short request at a time (docs/performance.md).

ALBERT fp32 inference on unpadded inputs (batch 1 and 4, L = 8, 32, 128 by default), random
weights, under torch.inference_mode. Contenders, all on the same weights:

  ours (cpp)                    ak.AlbertModel.from_hf(transformers model, backend="cpp")
  transformers sdpa             the baseline of the ratios
  torch.compile(transformers)   dynamic=False; its first call (compilation) reported apart
  onnxruntime                   torch.onnx.export of the transformers model, then the
                                onnxruntime.transformers BERT optimizer (fusions) if it works for
                                the graph, else plain ORT with all graph optimizations
  openvino                      openvino.convert_model of the same ONNX file, compiled for CPU

A contender whose package is absent or whose export fails is skipped with the reason printed.
Before timing, every contender's last_hidden_state is compared with transformers' on the real
tokens (all of them: no padding): max |diff| <= 1e-3 or the row is marked "check FAILED" (it is
still timed; a contender that raises is marked and not timed). Timing: interleaved rounds, one
call of each contender per round (tools.bench.run_interleaved): median and min-max; "x sdpa" is
the speed-up over transformers sdpa (its median / the row's), "vs floor" the row's median / floor.

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
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..model import AlbertConfig, AlbertModel
from .bench import run_interleaved
from .workloads import Workload

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
    """transformers model -> ONNX file with dynamic batch and length; the exporter used."""
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    wrapped = _LastHidden(hf)
    kw = dict(input_names=["input_ids"], output_names=["last_hidden_state"])
    try:
        torch.onnx.export(wrapped, (ids,), path, dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}}, **kw)
        return "torchscript exporter"
    except Exception:               # legacy exporter gone or failing: the dynamo exporter
        batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
        torch.onnx.export(wrapped, (ids,), path, dynamo=True, **kw,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}})
        return "dynamo exporter"


class _LastHidden(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids):
        return self.hf(input_ids).last_hidden_state


def _ort(onnx_path: str, cfg: AlbertConfig, tmp: str, say) -> Contender:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Contender("onnxruntime", None, f"onnxruntime not installed ({e})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    name, path = "onnxruntime (bert fusions)", os.path.join(tmp, "albert_opt.onnx")
    try:
        from onnxruntime.transformers.optimizer import optimize_model
        opt = optimize_model(onnx_path, model_type="bert", num_heads=cfg.num_attention_heads,
                             hidden_size=cfg.hidden_size)
        opt.save_model_to_file(path)
        say(f"onnxruntime fusions: {opt.get_fused_operator_statistics()}")
    except Exception as e:  # noqa: BLE001 (any optimizer failure: plain ORT instead)
        say(f"onnxruntime transformers optimizer failed ({type(e).__name__}: {e}); plain ORT")
        name, path = "onnxruntime (graph opt all)", onnx_path
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return Contender(name, lambda ids: torch.from_numpy(
        sess.run(None, {"input_ids": ids.numpy()})[0]))


def _openvino(onnx_path: str) -> Contender:
    try:
        import openvino as ov
    except ImportError as e:
        return Contender("openvino", None, f"openvino not installed ({e})")
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU")
    out = compiled.output(0)
    return Contender("openvino", lambda ids: torch.from_numpy(
        compiled({0: ids.numpy()})[out].copy()))


def _guarded(name: str, build: Callable[[], Contender]) -> Contender:
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (an export failure skips the contender)
        return Contender(name, None, f"export/build failed: {type(e).__name__}: {str(e)[:200]}")


def contenders(cfg: AlbertConfig, hf, compile_baseline: bool, runtimes: bool, tmp: str,
               say) -> list[Contender]:
    """Every contender on `hf`'s weights (skipped ones carry their reason)."""
    out = [Contender(BASELINE, lambda ids: hf(ids).last_hidden_state)]
    out.append(_guarded("ours (cpp)", lambda: _ours(hf)))
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


def _ours(hf) -> Contender:
    model = AlbertModel.from_hf(hf, backend="cpp").eval()
    return Contender("ours (cpp)", lambda ids: model(ids).last_hidden_state)


def floor_workloads(cfg: AlbertConfig, copy_nbytes: int = 8 << 20) -> list[Workload]:
    """The two rate probes, timed in the same rounds as the contenders: torch.mm at M = 512 tokens
    on the FFN-in shape [512, H] x [H, I] (work: FLOPs), and a cache-resident copy of an
    `copy_nbytes` buffer into another (work: bytes read + written)."""
    a, b = torch.randn(512, cfg.hidden_size), torch.randn(cfg.hidden_size, cfg.intermediate_size)
    src, dst = torch.randn(copy_nbytes // 4), torch.empty(copy_nbytes // 4)
    return [Workload("floor", GEMM_PROBE, lambda: torch.mm(a, b),
                     2 * 512 * cfg.hidden_size * cfg.intermediate_size, "GFLOP/s"),
            Workload("floor", COPY_PROBE, lambda: dst.copy_(src), 2 * copy_nbytes, "GB/s")]


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
            timed.append((row, Workload(f"B{batch} L{seqlen}", c.name, fn, batch * seqlen,
                                        "tokens/s")))
    probes = [] if floors else floor_workloads(cfg)
    say(f"B{batch} L{seqlen}: timing {len(timed)} contenders round-robin")
    results = run_interleaved([w for _, w in timed] + probes, min_time_s)
    for (row, _), r in zip(timed, results):
        row.median_s, row.min_s, row.max_s = r.median_s, r.min_s, r.max_s
    for w, r in zip(probes, results[len(timed):]):
        floors[w.name] = w.work / r.median_s
    tokens = batch * seqlen
    flop_s = encoder_flops(cfg, tokens) / floors["gemm_flop_s"]
    byte_s = weight_bytes(cfg) / floors["copy_bytes_s"]
    rows.append(Row("floor: GEMM FLOPs at large-M rate", batch, seqlen, flop_s, check="floor"))
    rows.append(Row("floor: weight bytes at cache bandwidth", batch, seqlen, byte_s,
                    check="floor"))
    base = next((r.median_s for r in rows if r.name == BASELINE), None)
    for r in rows:
        if r.median_s is not None:
            r.speedup_vs_sdpa = base / r.median_s if base else None
            r.vs_floor = r.median_s / max(flop_s, byte_s)
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
    """The table: contender, B, L, median ms, spread (min-max ms), speed-up vs transformers sdpa
    (its median / the row's; above 1: faster), time ratio vs the floor (the larger floor), the
    first call at that shape (compilation), check."""
    lines = [f"large-M GEMM rate {floors['gemm_flop_s'] / 1e9:.1f} GFLOP/s, cache-resident copy "
             f"{floors['copy_bytes_s'] / 1e9:.1f} GB/s (medians over the shapes; each shape's "
             "floors use the rates timed in its own rounds)",
             f"{'contender':40s} {'B':>2s} {'L':>4s} {'median ms':>10s} {'min-max ms':>17s} "
             f"{'x sdpa':>8s} {'vs floor':>8s} {'1st call s':>10s}  check"]
    for r in rows:
        spread = (f"{1e3 * r.min_s:8.2f}-{1e3 * r.max_s:8.2f}" if r.min_s is not None
                  else f"{'-':>17s}")
        lines.append(f"{r.name[:40]:40s} {r.batch:2d} {r.seqlen:4d} "
                     f"{_f(None if r.median_s is None else 1e3 * r.median_s, '.2f', 10)} {spread} "
                     f"{_f(r.speedup_vs_sdpa, '.2f', 8)} {_f(r.vs_floor, '.2f', 8)} "
                     f"{_f(r.first_call_s, '.2f', 10)}  {r.check}")
    return "\n".join(lines)


def main(args) -> int:
    """`albert-kernels bench --latency`: CPU, fp32, preset `args.preset`; --quick: L = 8 only,
    batch 1, short timing, no compile."""
    import json
    import sys
    from dataclasses import asdict
    from .info import machine
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
    print(format_latency(rows, floors))
    if args.json:
        doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "config": {"preset": args.preset, "dtype": "float32", "batches": list(batches),
                          "lengths": list(lengths), "min_time": min_time, "padding": "none"},
               "floors": floors, "results": [asdict(r) for r in rows]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    return 0
