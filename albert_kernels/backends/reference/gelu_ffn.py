"""Reference GELU feed-forward: gelu(x @ W1^T + b1) and the full ALBERT FFN.

The matrix products are F.linear in the input dtype (the pre-activation every backend saves is
in that dtype too). GELU and its derivative are evaluated in fp32 (float64 stays float64) in a
form that is accurate on the whole real line, then cast back (docs/correctness.md):

- tanh ("gelu_new"): 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3). With
  t = -2u, e = exp(-|t|), r = 1 / (1 + e): sigmoid(2u) = r (t <= 0) or e r (t > 0), and
  sigmoid(2u) (1 - sigmoid(2u)) = e r^2, so no 1 - s cancels in either tail. z is clamped to
  +-30 inside t (beyond it e underflows to 0 in fp32 and fp64 alike), so z^3 never overflows at
  the fp16 / bf16 maxima and the derivative is never 0 * inf.
- erf ("none"): gelu(z) = 0.5 z erfc(-z / sqrt(2)) (1 + erf cancels in the left tail);
  gelu'(z) = Phi(z) + z exp(-z^2 / 2) / sqrt(2 pi).

The derivative is written out in an autograd.Function instead of being left to autograd, whose
chain through tanh and z^3 gives 0 * inf = NaN for large |z|.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715
_CLAMP = 30.0


def _gelu_and_grad(z: torch.Tensor, approximate: str, need_grad: bool):
    """(gelu(z), gelu'(z) or None) in z's dtype (fp32 or fp64)."""
    if approximate == "tanh":
        zc = z.clamp(-_CLAMP, _CLAMP)
        t = -2.0 * _SQRT_2_OVER_PI * zc * (1.0 + _CUBIC * zc * zc)
        e = torch.exp(-t.abs())
        r = 1.0 / (1.0 + e)
        s = torch.where(t > 0, e * r, r)
        if not need_grad:
            return z * s, None
        du2 = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * zc * zc)
        return z * s, s + zc * (e * r * r) * du2
    cdf = 0.5 * torch.special.erfc(-z * (0.5 ** 0.5))
    if not need_grad:
        return z * cdf, None
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z * cdf, cdf + z * pdf


class _Gelu(torch.autograd.Function):
    """GELU with its derivative written out. The backward is itself made of differentiable
    PyTorch ops (double backward works); ``setup_context`` and the generated vmap rule let
    torch.func transforms (grad, vjp, jacrev, vmap) run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, approximate: str) -> torch.Tensor:
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32
        return _gelu_and_grad(z.to(compute), approximate, False)[0].to(z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, approximate = inputs
        ctx.save_for_backward(z)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        compute = torch.float64 if z.dtype == torch.float64 else torch.float32
        d = _gelu_and_grad(z.to(compute), ctx.approximate, True)[1]
        return (grad.to(compute) * d).to(z.dtype), None


def gelu(z: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU of z (any shape, fp16/bf16/fp32/fp64); approximate "tanh" or "none". z's dtype."""
    return _Gelu.apply(z, approximate)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                approximate: str) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] -> [..., N]; approximate "tanh" or "none"."""
    return gelu(F.linear(x, weight, bias), approximate)


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, approximate: str) -> torch.Tensor:
    """ALBERT's ffn -> activation -> ffn_output: x [..., H], w1 [I, H], w2 [H, I] -> [..., H]."""
    return F.linear(linear_gelu(x, w1, b1, approximate), w2, b2)
