"""Derivatives beyond the first, and torch.func transforms, for the kernel backends.

The cpp, cuda and triton backends compute each op's gradient with a backward kernel of their own,
which autograd cannot differentiate again. So that no higher derivative is silently zero:

- **Double backward** (``torch.autograd.grad(..., create_graph=True)``: gradient penalties,
  Hessian-vector products, ``gradgradcheck``): autograd runs a backward with grad mode on exactly
  when it records a graph of that backward. The ops' backwards then compute their gradients
  with :func:`reference_grads` instead of the kernel: the reference backend's formula (the
  definition of right; backends/reference) recomputed on the same saved inputs under autograd,
  whose result is differentiable again, with respect to the inputs and to the upstream gradient.
  A plain ``.backward()`` runs the kernels as before.
- **torch.func transforms** (grad, vjp, jacrev, jvp, vmap): the kernels' autograd formulas are no
  functorch rules, so while a transform is active (:func:`functorch_active`) the backend
  functions call the reference formula, which every transform supports.

Both compute the same function as the kernels (within the dtype's rounding); they are slower,
which only these uses pay.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def functorch_active() -> bool:
    """True inside a torch.func transform (grad, vjp, jacrev, jvp, vmap); never under
    torch.compile's tracing, which sees through the transforms itself."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def reference_grads(fn: Callable, args: Sequence, needs_grad: Sequence[bool],
                    grad_outputs: Sequence[torch.Tensor]) -> tuple:
    """Gradients of ``fn(*args)`` (a reference-backend formula with one output) with respect to
    the tensors in `args` whose `needs_grad` entry is True, given the upstream gradient
    ``grad_outputs[0]``, as tensors that can be differentiated again (with respect to `args`
    and the upstream gradient).

    ``torch.func.vjp`` differentiates with respect to these arguments only: an input computed
    from a weight that is also an argument (ALBERT's layers share their weights) does not add
    that earlier use to the weight's gradient, as it would with ``torch.autograd.grad``. The
    vjp runs on the outer autograd graph, so the result carries it. Returns one entry per arg:
    the gradient, or None where none was asked."""
    wrt = [i for i, (a, need) in enumerate(zip(args, needs_grad))
           if need and isinstance(a, torch.Tensor)]
    grads: list = [None] * len(args)
    if not wrt:
        return tuple(grads)

    def of_differentiable(*values):
        full = list(args)
        for i, value in zip(wrt, values):
            full[i] = value
        return fn(*full)

    with torch.enable_grad():
        _, vjp = torch.func.vjp(of_differentiable, *[args[i] for i in wrt])
        found = vjp(grad_outputs[0])
    for i, g in zip(wrt, found):
        grads[i] = g
    return tuple(grads)
