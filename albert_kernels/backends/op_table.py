"""The op table: the one declaration of albert_kernels' kernel ops.

Every list of ops in the package derives from :data:`OPS`: the methods of ``dispatch.Kernels``,
the autocast policy (``autocast.py``), the functions a backend module must define (checked by the
registry when it loads one), the compiled extension's forward/backward op names the ``cuda``
backend checks for, and the public names of ``albert_kernels.ops`` and ``albert_kernels``. Adding
an op means one entry here, the public function in ``ops/__init__.py``, its kernels in each backend
and its tests (docs/extending.md).

Each entry gives the backend signature (inputs already validated: backends never check user input
again) and the autocast class of the op:

- ``"lower"``: autocast's lower-precision list (``matmul``, ``linear``): under ``torch.autocast``
  every floating input is cast to the autocast dtype. Softmax statistics inside the attention
  kernels stay float32 in every backend, as autocast runs ``softmax`` in float32.
- ``"float32"``: autocast's float32 list on CUDA (``layer_norm``): inputs cast to float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OpSpec:
    """One kernel op. ``name``: the backend function and the public op of the same name;
    ``signature``: its backend arguments (the shapes are the public op's, see docs/api.md);
    ``autocast``: ``"lower"`` or ``"float32"`` (module docstring); ``extension``: the names of
    its forward and backward ops in the compiled extension (``torch.ops.albert_kernels``)."""

    name: str
    signature: str
    autocast: Literal["lower", "float32"]
    extension: tuple[str, str]


OPS: tuple[OpSpec, ...] = (
    OpSpec("attention", "q, k, v, key_padding_mask, scale, dropout_p  (q, k, v [B, H, L, D])",
           "lower", ("attention_fwd", "attention_bwd")),
    OpSpec("varlen_attention",
           "q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p  "
           "(q [Tq, H, D]; k, v [Tk, H, D])",
           "lower", ("varlen_attention_fwd", "varlen_attention_bwd")),
    OpSpec("add_layer_norm", "x, residual, weight, bias, eps", "float32",
           ("add_layer_norm_fwd", "add_layer_norm_bwd")),
    OpSpec("linear_gelu", "x, weight, bias, approximate", "lower",
           ("linear_gelu_fwd", "linear_gelu_bwd")),
    OpSpec("gelu_ffn", "x, w1, b1, w2, b2, approximate", "lower",
           ("gelu_ffn_fwd", "gelu_ffn_bwd")),
)

OP_NAMES: tuple[str, ...] = tuple(op.name for op in OPS)
BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}
EXTENSION_OPS: tuple[str, ...] = tuple(name for op in OPS for name in op.extension)


def missing_ops(module) -> list[str]:
    """The ops of :data:`OPS` that backend `module` does not define as callables."""
    return [name for name in OP_NAMES if not callable(getattr(module, name, None))]
