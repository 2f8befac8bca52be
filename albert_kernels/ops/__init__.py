"""The public op layer: validate the inputs, resolve the backend, call its kernel.

Every op accepts float32, float16 and bfloat16 tensors (float64 on the reference and cpp
backends), on CPU or CUDA, and is differentiable. ``backend=None`` picks the best backend
available for the tensors' device; the choice and its dtype / head-dim checks are made by
``albert_kernels.backends.dispatch.resolve``, the one dispatch point the models use too.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import available_backends, resolve
from ..backends.op_table import OP_NAMES
from .padding import pad, unpad
from .validate import (check_approximate, check_cu_seqlens, check_dropout_p, check_same, check_scale, check_tensor,
                       check_vector, describe)


def _backend(backend: Optional[str], t: torch.Tensor, head_dim: Optional[int] = None):
    return resolve(backend, t.device, t.dtype, head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention in the padded layout.

    q, k, v: [B, H, L, D], one float dtype and device. key_padding_mask: bool [B, L], True = real
    key (keys where it is False get zero weight, whatever they hold); a query whose keys are all
    masked returns zeros. scale defaults to D ** -0.5. dropout_p in [0, 1): dropout on the
    attention probabilities, applied whenever > 0 (pass 0 in eval; there is no training flag):
    each is dropped with probability dropout_p and kept ones are scaled by 1 / (1 - dropout_p),
    as ``nn.Dropout``. The mask comes from a Philox stream keyed by torch's generator for the
    device (``torch.manual_seed`` makes it reproducible, successive calls differ) and the
    backward regenerates it, as FlashAttention 2 does (docs/correctness.md). Returns
    [B, H, L, D]. Raises TypeError / ValueError naming the argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=4, floating=True)
    check_same(["q", "k", "v"], [q, k, v])
    batch, _, seqlen, head_dim = q.shape
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seqlen):
            raise ValueError(f"key_padding_mask must be bool [B, L] = [{batch}, {seqlen}], "
                             f"got {describe(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on "
                             f"{q.device}")
    scale = check_scale(scale, head_dim)
    dropout_p = check_dropout_p(dropout_p)
    kernels = _backend(backend, q, head_dim)
    return kernels.attention(q, k, v, key_padding_mask, scale, dropout_p)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, cu_seqlens_k: Optional[torch.Tensor] = None,
                     max_seqlen_k: Optional[int] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, backend: Optional[str] = None,
                     check_inputs: bool = True) -> torch.Tensor:
    """Softmax attention over packed variable-length sequences, in the convention of
    FlashAttention's ``flash_attn_varlen_func``.

    q: [Tq, H, D]; k, v: [Tk, H, D], one float dtype and device. cu_seqlens (FlashAttention's
    cu_seqlens_q): int32 [B+1], prefix sums of the query lengths (cu_seqlens[0] == 0,
    cu_seqlens[-1] == Tq); max_seqlen: the longest query length. cu_seqlens_k: int32 [B+1], the
    same over k's tokens (cu_seqlens_k[-1] == Tk); None means cu_seqlens (then Tk == Tq and each
    sequence attends to itself). max_seqlen_k: the longest key length; None means max_seqlen.
    Sequence b's queries q[cu_seqlens[b]:cu_seqlens[b+1]] attend to the keys
    k[cu_seqlens_k[b]:cu_seqlens_k[b+1]] only: queries without keys of their own (a left-padded
    row's pad positions, say) are query-only tokens, and a sequence with queries but no keys
    gives zero rows and zero gradients. dropout_p: as in :func:`attention` (the mask's layout
    uses max_seqlen and max_seqlen_k, which must bound the lengths). Returns [Tq, H, D].

    check_inputs: checking the values of cu_seqlens / cu_seqlens_k (and the max lengths against
    them) reads them back to the host: on CUDA, a device->host copy that waits for the GPU, on
    every call. Pass ``check_inputs=False`` when you have validated them once (or built them
    yourself, as ``ak.unpad`` does) and call repeatedly, e.g. once per layer: shapes, dtypes and
    devices are still checked, but no value is read and nothing waits. Invalid values are then
    undefined behaviour (out-of-bounds reads on a GPU). This is why ``AlbertModel`` validates its
    inputs once per forward and then calls the backend kernels directly: one check, no
    per-layer sync. Raises TypeError / ValueError naming the argument for invalid inputs, and the
    errors of ``backends.dispatch.resolve`` for the backend.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, rank=3, floating=True)
    check_same(["q", "k", "v"], [q, k, v], shape=False)
    check_same(["k", "v"], [k, v])
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k must be [Tk, H, D] with q's H, D = {list(q.shape[1:])}, "
                         f"got {describe(k)}")
    if not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs must be a bool, got {type(check_inputs).__name__}")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens and q {q.shape[0]}: keys laid out apart "
                         "from the queries need cu_seqlens_k")
    check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device, values=check_inputs)
    max_k_name = "max_seqlen_k" if max_seqlen_k is not None else "max_seqlen_k (None: max_seqlen)"
    if cu_seqlens_k is None:
        if max_seqlen_k is not None:
            check_cu_seqlens(cu_seqlens, max_seqlen_k, k.shape[0], q.device,
                             values=check_inputs, names=("cu_seqlens", max_k_name, "k"))
        cu_seqlens_k = cu_seqlens
    max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    if cu_seqlens_k is not cu_seqlens:
        check_tensor("cu_seqlens_k", cu_seqlens_k, rank=1)
        if cu_seqlens_k.shape != cu_seqlens.shape:
            raise ValueError(f"cu_seqlens_k must have the B+1 = {cu_seqlens.shape[0]} entries of "
                             f"cu_seqlens, got {describe(cu_seqlens_k)}")
        check_cu_seqlens(cu_seqlens_k, max_seqlen_k, k.shape[0], q.device, values=check_inputs,
                         names=("cu_seqlens_k", max_k_name, "k"))
    scale = check_scale(scale, q.shape[-1])
    dropout_p = check_dropout_p(dropout_p)
    kernels = _backend(backend, q, q.shape[-1])
    return kernels.varlen_attention(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k,
                                    scale, dropout_p)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float = 1e-12, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim, statistics in fp32.

    x, residual: [..., N], same shape; weight, bias: [N]. Returns x's shape and dtype.
    """
    check_tensor("x", x, min_rank=1, floating=True)
    check_tensor("residual", residual, floating=True)
    check_same(["x", "residual"], [x, residual])
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x must have a last dim >= 1 to normalise over, got {describe(x)}")
    check_vector("weight", weight, n, x, "x")
    check_vector("bias", bias, n, x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    kernels = _backend(backend, x)
    return kernels.add_layer_norm(x, residual, weight, bias, float(eps))


def _check_linear(x, weight, bias, x_name, w_name, b_name) -> None:
    check_tensor(w_name, weight, rank=2, floating=True)
    check_same([x_name, w_name], [x, weight], shape=False)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{w_name} must be [N, {x.shape[-1]}] to match {x_name}'s last dim, got "
                         f"{describe(weight)}")
    check_vector(b_name, bias, weight.shape[0], x, x_name)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                approximate: str = "tanh", backend: Optional[str] = None) -> torch.Tensor:
    """gelu(x @ weight.T + bias): x [..., K], weight [N, K], bias [N] -> [..., N].

    approximate="tanh" is transformers' "gelu_new" (ALBERT's default); "none" is the erf GELU.
    """
    check_tensor("x", x, min_rank=1, floating=True)
    _check_linear(x, weight, bias, "x", "weight", "bias")
    check_approximate(approximate)
    kernels = _backend(backend, x)
    return kernels.linear_gelu(x, weight, bias, approximate)


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, *, approximate: str = "tanh",
             backend: Optional[str] = None) -> torch.Tensor:
    """linear_gelu(x, w1, b1) @ w2.T + b2: x [..., H], w1 [I, H], b1 [I], w2 [H, I], b2 [H]."""
    check_tensor("x", x, min_rank=1, floating=True)
    _check_linear(x, w1, b1, "x", "w1", "b1")
    check_tensor("w2", w2, rank=2, floating=True)
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2 must be [N, {w1.shape[0]}] to take w1's output, got {describe(w2)}")
    check_same(["x", "w2"], [x, w2], shape=False)
    check_vector("b2", b2, w2.shape[0], x, "x")
    check_approximate(approximate)
    kernels = _backend(backend, x)
    return kernels.gelu_ffn(x, w1, b1, w2, b2, approximate)


# The public ops are the op table's (backends/op_table.py), each defined above, plus the index ops.
__all__ = [*OP_NAMES, "unpad", "pad", "available_backends"]
