"""Input checks for the public ops, done once, before any backend is called.

Every error names the argument and says what was expected and what was given.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"


def check_tensor(name: str, t, *, rank: Optional[int] = None, min_rank: Optional[int] = None,
                 floating: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got {describe(t)}")
    if min_rank is not None and t.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}, got {describe(t)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, shape: bool = True) -> None:
    """All tensors share device and dtype (and shape when asked) with the first one."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if shape and t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {list(first.shape)}, "
                             f"got {list(t.shape)}")


def check_vector(name: str, t, length: int, like: torch.Tensor, like_name: str) -> None:
    check_tensor(name, t, rank=1, floating=True)
    if t.shape[0] != length:
        raise ValueError(f"{name} must be [{length}], got {describe(t)}")
    check_same([like_name, name], [like, t], shape=False)


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_approximate(approximate) -> None:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


def check_cu_seqlens(cu_seqlens, max_seqlen, total: int, device: torch.device, *,
                     values: bool = True, names=("cu_seqlens", "max_seqlen", "q")) -> None:
    """cu_seqlens: int32 [B+1] on `device`; max_seqlen: an int >= 0. With `values` (and not while
    torch.compile traces), also the values: 0 first, non-decreasing, `total` last, no length
    above max_seqlen; reading them is a device->host copy (a sync on CUDA)."""
    check_tensor(names[0], cu_seqlens, rank=1)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{names[0]} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"{names[0]} is on {cu_seqlens.device} but q is on {device}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{names[0]} must have B+1 >= 1 entries, got 0")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{names[1]} must be a non-negative int, got {max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"{names[1]} must be a non-negative int, got {max_seqlen}")
    if not values or torch.compiler.is_compiling():
        return  # the value checks read the tensor on the host: eager only, not in a graph
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{names[0]}[0] must be 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{names[0]} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{names[0]}[-1] must equal T = {total} (tokens in {names[2]}), "
                         f"got {values[-1]}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{names[1]} = {max_seqlen} is smaller than the longest sequence "
                         f"in {names[0]} ({max(lengths)})")


def check_dropout_p(dropout_p) -> float:
    """dropout_p: a float in [0, 1) (the probability of dropping an attention probability)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return float(dropout_p)
