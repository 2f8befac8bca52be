"""Kernel backends. Each one is registered here, in one place (the registry itself is
``registry.py``); the ops, the models and ``patch_hf`` get one through ``dispatch.resolve``."""
from .dispatch import Kernels, resolve
from .registry import (BackendSpec, available_backends, backend_names, best_backend,
                       register_backend, unavailable_reason)


def _always(device_type: str):
    import torch
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return None if device_type in ("cpu", "cuda") else f"no support for device type {device_type!r}"


def _cpu_only(device_type: str):
    return None if device_type == "cpu" else "the C++ CPU kernels run on CPU tensors only"


def _cuda_probe(device_type: str):
    import torch
    if device_type != "cuda":
        return "the CUDA C++ kernels run on CUDA tensors only"
    if torch.version.cuda is None:
        return "this PyTorch is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _triton_probe(device_type: str):
    import importlib.util
    import os

    import torch
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None  # verification only: never picked by backend=None on CPU (priority 0)
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (for verification)"
    return f"no support for device type {device_type!r}"


# priority: which backend `backend=None` picks per device type (highest wins; 0 = never by default)
register_backend(BackendSpec(
    name="triton", module="albert_kernels.backends.triton", probe=_triton_probe,
    priority={"cuda": 30, "cpu": 0}))
register_backend(BackendSpec(
    name="cuda", module="albert_kernels.backends.cuda", probe=_cuda_probe, priority={"cuda": 20}))
register_backend(BackendSpec(
    name="cpp", module="albert_kernels.backends.cpp", probe=_cpu_only, priority={"cpu": 20}))
register_backend(BackendSpec(
    name="reference", module="albert_kernels.backends.reference", probe=_always,
    priority={"cpu": 1, "cuda": 1}))

__all__ = ["BackendSpec", "Kernels", "available_backends", "backend_names", "best_backend",
           "register_backend", "resolve", "unavailable_reason"]
