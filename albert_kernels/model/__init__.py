"""The ALBERT models on albert_kernels' op layer."""
from .config import AlbertConfig
from .models import (AlbertForPreTraining, AlbertForSequenceClassification, AlbertModel,
                     AlbertPreTrainedModel)

__all__ = ["AlbertConfig", "AlbertModel", "AlbertForPreTraining",
           "AlbertForSequenceClassification", "AlbertPreTrainedModel"]
