"""The registry of kernel backends: what a backend is, and how it is found and loaded.

The backends themselves are registered in ``backends/__init__.py``; callers get one through
``backends/dispatch.py`` ``resolve``, the only caller of :func:`lookup`. A backend is a module
that defines every op of the op table (``backends/op_table.py``) with the backend signature
given there (inputs are already validated by the op layer or the model, so backends
never check user input again), plus module-level ``DTYPES`` (set of accepted dtypes) and
``HEAD_DIMS`` (accepted attention head dims, or None for any). A backend is described by a
:class:`BackendSpec` whose ``probe`` tells whether it can run on a device type, and whose
``load`` imports the module (lazily: a backend that fails to build or import costs nothing until
it is asked for) and checks that it defines every op and both attributes.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional

from ..errors import BackendUnavailable
from .op_table import missing_ops

# Returns None when the backend can run on the device type, else the reason it cannot.
Probe = Callable[[str], Optional[str]]


@dataclass
class BackendSpec:
    name: str
    module: str                       # dotted module path, imported on first use
    probe: Probe                      # device type -> None (ok) or reason
    priority: dict = field(default_factory=dict)  # device type -> rank for backend=None (higher wins)
    _loaded: Optional[ModuleType] = None
    _load_error: Optional[str] = None

    def load(self) -> ModuleType:
        if self._loaded is None:
            if self._load_error is not None:
                raise BackendUnavailable(self._load_error)
            try:
                module = importlib.import_module(self.module)
            except BackendUnavailable as e:
                self._load_error = f"backend {self.name!r} is unavailable: {e}"
                raise BackendUnavailable(self._load_error) from e
            except Exception as e:  # an import or build error: report it, keep the others working
                self._load_error = f"backend {self.name!r} failed to load: {type(e).__name__}: {e}"
                raise BackendUnavailable(self._load_error) from e
            missing = missing_ops(module) + [a for a in ("DTYPES", "HEAD_DIMS")
                                             if not hasattr(module, a)]
            if missing:
                self._load_error = (f"backend {self.name!r} ({self.module}) does not define "
                                    f"{', '.join(missing)} (see backends/op_table.py)")
                raise BackendUnavailable(self._load_error)
            self._loaded = module
        return self._loaded


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> None:
    """Add (or replace) a backend. The op layer never needs to change for a new backend."""
    _BACKENDS[spec.name] = spec


def backend_names() -> list[str]:
    return list(_BACKENDS)


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None if backend `name` can run on `device_type`, else a sentence saying why not."""
    spec = _BACKENDS.get(name)
    if spec is None:
        return f"unknown backend {name!r}; known: {', '.join(_BACKENDS)}"
    reason = spec.probe(device_type)
    if reason is not None:
        return reason
    try:
        spec.load()
    except BackendUnavailable as e:
        return str(e)
    return None


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on `device` (a str, torch.device or device type), best first."""
    device_type = _device_type(device)
    names = [n for n in _BACKENDS if unavailable_reason(n, device_type) is None]
    return sorted(names, key=lambda n: -_BACKENDS[n].priority.get(device_type, 0))


# best_backend's answers, per device type, for one set of registered backends (every op call
# with backend=None asks; probing all backends each time cost ~0.1 ms per call).
_BEST: dict = {}


def best_backend(device_type: str) -> str:
    """The backend ``backend=None`` picks: the available one with the highest priority."""
    key = (device_type, tuple((n, id(s)) for n, s in _BACKENDS.items()))
    name = _BEST.get(key)
    if name is not None and _BACKENDS[name]._load_error is None:
        return name
    names = [n for n in available_backends(device_type)
             if _BACKENDS[n].priority.get(device_type, 0) > 0]
    if not names:
        raise BackendUnavailable(f"no backend is available for device type {device_type!r}")
    _BEST[key] = names[0]
    return names[0]


def lookup(name: Optional[str], device_type: str) -> tuple[str, ModuleType]:
    """(name, loaded module) of backend `name` (or the best one when None) on `device_type`.
    Only ``dispatch.resolve`` calls this; it adds the dtype and head-dim checks."""
    if name is None:
        name = best_backend(device_type)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    spec = _BACKENDS.get(name)
    if spec is not None and spec._loaded is not None and spec.probe(device_type) is None:
        return name, spec._loaded  # the common case, once loaded: no import machinery per call
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} on {device_type}: {reason}")
    return name, _BACKENDS[name].load()


def _device_type(device) -> str:
    import torch
    return torch.device(device).type
