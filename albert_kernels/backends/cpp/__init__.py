"""The "cpp" backend: the compiled extension's C++ CPU kernels (csrc/cpu/*.cpp).

The first import builds the extension (once; cached, see backends/extension/build.py). A build
failure raises BackendUnavailable, so the registry reports "cpp" unavailable with the compiler's
error and the other backends keep working.

Beyond the op table's ops it has the frozen-weight path (``freeze_encoder``, ``frozen.py``): the
``Kernels.freeze_encoder`` capability behind ``albert_kernels.freeze(model)``.
"""
import torch

from ..op_table import OP_NAMES

from ..extension.ops import add_layer_norm, attention, gelu_ffn, linear_gelu, varlen_attention
from .frozen import freeze_encoder

DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}
HEAD_DIMS = None  # any head dim (work buffers are zero-padded to the vector tile)

__all__ = [*OP_NAMES, "DTYPES", "HEAD_DIMS", "freeze_encoder"]
