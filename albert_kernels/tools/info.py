"""`albert-kernels info`: versions, devices, and which backends run here (or why not)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

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
