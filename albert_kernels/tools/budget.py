"""The error budget of docs/correctness.md, in one place: tests, ``albert-kernels verify`` and
the model comparisons all use it.

    gold   = reference computed in float64 on the same (upcast) inputs
    base   = reference computed in the candidate's dtype
    err    = max |candidate - gold|
    budget = 2 * max |base - gold| + floor(dtype),   floor = 4 * eps(dtype) * max |gold|
    pass  <=> err <= budget and the candidate has no NaN/inf where gold has none
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

FLOOR_ULPS = 4.0


@dataclass(frozen=True)
class Budget:
    error: float
    budget: float
    ok: bool
    nonfinite: bool = False

    @property
    def ratio(self) -> float:
        return self.error / self.budget if self.budget > 0 else (0.0 if self.error == 0 else float("inf"))

    def __str__(self) -> str:
        flag = "ok" if self.ok else "FAIL"
        extra = " (NaN/inf where gold is finite)" if self.nonfinite else ""
        return f"{flag}: error {self.error:.3e} <= budget {self.budget:.3e}?{extra}"


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def check_budget(candidate: torch.Tensor, base: torch.Tensor, gold: torch.Tensor,
                 dtype: torch.dtype | None = None, scale: float | None = None) -> Budget:
    """Hold `candidate` to the budget set by `base` (plain PyTorch in dtype) against `gold` (fp64).

    `scale` sets the magnitude the floor's ulps are taken of when it is larger than max |gold|:
    for a set of gradients compared together, the largest of them. A gradient that is zero
    analytically (a key bias: softmax ignores a constant shift) is then held to a few ulps of
    the set, not to zero.
    """
    dtype = dtype or candidate.dtype
    gold = gold.detach().to(torch.float64).cpu()
    cand = candidate.detach().to(torch.float64).cpu()
    base = base.detach().to(torch.float64).cpu()
    if cand.shape != gold.shape or base.shape != gold.shape:
        raise ValueError(f"shapes differ: candidate {list(cand.shape)}, base {list(base.shape)}, "
                         f"gold {list(gold.shape)}")
    finite = torch.isfinite(gold)
    nonfinite = bool((~torch.isfinite(cand) & finite).any())
    # Where gold itself is not finite, the candidate must match it exactly.
    if bool((~finite).any()) and not torch.equal(cand[~finite].nan_to_num(), gold[~finite].nan_to_num()):
        nonfinite = True
    cand, base, gold = cand[finite], base[finite], gold[finite]
    error = _max_abs(cand - gold)
    magnitude = max(_max_abs(gold), scale or 0.0, torch.finfo(dtype).tiny)
    floor = FLOOR_ULPS * torch.finfo(dtype).eps * magnitude
    # Where plain PyTorch overflows (base inf, gold finite) it sets no budget: those entries
    # are held to the floor, not to an infinite allowance.
    base_ok = torch.isfinite(base)
    budget = 2.0 * _max_abs(base[base_ok] - gold[base_ok]) + floor
    ok = (not nonfinite) and error <= budget
    return Budget(error, budget, ok, nonfinite)


def upcast(args: Sequence, dtype=torch.float64) -> list:
    """Floating tensors in `args` cast to `dtype` (leaves the rest), detached, grad kept if set."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            b = a.detach().to(dtype)
            b.requires_grad_(a.requires_grad)
            out.append(b)
        else:
            out.append(a)
    return out


def forward_and_grads(fn: Callable, args: Sequence, grad_out: torch.Tensor | None):
    """Run fn(*args); if grad_out is given, backprop it and return (out, grads of args needing it)."""
    out = fn(*args)
    grads = []
    if grad_out is not None:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))
    return out, grads


def compare_op(candidate: Callable, reference: Callable, args: Sequence, *,
               backward: bool = True, seed: int = 0) -> dict[str, Budget]:
    """Forward (and backward, with a random upstream gradient) of `candidate` vs the reference.

    `args` are the inputs in the dtype under test; floating tensors that should get gradients
    must have requires_grad set. Returns {"out": Budget, "grad0": ..., ...}.
    """
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    fresh = lambda xs: [a.detach().requires_grad_(a.requires_grad)
                        if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in xs]
    probe = reference(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_out = None
    if backward:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(probe.device)
    cand_out, cand_grads = forward_and_grads(candidate, fresh(args), grad_out)
    base_out, base_grads = forward_and_grads(reference, fresh(args), grad_out)
    gold_out, gold_grads = forward_and_grads(reference, upcast(args), grad_out)
    results = {"out": check_budget(cand_out, base_out, gold_out, dtype)}
    for i, (c, b, g) in enumerate(zip(cand_grads, base_grads, gold_grads)):
        results[f"grad{i}"] = check_budget(c, b, g, dtype)
    return results
