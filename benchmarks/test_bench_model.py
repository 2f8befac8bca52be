"""ALBERT-base forward and training step: ours vs transformers (eager, sdpa) and the GEMM floor."""
import pytest

from albert_kernels.tools.model_workloads import model_workloads
from conftest import DEVICE, DTYPE, workload_id

WORKLOADS = (model_workloads("base", 8, 128, "realistic", "forward", DTYPE, DEVICE,
                             compile_baseline=False)
             + model_workloads("base", 8, 128, "realistic", "train", DTYPE, DEVICE,
                               compile_baseline=False))


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_model(benchmark, workload):
    benchmark.group = workload.group
    benchmark.extra_info.update(unit=workload.unit, real_tokens=workload.work)
    benchmark.pedantic(workload.fn, rounds=3, warmup_rounds=1)
