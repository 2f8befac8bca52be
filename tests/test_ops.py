"""Every non-reference backend, every op, forward and backward, held to the error budget against
the reference (docs/correctness.md). Backends that cannot run here are skipped with their reason."""
import pytest
import torch

from albert_kernels.backends import backend_names, unavailable_reason
from albert_kernels.tools.cases import CASES, DTYPES, case_applies, run_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CANDIDATES = [(b, d) for b in backend_names() if b != "reference" for d in DEVICES]


def _skip_unless_runs(backend: str, device: str, case) -> None:
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    if not case_applies(case, backend, device):
        pytest.skip("the Triton interpreter runs the small cases only")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}:{c.name}" for c in CASES])
@pytest.mark.parametrize("backend,device", CANDIDATES, ids=[f"{b}-{d}" for b, d in CANDIDATES])
def test_op_within_budget(backend, device, case, dtype):
    _skip_unless_runs(backend, device, case)
    results = run_case(case, backend, DTYPES[dtype], device)
    failed = {k: str(v) for k, v in results.items() if not v.ok}
    assert not failed, f"{case.op} {case.name} {dtype} on {backend}/{device}: {failed}"
