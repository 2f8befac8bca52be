"""The "cuda" backend: the compiled extension's CUDA C++ kernels (csrc/cuda/*.cu).

    add_layer_norm.cu  residual add + LayerNorm, forward and backward (deterministic dweight/dbias)
    gelu_ffn.cu        linear_gelu / gelu_ffn through cuBLASLt GEMMs with fused GELU epilogues
    attention.cu       FlashAttention-2-style attention, padded and varlen with separate query /
                       key sequences (tensor cores for fp16/bf16, CUDA cores for fp32),
                       in-kernel attention dropout (Philox4x32-10 of philox.cuh: the draws of
                       backends/dropout.py and triton's tl.randint), deterministic backward

The functions are the extension's device-generic wrappers (the dispatcher picks these kernels for
CUDA tensors). Beyond the op table's ops it has CUDA graphs (``graph_encoder``, shared with the
triton backend in ``backends/cuda_graphs.py``): the ``Kernels.graph_encoder`` capability behind
``enable_cuda_graphs``. The first import builds the extension with its CUDA sources (once;
cached, see backends/extension/build.py); a build failure raises BackendUnavailable with the
compiler's error.
"""
import torch

from ...errors import BackendUnavailable
from ..op_table import EXTENSION_OPS, OP_NAMES
from ..extension import build as _build
from ..extension.ops import add_layer_norm, attention, gelu_ffn, linear_gelu, varlen_attention
from ..cuda_graphs import graph_encoder

_missing = [op for op in EXTENSION_OPS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"albert_kernels::{op}", "CUDA")]
if _missing:  # e.g. a library built where nvcc or a GPU was missing
    raise BackendUnavailable(
        f"the loaded extension ({_build._loaded.get('path', 'prebuilt')}) has no CUDA kernels for "
        f"{', '.join(_missing)}: it was built without csrc/cuda (rebuild with "
        "`albert-kernels build --cuda`)")

DTYPES = {torch.float32, torch.float16, torch.bfloat16}
HEAD_DIMS = {32, 64, 128}  # the head dims attention.cu instantiates (AK_DISPATCH_HEAD_DIM)

__all__ = [*OP_NAMES, "DTYPES", "HEAD_DIMS", "graph_encoder"]
