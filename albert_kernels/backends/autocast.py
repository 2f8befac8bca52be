"""torch.autocast for albert_kernels' kernels: the one policy, applied by ``dispatch.Kernels``.

Autocast only rewrites the ATen ops it knows; our kernels (C++ custom ops, Triton and CUDA
launches, the reference's Python) would otherwise receive whatever mix of float32 parameters and
low-precision activations the surrounding autocast produced, and fail ("expected scalar type
BFloat16 but found Float"). Under an enabled autocast for the tensors' device type, each kernel
casts its floating inputs as autocast's own op lists treat the ops it fuses (each op's class is
declared in the op table, ``op_table.py``), and then runs with autocast off (so nothing inside is
cast twice):

- ``attention``, ``varlen_attention``, ``linear_gelu``, ``gelu_ffn``: matrix products, autocast's
  "lower precision" list (``matmul``, ``linear``): every floating input to the autocast dtype
  (``torch.get_autocast_dtype``: bfloat16 or float16). Softmax statistics inside the attention
  kernels are float32 in every backend, as autocast runs ``softmax`` in float32.
- ``add_layer_norm``: autocast's float32 list on CUDA (``layer_norm``): inputs to float32, output
  float32, on every device. (CPU autocast leaves ``layer_norm`` in its input's dtype; in an ALBERT
  layer that input, the residual sum, is float32 anyway: transformers adds the float32 residual
  stream to the low-precision sublayer output, which promotes.)

float64 tensors are never cast (autocast leaves them alone too). Outside autocast nothing is
cast: mixed dtypes are then the caller's error, as for any op. The casts are differentiable, so
gradients reach float32 parameters as float32, as with autocast's own casts.

Parameter casts are cached for one forward call (:func:`cast_cache`, entered by the encoder
core's layer loop): ALBERT applies its shared layer at every depth, so without the cache each of
its weights would be cast once per depth. The cache holds casts of ``nn.Parameter`` inputs only
(activations are used once), keyed on the parameter itself, its version counter (an in-place
write in the meantime makes a new entry), the target dtype, and the grad / inference mode the
cast was made in (a cast made under ``no_grad`` has no autograd edge and is never handed to a
call that records gradients). A cast made with grad enabled stays in the autograd graph: every
use of it sends its gradient through the one cast back to the float32 parameter, as torch's
own autocast cache does for ``F.linear``. The cache is dropped when the outermost
:func:`cast_cache` block exits, so nothing outlives the forward call.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import nn

from .op_table import OPS

LOW_PRECISION_OPS = frozenset(op.name for op in OPS if op.autocast == "lower")
FLOAT32_OPS = frozenset(op.name for op in OPS if op.autocast == "float32")


def enabled(t: torch.Tensor) -> bool:
    """Whether an autocast region is active for `t`'s device type."""
    return torch.is_autocast_enabled(t.device.type)


_state = threading.local()


@contextlib.contextmanager
def cast_cache() -> Iterator[None]:
    """Cache parameter casts (see the module docstring) until the outermost such block exits.
    Nested blocks share the outer block's cache. Under ``torch.compile`` tracing nothing is
    cached (the compiled graph has its own common-subexpression elimination)."""
    if torch.compiler.is_compiling() or getattr(_state, "cache", None) is not None:
        yield
        return
    _state.cache = {}
    try:
        yield
    finally:
        _state.cache = None


def _cast(x, dtype: torch.dtype):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64 \
            and x.dtype != dtype:
        cache = None if torch.compiler.is_compiling() else getattr(_state, "cache", None)
        if cache is None or not isinstance(x, nn.Parameter):
            return x.to(dtype)
        key = (id(x), x._version, dtype, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled())
        hit = cache.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        cast = x.to(dtype)
        cache[key] = (x, cast)   # x held too, so its id cannot be reused while cached
        return cast
    return x


def activation(x: torch.Tensor) -> torch.Tensor:
    """`x` as autocast's lower-precision ops (``F.linear``) would receive it: cast to the
    autocast dtype of its device type when an autocast region is active there and `x` is a
    floating tensor other than float64; else `x` itself. For an input shared by several
    products, so that it is cast once instead of once per product."""
    if not torch.is_autocast_enabled(x.device.type):
        return x
    dtype = torch.get_autocast_dtype(x.device.type)
    if x.is_floating_point() and x.dtype not in (torch.float64, dtype):
        return x.to(dtype)
    return x


def run(op: str, fn: Callable, *args, **kwargs):
    """Call kernel `fn` (op name `op`) on `args` (floating tensors cast) and `kwargs` (passed as
    they are) under the policy above; autocast must be enabled for ``args[0]``'s device type."""
    device_type = args[0].device.type
    if op in LOW_PRECISION_OPS:
        dtype = torch.get_autocast_dtype(device_type)
    elif op in FLOAT32_OPS:
        dtype = torch.float32
    else:
        raise KeyError(f"no autocast policy for op {op!r}")
    args = tuple(_cast(a, dtype) for a in args)
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)
