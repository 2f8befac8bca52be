"""albert_kernels: verified fused kernels and a padding-free ALBERT encoder on them.

    import albert_kernels as ak
    y = ak.add_layer_norm(x, residual, weight, bias)          # best backend for x's device
    model = ak.AlbertModel.from_hf(hf_model)                   # same outputs, fewer FLOPs
    clf = ak.AlbertForSequenceClassification.from_pretrained(path, num_labels=3)   # any checkpoint
"""
from .backends import available_backends
from .errors import BackendUnavailable
from .integrations import register_hf_attention
from .model import (AlbertConfig, AlbertForMaskedLM, AlbertForMultipleChoice, AlbertForPreTraining,
                    AlbertForQuestionAnswering, AlbertForSequenceClassification,
                    AlbertForTokenClassification, AlbertModel)
from .model.hf_patch import patch_hf
from . import ops
from .model.layers import freeze, unfreeze
from .model.quantized import quantize_dynamic
from .ops import *  # noqa: F401,F403  the op table's ops, unpad, pad (ops.__all__)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
    "AlbertForSequenceClassification", "AlbertForTokenClassification", "AlbertForQuestionAnswering",
    "AlbertForMultipleChoice",
    "patch_hf", "register_hf_attention", "freeze", "unfreeze", "quantize_dynamic", *ops.__all__,
]
