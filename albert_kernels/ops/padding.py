"""Removing and restoring padding: pure index operations, shared by every backend.

``unpad`` gathers the real tokens of a padded batch into one packed tensor; ``pad`` scatters them
back, with zero rows at padded positions. Both are differentiable.
"""
from __future__ import annotations

import torch

from .validate import check_tensor


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """hidden [B, L, ...], attention_mask [B, L] (bool or 0/1 integers; True/1 = real token).

    Returns (packed [T, ...], indices int64 [T] into the flattened B*L positions,
    cu_seqlens int32 [B+1], max_seqlen int).
    """
    check_tensor("hidden", hidden, min_rank=2)
    check_tensor("attention_mask", attention_mask, rank=2)
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"attention_mask must be [B, L] = {list(hidden.shape[:2])} to match "
                         f"hidden, got {list(attention_mask.shape)}")
    if attention_mask.device != hidden.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, hidden on {hidden.device}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError("attention_mask must be bool or integer 0/1, got "
                            f"{attention_mask.dtype}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        attention_mask = attention_mask != 0
    batch, seqlen = attention_mask.shape
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.reshape(-1), as_tuple=False).reshape(-1)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=hidden.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0, dtype=torch.int32)
    max_seqlen = int(lengths.max()) if batch > 0 else 0
    packed = hidden.reshape(batch * seqlen, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """packed [T, ...] and the indices from ``unpad`` -> [batch, seqlen, ...], zeros at padding."""
    check_tensor("packed", packed, min_rank=1)
    check_tensor("indices", indices, rank=1)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.device != packed.device:
        raise ValueError(f"indices is on {indices.device} but packed is on {packed.device}")
    if indices.shape[0] != packed.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} entries but packed has "
                         f"{packed.shape[0]} rows")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in (batch, seqlen)):
        raise ValueError(f"batch and seqlen must be non-negative ints, got {batch!r}, {seqlen!r}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch * seqlen):
        raise ValueError(f"indices must lie in [0, batch*seqlen) = [0, {batch * seqlen})")
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_put((indices.long(),), packed)
    return out.reshape(batch, seqlen, *packed.shape[1:])
