"""Opt-in int8 inference: :func:`quantize_dynamic` and its :class:`QuantizedLinear`.

An encoder's products ``x @ W^T + b`` run with W in int8 (symmetric, one scale per output
channel: ``scale_w[n] = max_k |W[n, k]| / 127``) and x quantized per token at run time (uint8,
asymmetric: one scale and zero point per row, so a row's whole [min, max] range gets 256 levels),
int32 sums, and ``out = acc * scale_x[m] * scale_w[n] + b`` in fp32, GELU fused into the FFN-in
product's epilogue (``csrc/cpu/int8_linear.cpp``). Embeddings, LayerNorm, attention and softmax
stay fp32, and so does every product not named in ``products``.

Outlier input channels: BERT-like encoders carry a few input channels whose values are tens of
times the others' on every token; they would set every row's quantization step. Each product
keeps its ``outlier_channels`` largest input channels (found by one forward of the fp32 copy on a
fixed synthetic batch of token ids) in fp32, a small fp32 product added in the epilogue, as
LLM.int8() does (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale"), with the channels chosen ahead instead of per call.

Which products: measured on the real all-MiniLM-L6-v2 over 306 sentences
(``tests/data/sentences.txt`` + ``tools/st_bench.SENTENCES``; embeddings mean-pooled and
normalised, minimum cosine to fp32), 8 outlier channels: query, key, value, attention output and
FFN-in in int8 keep 0.99931 (without outlier channels 0.9939); adding FFN-out gives 0.9980 (its
int8 weights alone, with fp32 inputs, give 0.9973), so FFN-out stays fp32 by default;
``products="all"`` quantizes the six (ONNX Runtime's dynamic int8: below 0.99 on the same
sentences).
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

PRODUCTS = ("query", "key", "value", "dense", "ffn_in", "ffn_out")
DEFAULT_PRODUCTS = ("query", "key", "value", "dense", "ffn_in")
DEFAULT_OUTLIERS = 8


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
    correction), ``bias`` fp32 [N] or None; with outlier channels (input channels kept in fp32,
    as LLM.int8() does, Dettmers et al. 2022): ``outlier_channels`` int64 [C], ``weight_outliers``
    fp32 [N, C] (those columns of W; zero in ``weight_q``) and ``input_scale`` fp32 [K] (0 at
    those channels, 1 elsewhere: they are left out of the row's quantization range), else None.
    Inference only: an input that requires grad under grad mode raises RuntimeError; input must
    be float32 on the CPU (TypeError / ValueError).
    """

    def __init__(self, in_features: int, out_features: int, weight_q: torch.Tensor,
                 weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 outlier_channels: Optional[torch.Tensor] = None,
                 weight_outliers: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        from ..backends.extension import ops as _ext  # noqa: F401  builds / loads the extension
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_packed", torch.ops.albert_kernels.int8_pack_weight(weight_q))
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_sums", weight_q.sum(dim=1, dtype=torch.int32))
        self.register_buffer("bias", None if bias is None
                             else bias.detach().to(torch.float32).clone().contiguous())
        input_scale = None
        if outlier_channels is not None and outlier_channels.numel() > 0:
            input_scale = torch.ones(in_features)
            input_scale[outlier_channels] = 0.0
        else:
            outlier_channels = weight_outliers = None
        self.register_buffer("outlier_channels", outlier_channels)
        self.register_buffer("weight_outliers", weight_outliers)
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear,
                    outlier_channels: Optional[torch.Tensor] = None) -> "QuantizedLinear":
        """The int8 copy of `linear` (a CPU ``nn.Linear``); later writes to `linear` do not
        reach it. `outlier_channels`: input channels (int64 indices) kept in fp32."""
        weight = linear.weight.detach().to(torch.float32)
        outliers = None
        if outlier_channels is not None and outlier_channels.numel() > 0:
            outlier_channels = outlier_channels.to(torch.int64).unique().contiguous()
            outliers = weight[:, outlier_channels].clone().contiguous()
            weight = weight.clone()
            weight[:, outlier_channels] = 0.0
        weight_q, scale = quantize_weight(weight)
        return cls(linear.in_features, linear.out_features, weight_q, scale, linear.bias,
                   outlier_channels, outliers)

    def extra_repr(self) -> str:
        kept = 0 if self.outlier_channels is None else self.outlier_channels.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weights per channel, uint8 per-token inputs, "
                f"{kept} input channels in fp32")

    def _run(self, x: torch.Tensor, gelu: Optional[str]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"x must be on the CPU (int8 products are CPU only), got {x.device}")
        if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.bfloat16,
                                                           torch.float16):
            # Under torch.autocast the int8 product is an op of its own precision (as autocast
            # runs its fp32-listed ops): float32 in, float32 out, autocast off inside.
            with torch.autocast("cpu", enabled=False):
                return self._run(x.float(), gelu)
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32 (a quantize_dynamic model runs float32 "
                            f"inference, or under torch.autocast), got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dim must be in_features = {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("QuantizedLinear is inference only: run it under torch.no_grad() "
                               "or torch.inference_mode()")
        from ..backends.cpp.isa import int8_kernel
        rows = x.reshape(-1, self.in_features)
        addend = None
        if self.outlier_channels is not None:
            addend = F.linear(rows.index_select(1, self.outlier_channels), self.weight_outliers)
        out = torch.ops.albert_kernels.int8_linear(
            rows, self.weight_packed, self.weight_q, self.weight_scale, self.weight_sums,
            self.bias, self.input_scale, gelu, int8_kernel(rows.shape[0]), addend)
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


# the synthetic calibration batch that finds each product's outlier input channels
CALIBRATION_BATCH, CALIBRATION_LENGTH = 4, 32


def _parent_of(root: nn.Module, target: nn.Module) -> Optional[nn.Module]:
    for module in root.modules():
        if any(child is target for child in module.children()):
            return module
    return None


def _input_maxima(runner: nn.Module, linears: list) -> dict:
    """id(linear) -> max over tokens of |input| per input channel, fp32 [K], from one forward
    of `runner` (the encoder's base model) on a fixed batch of seeded random token ids. BERT-like
    encoders carry a few input channels with values tens of times the rest on every token (the
    outlier dimensions), whatever the text, so token ids that are not text find them too."""
    config = getattr(runner, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{type(runner).__name__} has no config.vocab_size")
    length = min(CALIBRATION_LENGTH, int(getattr(config, "max_position_embeddings", 512)) - 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (CALIBRATION_BATCH, length), generator=gen)
    stats: dict = {}

    def record(module, args):
        a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
        prev = stats.get(id(module))
        stats[id(module)] = a if prev is None else torch.maximum(prev, a)

    handles = [lin.register_forward_pre_hook(record) for lin in linears]
    was_training = runner.training
    try:
        runner.eval()
        with torch.no_grad():
            runner(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        runner.train(was_training)
        for h in handles:
            h.remove()
    return stats


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
                     products: Union[str, Iterable[str]] = DEFAULT_PRODUCTS,
                     outlier_channels: int = DEFAULT_OUTLIERS) -> nn.Module:
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
    outlier_channels: per product, how many input channels stay in fp32 (the largest ones seen in
    one forward of the fp32 copy on a fixed synthetic batch, see :func:`_input_maxima`); 0: none.

    The copy runs inference only (a forward that needs gradients raises RuntimeError). Hooks
    registered on its modules, the quantized ones included, fire as usual.
    Raises TypeError for a non-module, ValueError for a model with no encoder this library runs
    (not patched, or no supported encoder), parameters off the CPU or not float32, or bad
    ``products``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = _products(products)
    if isinstance(outlier_channels, bool) or not isinstance(outlier_channels, int) \
            or outlier_channels < 0:
        raise ValueError(f"outlier_channels must be an int >= 0, got {outlier_channels!r}")
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
        todo = {}
        for parts in layers:
            for role, lin in _parts_linears(parts).items():
                if role not in chosen or id(lin) in todo or not core.is_plain(lin) \
                        or type(lin) is not nn.Linear:
                    continue
                if lin.weight.dtype != torch.float32:
                    raise ValueError(f"quantize_dynamic: float32 weights only, got "
                                     f"{lin.weight.dtype}")
                todo[id(lin)] = lin
        maxima = {}
        if outlier_channels > 0 and todo:
            runner = _parent_of(new, encoder)
            if runner is None:
                raise ValueError("quantize_dynamic: outlier_channels > 0 needs the encoder's "
                                 "base model (embeddings + encoder) to run a calibration batch")
            maxima = _input_maxima(runner, list(todo.values()))
        replace = {}
        for key, lin in todo.items():
            channels = None
            if key in maxima:
                k = min(outlier_channels, lin.in_features)
                channels = maxima[key].topk(k).indices
            replace[key] = QuantizedLinear.from_linear(lin, channels)
        for parent in encoder.modules():
            for name, child in list(parent.named_children()):
                if id(child) in replace:
                    setattr(parent, name, replace[id(child)])
        if hasattr(encoder, "_unfreeze"):
            encoder._unfreeze()
    return new
