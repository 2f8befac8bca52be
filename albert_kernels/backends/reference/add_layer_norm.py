"""Reference residual add + LayerNorm: LayerNorm(x + residual) over the last dim.

Statistics are computed in fp32 (float64 stays float64), as API.md asks of every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    s = x + residual
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    y = F.layer_norm(s.to(compute), (s.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return y.to(x.dtype)
