"""The per-ISA kernel choice (albert_kernels/backends/cpp/isa.py): cpu_isa() against this CPU's
flags, the measured table (AVX2: small_m up to 4096 tokens, AVX-512: up to 1024, portable build:
never; other dtypes: the library), the forced override (argument and environment variable) and
its errors, and the two kernels a forced choice runs, held to the fp32 budget against float64 on
both sides of this ISA's crossover."""
import os
import platform

import pytest
import torch
import torch.nn.functional as F

from albert_kernels.backends import unavailable_reason
from albert_kernels.tools.budget import check_budget

needs_cpp = pytest.mark.skipif(unavailable_reason("cpp", "cpu") is not None,
                               reason=f"cpp backend: {unavailable_reason('cpp', 'cpu')}")


@pytest.fixture(scope="module")
def isa():
    if unavailable_reason("cpp", "cpu") is not None:
        pytest.skip(f"cpp backend: {unavailable_reason('cpp', 'cpu')}")
    from albert_kernels.backends.cpp import isa as module
    return module


@pytest.fixture(autouse=True)
def _no_forced_choice(monkeypatch):
    monkeypatch.delenv("ALBERT_KERNELS_CPU_GEMM", raising=False)


def _flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def test_cpu_isa_matches_the_cpu_flags_and_torch(isa):
    got = isa.cpu_isa()
    flags = _flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or flags is None:
        pytest.skip("needs an x86-64 Linux /proc/cpuinfo")
    assert got.avx512 == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags
                          and torch.cpu._is_avx512_supported())
    assert got.avx2 == ({"avx2", "fma", "f16c"} <= flags or got.avx512)
    assert got.avx512_bf16 == ("avx512_bf16" in flags and torch.cpu._is_avx512_bf16_supported())
    assert got.amx == ({"amx_tile", "amx_bf16"} <= flags and torch.cpu._is_amx_tile_supported())
    # the fp32 tier agrees with ATen's own dispatch and with the extension's build
    capability = torch.backends.cpu.get_cpu_capability()
    if "ATEN_CPU_CAPABILITY" not in os.environ:
        assert got.vector == {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "default")
    from albert_kernels.backends.extension import build, ops
    assert got.vector == {"AVX512": "avx512", "AVX2": "avx2"}.get(
        next((f.split("=")[1] for f in build.isa_flags() if f.startswith("-DCPU_CAPABILITY=")),
             "DEFAULT"), "default")
    assert ops.PANEL == {"avx512": 48, "avx2": 24}.get(got.vector, 24)
    assert set(got.names) <= {"avx2", "avx512", "avx512_bf16", "amx"}


@pytest.mark.parametrize("vector, limit", [("avx512", 1024), ("avx2", 4096), ("default", 0)])
def test_fp32_table(isa, vector, limit):
    for n, k in [(2304, 768), (768, 768), (3072, 768), (768, 3072)]:
        assert isa.gemm_kernel(0, n, k, isa=vector) == "library"  # nothing to compute
        if limit:
            assert isa.gemm_kernel(1, n, k, isa=vector) == "small_m"
            assert isa.gemm_kernel(limit, n, k, isa=vector) == "small_m"
        assert isa.gemm_kernel(limit + 1, n, k, isa=vector) == "library"
    assert isa.small_m_max_tokens(isa=vector) == limit
    cpu = isa.CpuIsa(avx2=vector != "default", avx512=vector == "avx512", avx512_bf16=False,
                     amx=False)
    assert isa.gemm_kernel(limit, 768, 768, isa=cpu) == ("small_m" if limit else "library")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_run_on_the_library(isa, dtype):
    for vector in isa.ISAS:
        assert isa.gemm_kernel(8, 768, 768, dtype, isa=vector) == "library"
        assert isa.small_m_max_tokens(dtype, isa=vector) == 0


def test_forced_choice_argument_and_environment(isa, monkeypatch):
    assert isa.gemm_kernel(8, 768, 768, isa="avx512", force="library") == "library"
    assert isa.gemm_kernel(100_000, 768, 768, isa="avx512", force="small_m") == "small_m"
    assert isa.gemm_kernel(8, 768, 768, isa="default", force="small_m") == "small_m"
    assert isa.small_m_max_tokens(isa="avx2", force="library") == 0
    assert isa.small_m_max_tokens(isa="avx2", force="small_m") > 10 ** 9
    monkeypatch.setenv("ALBERT_KERNELS_CPU_GEMM", "library")
    assert isa.gemm_kernel(8, 768, 768, isa="avx512") == "library"
    assert isa.gemm_kernel(8, 768, 768, isa="avx512", force="auto") == "small_m"  # argument wins
    monkeypatch.setenv("ALBERT_KERNELS_CPU_GEMM", "Small_M")
    assert isa.gemm_kernel(5000, 768, 768, isa="avx512") == "small_m"
    monkeypatch.setenv("ALBERT_KERNELS_CPU_GEMM", "auto")
    assert isa.gemm_kernel(5000, 768, 768, isa="avx512") == "library"


def test_bad_arguments_name_what_was_expected(isa, monkeypatch):
    with pytest.raises(ValueError, match="force must be 'auto', 'small_m' or 'library', got 'mkl'"):
        isa.gemm_kernel(8, 768, 768, force="mkl")
    with pytest.raises(ValueError, match="small_m kernel is float32 only, got torch.bfloat16"):
        isa.gemm_kernel(8, 768, 768, torch.bfloat16, force="small_m")
    with pytest.raises(ValueError, match="small_m kernel is float32 only"):
        isa.small_m_max_tokens(torch.bfloat16, force="small_m")
    with pytest.raises(ValueError, match=r"isa must be a CpuIsa or one of \('avx512', 'avx2', "
                                         r"'default'\), got 'sse'"):
        isa.gemm_kernel(8, 768, 768, isa="sse")
    with pytest.raises(ValueError, match="m, n and k must be >= 0"):
        isa.gemm_kernel(-1, 768, 768)
    monkeypatch.setenv("ALBERT_KERNELS_CPU_GEMM", "onednn")
    with pytest.raises(ValueError, match="ALBERT_KERNELS_CPU_GEMM must be 'auto', 'small_m' or "
                                         "'library', got 'onednn'"):
        isa.gemm_kernel(8, 768, 768)


def _run(choice, x, w, b):
    if choice == "library":
        return F.linear(x, w, b)
    ops = torch.ops.albert_kernels
    return ops.packed_linear(x, ops.pack_linear_weight(w), w.shape[0], b)


@needs_cpp
def test_forced_choice_runs_the_other_kernel_within_budget(isa):
    """On this CPU, at token counts on both sides of its crossover (and with one row), the
    automatic choice and the forced other kernel give the same product within the fp32 budget
    against float64."""
    limit = isa.small_m_max_tokens()
    counts = sorted({1, 8, max(limit, 1), limit + 1} - {0})
    gen = torch.Generator().manual_seed(0)
    n, k = 96, 3 * 128 + 5  # a partial panel and a partial K block on every build
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    b = torch.randn(n, generator=gen)
    for m in counts:
        x = torch.randn(m, k, generator=gen)
        gold = F.linear(x.double(), w.double(), b.double())
        auto = isa.gemm_kernel(m, n, k)
        other = "library" if auto == "small_m" else "small_m"
        assert isa.gemm_kernel(m, n, k, force=other) == other
        outs = {c: _run(c, x, w, b) for c in (auto, other)}
        for c, out in outs.items():
            result = check_budget(out, F.linear(x, w, b), gold)
            assert result.ok, f"M={m} {c}: {result}"
        assert (outs["small_m"] - outs["library"]).abs().max().item() <= 1e-4
