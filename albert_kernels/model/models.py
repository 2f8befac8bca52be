"""The ALBERT models on the op layer: AlbertModel, AlbertForPreTraining,
AlbertForSequenceClassification. Semantics follow transformers' ``modeling_albert.py``.

The fast path, in AlbertModel.forward: the inputs are validated once, padding is removed once
(the embeddings are computed for real tokens only), every layer runs on the packed tokens with
the backend's ``varlen_attention``, and the output is padded once at the end, with zero rows at
padded positions. The backend is resolved for where the inputs and weights are, from a cache
refilled when a model is built, moved or switched (``layers.ResolvesKernels``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from ..backends.dispatch import Kernels
from . import core
from .config import AlbertConfig
from .id_checks import check_id_ranges
from .layers import (AlbertEmbeddings, AlbertTransformer, AttentionPlan, ResolvesKernels,
                     pack_tokens)
from .layout import mask_layout
from .outputs import Recorder, warn_not_fused
from .weights import WeightsMixin


def _flatten_output(output) -> tuple[list, list]:
    """(field values, field names): the pytree children of an output and its context."""
    names = [f.name for f in fields(output)]
    return [getattr(output, name) for name in names], names


def _flatten_output_with_keys(output) -> tuple[list, list]:
    values, names = _flatten_output(output)
    return [(pytree.GetAttrKey(name), value) for name, value in zip(names, values)], names


def _unflatten_output(cls, values, names):
    return cls(**dict(zip(names, values)))


class _Output:
    """Like transformers' ModelOutput: fields by name, or by position over the fields that are set.

    Every subclass is a pytree node (children: its fields in declaration order, None included),
    so ``torch.export``, ``torch.utils._pytree`` and ``torch.func`` take and return it as they do
    transformers' outputs; ``serialized_type_name`` (module and class name) lets a program saved
    by ``torch.export.save`` be loaded again."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls, _flatten_output, functools.partial(_unflatten_output, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=_flatten_output_with_keys)

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, index):
        return self.to_tuple()[index]


@dataclass
class AlbertOutput(_Output):
    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class AlbertForPreTrainingOutput(_Output):
    loss: Optional[torch.Tensor]
    prediction_logits: torch.Tensor
    sop_logits: torch.Tensor


@dataclass
class SequenceClassifierOutput(_Output):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class AlbertPreTrainedModel(WeightsMixin, ResolvesKernels, nn.Module):
    """Shared by the ALBERT models: the config, the kernel backend, weight init and loading.

    backend: a backend name or None (the best available for the parameters' device); resolved
    when the model is built, moved (``.to()``, ``.cuda()``, ``.half()``) or ``set_backend`` is
    called: an unknown name, or a dtype or head dim the backend does not support, raises then
    (BackendUnavailable / TypeError / ValueError); a backend that cannot run on the parameters'
    device raises BackendUnavailable at the first forward.
    """

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, AlbertConfig):
            raise TypeError(f"config must be an albert_kernels.AlbertConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend

    def set_backend(self, backend: Optional[str]) -> "AlbertPreTrainedModel":
        """Switch the kernels in place (None = best available); the weights are untouched.
        Raises as the constructor does for an unknown backend or an unsupported dtype/head dim."""
        for module in self.modules():
            if isinstance(module, AlbertPreTrainedModel):
                module._use_backend(backend)
        return self

    def enable_cuda_graphs(self, max_tokens: int = 2048) -> "AlbertPreTrainedModel":
        """Run the encoder of every AlbertModel in this model as CUDA graphs, one per bucket of
        token count (up to `max_tokens` real + dummy tokens), captured at a bucket's first use
        and replayed after (the backend's ``Kernels.graph_encoder``; docs/api.md, "CUDA graphs").
        Inference only: the model must be in eval mode, on a CUDA device, on the 'cuda' or
        'triton' backend, and called without autograd (torch.inference_mode() or no_grad()).
        RuntimeError otherwise (here, and at a forward that breaks one of these; a backend
        without CUDA graphs: BackendUnavailable, a RuntimeError); ValueError for a max_tokens
        that is not a positive int. Returns the model."""
        runners = [(module, module.kernels.graph_encoder(module, max_tokens))
                   for module in self._albert_models()]
        for module, runner in runners:  # installed only once every model passed
            module.cuda_graphs = runner
        return self

    def disable_cuda_graphs(self) -> "AlbertPreTrainedModel":
        """Back to eager forwards; the captured graphs and their memory are freed."""
        for module in self._albert_models():
            module.cuda_graphs = None
        return self

    def _albert_models(self) -> list:
        return [m for m in self.modules() if isinstance(m, AlbertModel)]

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation: N(0, initializer_range) weights, zero biases."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        """Initialise the weights and resolve the backend (the end of every model's __init__)."""
        self.apply(self._init_weights)
        self._use_backend(self.backend)


class AlbertModel(AlbertPreTrainedModel):
    """The ALBERT encoder (embeddings, shared layers, pooler), padding-free.

    Ids outside the embedding tables (negative, or input_ids >= vocab_size, token_type_ids >=
    type_vocab_size, position_ids >= max_position_embeddings) raise ValueError naming the
    argument, the value and the valid range: always on the CPU; on CUDA when ``check_ids`` is
    True (``model.check_ids = True``: one host synchronisation per forward). By default on CUDA
    no synchronisation is added: a device-side assertion (``torch._assert_async``) stops the
    process at the next synchronisation instead (id_checks.py).
    """

    check_ids: bool = False
    cuda_graphs = None  # the backend's CUDA-graph runner once enable_cuda_graphs() is called

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None,
                 add_pooling_layer: bool = True, unpad: bool = True):
        super().__init__(config, backend)
        self.unpad = unpad  # False: run every layer on the padded grid (for comparison only)
        self.embeddings = AlbertEmbeddings(config)
        self.encoder = AlbertTransformer(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> AlbertOutput:
        """input_ids [B, L] int; attention_mask [B, L] (1/True = real token), a [B, 1, L, L]
        padding or block-diagonal mask, or None; token_type_ids, position_ids [B, L] int or None
        (zeros; 0..L-1; position_ids restarting at 0 right after a real token of the same row
        mark packed sequences, left-padding ids do not). The masks accepted and the layout each
        gives: ``layout.mask_layout``.

        output_hidden_states: also return ``hidden_states``, transformers' tuple (the encoder's
        input after the embedding projection, then every layer's output), each [B, L, hidden].
        output_attentions: also return ``attentions``, [B, heads, L, L] per layer; such a call
        forms the matrices, so it runs plain PyTorch attention on the padded grid (a warning
        says so once), not the fused kernels.

        Returns last_hidden_state [B, L, hidden] (zero rows at padded positions) and
        pooler_output [B, hidden] (tanh(pooler(hidden state at position 0))).

        The inputs are validated once, here (ValueError naming the argument); the layers then
        call the resolved backend's kernels directly, not the public ops, which would check
        cu_seqlens on the host in every layer. Eagerly, a forward reads the device a fixed number
        of times, never per layer: the checks of the mask, position ids and ids
        (``layout.mask_layout``, ``id_checks.check_id_ranges``) and, when padding is removed,
        the token positions, the longest length and the left-padded rows
        (``layout.packed_sequences``); under torch.compile, not at all. BackendUnavailable if the
        backend cannot run on the parameters' device.
        """
        kernels = self.kernels_for(input_ids.device, self._compute_dtype())
        input_ids, layout, token_type_ids, position_ids = self._check_ids(
            input_ids, attention_mask, token_type_ids, position_ids)
        ids = torch.stack([input_ids, token_type_ids, position_ids], dim=-1)     # [B, L, 3]
        recorder = None
        if output_hidden_states or output_attentions:
            recorder = Recorder([] if output_hidden_states else None,
                                [] if output_attentions else None)
            if output_attentions:
                warn_not_fused(type(self).__name__)
        # Under torch.compile the padded layout keeps every shape static (no data-dependent
        # token count), so the whole forward is one graph; eager runs padding-free.
        padded = not self.unpad or torch.compiler.is_compiling()
        tokens, plan, unpack = pack_tokens(ids, layout, padded, kernels,
                                           recorder.attentions if recorder else None)  # [T, 3]
        if recorder is not None:
            recorder.unpack = unpack
        encoded = None
        if self.cuda_graphs is not None and recorder is None:  # None: the batch runs eagerly
            encoded = self.cuda_graphs.encode(self, tokens, plan, self._embed_and_encode,
                                              self.config.pad_token_id)
        if encoded is None:
            encoded = self._embed_and_encode(tokens, plan, recorder)
        hidden = unpack(encoded)                                                  # [B, L, hidden]
        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        as_tuple = lambda v: None if v is None else tuple(v)
        return AlbertOutput(hidden, pooled, as_tuple(recorder and recorder.hidden_states),
                            as_tuple(recorder and recorder.attentions))

    def _embed_and_encode(self, tokens: torch.Tensor, plan: AttentionPlan,
                          recorder: Optional[Recorder] = None) -> torch.Tensor:
        """The encoder's output [N, hidden] for token rows [N, 3] (input id, token type,
        position) laid out by `plan`: what a CUDA graph captures."""
        x = self.embeddings(tokens[:, 0], tokens[:, 1], tokens[:, 2])             # [N, E]
        return self.encoder(x, plan, recorder)

    def _check_ids(self, input_ids, attention_mask, token_type_ids, position_ids):
        for name, t in (("input_ids", input_ids), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if t is None and name != "input_ids":
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be an integer tensor [B, L], got {got}")
        batch, seqlen = input_ids.shape
        if seqlen > self.config.max_position_embeddings and position_ids is None:
            raise ValueError(f"input_ids has {seqlen} positions but max_position_embeddings is "
                             f"{self.config.max_position_embeddings}")
        for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (batch, seqlen):
                raise ValueError(f"{name} must be [B, L] = [{batch}, {seqlen}] like input_ids, "
                                 f"got {list(t.shape)}")
        check_id_ranges(self.config, self.check_ids, input_ids=input_ids,
                        token_type_ids=token_type_ids, position_ids=position_ids)
        layout = mask_layout(attention_mask, batch, seqlen, position_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(seqlen, device=input_ids.device).expand(batch, seqlen)
        return input_ids, layout, token_type_ids.long(), position_ids.long()


class AlbertMLMHead(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.approximate, self.eps = config.gelu_approximate, config.layer_norm_eps
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size)
        # decoder.weight / decoder.bias: the word embeddings / self.bias when the owning model
        # ties them (WeightsMixin.tie_weights, config.tie_word_embeddings), else weights of their own

    def forward(self, hidden: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """hidden [..., hidden_size] (the whole [B, L] grid, or the gathered [M] labelled rows)
        -> logits [..., vocab_size], with the owning model's resolved `kernels`."""
        if core.is_plain(self.dense):
            x = kernels.linear_gelu(hidden, self.dense.weight, self.dense.bias, self.approximate)
        else:
            x = F.gelu(self.dense(hidden), approximate=self.approximate)
        return self.decoder(self.LayerNorm(x))


class AlbertSOPHead(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout_prob or 0.0)
        self.classifier = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class AlbertForPreTraining(AlbertPreTrainedModel):
    """ALBERT with the MLM head (decoder tied to the word embeddings unless
    ``config.tie_word_embeddings`` is False) and the SOP head.

    Sparse MLM head (``sparse_mlm=True``, the default): when ``labels`` are given, the MLM head
    (dense -> GELU -> LayerNorm -> decoder over the vocabulary) runs only at the positions where
    ``labels != -100``, as the original ALBERT gathers its at most ``max_predictions_per_seq``
    positions per sequence. ``prediction_logits`` then holds the logits of those positions only,
    ``[num_masked, vocab_size]``, in row-major (batch, position) order: the rows that
    ``dense_logits[labels != -100]`` would select. The loss is the same as the dense computation
    (cross-entropy averaged over the labelled positions, plus the SOP cross-entropy), and so are
    the gradients. The rows are gathered from the encoder's output, after the padding-free
    encoder has put the real tokens back on the [B, L] grid.

    Without ``labels``, or with ``sparse_mlm=False``, ``prediction_logits`` is ``[B, L, vocab_size]``
    as in transformers (rows at padded positions are the head applied to zero hidden states).
    """

    def __init__(self, config: AlbertConfig, backend: Optional[str] = None, sparse_mlm: bool = True):
        super().__init__(config, backend)
        self.sparse_mlm = bool(sparse_mlm)
        self.albert = AlbertModel(config, backend)
        self.predictions = AlbertMLMHead(config)
        self.sop_classifier = AlbertSOPHead(config)
        self.post_init()
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels: Optional[torch.Tensor] = None,
                sentence_order_label: Optional[torch.Tensor] = None) -> AlbertForPreTrainingOutput:
        """labels [B, L] int (-100 = not predicted); sentence_order_label [B] int (0 = A then B,
        1 = swapped). The loss is returned when both are given."""
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids)
        self._check_labels(input_ids, labels, sentence_order_label)
        hidden, targets = out.last_hidden_state, labels
        if labels is not None and self.sparse_mlm:
            selected = labels != -100
            hidden, targets = hidden[selected], labels[selected]        # [M, hidden], [M]
        kernels = self.kernels_for(hidden.device, self._compute_dtype())
        logits = self.predictions(hidden, kernels)
        sop_logits = self.sop_classifier(out.pooler_output)
        loss = None
        if labels is not None and sentence_order_label is not None:
            mlm = F.cross_entropy(logits.reshape(-1, self.config.vocab_size), targets.reshape(-1))
            loss = mlm + F.cross_entropy(sop_logits.view(-1, 2), sentence_order_label.view(-1))
        return AlbertForPreTrainingOutput(loss, logits, sop_logits)

    @staticmethod
    def _check_labels(input_ids, labels, sentence_order_label) -> None:
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                                   or tuple(labels.shape) != tuple(input_ids.shape)):
            got = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor) \
                else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor [B, L] = {list(input_ids.shape)} "
                             f"like input_ids (-100 = not predicted), got {got}")
        if sentence_order_label is not None and (
                not isinstance(sentence_order_label, torch.Tensor)
                or sentence_order_label.is_floating_point()
                or sentence_order_label.numel() != input_ids.shape[0]):
            got = f"{sentence_order_label.dtype} {list(sentence_order_label.shape)}" \
                if isinstance(sentence_order_label, torch.Tensor) else type(sentence_order_label).__name__
            raise ValueError(f"sentence_order_label must be an integer tensor [B] = "
                             f"[{input_ids.shape[0]}], got {got}")


class AlbertForSequenceClassification(AlbertPreTrainedModel):
    """Pooled output -> dropout -> classifier, with transformers' loss semantics (problem_type)."""

    def __init__(self, config: AlbertConfig, num_labels: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__(config, backend)
        if num_labels is not None:
            config.num_labels = num_labels
        self.num_labels = config.num_labels
        self.albert = AlbertModel(config, backend)
        self.dropout = nn.Dropout(config.classifier_dropout_prob or 0.0)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        pooled = self.albert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
                self.config.problem_type = problem
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(), labels.squeeze()) if self.num_labels == 1 \
                    else F.mse_loss(logits, labels)
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels)
        return SequenceClassifierOutput(loss, logits)
