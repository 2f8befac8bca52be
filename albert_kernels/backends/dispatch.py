"""The one dispatch point: (backend name or None, device, dtype, head dim) -> :class:`Kernels`.

:func:`resolve` is the only caller of the registry's lookup. The public ops call it on every call
(cheap once the backend is loaded: a few dict and set lookups); the models and ``patch_hf`` call
it when they are built, moved (``.to()``, ``.cuda()``, ``.half()``) or switched (``set_backend``)
and keep the result, so their ``forward`` never looks up, imports or loads a backend (which is
what lets ``torch.compile(model, fullgraph=True)`` trace a freshly built model).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..errors import BackendUnavailable
from . import autocast, registry
from .op_table import OPS, OpSpec


class Kernels:
    """A resolved backend: its ``name``, its loaded ``module``, and the module's kernels as methods,
    one per op of the op table (``backends/op_table.py``), with the backend signatures listed
    there. Inputs are not checked again here: the caller has validated them. Inside
    ``torch.autocast`` each kernel casts its inputs by the op's autocast class first
    (``backends/autocast.py``), for the models and the public ops alike."""

    __slots__ = ("name", "module")

    def __init__(self, name: str, module) -> None:
        self.name, self.module = name, module

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"

    def freeze_encoder(self, mapping, layers):
        """The backend's frozen-weight path (an optional capability; the cpp backend has it):
        an encoder's weights packed once for inference, see ``backends/cpp/frozen.py``.
        mapping: the encoder's input ``nn.Linear`` or None; layers: {key: ``LayerParts``}.
        BackendUnavailable naming the backend if it has no such path."""
        freeze = getattr(self.module, "freeze_encoder", None)
        if freeze is None:
            raise BackendUnavailable(f"backend {self.name!r} has no frozen-weight path "
                                     "(albert_kernels.freeze): the 'cpp' backend has one")
        return freeze(mapping, layers)

    def graph_encoder(self, model, max_tokens: int = 2048):
        """The backend's CUDA-graph path (an optional capability; the 'cuda' and 'triton'
        backends have it, see ``backends/cuda_graphs.py``): a ``CudaGraphRunner`` that runs
        `model`'s (an nn.Module in eval mode with its parameters on a CUDA device, run on these
        kernels) embeddings and encoder as CUDA graphs, one per bucket of up to `max_tokens`
        tokens. ValueError for a max_tokens that is not a positive int; RuntimeError for a
        model in training mode or not on a CUDA device; BackendUnavailable (a RuntimeError)
        naming the backends that have the path if this one has none."""
        from .cuda_graphs import check_max_tokens, check_model
        check_max_tokens(max_tokens)
        check_model(model, self)
        return self.module.graph_encoder(max_tokens)


def _kernel_method(op: OpSpec):
    name = op.name

    def kernel(self, *args, **kwargs):
        fn = getattr(self.module, name)
        if autocast.enabled(args[0]):
            return autocast.run(name, fn, *args, **kwargs)
        return fn(*args, **kwargs)

    kernel.__name__, kernel.__qualname__ = name, f"Kernels.{name}"
    kernel.__doc__ = f"The backend's {name}({op.signature})."
    return kernel


for _op in OPS:
    setattr(Kernels, _op.name, _kernel_method(_op))


# One Kernels object per (backend name, loaded module): resolve() allocates nothing per call.
_KERNELS: dict[str, Kernels] = {}


def resolve(backend: Optional[str], device: Union[str, torch.device], dtype: torch.dtype,
            head_dim: Optional[int] = None) -> Kernels:
    """The kernels to run tensors of `dtype` on `device` with (attention head dim `head_dim`).

    backend: a registered name ("cpp", "cuda", "triton", "reference", ...) or None for the best
    backend available on the device type (``backends/__init__.py`` sets the priorities).
    device: a torch.device or a string such as "cpu" or "cuda:0" (only its type matters).

    Raises BackendUnavailable (unknown name; the backend cannot run on the device type, or failed
    to build or import: the message says why), TypeError (`backend` is not a str or None; the
    backend does not accept `dtype`), ValueError (the backend does not support `head_dim`).
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name, module = registry.lookup(backend, device_type)
    check_support(name, module, dtype, head_dim)
    kernels = _KERNELS.get(name)
    if kernels is None or kernels.module is not module:
        kernels = _KERNELS[name] = Kernels(name, module)
    return kernels


def check_support(name: str, module, dtype: torch.dtype, head_dim: Optional[int] = None) -> None:
    """TypeError / ValueError unless backend `name` (its module's DTYPES and HEAD_DIMS) accepts
    `dtype` and `head_dim` (None: no attention, any head dim)."""
    if dtype not in module.DTYPES:
        allowed = ", ".join(sorted(str(d).replace("torch.", "") for d in module.DTYPES))
        raise TypeError(f"backend {name!r} accepts dtypes {allowed}, got {dtype}")
    if head_dim is not None and module.HEAD_DIMS is not None and head_dim not in module.HEAD_DIMS:
        raise ValueError(f"backend {name!r} supports head dims {sorted(module.HEAD_DIMS)}, got "
                         f"head dim {head_dim}")
