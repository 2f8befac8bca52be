"""Attention dropout's random numbers: one definition for every backend.

The mask is counter-based, as FlashAttention 2 draws it: a Philox4x32-10 generator keyed by a
seed and addressed by an offset, so the backward regenerates the forward's mask from two integers
instead of storing it. The generator is exactly Triton's ``tl.randint(seed, offset)``
(triton/language/random.py), which is the Random123 Philox4x32-10 (Salmon et al., SC'11):

- key = (seed_lo, seed_hi), the two 32-bit halves of the int64 seed;
- counter = (offset_lo, offset_hi, 0, 0), the two halves of the int64 offset;
- 10 rounds with multipliers 0xD2511F53 / 0xCD9E8D57 and key bumps 0x9E3779B9 / 0xBB67AE85;
- the draw is the first output word (uint32).

Element (s, h, i, j) of the attention probabilities (s = batch row or packed sequence, h = head,
i = query row and j = key index within the sequence) uses the offset

    philox_offset + ((s * H + h) * max_q + i) * max_k + j                (int64)

and is kept iff draw >= threshold, threshold = min(floor(p * 2**32), 2**32 - 1) (an integer
compare, the same in every backend); kept entries are scaled by 1 / (1 - p), as ``nn.Dropout``.
The C++ CPU copy is csrc/cpu/philox.h, the CUDA copy csrc/cuda/philox.cuh; Triton uses
``tl.randint``. See docs/correctness.md for how the tests hold each backend to this mask.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

MASK32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57   # Philox4x32 multipliers (Random123)
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85       # Weyl key increments (golden ratio, sqrt(3) - 1)
N_ROUNDS = 10
_CHUNK = 1 << 20  # draws per step in keep_mask


def _mul_hi_lo(a: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values a (int64 tensor) and a constant b.

    b is split into 16-bit halves so that every partial product stays below 2**49: int64 never
    overflows.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo            # a * b = p_hi * 2**16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(counter: Sequence[torch.Tensor], key: Tuple[int, int],
               n_rounds: int = N_ROUNDS) -> Tuple[torch.Tensor, ...]:
    """Philox4x32 of the counter words (int64 tensors holding uint32 values) under key (k0, k1).

    Returns the four output words as int64 tensors in [0, 2**32). This is Random123's
    philox4x32_R(n_rounds, ctr, key) and triton's ``philox_impl`` for 32-bit counters.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def randint(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """triton's ``tl.randint(seed, offsets)`` for an int64 seed and int64 offsets.

    Returns the uint32 draws as an int64 tensor of offsets' shape (values in [0, 2**32)).
    """
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo = offsets & MASK32
    hi = (offsets >> 32) & MASK32  # arithmetic shift, then the low word: two's complement bits
    zero = torch.zeros_like(lo)
    return philox4x32((lo, hi, zero, zero), (seed & MASK32, seed >> 32))[0]


def threshold(dropout_p: float) -> int:
    """The uint32 threshold: an element is kept iff its draw >= threshold."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return min(int(dropout_p * 2.0 ** 32), MASK32)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def draw_seed_offset(device: torch.device, numel: int) -> Tuple[int, int]:
    """(seed, philox_offset) for one dropout call that draws `numel` numbers on `device`.

    CPU: seed = a 63-bit integer from torch's default CPU generator (so ``torch.manual_seed``
    makes a run reproducible and successive calls differ), offset 0. CUDA: FlashAttention 2's
    scheme on the device's default generator: seed = its initial seed, offset = its current
    Philox offset, which is then advanced past the numbers used (rounded up to a multiple of 4,
    as torch's own CUDA kernels do). The seed is returned as a signed int64 (same bits).
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        seed, offset = gen.initial_seed(), gen.get_offset()
        gen.set_offset(offset + _round_up(max(int(numel), 0), 4))
        if seed >= 2 ** 63:
            seed -= 2 ** 64
        return int(seed), int(offset)
    seed = torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64).item()
    return int(seed), 0


def keep_mask(seed: int, offset: int, dropout_p: float, n_seqs: int, heads: int, max_q: int,
              max_k: int, device=None) -> torch.Tensor:
    """The keep mask of the contract above, bool [n_seqs, heads, max_q, max_k] on `device`.

    For the padded layout pass max_q = max_k = L; for varlen max_seqlen_q and max_seqlen_k
    (entries beyond a sequence's lengths are defined but never used). The contract's offset of
    element (s, h, i, j) is `offset` plus its row-major index in this grid, so the draws are taken
    over a flat range, in chunks to bound the int64 temporaries.
    """
    thr = threshold(dropout_p)
    out = torch.empty(n_seqs, heads, max_q, max_k, dtype=torch.bool, device=device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        end = min(start + _CHUNK, flat.numel())
        offsets = torch.arange(start, end, dtype=torch.int64, device=device) + int(offset)
        flat[start:end] = randint(seed, offsets) >= thr
    return out


__all__ = ["philox4x32", "randint", "threshold", "draw_seed_offset", "keep_mask"]
