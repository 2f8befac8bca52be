"""The ALBERT models on albert_kernels' op layer: the encoder (AlbertModel) and every task head
transformers has for ALBERT, with transformers' module names, weights' keys and outputs."""
from .config import AlbertConfig
from .heads import (AlbertForMaskedLM, AlbertForMultipleChoice, AlbertForQuestionAnswering,
                    AlbertForTokenClassification)
from .models import (AlbertForPreTraining, AlbertForSequenceClassification, AlbertModel,
                     AlbertPreTrainedModel)

__all__ = ["AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
           "AlbertForSequenceClassification", "AlbertForTokenClassification",
           "AlbertForQuestionAnswering", "AlbertForMultipleChoice", "AlbertPreTrainedModel"]
