"""``patch_hf`` for the BERT family: transformers' BERT, RoBERTa, XLM-RoBERTa, ELECTRA and
DistilBERT encoders run padding-free on the encoder core (``core.py``), in place.

As for ALBERT (``hf_patch.py``), each encoder instance (``BertEncoder``, ``RobertaEncoder``,
``XLMRobertaEncoder``, ``ElectraEncoder``, DistilBERT's ``Transformer``) keeps its identity and
every submodule: only its class is switched to a subclass whose ``forward`` packs the real tokens
once, runs every layer through the core on the model's own modules, and puts the result back on
the [B, L] grid once. Embeddings (RoBERTa's position ids from ``padding_idx``, ELECTRA's
``embeddings_project``, DistilBERT's sinusoidal table), pooler and heads stay transformers' own.

A per-family adapter maps one layer onto the core's :class:`core.LayerParts`:

- BERT layout (BERT, RoBERTa, XLM-RoBERTa, ELECTRA): ``attention.self.{query,key,value}``,
  ``attention.output.{dense,dropout,LayerNorm}``, ``intermediate.{dense,intermediate_act_fn}``,
  ``output.{dense,dropout,LayerNorm}``.
- DistilBERT: ``attention.{q_lin,k_lin,v_lin,out_lin}``, ``sa_layer_norm``,
  ``ffn.{lin1,activation,lin2,dropout}``, ``output_layer_norm``.

The activation runs as the fused GELU only when the module computes exactly
``F.gelu(x, approximate=...)`` (transformers' ``"gelu"`` and ``"gelu_pytorch_tanh"``); any other
activation module (``"gelu_new"``, ``"relu"``, ...) is called.

transformers' own forward runs for the call instead (the same numbers, at its speed) when: the
model is used as a decoder (``config.is_decoder``, ``add_cross_attention``, ``encoder_hidden_states``,
a cache or ``use_cache``), any module of the encoder has forward/backward hooks (transformers'
output capturing aside) or torch's global module hooks are set, a layer or one of its submodules
is not transformers' own class, or gradient checkpointing is on in training. ``patch_hf`` does not
patch a model whose config is a decoder's or whose ``position_embedding_type`` is not
``"absolute"`` (a UserWarning says so; ValueError when nothing else is left to patch).
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import core
from .hf_patch import padding_free_call, reject_head_mask
from .layers import ResolvesKernels


@dataclass(frozen=True)
class Family:
    """One transformers model family: its modeling module, the base class of its models, the
    encoder class patched, the classes its layers are made of (by role) and the adapter that
    extracts a layer's parts. ``heads``: the config attribute holding the number of heads."""
    name: str
    module: str
    pretrained: str
    encoder: str
    layer_classes: dict
    parts: Callable
    heads: str = "num_attention_heads"
    hidden: str = "hidden_size"


def _gelu_form(act) -> tuple:
    """(approximate, activation module or None) for an activation module: GELU's
    ``approximate`` when calling `act` computes exactly ``F.gelu(x, approximate)`` (then the
    fused kernels run it), else ("none", act): the core calls it."""
    try:
        from transformers import activations as hf_act
    except ImportError:  # pragma: no cover - transformers is there when its models are
        return "none", act
    if isinstance(act, torch.nn.Module) and not core.has_hooks(act):
        fn = act.__dict__.get("act")
        if type(act) is hf_act.GELUActivation and fn is F.gelu:
            return "none", None
        gelu_tanh = getattr(hf_act, "GELUTanh", None) or getattr(hf_act, "PytorchGELUTanh", None)
        if gelu_tanh is not None and type(act) is gelu_tanh and getattr(fn, "func", None) is \
                F.gelu and getattr(fn, "keywords", None) == {"approximate": "tanh"} \
                and not getattr(fn, "args", ()):
            return "tanh", None
    return "none", act


def _dropout_if_active(module) -> Optional[torch.nn.Module]:
    """A dropout module to call, or None when calling it is the identity (eval, no hooks)."""
    if module is None:
        return None
    if type(module) is torch.nn.Dropout and not module.training and not core.has_hooks(module):
        return None
    return module


def _exact(module, cls) -> bool:
    return cls is not None and type(module) is cls and "forward" not in module.__dict__


def bert_layer_parts(layer, classes: dict) -> Optional[core.LayerParts]:
    """The parts of a BERT-layout layer (BERT, RoBERTa, XLM-RoBERTa, ELECTRA), or None when the
    layer is not the family's own encoder layer (another class, cross-attention, causal)."""
    att = getattr(layer, "attention", None)
    if not _exact(layer, classes["layer"]) or getattr(layer, "is_decoder", False) \
            or getattr(layer, "add_cross_attention", False) or not _exact(att, classes["attention"]):
        return None
    sa, so = att.self, att.output
    inter, out = layer.intermediate, layer.output
    if not (_exact(sa, classes["self"]) and _exact(so, classes["self_output"])
            and _exact(inter, classes["intermediate"]) and _exact(out, classes["output"])) \
            or getattr(sa, "is_causal", False) or getattr(att, "is_cross_attention", False):
        return None
    approximate, activation = _gelu_form(inter.intermediate_act_fn)
    return core.LayerParts.make(
        query=sa.query, key=sa.key, value=sa.value, dense=so.dense, norm1=so.LayerNorm,
        ffn_in=inter.dense, ffn_out=out.dense, norm2=out.LayerNorm,
        output_dropout=_dropout_if_active(so.dropout), ffn_dropout=_dropout_if_active(out.dropout),
        num_heads=sa.num_attention_heads, head_dim=sa.attention_head_size,
        scale=core.attention_scale(sa),
        attention_dropout_p=sa.dropout.p, approximate=approximate, activation=activation,
        training=sa.training)


def distilbert_layer_parts(layer, classes: dict) -> Optional[core.LayerParts]:
    """The parts of a DistilBERT ``TransformerBlock`` (no dropout after the attention's output
    product; the FFN's dropout after ``lin2``), or None when it is not transformers' own."""
    att, ffn = getattr(layer, "attention", None), getattr(layer, "ffn", None)
    if not (_exact(layer, classes["layer"]) and _exact(att, classes["self"])
            and _exact(ffn, classes["ffn"])) or getattr(att, "is_causal", False):
        return None
    approximate, activation = _gelu_form(ffn.activation)
    return core.LayerParts.make(
        query=att.q_lin, key=att.k_lin, value=att.v_lin, dense=att.out_lin,
        norm1=layer.sa_layer_norm, ffn_in=ffn.lin1, ffn_out=ffn.lin2,
        norm2=layer.output_layer_norm, output_dropout=None,
        ffn_dropout=_dropout_if_active(ffn.dropout), num_heads=att.n_heads,
        head_dim=att.attention_head_size, scale=core.attention_scale(att),
        attention_dropout_p=att.dropout.p,
        approximate=approximate, activation=activation, training=att.training)


def _bert_layout(name: str, prefix: str) -> Family:
    roles = {"layer": "Layer", "attention": "Attention", "self": "SelfAttention",
             "self_output": "SelfOutput", "intermediate": "Intermediate", "output": "Output"}
    return Family(name, f"transformers.models.{name}.modeling_{name}", f"{prefix}PreTrainedModel",
                  f"{prefix}Encoder", {k: prefix + v for k, v in roles.items()}, bert_layer_parts)


FAMILIES = (
    _bert_layout("bert", "Bert"),
    _bert_layout("roberta", "Roberta"),
    _bert_layout("xlm_roberta", "XLMRoberta"),
    _bert_layout("electra", "Electra"),
    Family("distilbert", "transformers.models.distilbert.modeling_distilbert",
           "DistilBertPreTrainedModel", "Transformer",
           {"layer": "TransformerBlock", "self": "DistilBertSelfAttention", "ffn": "FFN"},
           distilbert_layer_parts, heads="n_heads", hidden="dim"),
)


def _hf_module(family: Family):
    try:
        return importlib.import_module(family.module)
    except ImportError:
        return None


_DECODER_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values")


class PatchedFamilyEncoderMixin(ResolvesKernels):
    """What ``patch_hf`` adds to a BERT-family encoder: the backend (``layers.ResolvesKernels``)
    and the core's forward. Set on the instance: ``backend``, ``_ak_head_dim`` and
    ``_ak_model_config`` (the transformers config of the model)."""

    _hf_class: type = None
    _family: Family = None
    _classes: dict = {}
    _output_type: type = None

    def _head_dim(self) -> int:
        return self._ak_head_dim

    def _steps_for_call(self) -> Optional[list]:
        """The layer schedule for this call, or None when transformers' forward must run (a
        module has hooks, see ``core.module_state``, or a layer is not the family's own). Kept
        between calls while ``core.module_state`` is unchanged (no module, parameter, mode or
        adapter-read attribute changed), so a call does not extract the parts again."""
        key = core.module_state(self)
        if key is None:
            return None
        cache = self.__dict__.get("_ak_steps")
        if cache is not None and cache.key == key:
            return cache.steps
        steps = self._core_steps()
        self._ak_steps = core.StepsCache(key, steps, self)
        return steps

    def _core_steps(self) -> Optional[list]:
        """One :class:`core.Step` per layer, or None when a layer cannot run on the core."""
        steps = []
        for layer in self.layer:
            parts = self._family.parts(layer, self._classes)
            if parts is None:
                return None
            steps.append(core.Step(id(layer), parts, layer))
        return steps

    def _freeze(self, kernels, names: dict) -> None:
        """Pack every layer's weights for the backend's frozen path (``albert_kernels.freeze``,
        ``core.freeze_steps``; the layers are unshared: one packed copy each). ValueError naming
        the first module it cannot run frozen (not plain, hooks, an activation other than
        ``F.gelu``'s erf or tanh form)."""
        if core.encoder_hooked(self):
            hooked = next((m for m in self.modules() if core.user_hooks(m, True)), self)
            raise ValueError(
                f"freeze: {names.get(id(hooked), type(hooked).__name__)} has hooks (or torch's "
                "global module hooks are set): a hooked encoder runs transformers' own forward, "
                "which the frozen path would bypass. Remove the hooks first, or run unfrozen")
        core.freeze_steps(self, None, self._core_steps(), kernels, names)

    def _unfreeze(self) -> None:
        self.__dict__.pop("_frozen", None)

    def _needs_transformers(self, args, kwargs) -> bool:
        config = self._ak_model_config
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return True
        if any(a is not None for a in args) or kwargs.get("use_cache"):
            return True
        if any(kwargs.get(k) is not None for k in _DECODER_ARGS):
            return True
        return self.training and any(getattr(m, "gradient_checkpointing", False)
                                     for m in self.modules())

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
        """transformers' encoder call: hidden_states [B, L, hidden] (float); attention_mask as
        the model passes it (None, a [B, 1, L, L] additive float or bool mask, see
        ``layout.mask_layout``); position_ids (BERT-layout models pass them): restarting at 0
        inside a row = packed rows. Returns the encoder's transformers output with
        ``last_hidden_state`` [B, L, hidden] (padded positions hold zeros, except a left-padded
        first position). Hidden states and attention probabilities go to transformers'
        collector (5.x) or into the output (4.x flags). transformers' forward runs instead for
        decoder use, hooks, foreign layer classes and gradient checkpointing (see the module
        docstring). ValueError for a head_mask or an attention_mask of another form."""
        reject_head_mask(kwargs)
        steps = None if self._needs_transformers(args, kwargs) else self._steps_for_call()
        if steps is None:
            return self._hf_class.forward(self, hidden_states, attention_mask, *args, **kwargs)
        kernels = self.kernels_for(hidden_states.device, hidden_states.dtype)

        def run(tokens, plan, recorder):
            frozen = core.frozen_for_call(self, None, steps, tokens, plan)
            h = tokens if recorder is None else recorder.hidden(tokens)
            return core.run_layers(steps, h, plan, recorder, frozen)

        out, extra = padding_free_call(hidden_states, attention_mask, kwargs, kernels, run)
        if kwargs.get("return_dict", True) is False:
            return (out,) + tuple(extra.values())
        return self._output_type(last_hidden_state=out, **extra)


_PATCHED: dict = {}


def patched_class(family: Family) -> Optional[type]:
    """The patched subclass of `family`'s encoder class (made once), or None when transformers
    has no such model."""
    cls = _PATCHED.get(family.name)
    if cls is None:
        hf = _hf_module(family)
        if hf is None:
            return None
        encoder = getattr(hf, family.encoder)
        from transformers import modeling_outputs as mo
        output_type = (mo.BaseModelOutput if family.name == "distilbert"
                       else mo.BaseModelOutputWithPastAndCrossAttentions)
        name = f"Patched{encoder.__name__}_{family.name}"
        cls = type(name, (PatchedFamilyEncoderMixin, encoder), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"transformers' {encoder.__name__} ({family.name}) run by albert_kernels' "
                       "encoder core.",
            "_hf_class": encoder, "_family": family,
            "_classes": {role: getattr(hf, c, None) for role, c in family.layer_classes.items()},
            "_output_type": output_type})
        _PATCHED[family.name] = cls
    return cls


def __getattr__(name: str):
    for family in FAMILIES:  # pickles of patched models name the class
        hf = _hf_module(family) if name.endswith("_" + family.name) else None
        if hf is not None and name == f"Patched{family.encoder}_{family.name}":
            return patched_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_models(model: torch.nn.Module) -> list:
    """(family, transformers model) for every BERT-family model in `model` (itself or inside
    it: a PEFT model, a SentenceTransformer)."""
    out = []
    for family in FAMILIES:
        hf = _hf_module(family)
        if hf is None:
            continue
        base = getattr(hf, family.pretrained)
        for m in model.modules():
            if isinstance(m, base):
                out.append((family, m))
    return out


def _not_encoder(config) -> Optional[str]:
    """Why a model with this config is not patched, or None."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder (is_decoder / add_cross_attention)"
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        return f"its position_embedding_type is {kind!r} (only 'absolute' runs on the core)"
    return None


def patch_family(model: torch.nn.Module, backend: Optional[str]) -> tuple:
    """Patch every BERT-family encoder in `model` (see :func:`hf_patch.patch_hf`). Returns
    (number of models patched, list of (class name, reason) of models left unpatched)."""
    patched_count, skipped = 0, []
    seen = set()
    for family, hf_model in family_models(model):
        if id(hf_model) in seen:  # a model inside one already handled (BertModel in a head)
            continue
        seen.update(id(m) for m in hf_model.modules())
        reason = _not_encoder(hf_model.config)
        if reason is not None:
            skipped.append((type(hf_model).__name__, reason))
            continue
        cls = patched_class(family)
        config = hf_model.config
        head_dim = getattr(config, family.hidden) // getattr(config, family.heads)
        found = False
        for module in hf_model.modules():
            if isinstance(module, cls):
                module._use_backend(backend)
                found = True
            elif type(module) is cls._hf_class and "forward" not in module.__dict__:
                module.__class__ = cls
                module._ak_model_config = config
                module._ak_head_dim = head_dim
                try:
                    module._use_backend(backend)
                except Exception:
                    module.__class__ = cls._hf_class
                    raise
                found = True
        patched_count += found
    for name, reason in skipped:
        warnings.warn(f"patch_hf: {name} is left unpatched (runs transformers' own code): "
                      f"{reason}", UserWarning, stacklevel=3)
    return patched_count, skipped
