"""AlbertConfig: the same field names and defaults as ``transformers.AlbertConfig``."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

# hidden_act values the fused kernels implement, and the GELU variant each one is.
GELU_VARIANTS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# transformers' problem_type values for sequence classification (None: from num_labels and the
# labels' dtype at the first loss).
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# ALBERT v2 sizes (Lan et al., 2019, table 1; the released v2 configs).
PRESETS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096),
    "xlarge": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=8192),
    "xxlarge": dict(hidden_size=4096, num_hidden_layers=12, num_attention_heads=64,
                    intermediate_size=16384),
}


@dataclass
class AlbertConfig:
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    classifier_dropout_prob: Optional[float] = 0.1
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 2
    eos_token_id: Optional[int] = 3
    tie_word_embeddings: bool = True
    num_labels: int = 2
    problem_type: Optional[str] = None
    # Keys of a transformers config.json that this model does not use (architectures,
    # torch_dtype, ...): kept so that a config round-trips.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                     "num_hidden_groups", "num_attention_heads", "intermediate_size",
                     "inner_group_num", "max_position_embeddings", "type_vocab_size",
                     "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AlbertConfig.{name} must be a positive int, got {value!r}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"AlbertConfig.problem_type must be one of {PROBLEM_TYPES}, got "
                             f"{self.problem_type!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError("AlbertConfig.tie_word_embeddings must be True (MLM decoder = word "
                             f"embeddings) or False, got {self.tie_word_embeddings!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"AlbertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.num_hidden_groups > self.num_hidden_layers:
            raise ValueError(f"AlbertConfig.num_hidden_groups ({self.num_hidden_groups}) cannot "
                             f"exceed num_hidden_layers ({self.num_hidden_layers})")
        if self.hidden_act not in GELU_VARIANTS:
            raise ValueError(f"AlbertConfig.hidden_act must be one of {sorted(GELU_VARIANTS)} "
                             f"(the activations the fused kernels implement), got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return GELU_VARIANTS[self.hidden_act]

    def group_of_layer(self, i: int) -> int:
        """transformers' mapping: layer i uses group int(i / (layers / groups))."""
        return int(i / (self.num_hidden_layers / self.num_hidden_groups))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AlbertConfig":
        """The ALBERT v2 sizes: "base", "large", "xlarge" or "xxlarge"."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "AlbertConfig":
        """From a config.json dict (transformers' keys). ValueError if its ``model_type`` is not
        "albert" (a BERT or other config would load with wrong shapes or semantics)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        d = dict(d)
        if d.get("model_type", "albert") != "albert":
            raise ValueError(f"config model_type is {d['model_type']!r}, not 'albert': "
                             "albert_kernels models load ALBERT checkpoints only")
        id2label = d.get("id2label")
        if "num_labels" not in d and isinstance(id2label, dict) and id2label:
            d["num_labels"] = len(id2label)
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in known})

    @classmethod
    def from_hf(cls, hf_config) -> "AlbertConfig":
        """From a transformers AlbertConfig object (ValueError for another model_type)."""
        d = hf_config.to_dict()
        d["model_type"] = getattr(hf_config, "model_type", d.get("model_type"))
        d["num_labels"] = hf_config.num_labels
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """transformers' config.json keys. A checkpoint's id2label/label2id that no longer match
        num_labels are left out (transformers then names the labels LABEL_0, LABEL_1, ...)."""
        d = asdict(self)
        extra = d.pop("extra")
        if len(extra.get("id2label") or {}) not in (0, self.num_labels):
            extra = {k: v for k, v in extra.items() if k not in ("id2label", "label2id")}
        return {**extra, **d, "model_type": "albert"}

    def to_hf(self, **kwargs):
        """This config as a transformers ``AlbertConfig`` (the reverse of :meth:`from_hf`);
        `kwargs` (e.g. ``attn_implementation="sdpa"``) are passed on to it. ImportError without
        transformers."""
        import transformers
        d = {k: v for k, v in self.to_dict().items() if k != "model_type"}
        return transformers.AlbertConfig(**{**d, **kwargs})

    @classmethod
    def from_json_file(cls, path: str) -> "AlbertConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
