"""albert_kernels: verified fused kernels and a padding-free ALBERT encoder on them.

    import albert_kernels as ak
    y = ak.add_layer_norm(x, residual, weight, bias)          # best backend for x's device
    model = ak.AlbertModel.from_hf(hf_model)                   # same outputs, fewer FLOPs
    clf = ak.AlbertForSequenceClassification.from_pretrained(path, num_labels=3)   # any checkpoint
"""
from .backends import available_backends
from .errors import BackendUnavailable
from .model import (AlbertConfig, AlbertForMaskedLM, AlbertForMultipleChoice, AlbertForPreTraining,
                    AlbertForQuestionAnswering, AlbertForSequenceClassification,
                    AlbertForTokenClassification, AlbertModel)
from .model.hf_patch import patch_hf
from .model.layers import freeze, unfreeze
from .ops import add_layer_norm, attention, gelu_ffn, linear_gelu, pad, unpad, varlen_attention

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "available_backends",
    "AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
    "AlbertForSequenceClassification", "AlbertForTokenClassification", "AlbertForQuestionAnswering",
    "AlbertForMultipleChoice",
    "attention", "varlen_attention", "add_layer_norm", "linear_gelu", "gelu_ffn", "unpad", "pad", "patch_hf",
    "freeze", "unfreeze",
]
