"""Which CPU instruction sets this machine has, and which kernel runs a matrix product on them.

The cpp backend's small-M kernel (``csrc/cpu/small_m.cpp``: ``pack_linear_weight`` /
``packed_linear``, the packed-weight path of ``model/packed.py``) and the library path
(``F.linear``: MKL's sgemm, oneDNN, AMX through torch) each win in a range of shapes that depends
on the vector ISA. :func:`gemm_kernel` answers, for an ISA and a product ``x [M, K] @ W^T``
(``W [N, K]``) in a dtype, which of the two runs, from a table measured on each ISA
(docs/performance.md, "Kernel choice per ISA"):

========== ======================================= ==========================================
ISA        fp32: ``"small_m"`` for                  measured on
========== ======================================= ==========================================
avx512     1 <= M <= 1024 (``library`` above)      Intel Xeon (Sapphire Rapids class), 8x48
                                                   zmm tile, 1 thread, 2026-12-04
avx2       1 <= M <= 4096 (``library`` above)      AMD EPYC (AVX2 + FMA), 4x24 ymm tile,
                                                   2 threads, 2026-12-01
default    never (the kernel's portable loop is    --
           no match for the library's)
========== ======================================= ==========================================

Every other dtype runs on the library (the small-M kernel is fp32 only; bf16 products go to
oneDNN, on AMX where the CPU has it). The table was measured on ALBERT-base's shapes
(N, K) in {(2304, 768), (768, 768), (3072, 768), (768, 3072)}; other shapes get the same
crossover.

A choice can be forced, to run the other kernel (tests compare the two within the error budget):
the ``force`` argument, else the environment variable ``ALBERT_KERNELS_CPU_GEMM`` (``auto``, the
default, ``small_m`` or ``library``).

bf16 attention (the cpp kernels' forward, ``csrc/cpu/attention.cpp``): on AMX tiles
(``"amx"``: bf16 products with fp32 accumulation, fp32 softmax statistics, P rounded to bf16 for
P V) in the AVX-512 build on a CPU with AMX-BF16 and AVX512-BF16, else the fp32-arithmetic kernel
(``"fp32"``); ``$ALBERT_KERNELS_CPU_BF16_ATTENTION`` = ``fp32`` forces the latter (read by the
kernel at each call). :func:`bf16_attention_kernel` says which runs.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from ..extension.build import _ISA_NEEDS, _cpu_flags

ENV_VAR = "ALBERT_KERNELS_CPU_GEMM"
CHOICES = ("small_m", "library")
ISAS = ("avx512", "avx2", "default")  # the fp32 vector tiers, fastest first

# fp32: the largest M (tokens) that runs on the small-M kernel, per vector ISA (0: never).
SMALL_M_MAX_TOKENS = {"avx512": 1024, "avx2": 4096, "default": 0}
# ... and the smallest: with one row the kernel still beats or matches the library's
# matrix-vector product on both measured ISAs.
SMALL_M_MIN_TOKENS = 1

# /proc/cpuinfo flags each feature needs. "avx512" is the set the extension's AVX-512 build
# needs (backends/extension/build.py), so the table's ISA is the kernel that was compiled.
_FLAGS = {
    "avx2": _ISA_NEEDS["AVX2"],
    "avx512": _ISA_NEEDS["AVX512"],
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_tile", "amx_bf16"},
}


@dataclass(frozen=True)
class CpuIsa:
    """The instruction sets of this CPU that the kernel choice depends on.

    avx2: AVX2 + FMA + F16C; avx512: AVX-512 F/BW/VL/DQ + FMA; avx512_bf16: AVX512-BF16 (bf16
    dot products); amx: AMX tiles with bf16 (oneDNN's bf16 GEMMs run on them).
    """

    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def vector(self) -> str:
        """The fp32 tier, one of :data:`ISAS`: ``"avx512"``, ``"avx2"`` or ``"default"``."""
        if self.avx512:
            return "avx512"
        return "avx2" if self.avx2 else "default"

    @property
    def names(self) -> tuple:
        """The features present, e.g. ``("avx2", "avx512", "avx512_bf16", "amx")``."""
        return tuple(n for n in ("avx2", "avx512", "avx512_bf16", "amx") if getattr(self, n))


def _cpuinfo_flags() -> Optional[frozenset]:
    """/proc/cpuinfo's flags as the build reads them (``build._cpu_flags``, read once per
    process), or None where there are none to read."""
    return _cpu_flags() or None


def _torch_probe(name: str) -> Optional[bool]:
    """torch.cpu._is_<name>_supported() (cpuinfo's answer, which also asks whether the OS enables
    the registers, e.g. AMX's tile state); None where this torch lacks it."""
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(fn()) if fn is not None else None
    except (RuntimeError, AttributeError):
        return None


def cpu_isa() -> CpuIsa:
    """This CPU's instruction sets, from /proc/cpuinfo's flags, refined by torch's own probes
    (the OS must enable AVX-512 and AMX state, too); without /proc/cpuinfo (not Linux), from
    ``torch.backends.cpu.get_cpu_capability()`` and the probes alone. Not x86-64: all False."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuIsa(False, False, False, False)
    flags = _cpuinfo_flags()
    if flags is not None:
        has = {name: need <= flags for name, need in _FLAGS.items()}
    else:
        capability = torch.backends.cpu.get_cpu_capability()
        has = {"avx2": capability in ("AVX2", "AVX512"), "avx512": capability == "AVX512",
               "avx512_bf16": False, "amx": False}
    for name, probe in (("avx512", "avx512"), ("avx512_bf16", "avx512_bf16"),
                        ("amx", "amx_tile")):
        answer = _torch_probe(probe)
        if answer is not None:
            has[name] = answer if flags is None else has[name] and answer
    return CpuIsa(avx2=has["avx2"] or has["avx512"], avx512=has["avx512"],
                  avx512_bf16=has["avx512_bf16"], amx=has["amx"])


def _choice(variable: str, choices: tuple, force: Optional[str] = None) -> tuple:
    """(source, value): ``force`` if given, else the environment `variable` (lower-cased;
    unset or empty: ``"auto"``). ValueError naming the argument or variable for a value other
    than ``"auto"`` and `choices`."""
    if force is not None:
        source, value = "force", force
    else:
        source, value = variable, os.environ.get(variable, "auto").strip().lower() or "auto"
    if value != "auto" and value not in choices:
        allowed = ", ".join(repr(c) for c in ("auto",) + choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{source} must be {allowed}, got {value!r}")
    return source, value


def forced_choice(force: Optional[str] = None) -> Optional[str]:
    """``force`` if given, else ``$ALBERT_KERNELS_CPU_GEMM``; None for ``"auto"`` / unset.
    Raises ValueError naming the argument or variable for any other value."""
    value = _choice(ENV_VAR, CHOICES, force)[1]
    return None if value == "auto" else value


def built_vector_isa() -> str:
    """The fp32 tier, one of :data:`ISAS`, that the extension's CPU kernels are compiled for
    (``build.build_isa``): this CPU's best, unless ``$ALBERT_KERNELS_CPU_ISA`` names a lower one.
    The table is read at this tier: it is the small-M kernel that runs."""
    from ..extension.build import build_isa
    return build_isa().lower()


def _vector_isa(isa) -> str:
    if isa is None:
        return built_vector_isa()
    if isinstance(isa, CpuIsa):
        return isa.vector
    if isa not in ISAS:
        raise ValueError(f"isa must be a CpuIsa or one of {ISAS}, got {isa!r}")
    return isa


def gemm_kernel(m: int, n: int, k: int, dtype: torch.dtype = torch.float32, *, isa=None,
                force: Optional[str] = None) -> str:
    """Which kernel runs the product x [m, k] @ W^T, W [n, k], on the CPU: ``"small_m"`` (the
    cpp backend's packed-weight kernel) or ``"library"`` (``F.linear``: MKL / oneDNN).

    isa: a :class:`CpuIsa`, or one of :data:`ISAS`; default: the tier the kernels are built for
    (:func:`built_vector_isa`: this CPU's best unless ``$ALBERT_KERNELS_CPU_ISA`` lowers it).
    force: ``"small_m"`` / ``"library"`` / ``"auto"`` (default: ``$ALBERT_KERNELS_CPU_GEMM``,
    else auto: the measured table of the module docstring).
    Raises ValueError for negative sizes, an unknown isa or force, or a forced ``"small_m"``
    in a dtype other than float32 (the kernel is fp32 only).
    """
    if min(m, n, k) < 0:
        raise ValueError(f"gemm_kernel: m, n and k must be >= 0, got m={m}, n={n}, k={k}")
    vector = _vector_isa(isa)
    forced = forced_choice(force)
    if forced == "small_m" and dtype != torch.float32:
        raise ValueError(f"force/{ENV_VAR}: the small_m kernel is float32 only, got {dtype}")
    if forced is not None:
        return forced
    if dtype != torch.float32:
        return "library"
    limit = SMALL_M_MAX_TOKENS[vector]
    return "small_m" if SMALL_M_MIN_TOKENS <= m <= limit else "library"


def small_m_max_tokens(dtype: torch.dtype = torch.float32, *, isa=None,
                       force: Optional[str] = None) -> int:
    """The largest token count M for which :func:`gemm_kernel` picks ``"small_m"`` (for every
    shape): the packed path's token limit on this ISA. 0 when it never does (another dtype, the
    portable build, or forced ``"library"``); ``sys.maxsize`` when ``"small_m"`` is forced.
    Raises ValueError as :func:`gemm_kernel`."""
    vector = _vector_isa(isa)
    forced = forced_choice(force)
    if forced == "small_m" and dtype != torch.float32:
        raise ValueError(f"force/{ENV_VAR}: the small_m kernel is float32 only, got {dtype}")
    if forced is not None:
        return sys.maxsize if forced == "small_m" else 0
    return SMALL_M_MAX_TOKENS[vector] if dtype == torch.float32 else 0


BF16_ATTENTION_ENV = "ALBERT_KERNELS_CPU_BF16_ATTENTION"


def bf16_attention_kernel(*, isa: Optional[CpuIsa] = None) -> str:
    """Which kernel the cpp backend's bf16 attention forward runs: ``"amx"`` (the AVX-512 build,
    a CPU with AMX-BF16 and AVX512-BF16, and ``$ALBERT_KERNELS_CPU_BF16_ATTENTION`` unset or
    ``auto``) or ``"fp32"`` (fp32 arithmetic on the bf16 data; also when the variable is
    ``fp32``). isa: a :class:`CpuIsa` (default: this CPU's, :func:`cpu_isa`). ValueError naming
    the variable for another value. (The kernel also needs the OS to grant the tile state; where
    Linux refuses, it runs fp32 while this says ``"amx"``.)"""
    # case-sensitive, as csrc/cpu/attention.cpp reads it (not through _choice)
    value = os.environ.get(BF16_ATTENTION_ENV, "auto").strip() or "auto"
    if value not in ("auto", "fp32"):
        raise ValueError(f"{BF16_ATTENTION_ENV} must be 'auto' or 'fp32', got {value!r}")
    isa = cpu_isa() if isa is None else isa
    if value == "fp32" or built_vector_isa() != "avx512":
        return "fp32"
    return "amx" if isa.amx and isa.avx512_bf16 else "fp32"


# ------------------------------------------------------------------------------------- int8
INT8_ENV_VAR = "ALBERT_KERNELS_CPU_INT8"
INT8_KERNELS = ("vnni", "avx2", "portable", "library")
# AVX-512 VNNI machines: our vpdpbusd kernel up to this many rows (tokens), the library's
# (torch._int_mm: oneDNN, on AMX-INT8 where present) above. Measured on an Intel Xeon (Sapphire
# Rapids class, AMX-INT8), 1 thread, all-MiniLM-L6-v2's shapes (N, K) in {(384, 384),
# (1536, 384), (384, 1536)}, 2026-12-05 (docs/performance.md, "int8 products").
INT8_VNNI_MAX_TOKENS = 64


@functools.lru_cache(maxsize=None)
def _int8_machine(isa_env: Optional[str]) -> tuple:
    """(AVX-512 VNNI, AVX2, the built vector tier) for a value of ``$ALBERT_KERNELS_CPU_ISA``:
    read once (every int8 product asks; uncached it cost ~20 us per call)."""
    flags = _cpuinfo_flags() or frozenset()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return (x86 and {"avx512_vnni", "avx512bw"} <= flags, x86 and "avx2" in flags,
            built_vector_isa())


def int8_kernel(m: int, *, force: Optional[str] = None) -> str:
    """Which kernel runs an int8 product (``torch.ops.albert_kernels.int8_linear``) on `m` rows:

    - ``"vnni"`` (our AVX-512 VNNI kernel) for m <= :data:`INT8_VNNI_MAX_TOKENS`, ``"library"``
      (``torch._int_mm``, oneDNN: AMX-INT8 / VNNI) above, on a CPU with AVX-512 VNNI when the
      extension is built for AVX-512;
    - ``"avx2"`` (our widening AVX2 kernel) on any other AVX2 CPU or build: oneDNN's int8
      product is not exact there (its u8 x s8 pair sums saturate in int16: measured on this
      Xeon with oneDNN limited to AVX2, errors of millions in the int32 sums), so the library is
      never chosen without VNNI;
    - ``"portable"`` (plain loops) elsewhere.

    force, else ``$ALBERT_KERNELS_CPU_INT8``: ``auto`` (default) or one of
    :data:`INT8_KERNELS`. ValueError for another value, or for ``vnni`` / ``avx2`` on a CPU that
    lacks the instructions (``library`` is honoured as asked: exact only with VNNI or AMX)."""
    source, value = _choice(INT8_ENV_VAR, INT8_KERNELS, force)
    has_vnni, has_avx2, vector = _int8_machine(os.environ.get("ALBERT_KERNELS_CPU_ISA"))
    if value == "vnni" and not has_vnni:
        raise ValueError(f"{source}='vnni': this CPU has no AVX-512 VNNI")
    if value == "avx2" and not has_avx2:
        raise ValueError(f"{source}='avx2': this CPU has no AVX2")
    if value != "auto":
        return value
    if has_vnni and vector == "avx512":
        return "vnni" if m <= INT8_VNNI_MAX_TOKENS else "library"
    return "avx2" if has_avx2 and vector in ("avx512", "avx2") else "portable"
