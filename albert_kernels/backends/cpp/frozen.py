"""The cpp backend's frozen-weight path (``Kernels.freeze_encoder``; opt-in through
``albert_kernels.freeze(model)``): an encoder's weights packed once into the panel layout of the
small-M kernel (``csrc/cpu/small_m.cpp``: ``pack_linear_weight``) and reused by every later
eligible call. docs/performance.md has the measurements.

Why pack: for a short request every product reads its whole weight for a few rows of work, and
``F.linear`` (MKL sgemm) re-packs the weight on every call; with the weights packed ahead, the
small-M kernel skips that. ALBERT shares its layers, so one packed copy serves every depth. Q, K
and V are three segments of one packed weight (one pass over the input writes the three outputs);
the FFN-in product applies bias + GELU in its epilogue. The kernel runs long inputs as passes of
rows, so padded batches take the path too, up to the token count :func:`use_small_m` allows on
this CPU's vector ISA (``isa.py``); beyond it the frozen encoder runs the usual path.

Each layer is ONE extension call (``packed_albert_layer``: QKV product, varlen attention, output
product, add + LayerNorm, FFN in + GELU, FFN out, add + LayerNorm) when the tokens are packed
sequences attending to themselves (no padding, or padding removed); with the padded layout or a
left-padded row's query-only token, the layer runs op by op on the same packed weights
(``packed_linear``) with the plan's attention.

Why our own kernel: ``benchmarks/small_m_gemm.py`` timed the library paths reachable from torch in
the 12-layer shared-weight loop (F.linear; MKL's packed GEMM ``torch.ops.mkl._mkl_linear``, which
is packed for one M; oneDNN's packed ``torch.ops.mkldnn._linear_pointwise``, about 0.3x its
large-M rate at M = 8 with 40-90 us of host cost per call; fbgemm's fp16-weight GEMM, which rounds
the weights outside the fp32 budget). docs/performance.md has the figures.

Frozen means frozen: the packed copy is what the encoder computes with, in the calls it applies
to, until ``freeze`` is called again (or ``unfreeze``). The model checks (``model/core.py``
``frozen_for_call``) that the modules are still plain and raises when a parameter was replaced or
updated in a way its version counter records; writes through ``.data`` are not recorded by torch
and are the caller's to follow with ``freeze``.
"""
from __future__ import annotations

from typing import Mapping

import torch

import sys

from .isa import SMALL_M_MIN_TOKENS, small_m_max_tokens

def use_small_m(tokens: int, hidden: int, intermediate: int) -> bool:
    """Whether the encoder's products on `tokens` rows (hidden -> hidden, hidden -> 3 * hidden,
    hidden -> intermediate, intermediate -> hidden) run on the packed small-M kernel: the one
    place that chooses between it and the library GEMM, from the per-ISA table of
    ``backends/cpp/isa.py`` (measured: AVX-512 1..1024 tokens, AVX2 1..4096, the portable build
    never; ``$ALBERT_KERNELS_CPU_GEMM`` forces either). Every product of a layer must agree, as
    one extension call runs them all: ``isa.small_m_max_tokens`` is the limit for every shape
    (one read of the table and the environment per call, not one per product)."""
    limit = small_m_max_tokens()
    if limit == sys.maxsize:   # forced "small_m": every size
        return True
    return SMALL_M_MIN_TOKENS <= tokens <= limit


def _ops():
    return torch.ops.albert_kernels


def _pack(weight: torch.Tensor, segments: int = 1) -> torch.Tensor:
    """nn.Linear weight [S*N, K] fp32 -> the small-M kernel's panels [S * ceil(N / P), K, P], P the
    build's panel width (``packed_panel_width()``: 24 on AVX2, 48 on AVX-512)."""
    return _ops().pack_linear_weight(weight.detach().contiguous(), segments)


class FrozenEncoder:
    """The packed weights of one encoder: the input mapping (an ``nn.Linear`` or None) and, per
    layer key, the arguments of ``packed_albert_layer`` after the tokens and cu_seqlens."""

    __slots__ = ("mapping", "layers", "hidden", "intermediate", "_layer_op", "_linear_op")

    def __init__(self, mapping, layers: Mapping) -> None:
        ops = _ops()
        self._layer_op = ops.packed_albert_layer.default  # the overloads: no per-call lookup
        self._linear_op = ops.packed_linear.default
        d = lambda t: t.detach()
        self.mapping = None
        if mapping is not None:
            self.mapping = (_pack(mapping.weight), mapping.out_features, d(mapping.bias))
        self.layers = {}
        for key, p in layers.items():
            qkv_w = torch.cat([p.query.weight, p.key.weight, p.value.weight]).detach()
            qkv_b = torch.cat([p.query.bias, p.key.bias, p.value.bias]).detach()
            self.layers[key] = (
                _pack(qkv_w, 3), qkv_b, _pack(p.dense.weight), d(p.dense.bias),
                d(p.norm1.weight), d(p.norm1.bias), p.norm1.eps,
                _pack(p.ffn_in.weight), d(p.ffn_in.bias), _pack(p.ffn_out.weight),
                d(p.ffn_out.bias), d(p.norm2.weight), d(p.norm2.bias), p.norm2.eps,
                p.num_heads, p.scale, p.approximate)
            self.hidden, self.intermediate = p.dense.out_features, p.ffn_in.out_features

    def usable(self, x: torch.Tensor, plan) -> bool:
        """Whether this call (x [M, features], the encoder's input) runs here: eager CPU fp32,
        no autocast, and :func:`use_small_m` for M tokens."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and use_small_m(x.shape[0], self.hidden, self.intermediate))

    def mapping_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mapping is None else self._linear_op(x, *self.mapping)

    def layer(self, key: int, h: torch.Tensor, plan) -> torch.Tensor:
        """One layer on h [M, hidden] fp32, as ``model.core.run_layer`` in eval mode."""
        args = self.layers[key]
        if plan.cu_seqlens is not None and plan.cu_extra is None:
            return self._layer_op(h, plan.cu_seqlens, plan.max_seqlen, *args)
        # the padded layout or query-only tokens: op by op, the plan's attention
        (qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, eps1, f1_w, f1_b, f2_w, f2_b, ln2_w, ln2_b, eps2,
         heads, scale, approximate) = args
        n, hidden = h.shape
        kernels, lin = plan.kernels, self._linear_op
        qkv = lin(h, qkv_w, hidden, qkv_b, None, 3).view(3, n, heads, hidden // heads)
        ctx = plan.attend(qkv[0], qkv[1], qkv[2], scale).reshape(n, hidden)
        a = kernels.add_layer_norm(lin(ctx, o_w, hidden, o_b), h, ln1_w, ln1_b, eps1)
        f = lin(lin(a, f1_w, f1_b.shape[0], f1_b, approximate), f2_w, hidden, f2_b)
        return kernels.add_layer_norm(f, a, ln2_w, ln2_b, eps2)


def freeze_encoder(mapping, layers: Mapping) -> FrozenEncoder:
    """Pack an encoder's weights for the frozen path. mapping: the input ``nn.Linear`` (or
    None); layers: {key: ``model.core.LayerParts``} whose modules are all plain fp32 CPU
    modules (the caller checks). Runs without autograd."""
    with torch.no_grad():
        return FrozenEncoder(mapping, layers)
