"""Opt-in int8 inference: :func:`quantize_dynamic` and its :class:`QuantizedLinear`.

An encoder's products ``x @ W^T + b`` run with W in int8 (symmetric, one scale per output
channel: ``scale_w[n] = max_k |W[n, k]| / 127``) and x quantized per token at run time (uint8,
asymmetric: one scale and zero point per row, so a row's whole [min, max] range gets 256 levels),
int32 sums, and ``out = acc * scale_x[m] * scale_w[n] + b`` in fp32, GELU fused into the FFN-in
product's epilogue (``csrc/cpu/int8_linear.cpp``). Embeddings, LayerNorm, attention and softmax
stay fp32, and so does every product not named in ``products``.

Which products: measured on the real all-MiniLM-L6-v2 over 306 sentences
(``tests/data/sentences.txt`` + ``tools/st_bench.SENTENCES``; embeddings mean-pooled and
normalised, minimum cosine to fp32): int8 query, key and attention output keep it at 0.9997;
int8 value (0.995 alone), FFN-in (0.998 alone) or FFN-out (0.9965 alone) each break the 0.999
budget, all six give 0.993 (ONNX Runtime's dynamic int8: 0.9875). The default is therefore
``("query", "key", "dense")``; ``products="all"`` quantizes the six.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

PRODUCTS = ("query", "key", "value", "dense", "ffn_in", "ffn_out")
DEFAULT_PRODUCTS = ("query", "key", "dense")


def quantize_weight(weight: torch.Tensor) -> tuple:
    """(weight_q int8 [N, K], scale fp32 [N]): symmetric per output channel,
    ``weight_q = clamp(round(weight / scale), -127, 127)``, ``scale = max |row| / 127`` (1 for
    an all-zero row)."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` for int8 inference on the CPU (see the module docstring): the int8 copy
    of the weight made once, activations quantized per token at every call.

    Buffers: ``weight_q`` int8 [N, K], ``weight_packed`` (the VNNI/AVX2 kernels' layout),
    ``weight_scale`` fp32 [N], ``weight_sums`` int32 [N] (sum_k weight_q[n, k], the zero point's
    correction), ``bias`` fp32 [N] or None. Inference only: an input that requires grad under
    grad mode raises RuntimeError; input must be float32 on the CPU (TypeError / ValueError).
    """

    def __init__(self, in_features: int, out_features: int, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        from ..backends.extension import ops as _ext  # noqa: F401  builds / loads the extension
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_packed", torch.ops.albert_kernels.int8_pack_weight(weight_q))
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_sums", weight_q.sum(dim=1, dtype=torch.int32))
        self.register_buffer("bias", None if bias is None
                             else bias.detach().to(torch.float32).clone().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        """The int8 copy of `linear` (a CPU ``nn.Linear``); later writes to `linear` do not
        reach it."""
        weight_q, scale = quantize_weight(linear.weight)
        return cls(linear.in_features, linear.out_features, weight_q, scale, linear.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weights per channel, uint8 per-token inputs")

    def _run(self, x: torch.Tensor, gelu: Optional[str]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"x must be on the CPU (int8 products are CPU only), got {x.device}")
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must be in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("QuantizedLinear is inference only: run it under torch.no_grad() "
                               "or torch.inference_mode()")
        from ..backends.cpp.isa import int8_kernel
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.albert_kernels.int8_linear(
            rows, self.weight_packed, self.weight_q, self.weight_scale, self.weight_sums,
            self.bias, None, gelu, int8_kernel(rows.shape[0]))
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32."""
        return self._run(x, None)

    def linear_gelu(self, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
        """``F.gelu(self(x), approximate=approximate)`` with GELU in the product's epilogue (the
        encoder core calls it for a bare FFN-in product; hooks go through ``forward``)."""
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        return self._run(x, approximate)


def _parts_linears(parts) -> dict:
    return {"query": parts.query, "key": parts.key, "value": parts.value, "dense": parts.dense,
            "ffn_in": parts.ffn_in, "ffn_out": parts.ffn_out}


def _encoders(model: nn.Module) -> list:
    """(encoder, its layers' core.LayerParts list) for every encoder in `model` that the core
    runs: ours and patched ALBERT encoders (``layers.CoreEncoder``), patched BERT-family ones."""
    from .hf_family import PatchedFamilyEncoderMixin
    from .layers import CoreEncoder
    out = []
    for module in model.modules():
        if isinstance(module, CoreEncoder):
            steps = module._core_steps(call_hooked=True)
        elif isinstance(module, PatchedFamilyEncoderMixin):
            steps = module._core_steps()
        else:
            continue
        if steps is None:
            raise ValueError(f"quantize_dynamic: the {type(module).__name__}'s layers are not "
                             "the family's own modules; nothing was quantized")
        out.append((module, [s.parts for s in steps if s.parts is not None]))
    return out


def _products(products) -> tuple:
    if products == "all":
        return PRODUCTS
    if isinstance(products, str) or not isinstance(products, Iterable):
        raise ValueError(f"products must be 'all' or a sequence of names from {PRODUCTS}, "
                         f"got {products!r}")
    products = tuple(products)
    bad = [p for p in products if p not in PRODUCTS]
    if bad or not products:
        raise ValueError(f"products must be 'all' or a non-empty sequence of names from "
                         f"{PRODUCTS}, got {products!r}")
    return products


def quantize_dynamic(model: nn.Module,
                     products: Union[str, Iterable[str]] = DEFAULT_PRODUCTS) -> nn.Module:
    """A NEW model whose encoder products run in int8 on the CPU (module docstring); `model`
    is left untouched, and later writes to its weights do not reach the copy.

    model: one of our ALBERT models, a transformers encoder after ``albert_kernels.patch_hf``
    (ALBERT, BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT), or a ``SentenceTransformer``
    whose transformer is patched (a new SentenceTransformer is returned). Parameters float32 on
    the CPU.
    products: which of each layer's products become int8 (:data:`PRODUCTS`: ``query``, ``key``,
    ``value``, ``dense`` (attention output), ``ffn_in``, ``ffn_out``), or ``"all"``. Default
    :data:`DEFAULT_PRODUCTS`: the set that keeps all-MiniLM-L6-v2's embeddings >= 0.999 cosine
    to fp32. A product that is not a plain ``nn.Linear`` (a LoRA wrapper, a hooked module) is
    left as it is, in fp32.

    The copy runs inference only (a forward that needs gradients raises RuntimeError). Hooks
    registered on its modules, the quantized ones included, fire as usual.
    Raises TypeError for a non-module, ValueError for a model with no encoder this library runs
    (not patched, or no supported encoder), parameters off the CPU or not float32, or bad
    ``products``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = _products(products)
    for name, p in model.named_parameters():
        if p.device.type != "cpu":
            raise ValueError(f"quantize_dynamic: int8 inference runs on the CPU; parameter "
                             f"{name!r} is on {p.device} (move the model with .cpu() first)")
    if not _encoders(model):
        raise ValueError(
            f"quantize_dynamic: {type(model).__name__} has no encoder albert_kernels runs: pass "
            "one of our ALBERT models, or a transformers model (or a SentenceTransformer) after "
            "albert_kernels.patch_hf(model)")
    new = copy.deepcopy(model)
    from . import core
    for encoder, layers in _encoders(new):
        replace = {}
        for parts in layers:
            for role, lin in _parts_linears(parts).items():
                if role not in chosen or id(lin) in replace or not core.is_plain(lin) \
                        or type(lin) is not nn.Linear:
                    continue
                if lin.weight.dtype != torch.float32:
                    raise ValueError(f"quantize_dynamic: float32 weights only, got "
                                     f"{lin.weight.dtype}")
                replace[id(lin)] = QuantizedLinear.from_linear(lin)
        for parent in encoder.modules():
            for name, child in list(parent.named_children()):
                if id(child) in replace:
                    setattr(parent, name, replace[id(child)])
        if hasattr(encoder, "_unfreeze"):
            encoder._unfreeze()
    return new
