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
from .layers import (AlbertTransformer, ResolvesKernels, key_mask_from_attention_mask,
                     pack_tokens)


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
                return_dict: bool = True, **kwargs):
        cfg = self.hf_config
        if output_attentions or getattr(cfg, "output_attentions", False):
            raise ValueError("output_attentions=True is not supported by albert_kernels' fused "
                             "attention (it never forms the attention matrix)")
        if output_hidden_states or getattr(cfg, "output_hidden_states", False):
            raise ValueError("output_hidden_states=True is not supported by a patched model")
        if head_mask is not None and any(m is not None for m in head_mask):
            raise ValueError("head_mask is not supported by albert_kernels")
        batch, seqlen, _ = hidden_states.shape
        kernels = self.kernels
        key_mask = key_mask_from_attention_mask(attention_mask, batch, seqlen)
        # Under torch.compile: the padded grid, static shapes for one graph.
        tokens, plan, unpack = pack_tokens(hidden_states, key_mask, torch.compiler.is_compiling(),
                                           kernels)
        out = unpack(super().forward(tokens, plan))
        return self._output_type(last_hidden_state=out) if return_dict else (out,)


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
    for name, module in list(model.named_modules()):
        if isinstance(module, PatchedAlbertTransformer):
            module._use_backend(backend)
        elif isinstance(module, hf.AlbertTransformer):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr,
                    PatchedAlbertTransformer(module, config, backend).train(module.training))
    return model
