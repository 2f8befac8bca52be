"""The default path against the opt-in frozen weights (albert_kernels.freeze) and transformers sdpa.

ALBERT-base, random weights, fp32 CPU inference under torch.inference_mode, no padding; B=1 at
L = 8, 32, 128 and B=8 at L = 128. The contenders of ``bench --latency`` without torch.compile
and the serving runtimes: transformers sdpa, ours (cpp) = frozen, ours (cpp, unfrozen) = the
default path; timed interleaved in one process (tools.bench.run_interleaved), same weights.

    python benchmarks/frozen_vs_default.py [--threads 2] [--min-time 2]
"""
import argparse

import torch

from albert_kernels.model.config import AlbertConfig
from albert_kernels.tools.latency import format_latency, run_latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AlbertConfig.preset("base")
    for batches, lengths in (((1,), (8, 32, 128)), ((8,), (128,))):
        rows, floors = run_latency(cfg, batches, lengths, args.min_time, compile_baseline=False,
                                   runtimes=False)
        print(format_latency(rows, floors))


if __name__ == "__main__":
    main()
