"""Each op against its PyTorch expression, torch.compile of it and the hardware ceiling."""
import pytest

from albert_kernels.tools.workloads import (add_layer_norm_workloads, attention_workloads,
                                            linear_gelu_workloads)
from conftest import DEVICE, DTYPE, workload_id

WORKLOADS = (add_layer_norm_workloads(1024, 768, DTYPE, DEVICE)
             + linear_gelu_workloads(1024, 768, 3072, DTYPE, DEVICE)
             + attention_workloads(8, 12, 128, 64, "realistic", DTYPE, DEVICE)
             + attention_workloads(8, 12, 128, 64, "none", DTYPE, DEVICE))


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_op(benchmark, workload):
    benchmark.group = workload.group
    benchmark.extra_info.update(unit=workload.unit, work=workload.work,
                                baseline=workload.baseline, ceiling=workload.ceiling)
    benchmark(workload.fn)
