"""``patch_hf``: run an existing transformers ALBERT model on albert_kernels, in place.

Every transformers ``AlbertTransformer`` (the shared-layer encoder inside each ALBERT class) is
swapped, by type, for :class:`PatchedAlbertTransformer`: our padding-free encoder holding the very
same parameter tensors (so state dicts, ``save_pretrained`` and an optimizer built before patching
keep working). Embeddings, pooler and heads stay transformers' own.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import get_backend
from .config import AlbertConfig
from .layers import AlbertTransformer, pack_tokens


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


def key_padding_mask_from_hf(mask, batch: int, seqlen: int) -> Optional[torch.Tensor]:
    """The bool [B, L] key padding mask (True = real) behind a mask transformers passes down:
    None, a 2D 0/1 mask, or a 4D [B, 1, Lq, L] bool (True = attend) or additive float mask."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"patch_hf supports padding masks only, got a {type(mask).__name__} "
                         "(use attn_implementation 'eager' or 'sdpa')")
    additive = False
    if mask.dim() == 4:
        if mask.shape[1] != 1 or mask.shape[-1] != seqlen:
            raise ValueError(f"patch_hf expects a [B, 1, Lq, L] padding mask, got {list(mask.shape)}")
        mask = mask[:, 0, 0, :]  # a padding mask masks keys: every query row is the same
        additive = mask.is_floating_point()  # transformers' 4D float masks: 0 = attend, -big = not
    if tuple(mask.shape) != (batch, seqlen):
        raise ValueError(f"attention_mask must be [B, L] = [{batch}, {seqlen}], got {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    return mask == 0 if additive else mask != 0


class PatchedAlbertTransformer(AlbertTransformer):
    """Stands in for transformers' AlbertTransformer: same parameters, our kernels, no padding."""

    def __init__(self, hf_encoder: torch.nn.Module, config: AlbertConfig, backend: Optional[str]):
        with torch.device("meta"):  # no memory for weights that are replaced at once
            super().__init__(config)
        share_parameters(self, hf_encoder)
        self.backend = backend
        self.hf_config = hf_encoder.config

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, head_mask=None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool = True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput
        cfg = self.hf_config
        if output_attentions or getattr(cfg, "output_attentions", False):
            raise ValueError("output_attentions=True is not supported by albert_kernels' fused "
                             "attention (it never forms the attention matrix)")
        if output_hidden_states or getattr(cfg, "output_hidden_states", False):
            raise ValueError("output_hidden_states=True is not supported by a patched model")
        if head_mask is not None and any(m is not None for m in head_mask):
            raise ValueError("head_mask is not supported by albert_kernels")
        batch, seqlen, _ = hidden_states.shape
        key_mask = key_padding_mask_from_hf(attention_mask, batch, seqlen)
        be = get_backend(self.backend, hidden_states.device.type)
        # Under torch.compile: the padded grid, static shapes for one graph.
        tokens, plan, unpack = pack_tokens(hidden_states, key_mask, torch.compiler.is_compiling())
        out = unpack(super().forward(tokens, plan, be))
        return BaseModelOutput(last_hidden_state=out) if return_dict else (out,)


def patch_hf(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """In place: every transformers ALBERT encoder in `model` runs on albert_kernels.

    Works for every transformers ALBERT class (AlbertModel, ...ForPreTraining, ...ForMaskedLM,
    ...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering,
    ...ForMultipleChoice). Calling it again on a patched model switches the backend. Returns model.
    """
    from transformers.models.albert import modeling_albert as hf
    if not isinstance(model, hf.AlbertPreTrainedModel):
        raise TypeError(f"patch_hf expects a transformers ALBERT model, got {type(model).__name__}")
    get_backend(backend, next(model.parameters()).device.type)  # fail now if it can't run
    config = AlbertConfig.from_hf(model.config)
    for name, module in list(model.named_modules()):
        if isinstance(module, PatchedAlbertTransformer):
            module.backend = backend
        elif isinstance(module, hf.AlbertTransformer):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr,
                    PatchedAlbertTransformer(module, config, backend).train(module.training))
    return model
