"""The op cases every backend is held to (docs/correctness.md): shapes, dtypes, masks and layouts.

Shared by the test suite and ``albert-kernels verify`` so that both check the same things.
A case builds its inputs for a (dtype, device); ``run_case`` compares a backend with the
reference under the error budget, forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops
from .budget import Budget, compare_op

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Key padding masks: right / left padding with random lengths, one row all padding."""
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=gen)
    if kind == "all_pad_row":
        lengths[0] = 0
    pos = torch.arange(seqlen)
    if kind == "left":
        mask = pos[None, :] >= (seqlen - lengths)[:, None]
    else:
        mask = pos[None, :] < lengths[:, None]
    return mask.to(device)


def _attention_case(batch, heads, seqlen, head_dim, mask=None, transposed=False):
    def make(dtype, device, gen):
        if transposed:  # [B, L, H, D] storage viewed as [B, H, L, D]: a non-contiguous layout
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
    return make, name


def _varlen_case(lengths, heads, head_dim):
    def make(dtype, device, gen):
        total = sum(lengths)
        q, k, v = (_randn(gen, total, heads, head_dim, dtype=dtype, device=device) for _ in range(3))
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()),
                          dtype=torch.int32, device=device)
        return [q, k, v, cu, max(lengths) if lengths else 0], {}
    return make, f"lengths={list(lengths)} H{heads} D{head_dim}"


def _add_ln_case(shape, sliced=False):
    def make(dtype, device, gen):
        n = shape[-1]
        if sliced:  # rows taken from a wider tensor: last dim contiguous, rows strided
            x = _randn(gen, *shape[:-1], n + 8, dtype=dtype, device=device, grad=False)[..., :n]
            x.requires_grad_()
        else:
            x = _randn(gen, *shape, dtype=dtype, device=device)
        r = _randn(gen, *shape, dtype=dtype, device=device)
        w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype).to(device).requires_grad_()
        b = _randn(gen, n, dtype=dtype, device=device, scale=0.1)
        return [x, r, w, b, 1e-12], {}
    return make, f"{list(shape)}" + (" sliced" if sliced else "")


def _linear_gelu_case(tokens, k, n, approximate="tanh", transposed_x=False):
    def make(dtype, device, gen):
        if transposed_x:
            x = _randn(gen, k, tokens, dtype=dtype, device=device, grad=False).t().requires_grad_()
        else:
            x = _randn(gen, tokens, k, dtype=dtype, device=device)
        w = _randn(gen, n, k, dtype=dtype, device=device, scale=k ** -0.5)
        b = _randn(gen, n, dtype=dtype, device=device, scale=0.1)
        return [x, w, b], {"approximate": approximate}
    return make, f"[{tokens}, {k}] -> {n} {approximate}" + (" x transposed" if transposed_x else "")


def _gelu_ffn_case(tokens, hidden, inner, approximate="tanh"):
    def make(dtype, device, gen):
        x = _randn(gen, tokens, hidden, dtype=dtype, device=device)
        w1 = _randn(gen, inner, hidden, dtype=dtype, device=device, scale=hidden ** -0.5)
        b1 = _randn(gen, inner, dtype=dtype, device=device, scale=0.1)
        w2 = _randn(gen, hidden, inner, dtype=dtype, device=device, scale=inner ** -0.5)
        b2 = _randn(gen, hidden, dtype=dtype, device=device, scale=0.1)
        return [x, w1, b1, w2, b2], {"approximate": approximate}
    return make, f"[{tokens}, {hidden}] -> {inner} {approximate}"


def _cases() -> list[OpCase]:
    out = []
    A = lambda *a, quick=True, **kw: OpCase("attention", *reversed(_attention_case(*a, **kw)), quick)
    out += [A(2, 2, 16, 64), A(2, 2, 7, 32, mask="right"), A(3, 2, 16, 64, mask="left"),
            A(3, 2, 16, 64, mask="all_pad_row"), A(1, 1, 1, 64), A(0, 2, 8, 64),
            A(2, 2, 16, 128, mask="right", transposed=True),
            A(2, 3, 113, 64, mask="right", quick=False), A(1, 2, 512, 64, mask="right", quick=False),
            A(2, 2, 128, 128, mask="left", quick=False)]
    V = lambda *a, quick=True: OpCase("varlen_attention", *reversed(_varlen_case(*a)), quick)
    out += [V([5, 1, 16], 2, 64), V([0, 7, 3], 2, 32), V([1], 1, 128), V([9, 0], 2, 64),
            V([113, 40, 1], 2, 64, quick=False), V([512, 128], 2, 64, quick=False),
            V([77, 33], 2, 128, quick=False)]
    L = lambda *a, quick=True, **kw: OpCase("add_layer_norm", *reversed(_add_ln_case(*a, **kw)), quick)
    out += [L((4, 64)), L((3, 5, 100)), L((1, 768)), L((0, 768)), L((7, 96), sliced=True),
            L((33, 768), quick=False), L((17, 1000), quick=False), L((9, 1536), quick=False),
            L((8, 1024), quick=False), L((4, 2048), quick=False), L((3, 4096), quick=False),
            L((16, 768), sliced=True, quick=False)]
    G = lambda *a, quick=True, **kw: OpCase("linear_gelu", *reversed(_linear_gelu_case(*a, **kw)), quick)
    out += [G(8, 32, 64), G(7, 48, 40, "none"), G(1, 64, 32), G(0, 32, 64),
            G(5, 32, 48, transposed_x=True),
            G(113, 768, 3072, quick=False), G(64, 256, 1000, "none", quick=False),
            G(33, 1024, 4096, quick=False)]
    F = lambda *a, quick=True: OpCase("gelu_ffn", *reversed(_gelu_ffn_case(*a)), quick)
    out += [F(8, 32, 64), F(5, 40, 72, "none"), F(1, 16, 64),
            F(64, 768, 3072, quick=False), F(17, 1000, 1536, "none", quick=False)]
    return out


CASES: list[OpCase] = _cases()


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
