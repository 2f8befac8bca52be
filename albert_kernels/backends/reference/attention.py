"""Reference attention: plain PyTorch, the definition of right. Works in float64 too.

Scores, softmax and the weighted sum are computed in the inputs' dtype, exactly as a user of
plain PyTorch would get them (the error budget's "base"); in float64 they are the "gold".
"""
from __future__ import annotations

from typing import Optional

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """q, k, v [B, H, L, D]; key_padding_mask bool [B, L] (True = real key) or None."""
    if key_padding_mask is None:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale          # [B, H, L, L]
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    keep = key_padding_mask[:, None, None, :]                          # [B, 1, 1, L]
    # Padded key/value slots may hold anything (NaN, inf): select them away before any product,
    # so neither the output nor a gradient of a real row ever multiplies them by 0.
    slot = ~key_padding_mask[:, None, :, None]                         # [B, 1, L, 1]
    k, v = k.masked_fill(slot, 0), v.masked_fill(slot, 0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A query whose keys are all padding has a row of -inf: softmax gives NaN; the contract is 0.
    probs = torch.where(keep.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, v)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> torch.Tensor:
    """Packed q, k, v [T, H, D]; sequence i holds tokens cu_seqlens[i]:cu_seqlens[i+1]."""
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [n, H, D] -> [1, H, n, D], attend within the sequence, back to [n, H, D]
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(attention(qs, ks, vs, None, scale)[0].transpose(0, 1))
    if not outs:  # no tokens: an empty attention keeps q, k, v in the autograd graph
        grid = lambda t: t.transpose(0, 1).unsqueeze(0)
        return attention(grid(q), grid(k), grid(v), None, scale)[0].transpose(0, 1)
    return torch.cat(outs, dim=0)
