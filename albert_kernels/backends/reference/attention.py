"""Reference attention: plain PyTorch, the definition of right. Works in float64 too.

For fp16 / bf16 inputs the scores q.k^T and the softmax are computed in fp32 (float32 and
float64 inputs in their own dtype), so scores beyond the fp16 range (a q.k near 8e4) are no
overflow: the docs promise fp32 softmax statistics, and every backend keeps them. The
probabilities are then cast to the inputs' dtype and the weighted sum p.v is formed in it, as
FlashAttention-style kernels do; in float64 the whole computation is the error budget's "gold".

Dropout (dropout_p > 0) is ``nn.Dropout`` on the softmax probabilities: an entry is dropped
with probability p and kept entries are scaled by 1 / (1 - p). The mask is the one every backend
draws (albert_kernels/backends/dropout.py): (seed, offset) from ``draw_seed_offset`` at forward
time, then ``keep_mask``; autograd differentiates through the fixed mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dropout import draw_seed_offset, keep_mask


def _drop_mask(q: torch.Tensor, dropout_p: float, n_seqs: int, max_q: int, max_k: int,
               seed_offset: Optional[tuple] = None) -> Optional[torch.Tensor]:
    """The keep mask [n_seqs, H, max_q, max_k] of this call, or None at p == 0 (draws nothing).
    seed_offset: the (seed, offset) another backend's forward drew, or None to draw them."""
    if dropout_p == 0:
        return None
    heads = q.shape[1]
    if seed_offset is None:
        seed_offset = draw_seed_offset(q.device, n_seqs * heads * max_q * max_k)
    return keep_mask(*seed_offset, dropout_p, n_seqs, heads, max_q, max_k, q.device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_keep: Optional[torch.Tensor], scale: float, keep: Optional[torch.Tensor],
            dropout_p: float) -> torch.Tensor:
    """q [N, H, Lq, D], k, v [N, H, Lk, D]; key_keep bool [N, Lk] (True = real key) or None;
    keep: bool [N, H, Lq, Lk] dropout keep mask or None. Returns [N, H, Lq, D] in v's dtype;
    scores and softmax in fp32 for fp16 / bf16 inputs (the module docstring)."""
    if key_keep is not None:
        # Padded key/value slots may hold anything (NaN, inf): select them away before any
        # product, so neither the output nor a gradient of a real row ever multiplies them by 0.
        slot = ~key_keep[:, None, :, None]                              # [N, 1, Lk, 1]
        k, v = k.masked_fill(slot, 0), v.masked_fill(slot, 0)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [N, H, Lq, Lk]
    if key_keep is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        real = key_keep[:, None, None, :]                               # [N, 1, 1, Lk]
        probs = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=-1)
        # A query whose keys are all padding has a row of -inf: softmax gives NaN; the contract
        # is 0.
        probs = torch.where(real.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    if keep is not None:
        probs = probs.masked_fill(~keep, 0) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(probs.to(v.dtype), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], scale: float,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, H, L, D]; key_padding_mask bool [B, L] (True = real key) or None; dropout_p
    in [0, 1) on the probabilities (mask with max_q = max_k = L). Returns [B, H, L, D]."""
    return attention_with_seed(q, k, v, key_padding_mask, scale, dropout_p, None)


def attention_with_seed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor], scale: float, dropout_p: float,
                        seed_offset: Optional[tuple]) -> torch.Tensor:
    """:func:`attention` with the dropout mask of a given (seed, offset) (None: drawn here), so
    that another backend's call can be recomputed with its very mask."""
    batch, _, seqlen, _ = q.shape
    keep = _drop_mask(q, dropout_p, batch, seqlen, seqlen, seed_offset)
    return _attend(q, k, v, key_padding_mask, scale, keep, dropout_p)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Packed q [Tq, H, D], k, v [Tk, H, D]: sequence b's queries q[cu_q[b]:cu_q[b+1]] attend to
    keys k[cu_k[b]:cu_k[b+1]] only (FlashAttention's flash_attn_varlen_func). A sequence with
    queries but no keys gives zero rows. Returns [Tq, H, D]."""
    return varlen_attention_with_seed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, scale, dropout_p, None)


def varlen_attention_with_seed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, scale: float,
                               dropout_p: float, seed_offset: Optional[tuple]) -> torch.Tensor:
    """:func:`varlen_attention` with the dropout mask of a given (seed, offset) (None: drawn)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    keep = _drop_mask(q, dropout_p, len(bounds_q) - 1, max_seqlen_q, max_seqlen_k, seed_offset)
    grid = lambda t: t.transpose(0, 1).unsqueeze(0)                     # [n, H, D] -> [1, H, n, D]
    outs = []
    for b, (q0, q1, k0, k1) in enumerate(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1],
                                             bounds_k[1:])):
        if q1 == q0:
            continue
        # no keys: an empty softmax and an empty product give the zero rows, inside the graph
        keep_b = None if keep is None else keep[b:b + 1, :, :q1 - q0, :k1 - k0]
        out = _attend(grid(q[q0:q1]), grid(k[k0:k1]), grid(v[k0:k1]), None, scale, keep_b,
                      dropout_p)
        outs.append(out[0].transpose(0, 1))
    if not outs:  # no query tokens: an empty attention keeps q, k, v in the autograd graph
        out = _attend(grid(q), grid(k[:0]), grid(v[:0]), None, scale, None, dropout_p)
        return out[0].transpose(0, 1)
    return torch.cat(outs, dim=0)
