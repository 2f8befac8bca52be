"""The other task heads transformers has for ALBERT, on the padding-free encoder:
AlbertForMaskedLM, AlbertForTokenClassification, AlbertForQuestionAnswering and
AlbertForMultipleChoice (AlbertForPreTraining and AlbertForSequenceClassification are in
models.py). Module names, state-dict keys, outputs' fields, losses and label conventions follow
transformers' ``modeling_albert.py``: -100 labels are ignored, question-answering positions
outside the sequence are clamped to L and ignored, ``num_labels`` comes from the config.

What padding-free means for each head's output (B sequences of L positions, T real tokens):

- masked LM: with ``labels`` (and ``sparse_mlm=True``, the default), the MLM head runs only at
  the labelled positions (``labels != -100``) and ``logits`` is ``[M, vocab_size]`` for those M
  positions in row-major (batch, position) order, as AlbertForPreTraining's sparse head; the loss
  and gradients are transformers'. Without labels: ``[B, L, vocab_size]`` like transformers.
- token classification, question answering: one small linear layer per position, so the outputs
  keep transformers' [B, L, ...] grid (what Trainer, pipelines and metrics index). The
  encoder's output at a padded position is a zero row (AlbertModel says where it is not), so
  token classification logits there are the classifier's bias; question answering start/end
  logits at padded positions are the dtype's lowest value, so the softmax over positions, the
  argmax and the loss cover real tokens only (transformers' loss also spreads probability onto
  padded positions' logits, computed from pad tokens' hidden states; without padding the two
  agree).
- multiple choice: one row per (example, choice), pooled at position 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import AlbertConfig
from .layout import mask_layout
from .models import AlbertMLMHead, AlbertModel, AlbertPreTrainedModel, _Output

IGNORE_INDEX = -100


@dataclass
class MaskedLMOutput(_Output):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class TokenClassifierOutput(_Output):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class QuestionAnsweringModelOutput(_Output):
    loss: Optional[torch.Tensor]
    start_logits: torch.Tensor
    end_logits: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class MultipleChoiceModelOutput(_Output):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


def check_int_tensor(name: str, t, shape: tuple, meaning: str) -> None:
    """ValueError naming `name` unless `t` is None or an integer tensor of `shape`."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() \
            or tuple(t.shape) != tuple(shape):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an integer tensor {list(shape)} ({meaning}), got {got}")


def _passed_through(out) -> dict:
    """hidden_states / attentions of the encoder's output, when it has them."""
    return {k: getattr(out, k, None) for k in ("hidden_states", "attentions")}


def _set_num_labels(config: AlbertConfig, num_labels: Optional[int]) -> int:
    if num_labels is not None:
        config.num_labels = num_labels
    return config.num_labels


class AlbertForMaskedLM(AlbertPreTrainedModel):
    """ALBERT with the MLM head (no pooler; the decoder tied to the word embeddings unless
    ``config.tie_word_embeddings`` is False). Output shapes: see the module docstring."""

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None, sparse_mlm: bool = True):
        super().__init__(config, backend)
        self.sparse_mlm = bool(sparse_mlm)
        self.albert = AlbertModel(config, backend, add_pooling_layer=False)
        self.predictions = AlbertMLMHead(config)
        self.post_init()
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> MaskedLMOutput:
        """labels [B, L] int (-100 = not predicted): the loss is the cross-entropy averaged over
        the labelled positions. Other keyword arguments go to the encoder."""
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids, **kwargs)
        check_int_tensor("labels", labels, input_ids.shape, "-100 = not predicted")
        hidden, targets = out.last_hidden_state, labels
        if labels is not None and self.sparse_mlm:
            selected = labels != IGNORE_INDEX
            hidden, targets = hidden[selected], labels[selected]        # [M, hidden], [M]
        kernels = self.kernels_for(hidden.device, self._compute_dtype())
        logits = self.predictions(hidden, kernels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config.vocab_size), targets.reshape(-1))
        return MaskedLMOutput(loss, logits, **_passed_through(out))


class AlbertForTokenClassification(AlbertPreTrainedModel):
    """Hidden state of every position -> dropout -> linear: logits [B, L, num_labels].

    Dropout is ``classifier_dropout_prob``, or ``hidden_dropout_prob`` when that is None (as in
    transformers). Padded positions: the module docstring."""

    def __init__(self, config: AlbertConfig, num_labels: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(config, backend)
        self.num_labels = _set_num_labels(config, num_labels)
        self.albert = AlbertModel(config, backend, add_pooling_layer=False)
        p = config.classifier_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> TokenClassifierOutput:
        """labels [B, L] int in [0, num_labels) or -100 (ignored): cross-entropy averaged over
        the labelled positions (label padded positions -100, as transformers' collators do)."""
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids, **kwargs)
        check_int_tensor("labels", labels, input_ids.shape, "-100 = ignored")
        logits = self.classifier(self.dropout(out.last_hidden_state))        # [B, L, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1))
        return TokenClassifierOutput(loss, logits, **_passed_through(out))


class AlbertForQuestionAnswering(AlbertPreTrainedModel):
    """Extractive QA: a linear layer gives each position a start and an end logit.

    start_logits, end_logits: [B, L]; at padded positions the dtype's lowest value (module
    docstring). ``config.num_labels`` must be 2 (start, end), as transformers' head assumes."""

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None):
        super().__init__(config, backend)
        if config.num_labels != 2:
            raise ValueError(f"AlbertForQuestionAnswering needs config.num_labels == 2 (a start "
                             f"and an end logit per position), got {config.num_labels}")
        self.num_labels = config.num_labels
        self.albert = AlbertModel(config, backend, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions: Optional[torch.Tensor] = None,
                end_positions: Optional[torch.Tensor] = None,
                **kwargs) -> QuestionAnsweringModelOutput:
        """start_positions, end_positions [B] (or [B, 1]) int: the answer span's first and last
        token. As in transformers, positions are clamped to [0, L] and L is ignored (an answer
        cut off by truncation adds no loss); the loss is the mean of the start and end
        cross-entropies over positions, returned when both are given."""
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids, **kwargs)
        batch, seqlen = input_ids.shape
        start_positions = self._positions("start_positions", start_positions, batch)
        end_positions = self._positions("end_positions", end_positions, batch)
        logits = self.qa_outputs(out.last_hidden_state)                      # [B, L, 2]
        real = mask_layout(attention_mask, batch, seqlen, position_ids).key_mask   # [B, L] bool
        if real is not None:
            logits = logits.masked_fill(~real[..., None], torch.finfo(logits.dtype).min)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]
            start = F.cross_entropy(start_logits, start_positions.clamp(0, ignored),
                                    ignore_index=ignored)
            end = F.cross_entropy(end_logits, end_positions.clamp(0, ignored), ignore_index=ignored)
            loss = (start + end) / 2
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits, **_passed_through(out))

    @staticmethod
    def _positions(name: str, positions, batch: int):
        if positions is not None and isinstance(positions, torch.Tensor) and positions.dim() > 1:
            positions = positions.squeeze(-1)
        check_int_tensor(name, positions, (batch,), "one token index per sequence")
        return positions


class AlbertForMultipleChoice(AlbertPreTrainedModel):
    """Each (example, choice) sequence -> pooled output -> dropout -> linear to one score;
    logits [B, num_choices]."""

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None):
        super().__init__(config, backend)
        self.albert = AlbertModel(config, backend)
        self.dropout = nn.Dropout(config.classifier_dropout_prob or 0.0)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels: Optional[torch.Tensor] = None, **kwargs) -> MultipleChoiceModelOutput:
        """input_ids and the optional attention_mask, token_type_ids, position_ids:
        [B, num_choices, L]; labels [B] int in [0, num_choices): cross-entropy over the choices."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3:
            got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be [B, num_choices, L] for multiple choice, got {got}")
        batch, choices, seqlen = input_ids.shape
        check_int_tensor("labels", labels, (batch,), "index of the right choice")
        flat = []
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (batch, choices, seqlen):
                raise ValueError(f"{name} must be [B, num_choices, L] = {[batch, choices, seqlen]} "
                                 f"like input_ids, got {list(t.shape)}")
            flat.append(None if t is None else t.reshape(batch * choices, seqlen))
        out = self.albert(input_ids.reshape(batch * choices, seqlen), *flat, **kwargs)
        logits = self.classifier(self.dropout(out.pooler_output)).view(batch, choices)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss, logits, **_passed_through(out))
