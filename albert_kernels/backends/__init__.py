"""Kernel backends. Each one registers here, in one place; the op layer dispatches by name."""
from .registry import (BackendSpec, available_backends, backend_names, best_backend, get_backend,
                       register_backend, unavailable_reason)


def _always(device_type: str):
    return None if device_type in ("cpu", "cuda") else f"no support for device type {device_type!r}"


register_backend(BackendSpec(
    name="reference", module="albert_kernels.backends.reference", probe=_always,
    priority={"cpu": 1, "cuda": 1}))

__all__ = ["BackendSpec", "available_backends", "backend_names", "best_backend", "get_backend",
           "register_backend", "unavailable_reason"]
