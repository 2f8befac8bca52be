"""Loading and saving weights with transformers' names, as transformers' ``from_pretrained`` does.

``from_hf(src)`` / ``from_pretrained(path)`` build any of our ALBERT classes from a checkpoint of
any transformers ALBERT class: a model object, a state_dict (with ``config=``), or a local
directory holding ``config.json`` and ``model.safetensors`` (or a sharded index) or
``pytorch_model.bin``. As in transformers:

- the encoder loads by name, with or without the ``albert.`` prefix (an ``AlbertModel``
  checkpoint into a model with a head, a checkpoint with a head into a bare ``AlbertModel``);
- weights the checkpoint lacks (a new task head) keep the initialisation transformers gives them
  (``_init_weights``: N(0, initializer_range) weights, zero biases, LayerNorm 1 and 0, the
  padding row of the word embeddings zero), and checkpoint weights the model does not use (the
  pretraining heads under a classifier) are skipped; both lists go into ONE warning;
- ``tie_word_embeddings`` (config) decides whether the MLM decoder is the word embedding matrix
  (True: the checkpoint stores it once) or a weight of its own (False: loaded and saved as such);
- a shape mismatch raises ValueError naming the key (``ignore_mismatched_sizes=True``:
  re-initialised and listed in the warning instead), a config whose ``model_type`` is not
  "albert" raises ValueError, and ``strict=True`` turns missing or unused weights into a KeyError.

The legacy buffers ``embeddings.position_ids`` / ``embeddings.token_type_ids`` are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Mapping, NamedTuple, Optional

import torch

from .config import AlbertConfig

BASE_PREFIX = "albert."
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# The encoder's top-level modules: these keys take the "albert." prefix in a model with a head.
ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# A missing key filled from another one: transformers 4.x always tied the decoder bias to
# predictions.bias and saved it once, so an untied 4.x checkpoint may lack the decoder's own bias.
FALLBACK_KEYS = {"predictions.decoder.bias": "predictions.bias"}
INIT_RULE = ("N(0, initializer_range) weights, zero biases, LayerNorm weight 1 and bias 0, "
             "as transformers initialises them")


class LoadReport(NamedTuple):
    """What ``load_hf_state_dict`` did not load exactly: keys, sorted."""
    missing_keys: list          # the model's weights the checkpoint lacks: left initialised
    unexpected_keys: list       # checkpoint weights the model does not use: skipped
    mismatched_keys: list       # (key, checkpoint shape, model shape) re-initialised

    def message(self, where: str) -> str:
        parts = []
        if self.missing_keys:
            parts.append(f"{len(self.missing_keys)} weight(s) not in the checkpoint were newly "
                         f"initialised ({INIT_RULE}): {', '.join(self.missing_keys)}")
        if self.mismatched_keys:
            shapes = ", ".join(f"{k} (checkpoint {list(a)}, model {list(b)})"
                               for k, a, b in self.mismatched_keys)
            parts.append(f"{len(self.mismatched_keys)} weight(s) of another shape were newly "
                         f"initialised: {shapes}")
        if self.unexpected_keys:
            parts.append(f"{len(self.unexpected_keys)} checkpoint weight(s) this model does not "
                         f"use were skipped: {', '.join(self.unexpected_keys)}")
        return f"{where}: " + "; ".join(parts) + (
            ". Expected when the checkpoint comes from another ALBERT class (train the new "
            "weights on your task); not when it should hold this very model." if parts else "")


def _not_a_directory(path: str) -> str:
    return (f"{path!r} is not a local directory. Checkpoints are read from disk only: a hub id "
            "(such as 'albert/albert-base-v2') must be downloaded first, e.g. "
            "huggingface_hub.snapshot_download(repo_id), and the directory it returns passed "
            "instead")


def source_dtype(state: Mapping[str, torch.Tensor]) -> Optional[torch.dtype]:
    """The floating-point dtype a checkpoint's weights are stored in (that of its first
    floating-point tensor, as transformers' ``dtype="auto"`` takes it), or None if it has none."""
    for tensor in state.values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.dtype
    return None


def read_hf_directory(path: str) -> tuple[AlbertConfig, dict]:
    """(config, state_dict) from a directory written by transformers' save_pretrained (or ours).

    Raises FileNotFoundError when `path` is not a local directory (a hub id: the message says to
    download it first) or lacks config.json or a weights file, ValueError when config.json is
    not an ALBERT config (``model_type``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(_not_a_directory(path))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    config = AlbertConfig.from_json_file(config_path)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.torch import load_file
        if os.path.isfile(single):
            return config, load_file(single)
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return config, state
    if os.path.isfile(binary):
        return config, torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path!r} has neither model.safetensors nor pytorch_model.bin")


def _read_source(src, config: Optional[AlbertConfig]) -> tuple[Optional[AlbertConfig], dict, str]:
    """(config of the source or None, state_dict, a short description of the source)."""
    if isinstance(src, (str, os.PathLike)):
        config_from_src, state = read_hf_directory(os.fspath(src))
        return config_from_src, state, repr(os.fspath(src))
    if isinstance(src, Mapping):
        if config is None:
            raise ValueError("from_hf(state_dict) needs config=AlbertConfig(...): a state_dict "
                             "does not say how many heads or groups the model has")
        return None, dict(src), "state_dict"
    if isinstance(src, torch.nn.Module) and hasattr(src, "config"):
        return AlbertConfig.from_hf(src.config), src.state_dict(), type(src).__name__
    raise TypeError("src must be a transformers ALBERT model, a state_dict or a directory "
                    f"path, got {type(src).__name__}")


def _with_overrides(config: AlbertConfig, overrides: dict) -> AlbertConfig:
    """A copy of `config` with the given fields changed; a changed num_labels drops the
    checkpoint's id2label/label2id (transformers then names the labels LABEL_0...)."""
    extra = dict(config.extra)
    if "num_labels" in overrides and overrides["num_labels"] != config.num_labels:
        extra.pop("id2label", None)
        extra.pop("label2id", None)
    return dataclasses.replace(config, **overrides, extra=extra)


def _tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """Keys of parameters that are the same tensor as an earlier key: {alias: canonical}."""
    seen, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied


def _align_prefix(keys, headed: bool) -> dict[str, str]:
    """{checkpoint key: model key}: the encoder's keys get the "albert." prefix (a model with a
    head) or lose it (a bare AlbertModel), as transformers' base_model_prefix does."""
    has_prefix = any(k.startswith(BASE_PREFIX) for k in keys)
    if headed and not has_prefix:
        return {k: BASE_PREFIX + k if k.startswith(ENCODER_PREFIXES) else k for k in keys}
    if not headed and has_prefix:
        return {k: k[len(BASE_PREFIX):] if k.startswith(BASE_PREFIX) else k for k in keys}
    return {k: k for k in keys}


class WeightsMixin:
    """from_hf / from_pretrained / load_hf_state_dict / save_hf / save_pretrained / tie_weights
    for the ALBERT models (module names are transformers', so keys are too)."""

    @classmethod
    def from_hf(cls, src, config: Optional[AlbertConfig] = None, *, strict: bool = False,
                ignore_mismatched_sizes: bool = False, dtype: Optional[torch.dtype] = None,
                **kwargs):
        """Build this model from a checkpoint of any transformers ALBERT class.

        src: a transformers ALBERT model object, a state_dict (then ``config`` is required), or a
        local directory (config.json + model.safetensors / sharded index / pytorch_model.bin).
        config: an AlbertConfig used instead of the source's. dtype: the parameters' dtype; None
        keeps the checkpoint's (a float64 or bfloat16 source gives a float64 or bfloat16 model,
        as transformers' ``dtype="auto"``), float32 if it holds no floating-point tensor.
        kwargs: AlbertConfig fields override the config (``num_labels=3``,
        ``problem_type=...``); the rest go to the constructor (``backend=``, ``sparse_mlm=``).
        Loading follows this module's docstring; weights newly initialised or skipped are
        listed in one UserWarning. The model is returned in eval mode, as transformers returns
        it (call ``.train()`` to fine-tune), on the CPU.
        Raises TypeError (src, dtype), ValueError (a state_dict without config, a non-ALBERT
        config, a shape mismatch, no key in common), FileNotFoundError (a path that is not a
        local directory, such as a hub id, or one without the files), KeyError
        (``strict=True``), and what the backend raises for a dtype it does not support.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        config_from_src, state, where = _read_source(src, config)
        names = {f.name for f in dataclasses.fields(AlbertConfig)} - {"extra"}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        model = cls(_with_overrides(config or config_from_src, overrides), **kwargs)
        dtype = dtype or source_dtype(state) or torch.float32
        if dtype != torch.float32:  # cast before loading: no weight is rounded through fp32
            model.to(dtype)
        report = model.load_hf_state_dict(state, strict=strict,
                                          ignore_mismatched_sizes=ignore_mismatched_sizes)
        if any(report):
            warnings.warn(report.message(f"{cls.__name__}.from_hf({where})"), stacklevel=2)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """``from_hf`` for a local directory, spelled as in transformers (same kwargs; eval mode,
        the checkpoint's dtype). A hub id is not fetched: download it first
        (``huggingface_hub.snapshot_download(repo_id)``); FileNotFoundError says so."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path, got {type(path).__name__}")
        if not os.path.isdir(path):
            raise FileNotFoundError(_not_a_directory(os.fspath(path)))
        return cls.from_hf(path, **kwargs)

    def load_hf_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = False,
                           ignore_mismatched_sizes: bool = False) -> LoadReport:
        """Copy transformers-named weights into this model; returns what was not loaded exactly.

        Nothing is copied unless every check passes. Weights the checkpoint lacks keep their
        current values (on a freshly built model: transformers' initialisation). Raises
        ValueError naming the key for a shape mismatch (unless ``ignore_mismatched_sizes``) and
        when no key matches at all; KeyError for missing or unused keys with ``strict=True``.
        """
        state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
        renamed = _align_prefix(state, headed=hasattr(self, "albert"))
        checkpoint_name = {new: old for old, new in renamed.items()}   # unused keys: as stored
        state = {renamed[k]: v for k, v in state.items()}
        own = dict(self.named_parameters(remove_duplicate=False))
        own.update(dict(self.named_buffers()))
        tied, unexpected = _tied_keys(self), []
        for alias, canonical in tied.items():   # save_pretrained stores a tied weight once
            if alias in state:
                value = state.pop(alias)
                if canonical not in state:
                    state[canonical] = value
                elif not torch.equal(value, state[canonical]):
                    unexpected.append(f"{alias} (differs from {canonical}, which it is tied to "
                                      "by tie_word_embeddings=True)")
        for key, source in FALLBACK_KEYS.items():
            if key in own and key not in tied and key not in state and source in state:
                state[key] = state[source]
        if state and not any(k in own for k in state):
            raise ValueError(f"none of the checkpoint's {len(state)} keys is a weight of "
                             f"{type(self).__name__} (first: {sorted(state)[:3]}); is it ALBERT?")
        unexpected += sorted(checkpoint_name[k] for k in state if k not in own)
        # A tied alias is missing with its canonical weight (transformers lists both names).
        missing = sorted(k for k in own if k not in state and tied.get(k, k) not in state)
        mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(state)
                      if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
        if mismatched and not ignore_mismatched_sizes:
            raise ValueError("; ".join(f"key {k!r} has shape {list(a)} in the checkpoint, the model "
                                       f"expects {list(b)}" for k, a, b in mismatched)
                             + " (ignore_mismatched_sizes=True initialises such weights anew)")
        for name, _, _ in mismatched:
            del state[name]
        if strict and (missing or unexpected):
            raise KeyError("; ".join(f"{what} keys in the state_dict: {', '.join(keys)}" for what, keys
                                     in (("missing", missing), ("unexpected", unexpected)) if keys))
        with torch.no_grad():
            for name, tensor in state.items():
                if name in own:
                    own[name].copy_(tensor)
        return LoadReport(missing, unexpected, mismatched)

    def tie_weights(self) -> None:
        """With ``config.tie_word_embeddings`` (the default), make the MLM decoder's weight the word
        embedding matrix and its bias ``predictions.bias``, as transformers does; with False they
        stay weights of their own (loaded, saved and trained as such). No MLM head: nothing."""
        head = getattr(self, "predictions", None)
        if head is None or not self.config.tie_word_embeddings:
            return
        head.decoder.weight = self.albert.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with exactly transformers' keys (tied weights appear under both names)."""
        out = {name: p.detach() for name, p in self.named_parameters(remove_duplicate=False)}
        out.update({name: b.detach() for name, b in self.named_buffers()})
        return out

    def save_hf(self, directory: str) -> None:
        """Write config.json (``architectures`` = this class's name, which is transformers' name
        for the same model) and model.safetensors (a tied weight once, as transformers saves it):
        loadable by ``from_hf``/``from_pretrained`` and by transformers' ``from_pretrained``."""
        from safetensors.torch import save_file
        config = dataclasses.replace(self.config, extra={**self.config.extra,
                                                         "architectures": [type(self).__name__]})
        config.save(directory)
        tied = _tied_keys(self)
        state = {k: v.contiguous() for k, v in self.to_hf_state_dict().items() if k not in tied}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    def save_pretrained(self, directory: str) -> None:
        """``save_hf``, spelled as in transformers."""
        self.save_hf(os.fspath(directory))
