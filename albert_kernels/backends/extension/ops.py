"""The compiled extension's ops as differentiable, torch.compile-able Python functions.

Importing this module builds (once, cached) and loads the extension, then registers for every
``torch.ops.albert_kernels.*_fwd`` op a fake (meta) implementation and an autograd formula that
calls the matching ``*_bwd`` op (which gets a fake implementation too). The five functions at the
bottom have the backend signature of ``albert_kernels.backends.registry`` and are device-generic:
the dispatcher picks the CPU or CUDA kernels by the tensors' device. They only reshape to the
kernels' layouts (see csrc/registration.cpp) and back. Double backward and torch.func transforms
use the reference formulas (backends/higher_order.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .. import reference
from ..dropout import draw_seed_offset
from ..op_table import OP_NAMES
from ..higher_order import functorch_active, reference_grads
from ..reference.attention import attention_with_seed, varlen_attention_with_seed
from .build import build


def _load() -> None:
    """A library prebuilt by setup.py (albert_kernels/_C*.so) if there is one, else the JIT build."""
    if os.environ.get("ALBERT_KERNELS_CSRC") is None:
        prebuilt = sorted(Path(__file__).resolve().parents[2].glob("_C*.so"))
        if prebuilt:
            torch.ops.load_library(str(prebuilt[0]))
            return
    build()


_load()
_ops = torch.ops.albert_kernels


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Saved statistics (mean, rstd, lse) are fp32, fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake (meta) implementations
@torch.library.register_fake("albert_kernels::add_layer_norm_fwd")
def _(x, residual, weight, bias, eps):
    m = x.shape[0]
    return (torch.empty_like(x), x.new_empty(m, dtype=_stat_dtype(x)),
            x.new_empty(m, dtype=_stat_dtype(x)))


@torch.library.register_fake("albert_kernels::add_layer_norm_bwd")
def _(grad_out, x, residual, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.register_fake("albert_kernels::linear_gelu_fwd")
def _(x, weight, bias, approximate):
    pre = x.new_empty(x.shape[0], weight.shape[0])
    return torch.empty_like(pre), pre


@torch.library.register_fake("albert_kernels::linear_gelu_bwd")
def _(grad_out, x, weight, pre, approximate):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


@torch.library.register_fake("albert_kernels::gelu_ffn_fwd")
def _(x, w1, b1, w2, b2, approximate):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.register_fake("albert_kernels::gelu_ffn_bwd")
def _(grad_out, x, w1, w2, pre, approximate):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]))


def _lse_shape(q: torch.Tensor, rows: tuple, save_residual: bool) -> tuple:
    """The attention ops' saved statistics `lse`: the log-sum-exp per query row on CPU; on CUDA
    fp32 [2, *rows], the row max and log2 of the row sum apart, and with save_residual for
    fp16/bf16 [2 + D / 2, *rows]: planes 2.. hold the output's rounding residual in q's dtype
    (csrc/cuda/attention.cu, csrc/registration.cpp)."""
    if q.device.type != "cuda":
        return tuple(rows)
    planes = 2
    if save_residual and q.dtype in (torch.float16, torch.bfloat16):
        planes += q.shape[-1] // 2
    return (planes, *rows)


def _wants_residual(*tensors: torch.Tensor) -> bool:
    """save_residual for the attention forward: True when autograd will call its backward."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.library.register_fake("albert_kernels::attention_fwd")
def _(q, k, v, key_padding_mask, scale, dropout_p, seed, offset, save_residual=False):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, q.shape[:3], save_residual),
                                            dtype=_stat_dtype(q))


@torch.library.register_fake("albert_kernels::attention_bwd")
def _(grad_out, q, k, v, out, lse, key_padding_mask, scale, dropout_p, seed, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("albert_kernels::varlen_attention_fwd")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, seed,
      offset, save_residual=False):
    return torch.empty_like(q), q.new_empty(_lse_shape(q, (q.shape[1], q.shape[0]),
                                                       save_residual), dtype=_stat_dtype(q))


@torch.library.register_fake("albert_kernels::varlen_attention_bwd")
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      dropout_p, seed, offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# the small-M inference ops (csrc/cpu/small_m.cpp; no autograd: inference only)
# output features per packed panel (kNR in small_m.cpp: 24 in the AVX2 build, 48 in the AVX-512 one)
PANEL = int(_ops.packed_panel_width())


@torch.library.register_fake("albert_kernels::pack_linear_weight")
def _(weight, segments=1):
    n = weight.shape[0] // segments
    return weight.new_empty((segments * -(-n // PANEL), weight.shape[1], PANEL))


@torch.library.register_fake("albert_kernels::packed_linear")
def _(x, packed_weight, out_features, bias=None, gelu_approximate=None, segments=1):
    shape = (x.shape[0], out_features) if segments == 1 else (segments, x.shape[0], out_features)
    return x.new_empty(shape)


@torch.library.register_fake("albert_kernels::packed_albert_layer")
def _(hidden_states, *args):
    return torch.empty_like(hidden_states)


# the int8 inference ops (csrc/cpu/int8_linear.cpp; no autograd): weights packed as
# [ceil(N / 16), ceil(K / 4), 16, 4] int8
@torch.library.register_fake("albert_kernels::int8_pack_weight")
def _(weight_q):
    n, k = weight_q.shape
    return weight_q.new_empty((-(-n // 16), -(-k // 4), 16, 4))


@torch.library.register_fake("albert_kernels::int8_quantize_rows")
def _(x, input_scale=None):
    m = x.shape[0]
    return (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((m,)),
            x.new_empty((m,), dtype=torch.int32))


@torch.library.register_fake("albert_kernels::int8_gemm")
def _(q, weight_packed, weight_q, kernel):
    return q.new_empty((q.shape[0], weight_q.shape[0]), dtype=torch.int32)


@torch.library.register_fake("albert_kernels::int8_linear")
def _(x, weight_packed, weight_q, weight_scale, weight_sums, bias=None, input_scale=None,
      gelu_approximate=None, kernel="portable", addend=None):
    return x.new_empty((x.shape[0], weight_q.shape[0]))


# ---------------------------------------------------------------- autograd
# Each backward runs the *_bwd kernel; with grad mode on (autograd is recording the backward:
# create_graph=True) it computes the gradients with the reference formula instead, which can be
# differentiated again (backends/higher_order.py).
def _setup_add_ln(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    ctx.eps = eps
    ctx.save_for_backward(x, residual, weight, bias, output[1], output[2])


def _bwd_add_ln(ctx, grad_out, _grad_mean, _grad_rstd):
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        return reference_grads(reference.add_layer_norm, (x, residual, weight, bias, ctx.eps),
                               ctx.needs_input_grad, (grad_out,))
    gx, gw, gb = _ops.add_layer_norm_bwd(grad_out.contiguous(), x, residual, weight, mean, rstd)
    return gx, gx, gw, gb, None  # d residual == d x


def _setup_linear_gelu(ctx, inputs, output):
    x, weight, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, weight, bias, output[1])


def _bwd_linear_gelu(ctx, grad_out, _grad_pre):
    x, weight, bias, pre = ctx.saved_tensors
    if torch.is_grad_enabled():
        return reference_grads(reference.linear_gelu, (x, weight, bias, ctx.approximate),
                               ctx.needs_input_grad, (grad_out,))
    gx, gw, gb = _ops.linear_gelu_bwd(grad_out.contiguous(), x, weight, pre, ctx.approximate)
    return gx, gw, gb, None


def _setup_gelu_ffn(ctx, inputs, output):
    x, w1, b1, w2, b2, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1])


def _bwd_gelu_ffn(ctx, grad_out, _grad_pre):
    x, w1, b1, w2, b2, pre = ctx.saved_tensors
    if torch.is_grad_enabled():
        return reference_grads(reference.gelu_ffn, (x, w1, b1, w2, b2, ctx.approximate),
                               ctx.needs_input_grad, (grad_out,))
    gx, gw1, gb1, gw2, gb2 = _ops.gelu_ffn_bwd(grad_out.contiguous(), x, w1, w2, pre,
                                               ctx.approximate)
    return gx, gw1, gb1, gw2, gb2, None


def _setup_attention(ctx, inputs, output):
    q, k, v, key_padding_mask = inputs[:4]
    ctx.args, ctx.n_inputs = inputs[4:8], len(inputs)  # scale, dropout_p, seed, offset
    ctx.save_for_backward(q, k, v, output[0], output[1], key_padding_mask)


def _bwd_attention(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    scale, dropout_p, seed, offset = ctx.args
    if torch.is_grad_enabled():  # the reference with the forward's dropout mask
        fn = lambda q, k, v: attention_with_seed(
            q, k, v, key_padding_mask, scale, dropout_p, (seed, offset))
        grads = reference_grads(fn, (q, k, v), ctx.needs_input_grad[:3], (grad_out,))
        return grads + (None,) * (ctx.n_inputs - 3)
    # the same (seed, offset) as forward: the kernel regenerates the forward's dropout mask
    gq, gk, gv = _ops.attention_bwd(grad_out.contiguous(), q, k, v, out, lse, key_padding_mask,
                                    *ctx.args)
    return (gq, gk, gv) + (None,) * (ctx.n_inputs - 3)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k = inputs[:5]
    ctx.args, ctx.n_inputs = inputs[5:11], len(inputs)  # max_q, max_k, scale, p, seed, offset
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens_q, cu_seqlens_k)


def _bwd_varlen(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    max_q, max_k, scale, dropout_p, seed, offset = ctx.args
    if torch.is_grad_enabled():
        fn = lambda q, k, v: varlen_attention_with_seed(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, dropout_p, (seed, offset))
        grads = reference_grads(fn, (q, k, v), ctx.needs_input_grad[:3], (grad_out,))
        return grads + (None,) * (ctx.n_inputs - 3)
    gq, gk, gv = _ops.varlen_attention_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens_q,
                                           cu_seqlens_k, *ctx.args)
    return (gq, gk, gv) + (None,) * (ctx.n_inputs - 3)


for _name, _setup, _bwd in [("add_layer_norm_fwd", _setup_add_ln, _bwd_add_ln),
                            ("linear_gelu_fwd", _setup_linear_gelu, _bwd_linear_gelu),
                            ("gelu_ffn_fwd", _setup_gelu_ffn, _bwd_gelu_ffn),
                            ("attention_fwd", _setup_attention, _bwd_attention),
                            ("varlen_attention_fwd", _setup_varlen, _bwd_varlen)]:
    torch.library.register_autograd(f"albert_kernels::{_name}", _bwd, setup_context=_setup)


# ---------------------------------------------------------------- the backend functions
def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] contiguous (also when a dim is 0, where reshape(-1, N) is ambiguous)."""
    if t.dim() == 2 and t.is_contiguous():  # the model's token-major tensors: nothing to do
        return t
    return t.reshape(t.shape[:-1].numel(), t.shape[-1]).contiguous()


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x, residual [..., N] -> LayerNorm(x + residual) [..., N]; kernels see [M, N].
    Inside a torch.func transform: the reference formula (backends/higher_order.py)."""
    if functorch_active():
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    out, _, _ = _ops.add_layer_norm_fwd(_rows(x), _rows(residual), weight.contiguous(),
                                        bias.contiguous(), eps)
    return out if x.dim() == 2 else out.reshape(x.shape)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                approximate: str) -> torch.Tensor:
    """gelu(x @ weight.T + bias): x [..., K], weight [N, K] -> [..., N]."""
    if functorch_active():
        return reference.linear_gelu(x, weight, bias, approximate)
    out, _ = _ops.linear_gelu_fwd(_rows(x), weight.contiguous(),
                                  bias.contiguous(), approximate)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, approximate: str) -> torch.Tensor:
    """linear_gelu(x, w1, b1) @ w2.T + b2: x [..., H] -> [..., H]."""
    if functorch_active():
        return reference.gelu_ffn(x, w1, b1, w2, b2, approximate)
    out, _ = _ops.gelu_ffn_fwd(_rows(x), w1.contiguous(),
                               b1.contiguous(), w2.contiguous(), b2.contiguous(), approximate)
    return out.reshape(*x.shape[:-1], w2.shape[0])


def _seed_offset(device: torch.device, dropout_p: float, numel: int) -> tuple:
    """(seed, offset) of one dropout call (backends/dropout.py); (0, 0), drawing nothing, at p=0."""
    if dropout_p == 0:
        return 0, 0
    return draw_seed_offset(device, numel)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], scale: float,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, H, L, D]; key_padding_mask bool [B, L] (True = real key) or None;
    dropout_p on the probabilities (mask of backends/dropout.py with max_q = max_k = L)."""
    if functorch_active():
        return reference.attention(q, k, v, key_padding_mask, scale, dropout_p)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    batch, heads, seqlen = q.shape[:3]
    seed, offset = _seed_offset(q.device, dropout_p, batch * heads * seqlen * seqlen)
    out, _ = _ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask,
                                scale, dropout_p, seed, offset, _wants_residual(q, k, v))
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Packed q [Tq, H, D], k, v [Tk, H, D]; cu_seqlens_q / cu_seqlens_k int32 [B+1]; dropout_p
    on the probabilities (mask of backends/dropout.py with max_seqlen_q, max_seqlen_k)."""
    if functorch_active():
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, scale, dropout_p)
    n_seqs, heads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    seed, offset = _seed_offset(q.device, dropout_p, n_seqs * heads * max_seqlen_q * max_seqlen_k)
    out, _ = _ops.varlen_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(),
                                       cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                       max_seqlen_q, max_seqlen_k, scale, dropout_p, seed, offset,
                                       _wants_residual(q, k, v))
    return out


__all__ = list(OP_NAMES)
