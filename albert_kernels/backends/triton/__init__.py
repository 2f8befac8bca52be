"""The Triton backend: fused GPU kernels written in Triton, one file per op.

    attention.py       FlashAttention-2 forward/backward, padded (+ key padding mask) and varlen
                       (separate query / key sequences), with in-kernel attention dropout
    attention_kernels.py  its Triton kernels
    add_layer_norm.py  residual add + LayerNorm forward/backward
    gelu_ffn.py        GEMM with bias/GELU prologue and epilogue: linear_gelu and gelu_ffn
    aot.py             ahead-of-time compilation of every kernel for sm_80 / sm_90 (no GPU needed)

Beyond the op table's ops it has CUDA graphs (``graph_encoder``, shared with the cuda backend in
``backends/cuda_graphs.py``): the ``Kernels.graph_encoder`` capability behind
``enable_cuda_graphs``. It runs on CUDA tensors; on CPU only under ``TRITON_INTERPRET=1`` (set before triton is
imported), which is how these kernels are verified on machines without a GPU.
"""
import torch

from ..op_table import OP_NAMES

from .add_layer_norm import add_layer_norm
from .attention import attention, varlen_attention
from .gelu_ffn import gelu_ffn, linear_gelu
from ..cuda_graphs import graph_encoder

DTYPES = {torch.float32, torch.float16, torch.bfloat16}
HEAD_DIMS = {32, 64, 128}

__all__ = [*OP_NAMES, "DTYPES", "HEAD_DIMS", "graph_encoder"]
