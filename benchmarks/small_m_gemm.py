"""Small-M fp32 matrix products on the CPU: which library path serves one short request best
(the measurement behind albert_kernels/backends/cpp/frozen.py and backends/cpp/isa.py).

    python benchmarks/small_m_gemm.py [--min-time 0.5] [--tokens 1 8 32 128] [--loop-only]
                                      [--threads N] [--paths NAME ...] [--no-loop] [--json FILE]

For M tokens and ALBERT-base's shapes (y = x @ W^T + b, W [N, K]: 768x768 attention output,
2304x768 fused Q/K/V, 3072x768 FFN in, 768x3072 FFN out) it times, interleaved round-robin (one
call of each path per round; medians), in GFLOP/s:

  F.linear        torch.nn.functional.linear on the nn.Linear weight (MKL sgemm as torch calls
                  it: the weight is re-read and repacked on every call)
  mkl packed      torch.ops.mkl._mkl_reorder_linear_weight(W, M) once, then
                  torch.ops.mkl._mkl_linear (MKL cblas_sgemm_compute on the packed weight; the
                  packing is for one batch size: another M falls back to the unpacked product)
  mkl packed@64   the same packed for M = 64, called with M rows (the fallback's cost)
  onednn packed   torch.ops.mkldnn._reorder_linear_weight(W, M) once, then
                  torch.ops.mkldnn._linear_pointwise(x, Wp, b, "none") (what torch.compile's CPU
                  freezing uses for low-precision weights)
  onednn packed@64  packed for M = 64 (the blocked layout does not depend on M), called with M
  fbgemm fp16     torch.fbgemm_linear_fp16_weight_fp32_activation (fbgemm's only packed path
                  with fp32 activations: the WEIGHT is rounded to fp16, so it is listed for its
                  speed only; it is outside the fp32 error budget)
  ours small-M    the cpp backend's kernel (csrc/cpu/small_m.cpp): pack_linear_weight once, then
                  packed_linear (what albert_kernels/backends/cpp/frozen.py runs); skipped when
                  the cpp extension does not load

(``--paths`` keeps only the named ones), then the whole shared-weight encoder loop (12 applications
of one layer's four products: fused QKV, attention output, FFN in, FFN out; 28 MB of weights that
stay in L3) per path, in GFLOP/s and ms, against the large-M rate (torch.mm at M = 512)
(``--no-loop`` skips it). ``--json`` writes every median with the CPU's model name and flags
(the per-ISA kernel table of albert_kernels/backends/cpp/isa.py is read off such files).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

H, I, LAYERS = 768, 3072, 12
SHAPES = {"attn out 768x768": (H, H), "fused qkv 2304x768": (3 * H, H),
          "ffn in 3072x768": (I, H), "ffn out 768x3072": (H, I)}


def _small_m_ops():
    """torch.ops.albert_kernels when the cpp extension loads, else None."""
    from albert_kernels.backends import unavailable_reason
    if unavailable_reason("cpp", "cpu") is not None:
        return None
    from albert_kernels.backends.extension import ops
    return ops._ops


def paths(w: torch.Tensor, b: torch.Tensor, m: int) -> dict:
    """name -> fn(x) for one weight [N, K] and bias [N] at M = m rows."""
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    mkl64 = torch.ops.mkl._mkl_reorder_linear_weight(w, 64)
    dnn = torch.ops.mkldnn._reorder_linear_weight(w, m)
    dnn64 = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    fp16 = torch.fbgemm_pack_gemm_matrix_fp16(w)
    ours, ops = {}, _small_m_ops()
    if ops is not None:
        packed, n = ops.pack_linear_weight(w), w.shape[0]
        ours["ours small-M"] = lambda x: ops.packed_linear(x, packed, n, b)
    return ours | {
        "F.linear": lambda x: F.linear(x, w, b),
        "mkl packed": lambda x: torch.ops.mkl._mkl_linear(x, mkl, w, b, m),
        "mkl packed@64": lambda x: torch.ops.mkl._mkl_linear(x, mkl64, w, b, 64),
        "onednn packed": lambda x: torch.ops.mkldnn._linear_pointwise(x, dnn, b, "none", [], ""),
        "onednn packed@64": lambda x: torch.ops.mkldnn._linear_pointwise(x, dnn64, b, "none", [],
                                                                         ""),
        "fbgemm fp16": lambda x: torch.fbgemm_linear_fp16_weight_fp32_activation(x, fp16, b),
    }


def interleaved(fns: dict, min_time: float) -> dict:
    """name -> median seconds, one call of each per round until each has min_time of calls."""
    for f in fns.values():
        f(), f()
    times = {k: [] for k in fns}
    while min(sum(t) for t in times.values()) < min_time or min(map(len, times.values())) < 5:
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def cpu_description() -> dict:
    """The CPU's model name, its vector ISA flags and torch's CPU capability."""
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and ":" in line:
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return {"model": model, "isa_flags": isa,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--loop-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                    "torch's; 1 keeps a loaded machine's descheduled threads out of the figures)")
    ap.add_argument("--paths", nargs="+", default=None,
                    help="keep only these paths (names as printed, e.g. 'ours small-M' F.linear)")
    ap.add_argument("--no-loop", action="store_true", help="the single products only")
    ap.add_argument("--json", default=None, help="write the medians (and the CPU) to this file")
    args = ap.parse_args()
    if args.loop_only and args.no_loop:
        ap.error("--loop-only and --no-loop leave nothing to time")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = {name: (torch.randn(n, k) * 0.02, torch.randn(n) * 0.02)
               for name, (n, k) in SHAPES.items()}
    record = {"cpu": cpu_description(), "threads": torch.get_num_threads(),
              "min_time_s": args.min_time, "products": [], "loop": []}

    def keep(fns: dict) -> dict:
        if args.paths is None:
            return fns
        unknown = set(args.paths) - set(fns)
        if unknown:
            ap.error(f"--paths: unknown {sorted(unknown)}; known: {sorted(fns)}")
        return {k: f for k, f in fns.items() if k in args.paths}

    with torch.inference_mode():
        a, bm = torch.randn(512, H), torch.randn(H, I)
        big = interleaved({"mm": lambda: torch.mm(a, bm)}, args.min_time)["mm"]
        record["large_m_gflops"] = 2 * 512 * H * I / big / 1e9
        print(f"large-M rate (torch.mm 512x768 @ 768x3072): {record['large_m_gflops']:.1f} "
              f"GFLOP/s; torch threads {torch.get_num_threads()}")
        for m in args.tokens:
            per = {name: keep(paths(w, b, m)) for name, (w, b) in weights.items()}
            names = list(next(iter(per.values())))
            if not args.loop_only:
                for shape, (n, k) in SHAPES.items():
                    x = torch.randn(m, k)
                    med = interleaved({p: (lambda f=f: f(x)) for p, f in per[shape].items()},
                                      args.min_time)
                    record["products"].append({"M": m, "N": n, "K": k, "shape": shape,
                                               "median_s": med})
                    print(f"M={m:4d} {shape:20s} " + "  ".join(
                        f"{p} {2 * m * n * k / s / 1e9:6.1f}" for p, s in med.items()), flush=True)
            if args.no_loop:
                continue
            x_h = torch.randn(m, H)

            def loop(p):
                qkv, o = per["fused qkv 2304x768"][p], per["attn out 768x768"][p]
                f1, f2 = per["ffn in 3072x768"][p], per["ffn out 768x3072"][p]

                def run():
                    h = x_h
                    for _ in range(LAYERS):
                        qkv(h)
                        h = o(h)
                        h = f2(f1(h))
                    return h
                return run
            med = interleaved({p: loop(p) for p in names}, args.min_time)
            flops = 2 * m * LAYERS * (4 * H * H + 2 * H * I)
            record["loop"].append({"M": m, "median_s": med})
            print(f"M={m:4d} 12-layer loop      " + "  ".join(
                f"{p} {flops / s / 1e9:6.1f} GFLOP/s {1e3 * s:6.2f} ms" for p, s in med.items()),
                flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
