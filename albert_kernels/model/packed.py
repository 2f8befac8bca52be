"""The small-M inference path: one short request on the CPU (issue 16; docs/performance.md).

With a handful of tokens (M rows) a matrix product reads its whole weight for a few rows of
work, and ``F.linear`` (MKL sgemm) also re-packs that weight on every call: for ALBERT-base at
M = 8 the encoder's products ran at 12-27 GFLOP/s. Here the encoder's weights are reordered ONCE
into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the packing
torch.compile's CPU freezing uses) and every product is ``torch.ops.mkldnn._linear_pointwise`` on
the packed copy: Q, K and V as one product over the concatenated weight [3H, H], the attention
output, the FFN in with bias + GELU in oneDNN's epilogue (attr "gelu", algorithm "tanh" for
gelu_new, "none" for the erf GELU), the FFN out, and the embedding mapping. ALBERT shares its
layers, so one packed copy serves every depth (12 applications for base) and every call.
``benchmarks/small_m_gemm.py`` measured the library paths (F.linear, MKL packed
``torch.ops.mkl._mkl_linear``, oneDNN packed, fbgemm's fp16-weight GEMM) and picked oneDNN: the
fastest fp32 one in the 12-layer shared-weight loop from M = 2 to 128 (1.2-1.7x F.linear; at
M = 1 F.linear's matrix-vector product wins: MIN_TOKENS); MKL's packed GEMM is packed for one M and falls back to the unpacked product for any
other, and fbgemm's only fp32-activation path rounds the weights to fp16 (outside the budget).

When it runs (:func:`packed_encoder`): eager CPU fp32 inference — the encoder is in eval mode, no
autograd graph is needed (``torch.is_grad_enabled()`` is False, or neither the input nor any
parameter requires grad), no autocast, not under torch.compile, :data:`MIN_TOKENS` to
:data:`MAX_TOKENS` tokens, oneDNN available. Anything else (training, fine-tuning, padded batches of many tokens)
keeps the usual path, and then the packed copy is dropped: it costs no memory when unused.

The packed copy follows the parameters: it is keyed on every packed parameter's identity,
``data_ptr`` and ``_version`` (an optimizer step or ``load_state_dict`` bumps ``_version``;
``.to()`` makes new tensors), and rebuilt lazily on the next call that runs the path. It is a
plain attribute, never in the state dict, and not copied by ``copy.deepcopy`` or pickling.

Host work per layer is kept small: the packed entries hold plain tuples (no module attribute
lookups), the layer calls the backend module's functions directly (autocast is excluded once
per forward), and Q, K, V leave the fused product through one copy into [3, M, heads, head_dim].
"""
from __future__ import annotations

from typing import Optional

import torch

# Token count (rows of every product) up to which the packed path runs. Measured on the 2-core
# AMD EPYC (benchmarks/small_m_gemm.py): oneDNN's packed GEMM beats F.linear at every M up to
# 128; B=8, L=128 padded batches (~500 real tokens) stay on MKL's F.linear, which the padded
# throughput figures were measured with.
MAX_TOKENS = 128
# ... and from which: with one row F.linear runs MKL's matrix-vector product, which the same
# measurement found 5.6x faster than oneDNN's packed product (12-layer loop, M = 1, 2 threads);
# from M = 2 on, oneDNN's packed product is the faster one.
MIN_TOKENS = 2


def available() -> bool:
    """True when this torch has oneDNN (mkldnn) and its packed-linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [N, K] fp32 -> oneDNN's blocked copy (the layout does not depend on M:
    the hint is MAX_TOKENS)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), MAX_TOKENS)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
           gelu: str = "") -> torch.Tensor:
    """x [M, K] fp32 @ packed [N, K]^T + bias [N] -> [M, N]; with ``gelu`` ("tanh" or "none"),
    GELU applied in oneDNN's epilogue."""
    op = torch.ops.mkldnn._linear_pointwise.default  # the overload: no per-call resolution
    return op(x, packed, bias, "gelu", [], gelu) if gelu else op(x, packed, bias, "none", [], "")


class PackCache:
    """Holds one encoder's packed weights (or nothing). Copies and pickles as empty: oneDNN's
    opaque tensors are neither copied nor pickled, and a copy's parameters are new tensors."""

    __slots__ = ("key", "entry")

    def __init__(self) -> None:
        self.key, self.entry = None, None

    def clear(self) -> None:
        self.key, self.entry = None, None

    def __deepcopy__(self, memo) -> "PackCache":
        return PackCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self.key, self.entry = None, None


class PackedEncoder:
    """The packed weights of one AlbertTransformer: the embedding mapping and, per shared layer
    (by identity), a tuple of what its forward needs."""

    __slots__ = ("mapping", "layers")

    def __init__(self, encoder) -> None:
        m = encoder.embedding_hidden_mapping_in
        self.mapping = (_pack(m.weight), m.bias.detach())
        self.layers = {}
        for group in encoder.albert_layer_groups:
            for layer in group.albert_layers:
                att, ln1, ln2 = layer.attention, layer.attention.LayerNorm, \
                    layer.full_layer_layer_norm
                qkv_w = torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach()
                qkv_b = torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach()
                d = lambda t: t.detach()
                self.layers[id(layer)] = (
                    _pack(qkv_w), qkv_b, att.num_heads, att.head_dim, att.scale,
                    _pack(att.dense.weight), d(att.dense.bias), d(ln1.weight), d(ln1.bias),
                    att.eps, _pack(layer.ffn.weight), d(layer.ffn.bias),
                    _pack(layer.ffn_output.weight), d(layer.ffn_output.bias), layer.approximate,
                    d(ln2.weight), d(ln2.bias), layer.eps)

    def layer(self, layer, h: torch.Tensor, plan) -> torch.Tensor:
        """One AlbertLayer on h [M, hidden] fp32, as ``AlbertLayer.forward`` in eval mode."""
        (qkv_w, qkv_b, heads, head_dim, scale, o_w, o_b, ln1_w, ln1_b, eps1, f1_w, f1_b, f2_w,
         f2_b, approximate, ln2_w, ln2_b, eps2) = self.layers[id(layer)]
        module = plan.kernels.module  # autocast is off on this path: no per-op autocast check
        n = h.shape[0]
        qkv = linear(h, qkv_w, qkv_b).view(n, 3, heads, head_dim).transpose(0, 1).contiguous()
        ctx = plan.attend(qkv[0], qkv[1], qkv[2], scale).reshape(n, heads * head_dim)
        a = module.add_layer_norm(linear(ctx, o_w, o_b), h, ln1_w, ln1_b, eps1)
        f = linear(linear(a, f1_w, f1_b, approximate), f2_w, f2_b)
        return module.add_layer_norm(f, a, ln2_w, ln2_b, eps2)

    def mapping_in(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, *self.mapping)


def _key(params) -> tuple:
    """(identity, data_ptr, _version) of each parameter; an inference tensor (made under
    torch.inference_mode) has no version counter: its identity and data_ptr only."""
    return tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)


def packed_encoder(encoder, x: torch.Tensor) -> Optional[PackedEncoder]:
    """The encoder's packed weights if the small-M path applies to input x [M, embedding_size]
    (see the module docstring), built or rebuilt when the parameters changed; else None, after
    dropping any packed copy (training or large batches hold no packed memory)."""
    if torch.compiler.is_compiling():  # traced graphs keep the usual path; nothing is touched
        return None
    cache = encoder.__dict__.get("_pack_cache")
    if cache is None:  # a module made before the cache existed (an old pickle)
        cache = encoder._pack_cache = PackCache()
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and MIN_TOKENS <= x.shape[0] <= MAX_TOKENS and not encoder.training
            and not torch.is_autocast_enabled("cpu") and available()):
        cache.clear()
        return None
    params = list(encoder.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params) or (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        cache.clear()
        return None
    key = _key(params)
    if cache.key != key:
        cache.clear()  # the old copy goes before the new one is built
        with torch.no_grad():
            cache.entry = PackedEncoder(encoder)
        cache.key = key
    return cache.entry
