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

``mul_rn`` is a product rounded to fp32 on its own. Triton lets LLVM contract a multiply and a
following add into one fused multiply-add, which skips the product's rounding; where two kernels
must round a product identically (attention's scores in forward and backward), the product is
taken with ``mul_rn``: a PTX ``mul.rn.f32`` (inline assembly), which neither LLVM nor ptxas
contracts (PTX ISA: an explicit rounding modifier forbids the fusion). Not libdevice's
``__nv_fmul_rn``: Triton links libdevice with flush-to-zero on, and it compiles to
``mul.rn.ftz.f32``, which flushes subnormal products that the kernels' plain products keep. The
interpreter contracts nothing, so there it is a plain product.

``exp_f32`` is libdevice's ``expf`` (about 2 ulp at any argument): ``tl.exp`` compiles to
``ex2.approx`` of ``x * log2(e)`` rounded to fp32 first, a relative error of up to
|x| * 2^-24 (4e-6 at x = -87), where the GELU tails need fp32's own accuracy. Triton links
libdevice with flush-to-zero, so results below 2^-126 may come out as 0 (an absolute error under
1.2e-38). The interpreter's ``tl.exp`` is numpy's, already accurate.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Read once at import, like triton itself does: the interpreter replaces kernels at import time.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRETING)
_INTERPRETING = tl.constexpr(INTERPRETING)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation. a [M, K], b [K, N] in fp16/bf16/fp32, acc fp32 [M, N]."""
    if _UPCAST_DOT_OPERANDS:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), acc.to(tl.float64),
                      input_precision="ieee").to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def mul_rn(a, b):
    """a * b for fp32 a, b, rounded to nearest as a separate step (never fused into an fma)."""
    if _INTERPRETING:  # the interpreter: no contraction, and no inline assembly
        return a * b
    return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def exp_f32(x):
    """exp(x) for fp32 x to about 2 ulp (libdevice's expf on the GPU; see the module docstring)."""
    if _INTERPRETING:  # numpy's exp; the interpreter has no libdevice
        return tl.exp(x)
    return libdevice.exp(x)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
