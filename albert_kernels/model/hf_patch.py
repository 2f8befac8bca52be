"""``patch_hf``: run an existing transformers ALBERT model on albert_kernels, in place (the BERT
family, BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT, is patched the same way by
``hf_family.py``; ``patch_hf`` takes both).

Every transformers ``AlbertTransformer`` (the shared-layer encoder inside each ALBERT class) keeps
its identity and every submodule object: only its class is switched to
:class:`PatchedAlbertTransformer`, a subclass whose ``forward`` runs the encoder core
(``core.py``) over transformers' own modules, padding-free. So state dicts, ``save_pretrained``,
an optimizer built before patching, PEFT adapters added before or after, module hooks and
accelerate's hooks all see the same modules as before. Embeddings, pooler and heads stay
transformers' own.

The core runs the layers per op, fused where a submodule is plain (``core.is_plain``) and calling
it where it is not (a PEFT LoRA wrapper, another Linear class, accelerate's device and offload
hooks): such modules are called on token-major [N, features] tensors, which per-token modules do
not tell apart from transformers' [B, L, features]. Hooks are another matter: a user's hook sees
the tensors and may index them by position, so when any module of the encoder has forward,
forward-pre or backward hooks (transformers' own output capturing aside), torch's global module
hooks are registered, or a group, layer or attention module is not transformers' own class, the
encoder runs transformers' own ``AlbertTransformer.forward`` for that call: the hooks then fire
exactly as in transformers, as often and with its arguments, at transformers' speed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import core
from .config import AlbertConfig
from .layers import CoreEncoder, ResolvesKernels, pack_tokens
from .layout import mask_layout
from .outputs import Recorder, find_transformers_collector, transformers_collector, warn_not_fused


def reject_head_mask(kwargs: dict) -> None:
    """ValueError for a head_mask with a non-None entry in a patched encoder's call (the fused
    attention has no per-head mask)."""
    head_mask = kwargs.get("head_mask")
    if head_mask is not None and any(m is not None for m in head_mask):
        raise ValueError("head_mask is not supported by albert_kernels")


def padding_free_call(hidden_states: torch.Tensor, attention_mask, kwargs: dict, kernels,
                      run: Callable, per_group: bool = False) -> tuple:
    """The body of a patched transformers encoder's forward, for every family: lay the batch out
    padding-free once (``layout.mask_layout``, ``layers.pack_tokens``), run the layers, pad once.

    hidden_states [B, L, hidden]; attention_mask and ``kwargs`` (``position_ids``,
    ``output_attentions``, ``output_hidden_states``) as transformers passes them to its encoder;
    kernels: the resolved backend; run(tokens [N, hidden], plan, recorder) -> tokens [N, hidden]
    (recorder None unless hidden states or attentions are asked for). Hidden states and attention
    probabilities go where transformers expects them: the collector of its ``capture_outputs``
    (5.x), or, for 4.x's flags, the returned ``extra`` tuples (one hidden state per layer group
    with `per_group`, ALBERT's convention). Under torch.compile the padded grid is used (static
    shapes). Returns (last_hidden_state [B, L, hidden], extra: dict)."""
    output_attentions = kwargs.get("output_attentions", False)
    output_hidden_states = kwargs.get("output_hidden_states", False)
    recorder = Recorder.from_collector(transformers_collector())
    legacy = recorder is None and (output_attentions or output_hidden_states)
    if legacy:  # transformers 4: the encoder returns the tuples
        recorder = Recorder([] if output_hidden_states else None,
                            [] if output_attentions else None, per_group=per_group)
    probs = recorder.attentions if recorder is not None else None
    if probs is not None:
        warn_not_fused("patch_hf")
    batch, seqlen, _ = hidden_states.shape
    layout = mask_layout(attention_mask, batch, seqlen, kwargs.get("position_ids"))
    tokens, plan, unpack = pack_tokens(hidden_states, layout, torch.compiler.is_compiling(),
                                       kernels, probs)
    if recorder is not None:
        recorder.unpack = unpack
    out = unpack(run(tokens, plan, recorder))
    extra = {}
    if legacy:
        extra = {k: tuple(v) for k, v in (("hidden_states", recorder.hidden_states),
                                          ("attentions", recorder.attentions)) if v is not None}
    return out, extra


class PatchedEncoderMixin(ResolvesKernels, CoreEncoder):
    """What ``patch_hf`` adds to a transformers ALBERT encoder: the backend (resolved for where
    the hidden states are, see ``layers.ResolvesKernels``) and the core's forward. Set on the
    instance: ``backend`` and ``_ak_config`` (our AlbertConfig of the model)."""

    _hf_class: type = None
    _hf_types: tuple = ()

    def _head_dim(self) -> int:
        return self._ak_config.head_dim

    def _core_types(self) -> tuple:
        return self._hf_types

    def _core_config(self) -> tuple:
        c = self.config
        return c.num_hidden_layers, c.num_hidden_groups, self._ak_config.gelu_approximate

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        """transformers' encoder call: hidden_states [B, L, embedding_size]; attention_mask as
        transformers passes it (None, [B, 1, L, L] additive or bool; see ``layout.mask_layout``);
        position_ids (transformers 5 passes them) are read as packed rows (restarting at 0
        inside a row) only under a flash-attention implementation, the only one with which
        transformers' ALBERT splits rows by them; with eager and sdpa it attends across the row,
        and so does the core.
        Hidden states and attention probabilities go where transformers expects them: the
        collector of its ``capture_outputs`` (5.x), or this call's output (4.x flags).
        transformers' own forward runs instead when a layer-level module has hooks (see the
        module docstring). ValueError for a head_mask (not supported)."""
        reject_head_mask(kwargs)
        steps = None if core.encoder_hooked(self) else self._core_steps(call_hooked=False)
        if steps is None:
            return self._hf_class.forward(self, hidden_states, attention_mask, **kwargs)
        return_dict = kwargs.get("return_dict", True)
        kernels = self.kernels_for(hidden_states.device, hidden_states.dtype)
        impl = str(getattr(self.config, "_attn_implementation", None) or "")
        if "position_ids" in kwargs and not impl.startswith("flash"):
            kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
        out, extra = padding_free_call(
            hidden_states, attention_mask, kwargs, kernels,
            lambda tokens, plan, recorder: self._run_core(tokens, plan, steps, recorder),
            per_group=True)
        if return_dict:
            return self._output_type(last_hidden_state=out, **extra)
        return (out,) + tuple(extra.values())


_PATCHED: list = []


def _patched_class() -> type:
    """PatchedAlbertTransformer: transformers' AlbertTransformer with the core's forward (made
    once, at first use: transformers is imported then)."""
    if not _PATCHED:
        from transformers.modeling_outputs import BaseModelOutput
        from transformers.models.albert import modeling_albert as hf
        cls = type("PatchedAlbertTransformer", (PatchedEncoderMixin, hf.AlbertTransformer), {
            "__module__": __name__, "__qualname__": "PatchedAlbertTransformer",
            "__doc__": "transformers' AlbertTransformer run by albert_kernels' encoder core.",
            "_hf_class": hf.AlbertTransformer,
            "_hf_types": (hf.AlbertLayerGroup, hf.AlbertLayer, hf.AlbertAttention),
            "_output_type": BaseModelOutput})
        _PATCHED.append(cls)
    return _PATCHED[0]


def __getattr__(name: str):
    if name == "PatchedAlbertTransformer":  # pickles of patched models name it
        return _patched_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _albert_models(model: torch.nn.Module) -> list:
    from transformers.models.albert import modeling_albert as hf
    if isinstance(model, hf.AlbertPreTrainedModel):
        return [model]
    return [m for m in model.modules() if isinstance(m, hf.AlbertPreTrainedModel)]


def patch_hf(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """In place: every transformers ALBERT, BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT
    encoder in `model` runs on albert_kernels.

    model: any transformers model class of these families used as an encoder (``AlbertModel``,
    ``BertModel``, ...ForPreTraining, ...ForMaskedLM, ...ForSequenceClassification,
    ...ForTokenClassification, ...ForQuestionAnswering, ...ForMultipleChoice,
    ``BertForNextSentencePrediction``, ``ElectraForPreTraining``, ...), or a module holding such
    models (a PEFT ``PeftModel``, a sentence-transformers ``SentenceTransformer``): every one
    inside is patched. Calling it again on a patched model switches the backend. Returns model.
    The encoders keep their submodules (see the module docstring and ``hf_family.py``). The
    backend is checked now for the parameters' device and dtype and the model's head dim:
    BackendUnavailable for an unknown name, TypeError / ValueError for a dtype or head dim it
    does not support; one that cannot run on the parameters' device (``backend="cuda"`` before
    ``.cuda()``) raises BackendUnavailable at the first forward.

    A BERT-family model configured as a decoder (``is_decoder``, ``add_cross_attention``) or with
    a ``position_embedding_type`` other than ``"absolute"`` is left unpatched with a UserWarning
    (it keeps running transformers' own code); ValueError if that leaves nothing patched.
    TypeError if `model` holds none of these models.
    """
    from transformers.models.albert import modeling_albert as hf
    from . import hf_family
    albert_models = _albert_models(model)
    family = hf_family.family_models(model)
    if not albert_models and not family:
        raise TypeError("patch_hf expects a transformers ALBERT, BERT, RoBERTa, XLM-RoBERTa, "
                        "ELECTRA or DistilBERT model (or a module holding one: a PEFT model, a "
                        f"SentenceTransformer), got {type(model).__name__}")
    find_transformers_collector()  # now, not inside a forward torch.compile may trace
    if albert_models:
        patched = _patched_class()
        for albert in albert_models:
            config = AlbertConfig.from_hf(albert.config)
            for module in albert.modules():
                if isinstance(module, patched):
                    module._use_backend(backend)
                elif type(module) is hf.AlbertTransformer and "forward" not in module.__dict__:
                    module.__class__ = patched
                    module._ak_config = config
                    module._use_backend(backend)
    if family:
        count, skipped = hf_family.patch_family(model, backend)
        if not albert_models and count == 0:
            raise ValueError("patch_hf: nothing to patch in " + type(model).__name__ + ": " +
                             "; ".join(f"{name}: {why}" for name, why in skipped) +
                             " (those run transformers' own code; use them unpatched)")
    return model
