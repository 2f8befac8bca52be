"""The reference backend: plain, readable PyTorch that defines what every other backend must give."""
import torch

from ..op_table import OP_NAMES

from .add_layer_norm import add_layer_norm
from .attention import attention, varlen_attention
from .gelu_ffn import gelu_ffn, linear_gelu

DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
HEAD_DIMS = None  # any head dim

__all__ = [*OP_NAMES, "DTYPES", "HEAD_DIMS"]
