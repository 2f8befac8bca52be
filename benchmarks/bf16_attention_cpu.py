"""The cpp backend's bf16 varlen attention forward: the AMX kernel against the fp32-arithmetic
one (``ALBERT_KERNELS_CPU_BF16_ATTENTION=fp32``), interleaved in one process.

ALBERT-base's attention shape (12 heads, head_dim 64) on 8 packed sequences of 40 to 128 tokens
(753 tokens, as the B8 L128 realistic batch). Each round times 3 calls of each kernel; prints
the medians and the median of the per-round ratios. Run:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bf16_attention_cpu.py --rounds 15
"""
import argparse
import os
import statistics
import time

import torch

from albert_kernels.backends import cpp
from albert_kernels.backends.cpp import isa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = [128, 40, 97, 128, 60, 128, 112, 60]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    tokens = int(cu[-1])
    q, k, v = (torch.randn(tokens, 12, 64).bfloat16() for _ in range(3))
    print(f"{tokens} tokens, kernel by default: {isa.bf16_attention_kernel()}, "
          f"threads {args.threads}")
    times = {"auto": [], "fp32": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for mode in times:
                os.environ[isa.BF16_ATTENTION_ENV] = mode
                t0 = time.perf_counter()
                for _ in range(3):
                    cpp.varlen_attention(q, k, v, cu, cu, 128, 128, 0.125)
                times[mode].append((time.perf_counter() - t0) / 3)
    os.environ.pop(isa.BF16_ATTENTION_ENV)
    for mode, ts in times.items():
        print(f"{mode:5s} median {statistics.median(ts) * 1e3:.3f} ms, min {min(ts) * 1e3:.3f} ms")
    ratios = [f / a for a, f in zip(times["auto"], times["fp32"])]
    print(f"fp32 / auto per round: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
