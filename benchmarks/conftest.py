"""pytest-benchmark suites: `pytest benchmarks --benchmark-only`. They time the same workloads as
`albert-kernels bench` (albert_kernels/tools/workloads.py), so the two never drift apart."""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def workload_id(w) -> str:
    return f"{w.group} | {w.name}"
