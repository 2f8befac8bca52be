"""The small-M inference path: one short request on the CPU (issue 16; docs/performance.md).

With a handful of tokens (M rows) a matrix product reads its whole weight for a few rows of
work, and ``F.linear`` (MKL sgemm) also re-packs that weight on every call: for ALBERT-base at
M = 8 the encoder's products ran at 12-27 GFLOP/s. Here the encoder's weights are packed ONCE
into the panel layout of the cpp backend's small-M kernel (``csrc/cpu/small_m.cpp``:
``torch.ops.albert_kernels.pack_linear_weight``) and reused: ALBERT shares its layers, so one
packed copy serves every depth (12 applications for base) and every call. Q, K and V are three
segments of one packed weight (one pass over it writes three outputs); the FFN-in product applies
bias + GELU in its epilogue. Written for short requests, the kernel also runs ahead of MKL's
``F.linear`` on long inputs (passes of 256 rows), so padded batches take this path too, up to
:data:`MAX_TOKENS`.

Each layer is ONE extension call (``packed_albert_layer``: QKV product, varlen attention, output
product, add + LayerNorm, FFN in + GELU, FFN out, add + LayerNorm) when the tokens are packed
sequences attending to themselves (the usual case: no padding, or padding removed); with the
padded layout or a left-padded row's query-only token, the layer runs op by op on the same packed
weights (``packed_linear``) with the plan's attention.

Why our own kernel: ``benchmarks/small_m_gemm.py`` timed the library paths reachable from torch in
the 12-layer shared-weight loop (F.linear, MKL's packed GEMM ``torch.ops.mkl._mkl_linear``,
oneDNN's packed ``torch.ops.mkldnn._linear_pointwise``, fbgemm's fp16-weight GEMM): oneDNN's was the
fastest fp32 one but ran at about 0.3x its large-M rate at M = 8, and its per-call host cost
(40-90 us) was a sixth of a short request's time; MKL's packed GEMM is packed for one M, and
fbgemm rounds the weights to fp16 (outside the budget). The figures are in docs/performance.md.

When it runs (:func:`packed_encoder`): eager CPU fp32 inference on the ``cpp`` backend — the
encoder is in eval mode, no autograd graph is needed (``torch.is_grad_enabled()`` is False, or
neither the input nor any parameter requires grad), no autocast, not under torch.compile,
:data:`MIN_TOKENS` to :data:`MAX_TOKENS` tokens. Anything else (training, fine-tuning, more
than 4096 tokens, the reference backend) keeps the usual path, and then the packed copy is
dropped: it costs no memory when unused.

The packed copy follows the parameters: it is keyed on every packed parameter's identity,
``data_ptr`` and ``_version`` (an optimizer step or ``load_state_dict`` bumps ``_version``;
``.to()`` makes new tensors), and rebuilt lazily on the next call that runs the path. It is a
plain attribute, never in the state dict, and not copied by ``copy.deepcopy`` or pickling.
"""
from __future__ import annotations

from typing import Optional

import torch

# Token count (rows of every product) up to which the packed path runs. The kernel runs long
# inputs as passes of 256 rows and measured 1.1-1.4x MKL's F.linear rate on ALBERT-base's
# products from M = 64 to 4096 (2 threads, AVX2; docs/performance.md), so padded batches
# (B=8, L=128: ~750 real tokens) take it too; 4096 is the largest M measured.
MAX_TOKENS = 4096
# ... and from which: with one token the kernel's one-row tile is level with MKL's matrix-vector
# product (benchmarks/small_m_gemm.py, M = 1), and the layer still makes one call instead of ten.
MIN_TOKENS = 1


def _ops():
    return torch.ops.albert_kernels


def _pack(weight: torch.Tensor, segments: int = 1) -> torch.Tensor:
    """nn.Linear weight [S*N, K] fp32 -> the small-M kernel's panels [S * ceil(N / 24), K, 24]."""
    return _ops().pack_linear_weight(weight.detach().contiguous(), segments)


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
    (by identity), the arguments of ``packed_albert_layer`` after the tokens and cu_seqlens."""

    __slots__ = ("mapping", "layers", "_layer_op", "_linear_op")

    def __init__(self, encoder) -> None:
        ops = _ops()
        self._layer_op = ops.packed_albert_layer.default  # the overloads: no per-call lookup
        self._linear_op = ops.packed_linear.default
        m = encoder.embedding_hidden_mapping_in
        self.mapping = (_pack(m.weight), m.out_features, m.bias.detach())
        self.layers = {}
        for group in encoder.albert_layer_groups:
            for layer in group.albert_layers:
                att, ffn, ffn_out = layer.attention, layer.ffn, layer.ffn_output
                d = lambda t: t.detach()
                qkv_w = torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach()
                qkv_b = torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach()
                self.layers[id(layer)] = (
                    _pack(qkv_w, 3), qkv_b, _pack(att.dense.weight), d(att.dense.bias),
                    d(att.LayerNorm.weight), d(att.LayerNorm.bias), att.eps,
                    _pack(ffn.weight), d(ffn.bias), _pack(ffn_out.weight), d(ffn_out.bias),
                    d(layer.full_layer_layer_norm.weight), d(layer.full_layer_layer_norm.bias),
                    layer.eps, att.num_heads, att.scale, layer.approximate)

    def layer(self, layer, h: torch.Tensor, plan) -> torch.Tensor:
        """One AlbertLayer on h [M, hidden] fp32, as ``AlbertLayer.forward`` in eval mode."""
        args = self.layers[id(layer)]
        if plan.cu_seqlens is not None and plan.cu_extra is None:
            return self._layer_op(h, plan.cu_seqlens, plan.max_seqlen, *args)
        # the padded layout or query-only tokens: op by op, the plan's attention
        (qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, eps1, f1_w, f1_b, f2_w, f2_b, ln2_w, ln2_b, eps2,
         heads, scale, approximate) = args
        n, hidden = h.shape
        module, lin = plan.kernels.module, self._linear_op
        qkv = lin(h, qkv_w, hidden, qkv_b, None, 3).view(3, n, heads, hidden // heads)
        ctx = plan.attend(qkv[0], qkv[1], qkv[2], scale).reshape(n, hidden)
        a = module.add_layer_norm(lin(ctx, o_w, hidden, o_b), h, ln1_w, ln1_b, eps1)
        f = lin(lin(a, f1_w, f1_b.shape[0], f1_b, approximate), f2_w, hidden, f2_b)
        return module.add_layer_norm(f, a, ln2_w, ln2_b, eps2)

    def mapping_in(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_op(x, *self.mapping)


def _key(params) -> tuple:
    """(identity, data_ptr, _version) of each parameter; an inference tensor (made under
    torch.inference_mode) has no version counter: its identity and data_ptr only."""
    return tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)


def packed_encoder(encoder, x: torch.Tensor, kernels) -> Optional[PackedEncoder]:
    """The encoder's packed weights if the small-M path applies to input x [M, embedding_size]
    on the resolved backend ``kernels`` (see the module docstring), built or rebuilt when the
    parameters changed; else None, after dropping any packed copy (training or large batches
    hold no packed memory)."""
    if torch.compiler.is_compiling():  # traced graphs keep the usual path; nothing is touched
        return None
    cache = encoder.__dict__.get("_pack_cache")
    if cache is None:  # a module made before the cache existed (an old pickle)
        cache = encoder._pack_cache = PackCache()
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and MIN_TOKENS <= x.shape[0] <= MAX_TOKENS and not encoder.training
            and kernels.name == "cpp" and not torch.is_autocast_enabled("cpu")):
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
