"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (docs/correctness.md, "Without
a GPU", step 2): every kernel the backend launches, in every autotune config that fits the chip,
for every head dim and dtype, within the chip's shared memory, without register spills
(aot.SPILL_TOLERANCE).

The compilation runs in a subprocess without TRITON_INTERPRET: under the interpreter (which
conftest.py turns on when there is no GPU) triton replaces the kernels in-process. Its table (one
row per compiled kernel) goes to kernels.txt in pytest's temporary folder for this module, and to
the terminal only with `pytest -s`, so that `pytest -q` stays quiet.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # about 300 CPU-seconds of compilation when triton's cache is cold

ARCHS = (80, 90)
DTYPES = {"float16", "bfloat16", "float32"}


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    """(rows, table, exit status): `python -m albert_kernels.backends.triton.aot` run once for this
    module. The table (kernel, config, arch, shared, regs, spills) is written to kernels.txt beside
    kernels.json in the module's temporary folder."""
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "albert_kernels.backends.triton.aot", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1800)
    rows = json.loads(out.read_text()) if out.exists() else []
    text = proc.stdout + proc.stderr[-6000:]
    out.with_suffix(".txt").write_text(text)
    return rows, text, proc.returncode


@pytest.fixture(scope="module")
def aot_rows(aot_run):
    rows, text, returncode = aot_run
    assert returncode == 0 and rows, f"AOT compilation failed:\n{text[-12000:]}"
    return rows


def test_every_kernel_compiles_within_shared_memory_without_spills(aot_run, aot_rows, request,
                                                                   capsys):
    from albert_kernels.backends.triton.aot import SHARED_LIMIT, SPILL_TOLERANCE
    if request.config.getoption("capture") == "no":   # -s: the table is the report
        with capsys.disabled():
            print("\n" + aot_run[1])
    for row in aot_rows:
        where = f"{row['kernel']} {row['dtype']} sm_{row['arch']} {row['config']}"
        assert row["error"] is None, where + ": " + row["error"]
        assert 0 <= row["shared"] <= SHARED_LIMIT[row["arch"]], where
        assert 0 < row["regs"] <= 255, where
        assert row["spill_bytes"] <= SPILL_TOLERANCE, f"{where}: spills {row['spill_bytes']} bytes"


def test_coverage_every_kernel_arch_dtype_head_dim_and_config(aot_rows):
    """The table holds every kernel of the backend's modules, for both archs and all dtypes,
    the attention kernels at every supported head dim, and the GEMM in every config that fits."""
    from albert_kernels.backends.triton import HEAD_DIMS, aot
    from albert_kernels.backends.triton.gelu_ffn import CONFIGS, usable_configs

    kernels = {name for _, name, _ in aot._kernels()}
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in aot_rows}
    missing = {(k, a, d) for k in kernels for a in ARCHS for d in DTYPES} - seen
    assert not missing, f"not compiled: {sorted(missing)}"

    for name in kernels:
        if name.startswith("_attn"):
            dims = {r["launch"]["HEAD_DIM"] for r in aot_rows if r["kernel"] == name}
            assert dims == set(HEAD_DIMS), f"{name}: head dims {dims}"
            if name != "_attn_bwd_preprocess_kernel":  # attention dropout: both variants
                flags = {r["launch"].get("DROPOUT") for r in aot_rows if r["kernel"] == name}
                assert flags == {False, True}, f"{name}: DROPOUT variants {flags}"

    elem = {"float16": 2, "bfloat16": 2, "float32": 4}
    for arch in ARCHS:
        for dtype in DTYPES:
            want = {tuple(sorted(c.all_kwargs().items()))
                    for c in usable_configs(CONFIGS, elem[dtype], aot.SHARED_LIMIT[arch])}
            got = {tuple(sorted(r["tuned"].items())) for r in aot_rows
                   if r["kernel"] == "_matmul_kernel" and r["arch"] == arch and r["dtype"] == dtype}
            assert want and got == want, f"_matmul_kernel sm_{arch} {dtype}: {got ^ want}"
