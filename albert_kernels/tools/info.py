"""`albert-kernels info`: versions, devices, and which backends run here (or why not)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Optional

import torch

from ..backends import backend_names, unavailable_reason


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The instruction sets that change the speed of these kernels, in the order a reader compares
# machines by: (name in the summary, the /proc/cpuinfo flags it needs).
_ISA = (("AVX2", ("avx2",)), ("FMA", ("fma",)),
        ("AVX-512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
        ("AVX-512 VNNI", ("avx512_vnni",)), ("AVX-VNNI", ("avx_vnni",)),
        ("AVX-512 BF16", ("avx512_bf16",)),
        ("AVX-512 FP16", ("avx512_fp16",)), ("AMX-BF16", ("amx_bf16", "amx_tile")),
        ("AMX-INT8", ("amx_int8", "amx_tile")), ("NEON", ("asimd",)), ("SVE", ("sve",)))


def cpu_isa(flags: Optional[set[str]] = None) -> list[str]:
    """The instruction sets of `_ISA` this CPU has (from :func:`cpu_flags` by default)."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, need in _ISA if all(f in flags for f in need)]


def isa_level(isa: list[str]) -> str:
    """The widest of AMX, AVX-512 and AVX2 that `isa` holds, lower-case for file names ("amx",
    "avx512", "avx2"), else torch's own name for what its CPU kernels use."""
    for level, name in (("amx", "AMX-BF16"), ("avx512", "AVX-512"), ("avx2", "AVX2")):
        if name in isa:
            return level
    import torch
    return torch.backends.cpu.get_cpu_capability().lower()


def machine_slug(m: dict, device: str = "cpu") -> str:
    """A file-name-safe name of the machine `m` (:func:`machine`) for figures measured on `device`
    ("cpu" or "cuda"): the GPU model for cuda, else the CPU model, then the CPU's widest
    instruction set and core count, e.g. "intel-xeon-platinum-8480_amx_2core"."""
    name = m["gpus"][0] if device == "cuda" and m.get("gpus") else m["cpu"]
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", "", name, flags=re.I)
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return f"{name}_{isa_level(m['cpu_isa'])}_{m['cores']}core"


def nvcc_version() -> str:
    from ..backends.extension.build import find_nvcc
    nvcc = find_nvcc()
    if not nvcc:
        return "not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"


def machine() -> dict:
    """A description of this machine and software, recorded with every benchmark."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cpu": cpu_name(),
        "cpu_isa": cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def report() -> str:
    m = machine()
    lines = [
        f"albert_kernels {_version('albert-kernels')}",
        f"python {m['python']}, torch {m['torch']} (CUDA build: {m['torch_cuda'] or 'no'}), "
        f"triton {m['triton']}, transformers {m['transformers']}",
        f"nvcc: {nvcc_version()}",
        f"cpu: {m['cpu']} ({m['cores']} cores, torch uses {m['torch_threads']} threads)",
        f"cpu instruction sets: {', '.join(m['cpu_isa']) or 'none detected'} (torch's CPU "
        f"kernels: {m['torch_cpu_capability']})",
        f"gpus: {', '.join(m['gpus']) or 'none'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}",
        "backends:",
    ]
    for device in ("cpu", "cuda"):
        for name in backend_names():
            reason = unavailable_reason(name, device)
            status = "available" if reason is None else f"unavailable: {reason.splitlines()[0]}"
            lines.append(f"  {device:4s} {name:9s} {status}")
    return "\n".join(lines)
