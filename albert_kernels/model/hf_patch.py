"""``patch_hf``: run an existing transformers ALBERT model on albert_kernels, in place.

Every transformers ``AlbertTransformer`` (the shared-layer encoder inside each ALBERT class) is
swapped, by type, for :class:`PatchedAlbertTransformer`: our padding-free encoder holding the very
same parameter tensors (so state dicts, ``save_pretrained`` and an optimizer built before patching
keep working). Embeddings, pooler and heads stay transformers' own.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import AlbertConfig
from .layers import AlbertTransformer, ResolvesKernels, pack_tokens
from .layout import mask_layout
from .outputs import Recorder, find_transformers_collector, transformers_collector, warn_not_fused


def share_parameters(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Make every parameter of `dst` the same Parameter object as `src`'s of the same name."""
    own = dict(dst.named_parameters())
    theirs = dict(src.named_parameters())
    if set(own) != set(theirs):
        raise KeyError(f"parameter names differ: {sorted(set(own) ^ set(theirs))}")
    for name, param in theirs.items():
        if own[name].shape != param.shape:
            raise ValueError(f"parameter {name!r}: {list(param.shape)} vs {list(own[name].shape)}")
        owner, _, attr = name.rpartition(".")
        setattr(dst.get_submodule(owner), attr, param)


class PatchedAlbertTransformer(ResolvesKernels, AlbertTransformer):
    """Stands in for transformers' AlbertTransformer: same parameters, our kernels, no padding.
    The backend is resolved here and when the model is moved (see ``layers.ResolvesKernels``)."""

    def __init__(self, hf_encoder: torch.nn.Module, config: AlbertConfig, backend: Optional[str]):
        from transformers.modeling_outputs import BaseModelOutput
        with torch.device("meta"):  # no memory for weights that are replaced at once
            super().__init__(config)
        share_parameters(self, hf_encoder)
        self.hf_config = hf_encoder.config
        self._output_type = BaseModelOutput  # imported here: forward imports nothing
        self._use_backend(backend)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, head_mask=None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool = True, position_ids=None, **kwargs):
        """transformers' encoder call: hidden_states [B, L, embedding_size]; attention_mask as
        transformers passes it (None, [B, 1, L, L] additive or bool; see ``layout.mask_layout``);
        position_ids (transformers 5 passes them): restarting at 0 inside a row = packed rows.
        Hidden states and attention probabilities go where transformers expects them: the
        collector of its ``capture_outputs`` (5.x), or this call's output (4.x flags)."""
        if head_mask is not None and any(m is not None for m in head_mask):
            raise ValueError("head_mask is not supported by albert_kernels")
        recorder = Recorder.from_collector(transformers_collector())
        legacy = recorder is None and (output_attentions or output_hidden_states)
        if legacy:  # transformers 4: the encoder returns the tuples, one hidden state per group
            recorder = Recorder([] if output_hidden_states else None,
                                [] if output_attentions else None, per_group=True)
        probs = recorder.attentions if recorder is not None else None
        if probs is not None:
            warn_not_fused("patch_hf")
        batch, seqlen, _ = hidden_states.shape
        layout = mask_layout(attention_mask, batch, seqlen, position_ids)
        # Under torch.compile: the padded grid, static shapes for one graph.
        tokens, plan, unpack = pack_tokens(hidden_states, layout, torch.compiler.is_compiling(),
                                           self.kernels, probs)
        if recorder is not None:
            recorder.unpack = unpack
        out = unpack(super().forward(tokens, plan, recorder))
        extra = {}
        if legacy:
            extra = {k: tuple(v) for k, v in (("hidden_states", recorder.hidden_states),
                                              ("attentions", recorder.attentions)) if v is not None}
        if return_dict:
            return self._output_type(last_hidden_state=out, **extra)
        return (out,) + tuple(extra.values())


def patch_hf(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """In place: every transformers ALBERT encoder in `model` runs on albert_kernels.

    Works for every transformers ALBERT class (AlbertModel, ...ForPreTraining, ...ForMaskedLM,
    ...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering,
    ...ForMultipleChoice). Calling it again on a patched model switches the backend. Returns model.
    The backend is resolved now, for the parameters' device and dtype and the model's head dim,
    as ``AlbertModel`` resolves it: BackendUnavailable for an unknown name, TypeError / ValueError
    for a dtype or head dim it does not support; one that cannot run on the parameters' device
    (``backend="cuda"`` before ``.cuda()``) raises BackendUnavailable at the first forward.
    """
    from transformers.models.albert import modeling_albert as hf
    if not isinstance(model, hf.AlbertPreTrainedModel):
        raise TypeError(f"patch_hf expects a transformers ALBERT model, got {type(model).__name__}")
    config = AlbertConfig.from_hf(model.config)
    find_transformers_collector()  # now, not inside a forward torch.compile may trace
    for name, module in list(model.named_modules()):
        if isinstance(module, PatchedAlbertTransformer):
            module._use_backend(backend)
        elif isinstance(module, hf.AlbertTransformer):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr,
                    PatchedAlbertTransformer(module, config, backend).train(module.training))
    return model
