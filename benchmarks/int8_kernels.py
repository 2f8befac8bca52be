"""The int8 product's kernels against fp32 ``F.linear`` on all-MiniLM-L6-v2's shapes: the
measurements behind ``backends/cpp/isa.py``'s ``INT8_VNNI_MAX_TOKENS`` (docs/performance.md,
"int8 products"). Per (M, N, K): the median time of ``int8_linear`` (per-token quantization,
product, fp32 epilogue with bias) on each kernel this CPU runs, and of fp32 ``F.linear``, the
contenders interleaved round by round.

    PYTHONPATH=$PWD python benchmarks/int8_kernels.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import albert_kernels  # noqa: F401  loads the extension
    from albert_kernels.backends.cpp import isa
    from albert_kernels.backends.extension import ops as _ext  # noqa: F401
    ops = torch.ops.albert_kernels
    kernels = []
    for name in ("vnni", "library", "avx2"):
        try:
            kernels.append(isa.int8_kernel(1, force=name))
        except ValueError:
            pass
    if "vnni" not in kernels and "library" in kernels:
        kernels.remove("library")  # not exact without VNNI / AMX
    print(f"threads {args.threads}; kernels {kernels}; times in us (median); shared machine")
    print(f"{'M':>5s} {'N':>5s} {'K':>5s} {'fp32':>9s} " + " ".join(f"{k:>9s}" for k in kernels))
    gen = torch.Generator().manual_seed(0)
    for m in (1, 8, 32, 64, 128, 512, 2048):
        for n, k in ((384, 384), (1536, 384), (384, 1536)):
            x, w, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), \
                torch.randn(n, generator=gen)
            wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            packed, ws, sums = ops.int8_pack_weight(wq), torch.rand(n), wq.sum(1, dtype=torch.int32)
            fns = {"fp32": lambda: torch.nn.functional.linear(x, w, b)}
            for name in kernels:
                fns[name] = (lambda name=name: ops.int8_linear(x, packed, wq, ws, sums, b, None,
                                                               None, name))
            times = {name: [] for name in fns}
            for r in range(args.rounds + 1):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    if r:
                        times[name].append(time.perf_counter() - t0)
            row = " ".join(f"{np.median(times[name]) * 1e6:9.1f}" for name in fns)
            print(f"{m:5d} {n:5d} {k:5d} {row}", flush=True)


if __name__ == "__main__":
    main()
