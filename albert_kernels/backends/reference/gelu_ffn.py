"""Reference GELU feed-forward: gelu(x @ W1^T + b1) and the full ALBERT FFN."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                approximate: str) -> torch.Tensor:
    """x [..., K], weight [N, K], bias [N] -> [..., N]; approximate "tanh" or "none"."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, approximate: str) -> torch.Tensor:
    """ALBERT's ffn -> activation -> ffn_output: x [..., H], w1 [I, H], w2 [H, I] -> [..., H]."""
    return F.linear(linear_gelu(x, w1, b1, approximate), w2, b2)
