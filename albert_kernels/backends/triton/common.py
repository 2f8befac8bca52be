"""Helpers shared by the Triton kernels of this backend (nothing op-specific lives here).

``mma`` is the one place that calls ``tl.dot``. On a GPU it is a plain ``tl.dot`` with fp32
accumulation: fp16/bf16 operands run on tensor cores (mma.sync on sm_80, wgmma on sm_90), fp32
operands use ``input_precision="ieee"`` (true fp32 FMA, no TF32: TF32's 10-bit mantissa would not
hold fp32 results to the error budget of docs/correctness.md).

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU verification) ``tl.dot`` is wrong for
bfloat16: the interpreter stores bf16 as uint16 bit patterns and its ``create_dot`` multiplies
the bit patterns (triton-lang/triton#11584; upstream declined the fix, #11585: "we just don't
support it yet"). So, only there, the operands are first converted (bf16 -> fp64 is correct
there) and the product is taken in fp64, then rounded to fp32 once. The interpreter's dot is
numpy's matmul, whose fp32 summation order depends on the operands' shapes and layout: attention's
backward recomputes the forward's scores as K Q^T in other tile sizes, and at |q.k| ~ 1e5 the
two fp32 sums differed by an ulp (0.4% on P = exp2(s - lse), dv 5e-3 off). On the GPU the fp32
dot is a chain of FMAs over k in order, the same for Q K^T and K Q^T and any tile, so the
recomputed scores round exactly as in forward; the fp64 product gives the interpreter that
property (every product of fp32 or bf16 values is exact in fp64; the fp64 sum of <= 128 of them
rounds to the same fp32 value in any order). The GPU path itself (bf16 operands into the MMA) is compiled ahead of time for sm_80 and
sm_90 by ``aot.py``.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once at import, like triton itself does: the interpreter replaces kernels at import time.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRETING)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation. a [M, K], b [K, N] in fp16/bf16/fp32, acc fp32 [M, N]."""
    if _UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), acc.to(tl.float64),
                      input_precision="ieee").to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
