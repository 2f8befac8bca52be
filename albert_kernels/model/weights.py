"""Loading and saving weights with transformers' names.

``from_hf(src)`` takes a transformers ALBERT model object, a state_dict (with ``config=``), or a
local directory holding ``config.json`` and ``model.safetensors`` (or a sharded index) or
``pytorch_model.bin``. Every missing, unexpected or mis-shaped key is an error that names it;
the legacy ``embeddings.position_ids`` buffer key is ignored.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import torch

from .config import AlbertConfig

BASE_PREFIX = "albert."
IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Heads of other transformers ALBERT classes: dropped when a bare AlbertModel is loaded from them.
HEAD_PREFIXES = ("predictions.", "sop_classifier.", "classifier.", "qa_outputs.")


def read_hf_directory(path: str) -> tuple[AlbertConfig, dict]:
    """(config, state_dict) from a directory written by transformers' save_pretrained."""
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


def _tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """Keys of parameters that are the same tensor as an earlier key: {alias: canonical}."""
    seen, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return tied


class WeightsMixin:
    """from_hf / load_hf_state_dict / to_hf_state_dict for the ALBERT models."""

    @classmethod
    def from_hf(cls, src, config: Optional[AlbertConfig] = None, **kwargs):
        """Build this model from transformers weights (model object, state_dict or directory)."""
        if isinstance(src, (str, os.PathLike)):
            config_from_src, state = read_hf_directory(os.fspath(src))
        elif isinstance(src, Mapping):
            if config is None:
                raise ValueError("from_hf(state_dict) needs config=AlbertConfig(...): a state_dict "
                                 "does not say how many heads or groups the model has")
            config_from_src, state = None, dict(src)
        elif isinstance(src, torch.nn.Module) and hasattr(src, "config"):
            config_from_src, state = AlbertConfig.from_hf(src.config), src.state_dict()
        else:
            raise TypeError("src must be a transformers ALBERT model, a state_dict or a directory "
                            f"path, got {type(src).__name__}")
        model = cls(config or config_from_src, **kwargs)
        model.load_hf_state_dict(state)
        return model

    def load_hf_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy transformers-named weights in; strict, with errors that name the key."""
        state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
        is_base = not hasattr(self, "albert")
        if is_base and any(k.startswith(BASE_PREFIX) for k in state):
            # A bare encoder loaded from a model with heads: keep the encoder, drop the heads.
            state = {k[len(BASE_PREFIX):]: v for k, v in state.items()
                     if k.startswith(BASE_PREFIX) or not k.startswith(HEAD_PREFIXES)}
        tied = _tied_keys(self)
        own = dict(self.named_parameters(remove_duplicate=False))
        own.update(dict(self.named_buffers()))
        for alias, canonical in tied.items():   # save_pretrained drops tied copies
            if alias not in state and canonical in state:
                state[alias] = state[canonical]
            elif canonical not in state and alias in state:
                state[canonical] = state[alias]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing:
            raise KeyError(f"missing keys in the state_dict: {', '.join(missing)}")
        if unexpected:
            raise KeyError(f"unexpected keys in the state_dict: {', '.join(unexpected)}")
        for name, tensor in state.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise ValueError(f"key {name!r} has shape {list(tensor.shape)}, the model expects "
                                 f"{list(own[name].shape)}")
        with torch.no_grad():
            for name, tensor in state.items():
                if name not in tied:
                    own[name].copy_(tensor)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights with exactly transformers' keys (tied weights appear under both names)."""
        out = {name: p.detach() for name, p in self.named_parameters(remove_duplicate=False)}
        out.update({name: b.detach() for name, b in self.named_buffers()})
        return out

    def save_hf(self, directory: str) -> None:
        """Write config.json and model.safetensors, loadable by from_hf and by transformers."""
        from safetensors.torch import save_file
        self.config.save(directory)
        tied = _tied_keys(self)
        state = {k: v.contiguous() for k, v in self.to_hf_state_dict().items() if k not in tied}
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
