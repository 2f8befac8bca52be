"""Reference residual add + LayerNorm: LayerNorm(x + residual) over the last dim.

The definition of right, so it computes at least as accurately as any backend (docs/correctness.md):

- s = x + residual is formed in fp32 (float64 stays float64), never in the input dtype: in fp16
  the sum can exceed 65504 while the normalised output is perfectly representable.
- Each row is shifted by its first element before the statistics, s' = s - s[..., 0]. LayerNorm
  does not change under a common shift, but its rounding does: a constant row becomes exactly 0
  (mean 0, variance 0, output = bias), and a near-constant row with a large common offset keeps
  every bit of its spread, where one rounding step of the mean of the unshifted row would be
  magnified by rstd (1/sqrt(eps) = 1e6 for ALBERT's eps = 1e-12). The shift is a constant of the
  function (detached), so the gradient is that of LayerNorm itself.
- Statistics and the normalisation run in fp32 (F.layer_norm, two-pass), the result is cast back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x, residual [..., N] (one dtype), weight, bias [N] -> LayerNorm(x + residual), x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = x.to(compute) + residual.to(compute)
    s = s - s[..., :1].detach()
    y = F.layer_norm(s, (s.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return y.to(x.dtype)
