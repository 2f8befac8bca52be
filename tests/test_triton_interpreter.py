"""Multi-block paths of the Triton kernels under the interpreter (CPU, no GPU).

The quick cases of tools/cases.py fit in one block per program (L <= 16, a single GEMM tile), so
they never run the online-softmax rescaling across key blocks, the skip of leading padding blocks
(left padding), dK/dV loops over several query blocks, multi-tile GEMMs with a K loop, or the
grouped tile order. These medium cases from the shared list do, at a few seconds each. On a GPU
test_ops.py runs every case, these included, so this file is for the interpreter only.
"""
import pytest
import torch

from albert_kernels.backends import unavailable_reason
from albert_kernels.tools.cases import CASES, DTYPES, run_case

MULTI_BLOCK = [
    ("attention", "B2 H3 L113 D64 mask=right"),
    ("attention", "B2 H2 L128 D128 mask=left"),
    ("varlen_attention", "lengths=[113, 40, 1] H2 D64"),
    ("varlen_attention", "lengths=[77, 33] H2 D128"),
    ("add_layer_norm", "[17, 1000]"),
    ("linear_gelu", "[64, 256] -> 1000 none"),
]
SELECTED = [c for c in CASES if (c.op, c.name) in MULTI_BLOCK]


def test_the_selected_cases_exist():
    assert len(SELECTED) == len(MULTI_BLOCK), "a case named here is gone from tools/cases.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_ops.py runs every case")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", SELECTED, ids=[f"{c.op}:{c.name}" for c in SELECTED])
def test_multi_block_case_under_interpreter(case, dtype):
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)
    results = run_case(case, "triton", DTYPES[dtype], "cpu")
    failed = {k: str(v) for k, v in results.items() if not v.ok}
    assert not failed, f"{case.op} {case.name} {dtype}: {failed}"
