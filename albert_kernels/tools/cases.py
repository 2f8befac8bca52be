"""The op cases every backend is held to (docs/correctness.md): shapes, dtypes, masks and layouts.

Shared by the test suite and ``albert-kernels verify`` so that both check the same things.
A case builds its inputs for a (dtype, device); ``run_case`` compares a backend with the
reference under the error budget, forward and backward.

To add a case, add a row to ``CASES`` (the functions ``attention_case`` ... ``gelu_ffn_case``
say what their arguments mean). To cover a new op, write one such function returning an
:class:`OpCase` whose ``make`` builds the op's positional and keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import ops
from ..dtypes import DTYPES
from .budget import Budget, compare_op



@dataclass(frozen=True)
class OpCase:
    op: str                 # name of the public op in albert_kernels.ops
    name: str               # short description of the shapes / mask / layout
    make: Callable          # (dtype, device, generator) -> (args, kwargs)
    quick: bool = True      # small enough for the Triton interpreter and `verify --quick`


def _randn(gen, *shape, dtype, device, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)
    return t.requires_grad_(grad)


def _mask(kind: str, batch: int, seqlen: int, gen, device):
    """bool [batch, seqlen] key padding mask with random lengths in [1, seqlen]: "right" (real
    tokens first), "left" (real tokens last), "all_pad_row" (right, and row 0 all padding)."""
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
    if kind == "all_pad_row":
        lengths[0] = 0
    pos = torch.arange(seqlen)
    if kind == "left":
        mask = pos[None, :] >= (seqlen - lengths)[:, None]
    else:
        mask = pos[None, :] < lengths[:, None]
    return mask.to(device)


def attention_case(batch: int, heads: int, seqlen: int, head_dim: int, *,
                   mask: Optional[str] = None, transposed: bool = False,
                   quick: bool = True) -> OpCase:
    """``ak.attention`` on q, k, v [batch, heads, seqlen, head_dim].

    mask: None (no key padding mask) or a kind of :func:`_mask`. transposed: q, k, v are
    [B, L, H, D] storage viewed as [B, H, L, D] (a non-contiguous layout).
    """
    def make(dtype, device, gen):
        if transposed:
            q, k, v = (_randn(gen, batch, seqlen, heads, head_dim, dtype=dtype, device=device,
                              grad=False).transpose(1, 2).requires_grad_() for _ in range(3))
        else:
            q, k, v = (_randn(gen, batch, heads, seqlen, head_dim, dtype=dtype, device=device)
                       for _ in range(3))
        kw = {}
        if mask is not None:
            kw["key_padding_mask"] = _mask(mask, batch, seqlen, gen, device)
        return [q, k, v], kw
    name = f"B{batch} H{heads} L{seqlen} D{head_dim}" + (f" mask={mask}" if mask else "") + \
        (" transposed" if transposed else "")
    return OpCase("attention", name, make, quick)


def varlen_case(lengths: list[int], heads: int, head_dim: int, *, quick: bool = True) -> OpCase:
    """``ak.varlen_attention`` on sequences of these `lengths` packed into q, k, v [T, heads,
    head_dim], with cu_seqlens and max_seqlen built from them (zero lengths allowed)."""
    def make(dtype, device, gen):
        total = sum(lengths)
        q, k, v = (_randn(gen, total, heads, head_dim, dtype=dtype, device=device) for _ in range(3))
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()),
                          dtype=torch.int32, device=device)
        return [q, k, v, cu, max(lengths) if lengths else 0], {}
    return OpCase("varlen_attention", f"lengths={list(lengths)} H{heads} D{head_dim}", make, quick)


def add_layer_norm_case(shape: tuple, *, sliced: bool = False, quick: bool = True) -> OpCase:
    """``ak.add_layer_norm`` on x, residual of `shape`, weight and bias [shape[-1]], eps 1e-12.
    sliced: x's rows are taken from a wider tensor (last dim contiguous, rows strided)."""
    def make(dtype, device, gen):
        n = shape[-1]
        if sliced:
            x = _randn(gen, *shape[:-1], n + 8, dtype=dtype, device=device, grad=False)[..., :n]
            x.requires_grad_()
        else:
            x = _randn(gen, *shape, dtype=dtype, device=device)
        r = _randn(gen, *shape, dtype=dtype, device=device)
        w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).to(device).requires_grad_()
        b = _randn(gen, n, dtype=dtype, device=device, scale=0.1)
        return [x, r, w, b, 1e-12], {}
    return OpCase("add_layer_norm", f"{list(shape)}" + (" sliced" if sliced else ""), make, quick)


def linear_gelu_case(tokens: int, k: int, n: int, approximate: str = "tanh", *,
                     transposed_x: bool = False, quick: bool = True) -> OpCase:
    """``ak.linear_gelu`` on x [tokens, k], weight [n, k], bias [n] with this GELU.
    transposed_x: x is a [k, tokens] tensor transposed (non-contiguous)."""
    def make(dtype, device, gen):
        if transposed_x:
            x = _randn(gen, k, tokens, dtype=dtype, device=device, grad=False).t().requires_grad_()
        else:
            x = _randn(gen, tokens, k, dtype=dtype, device=device)
        w = _randn(gen, n, k, dtype=dtype, device=device, scale=k ** -0.5)
        b = _randn(gen, n, dtype=dtype, device=device, scale=0.1)
        return [x, w, b], {"approximate": approximate}
    name = f"[{tokens}, {k}] -> {n} {approximate}" + (" x transposed" if transposed_x else "")
    return OpCase("linear_gelu", name, make, quick)


def gelu_ffn_case(tokens: int, hidden: int, inner: int, approximate: str = "tanh", *,
                  quick: bool = True) -> OpCase:
    """``ak.gelu_ffn`` on x [tokens, hidden] through [inner, hidden] and [hidden, inner]."""
    def make(dtype, device, gen):
        x = _randn(gen, tokens, hidden, dtype=dtype, device=device)
        w1 = _randn(gen, inner, hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
        b1 = _randn(gen, inner, dtype=dtype, device=device, scale=0.1)
        w2 = _randn(gen, hidden, inner, dtype=dtype, device=device, scale=inner ** -0.5)
        b2 = _randn(gen, hidden, dtype=dtype, device=device, scale=0.1)
        return [x, w1, b1, w2, b2], {"approximate": approximate}
    return OpCase("gelu_ffn", f"[{tokens}, {hidden}] -> {inner} {approximate}", make, quick)


# The table. One row per case; quick=False rows are the large shapes (skipped by `verify
# --quick` and by the Triton interpreter). Covered on purpose: empty batches and sequences,
# one token, odd sizes that are no multiple of a tile, ALBERT's real sizes, non-contiguous inputs.
CASES: list[OpCase] = [
    # attention(batch, heads, seqlen, head_dim)
    attention_case(2, 2, 16, 64),
    attention_case(2, 2, 7, 32, mask="right"),
    attention_case(3, 2, 16, 64, mask="left"),
    attention_case(3, 2, 16, 64, mask="all_pad_row"),
    attention_case(1, 1, 1, 64),
    attention_case(0, 2, 8, 64),
    attention_case(2, 2, 16, 128, mask="right", transposed=True),
    attention_case(2, 3, 113, 64, mask="right", quick=False),
    attention_case(1, 2, 512, 64, mask="right", quick=False),
    attention_case(2, 2, 128, 128, mask="left", quick=False),
    # varlen_attention(lengths, heads, head_dim)
    varlen_case([5, 1, 16], 2, 64),
    varlen_case([0, 7, 3], 2, 32),
    varlen_case([1], 1, 128),
    varlen_case([9, 0], 2, 64),
    varlen_case([113, 40, 1], 2, 64, quick=False),
    varlen_case([512, 128], 2, 64, quick=False),
    varlen_case([77, 33], 2, 128, quick=False),
    # add_layer_norm(shape)
    add_layer_norm_case((4, 64)),
    add_layer_norm_case((3, 5, 100)),
    add_layer_norm_case((1, 768)),
    add_layer_norm_case((0, 768)),
    add_layer_norm_case((7, 96), sliced=True),
    add_layer_norm_case((33, 768), quick=False),
    add_layer_norm_case((17, 1000), quick=False),
    add_layer_norm_case((9, 1536), quick=False),
    add_layer_norm_case((8, 1024), quick=False),
    add_layer_norm_case((4, 2048), quick=False),
    add_layer_norm_case((3, 4096), quick=False),
    add_layer_norm_case((16, 768), sliced=True, quick=False),
    # linear_gelu(tokens, k, n, approximate)
    linear_gelu_case(8, 32, 64),
    linear_gelu_case(7, 48, 40, "none"),
    linear_gelu_case(1, 64, 32),
    linear_gelu_case(0, 32, 64),
    linear_gelu_case(5, 32, 48, transposed_x=True),
    linear_gelu_case(113, 768, 3072, quick=False),
    linear_gelu_case(64, 256, 1000, "none", quick=False),
    linear_gelu_case(33, 1024, 4096, quick=False),
    # gelu_ffn(tokens, hidden, inner, approximate)
    gelu_ffn_case(8, 32, 64),
    gelu_ffn_case(5, 40, 72, "none"),
    gelu_ffn_case(1, 16, 64),
    gelu_ffn_case(1100, 32, 72, "none"),  # several row blocks in every dtype (256 or 1024 rows)
    gelu_ffn_case(64, 768, 3072, quick=False),
    gelu_ffn_case(17, 1000, 1536, "none", quick=False),
]


def case_applies(case: OpCase, backend: str, device: str) -> bool:
    """The Triton interpreter (Triton on CPU) is slow: it runs the quick cases only."""
    return case.quick or not (backend == "triton" and torch.device(device).type == "cpu")


def run_case(case: OpCase, backend: str, dtype: torch.dtype, device="cpu", *, seed: int = 0,
             backward: bool = True) -> dict[str, Budget]:
    """The case's op on `backend` vs the reference, forward and backward, under the budget."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = case.make(dtype, torch.device(device), gen)
    fn = getattr(ops, case.op)
    candidate = lambda *a: fn(*a, backend=backend, **kwargs)
    reference = lambda *a: fn(*a, backend="reference", **kwargs)
    return compare_op(candidate, reference, args, backward=backward, seed=seed)
