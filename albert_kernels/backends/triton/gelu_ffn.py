"""Triton linear + GELU and ALBERT's feed-forward block, forward and backward, on one GEMM kernel.

    linear_gelu(x, W, b) = gelu(x @ W^T + b)                     x [M, K], W [N, K], b [N]
    gelu_ffn(x, W1, b1, W2, b2) = linear_gelu(x, W1, b1) @ W2^T + b2

Every product is ``_matmul_kernel`` (C = A @ B, any strides, fp32 accumulation, autotuned per
M, N, K, dtype and variant, AUTOTUNE_KEY), specialised by two constexprs: what it does to A tiles
as they are loaded (PROLOGUE) and what it does to the accumulator before its single store
(EPILOGUE). The GELU flavour
("tanh" = transformers' gelu_new, "none" = erf) is a runtime flag, so each (PROLOGUE, EPILOGUE)
pair is one compiled kernel per config and dtype, not two.

Saved for backward: the pre-activation z = x @ W^T + b (in the input dtype) rather than
recomputing it: recomputing costs a whole GEMM (2*M*N*K FLOPs), saving costs one [M, N] store.
The activation is applied to z rounded to the input dtype, the tensor that is saved, so backward
differentiates exactly the function forward computed. gelu_ffn also keeps h = gelu(z), the input
of its second GEMM, for dW2.

Backward, with GELU's derivative fused into the gradient GEMMs:
  linear_gelu: dx = (dy * gelu'(z)) @ W, the product dz = dy * gelu'(z) formed in the A prologue
               (and stored once, by the programs of the first output column block); then
               dW = dz^T @ x and db = sum(dz) from the same kernel (row sums of A).
  gelu_ffn:    dW2 = dy^T @ h, db2 = sum(dy);  dz = (dy @ W2) * gelu'(z) in the epilogue;
               dx = dz @ W1;  dW1 = dz^T @ x, db1 = sum(dz).
Every reduction is inside one program in a fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..higher_order import functorch_active, reference_grads
from ..reference import gelu_ffn as reference_gelu_ffn, linear_gelu as reference_linear_gelu
from ..reference.gelu_ffn import _gelu_and_grad
from .common import INTERPRETING, ceil_div, exp_f32, mma

# PROLOGUE: what happens to an A tile as it is loaded.
PRO_NONE = tl.constexpr(0)       # A as is
PRO_GELU_GRAD = tl.constexpr(1)  # A * gelu'(Z), Z laid out like A; also stored to DZ (pid_n == 0)
# EPILOGUE: what happens to the fp32 accumulator before the store to C.
EPI_NONE = tl.constexpr(0)       # C = acc
EPI_BIAS = tl.constexpr(1)       # C = acc + bias
EPI_BIAS_GELU = tl.constexpr(2)  # Z = acc + bias (stored, input dtype); C = gelu(Z)
EPI_GELU_GRAD = tl.constexpr(3)  # C = acc * gelu'(Z), Z laid out like C

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
GELU_COEF = tl.constexpr(0.044715)


GELU_CLAMP = tl.constexpr(30.0)
# erfc(a) = t exp(-a^2 + ERFC_C + t P(t)), t = 1 / (1 + a / 2), a >= 0: Numerical Recipes' erfcc
# (Press et al., section 6.2), relative error < 1.2e-7 everywhere; P is written out in _erfc_nonneg.
ERFC_C = tl.constexpr(-1.26551223)


@triton.jit
def _erfc_nonneg(a):
    """erfc(a) for a >= 0 with fp32 relative accuracy in the tail (where 1 - erf(a) is 0).
    exp(-a^2) and exp(P(t) - err) are separate factors, err = the rounding of a^2 (fma), so no
    rounding of a large exponent sum is magnified (libdevice's erfc has no interpreter twin).
    The exponentials are exp_f32 (tl.exp would round -a^2 * log2(e) at a^2's magnitude, undoing
    the split) and t is a correctly rounded division (a plain `/` compiles to div.full, 2 ulp).
    a is clamped to 12, where exp(-a^2) is already 0 in fp32: a^2 never overflows."""
    a = tl.minimum(a, 12.0)
    t = tl.math.div_rn(1.0, 1.0 + 0.5 * a)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    a2 = a * a
    a2_err = tl.fma(a, a, -a2)
    return t * exp_f32(-a2) * exp_f32(p * t + ERFC_C - a2_err)


@triton.jit
def _phi(z):
    """Phi(z) = 0.5 erfc(-z / sqrt(2)) of fp32 z: 0.5 (1 + erf) where z >= 0, the erfc tail below
    (1 + erf(z / sqrt(2)) cancels there)."""
    w = z * INV_SQRT_2
    return tl.where(z >= 0, 0.5 * (1.0 + tl.math.erf(w)), 0.5 * _erfc_nonneg(tl.abs(w)))


@triton.jit
def _sigmoid_2u(z):
    """(s, e r^2) for the tanh GELU of fp32 z: s = sigmoid(2u) = 0.5 (1 + tanh(u)),
    u = sqrt(2/pi) (z + 0.044715 z^3), and e r^2 = s (1 - s), from e = exp(-|2u|) and
    r = 1 / (1 + e): s = 1 - e r (u >= 0: exactly 1 where e = 0, whatever the division's last
    bit) or e r (u < 0). No 1 - s and no 1 + tanh is formed, so
    neither tail cancels; z is clamped to +-30 first (e underflows to 0 beyond), so z^3 never
    overflows (bf16 maximum) and no 0 * inf appears in the derivative."""
    zc = tl.minimum(tl.maximum(z, -GELU_CLAMP), GELU_CLAMP)
    two_u = 2.0 * SQRT_2_OVER_PI * (zc + GELU_COEF * zc * zc * zc)
    e = tl.exp(-tl.abs(two_u))
    r = 1.0 / (1.0 + e)
    er = e * r
    return tl.where(two_u >= 0, 1.0 - er, er), er * r


@triton.jit
def _gelu(z, gelu_tanh):
    """GELU of fp32 z: tanh approximation when gelu_tanh != 0, else the exact erf form."""
    if gelu_tanh != 0:
        s, _ = _sigmoid_2u(z)
        g = z * s
    else:
        g = z * _phi(z)
    return g


@triton.jit
def _gelu_grad(z, gelu_tanh):
    """d gelu / dz of fp32 z, same flavour switch as _gelu."""
    if gelu_tanh != 0:
        s, er2 = _sigmoid_2u(z)
        zc = tl.minimum(tl.maximum(z, -GELU_CLAMP), GELU_CLAMP)  # exact: er2 = 0 beyond
        d = s + zc * er2 * (2.0 * SQRT_2_OVER_PI) * (1.0 + zc * zc * (3.0 * GELU_COEF))
    else:
        # exp(-z^2 / 2) = exp(-h) (1 - h_err) to fp32 accuracy, h_err the rounding of h (as in
        # _erfc_nonneg); z clamped to +-30 (exactly 0 beyond), so h never overflows to inf
        zc = tl.minimum(tl.maximum(z, -GELU_CLAMP), GELU_CLAMP)
        half_z = 0.5 * zc
        h = half_z * zc
        h_err = tl.fma(half_z, zc, -h)
        d = _phi(z) + z * INV_SQRT_2PI * (exp_f32(-h) * (1.0 - h_err))
    return d


# Tiles for sm_80 and sm_90 (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). fp16/bf16 ones keep
# at most 64 accumulator elements per thread: the GELU epilogues hold several fp32 temporaries per
# element, and 128 per thread (e.g. 128x256 on 8 warps) spills. fp32 runs its dots on FMA units,
# whose operand tiles also live in registers: one small tile on 8 warps. `usable_configs` picks
# the list for the dtype and drops tiles whose pipeline buffers overflow the chip's shared memory.
_TILES_16BIT = [(128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
_TILES_FP32 = [(64, 64, 32, 8, 3)]


def _configs(tiles) -> list:
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


CONFIGS_16BIT, CONFIGS_FP32 = _configs(_TILES_16BIT), _configs(_TILES_FP32)
CONFIGS = CONFIGS_16BIT + CONFIGS_FP32


def shared_memory_estimate(config: triton.Config, elem_bytes: int) -> int:
    """Bytes of the A and B tile ring buffers (num_stages deep) that the pipeliner allocates."""
    kw = config.kwargs
    return (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elem_bytes * config.num_stages


# The GELU prologue / epilogues (the erfc- and sigmoid-based forms that stay exact in both tails)
# hold more fp32 temporaries per accumulator element: in 16-bit, tiles above 64 x 64 spill 48-1088
# bytes per thread on sm_80 / sm_90 (triton 3.6 and 3.8 AOT, 2026-11-30), so those variants keep
# the 64 x 64 tiles only. To be revisited with a GPU at hand (measure the bigger tiles' speed).
_GELU_MAX_TILE = 64 * 64


def usable_configs(configs, elem_bytes: int, shared_limit: int, gelu: bool = False) -> list:
    """The configs autotuning may pick for an element size on a chip with `shared_limit` bytes;
    `gelu`: the launch has a GELU prologue or epilogue (see _GELU_MAX_TILE)."""
    wanted = CONFIGS_FP32 if elem_bytes == 4 else CONFIGS_16BIT
    return [c for c in configs
            if any(c is w for w in wanted) and shared_memory_estimate(c, elem_bytes) <= shared_limit
            and not (gelu and elem_bytes < 4
                     and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > _GELU_MAX_TILE)]


def has_gelu(launch_kwargs) -> bool:
    """Whether a launch of _matmul_kernel (its PROLOGUE / EPILOGUE arguments) runs GELU code."""
    return (int(launch_kwargs.get("PROLOGUE", 0)) == int(PRO_GELU_GRAD.value)
            or int(launch_kwargs.get("EPILOGUE", 0)) in (int(EPI_BIAS_GELU.value), int(EPI_GELU_GRAD.value)))


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: `usable_configs` for this dtype and device. Under the interpreter (CPU
    verification, nothing to time) just the smallest tile of the dtype's list."""
    elem_bytes = named_args["A"].element_size()
    gelu = has_gelu({**kwargs, **named_args})
    if INTERPRETING:
        return [min(usable_configs(configs, elem_bytes, 1 << 30, gelu),
                    key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    from triton.runtime import driver
    limit = driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"]
    return usable_configs(configs, elem_bytes, limit, gelu)


# The autotune key: the shape, and the constexprs that select the code (a GELU prologue or epilogue
# prunes the tile list differently, see usable_configs, and runs at another speed); triton adds
# the operands' dtypes itself.
AUTOTUNE_KEY = ["M", "N", "K", "PROLOGUE", "EPILOGUE", "ROWSUM_A"]


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["gelu_tanh"])
def _matmul_kernel(
        A, B, C, BIAS, Z, DZ, ROWSUM, M, N, K, gelu_tanh,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_zm, stride_zn,
        stride_dzm, stride_dzk,
        PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, ROWSUM_A: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C [M, N] = epilogue(prologue(A [M, K]) @ B [K, N]); every operand has its own strides.

    Grid: one program per (BLOCK_M x BLOCK_N) tile of C, in groups of GROUP_M tile rows (so that
    consecutive programs share B tiles in L2). The accumulator is fp32, bias and GELU math fp32.
    BIAS [N]. Z: pre-activation, input dtype; laid out like A (PROLOGUE == PRO_GELU_GRAD, read)
    or like C (EPI_BIAS_GELU writes it, EPI_GELU_GRAD reads it). DZ [M, K]: the A tiles after the
    prologue, written by the programs of tile column 0. ROWSUM [M] (ROWSUM_A): sum over K of the
    A tiles after the prologue (a bias gradient when A is a transposed upstream gradient), also
    written by tile column 0. Row offsets (times a row stride) are 64-bit; K is walked by moving
    the pointers, so offsets inside a tile stay 32-bit.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    a_ptrs = A + rows * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + cols * stride_bn
    za_ptrs = Z + rows * stride_zm + offs_k[None, :] * stride_zn
    dz_ptrs = DZ + rows * stride_dzm + offs_k[None, :] * stride_dzk
    first_column = pid_n == 0

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE == PRO_GELU_GRAD:
            z = tl.load(za_ptrs, mask=a_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * _gelu_grad(z, gelu_tanh)).to(A.dtype.element_ty)
            tl.store(dz_ptrs, a, mask=a_mask & first_column)
            za_ptrs += BLOCK_K * stride_zn
            dz_ptrs += BLOCK_K * stride_dzk
        if ROWSUM_A:
            row_sum += tl.sum(a.to(tl.float32), 1)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == EPI_BIAS or EPILOGUE == EPI_BIAS_GELU:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == EPI_BIAS_GELU:
        z = acc.to(C.dtype.element_ty)
        tl.store(Z + rows * stride_zm + cols * stride_zn, z, mask=c_mask)
        acc = _gelu(z.to(tl.float32), gelu_tanh)
    if EPILOGUE == EPI_GELU_GRAD:
        z = tl.load(Z + rows * stride_zm + cols * stride_zn, mask=c_mask, other=0.0).to(tl.float32)
        acc = acc * _gelu_grad(z, gelu_tanh)
    tl.store(C + rows * stride_cm + cols * stride_cn, acc.to(C.dtype.element_ty), mask=c_mask)
    if ROWSUM_A:
        tl.store(ROWSUM + offs_m, row_sum.to(ROWSUM.dtype.element_ty), mask=m_ok & first_column)


def matmul(a: torch.Tensor, b: torch.Tensor, *, prologue: int = PRO_NONE, epilogue: int = EPI_NONE,
           bias=None, z=None, gelu_tanh: bool = True, rowsum: bool = False):
    """C = epilogue(prologue(a) @ b) for a [M, K], b [K, N] of one dtype, any strides.

    Returns (C, extra, sums): extra is z (EPI_BIAS_GELU, [M, N]), dz (PRO_GELU_GRAD, [M, K]) or
    None; sums the row sums [M] of prologue(a) when `rowsum`, else None.
    """
    prologue, epilogue = tl.constexpr(prologue).value, tl.constexpr(epilogue).value
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    extra = None
    if epilogue == EPI_BIAS_GELU:
        extra = z = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if prologue == PRO_GELU_GRAD:
        extra = torch.empty((m, k), dtype=a.dtype, device=a.device)
    sums = torch.empty(m, dtype=a.dtype, device=a.device) if rowsum else None
    if m == 0 or n == 0:
        _no_programs(a, z, prologue, gelu_tanh, extra, sums)
        return c, extra, sums
    dz = extra if prologue == PRO_GELU_GRAD else c
    z = z if z is not None else c
    grid = lambda meta: (ceil_div(m, meta["BLOCK_M"]) * ceil_div(n, meta["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, z, dz, sums if rowsum else c, m, n, k,
        int(gelu_tanh), a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1),
        PROLOGUE=prologue, EPILOGUE=epilogue, ROWSUM_A=rowsum)
    return c, extra, sums


def _no_programs(a, z, prologue, gelu_tanh, extra, sums) -> None:
    """No program runs when M or N is 0, but dz (PRO_GELU_GRAD) and the row sums of A do not
    depend on N: with N == 0 (an empty hidden or intermediate dim) they are formed here."""
    a32 = a.float()
    if prologue == PRO_GELU_GRAD:
        approximate = "tanh" if gelu_tanh else "none"
        extra.copy_(a32 * _gelu_and_grad(z.float(), approximate, True)[1])
        a32 = extra.float()
    if sums is not None:
        sums.copy_(a32.sum(1))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])  # not -1: the last dim may be 0


class _LinearGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gelu_tanh):
        x2 = _rows(x)
        y, z, _ = matmul(x2, weight.t(), epilogue=EPI_BIAS_GELU, bias=bias, gelu_tanh=gelu_tanh)
        ctx.save_for_backward(x, x2, weight, bias, z)  # x as given: for a double backward
        ctx.gelu_tanh, ctx.x_shape = gelu_tanh, x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x2, weight, bias, z = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that differentiates again
            approximate = "tanh" if ctx.gelu_tanh else "none"
            return reference_grads(reference_linear_gelu, (x, weight, bias, approximate),
                                   ctx.needs_input_grad, (dy,))
        dy2 = _rows(dy)
        dx, dz, _ = matmul(dy2, weight, prologue=PRO_GELU_GRAD, z=z, gelu_tanh=ctx.gelu_tanh)
        dw, _, db = matmul(dz.t(), x2, rowsum=True)
        return dx.reshape(ctx.x_shape), dw, db, None


class _GeluFfnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gelu_tanh):
        x2 = _rows(x)
        h, z, _ = matmul(x2, w1.t(), epilogue=EPI_BIAS_GELU, bias=b1, gelu_tanh=gelu_tanh)
        y, _, _ = matmul(h, w2.t(), epilogue=EPI_BIAS, bias=b2)
        ctx.save_for_backward(x, x2, w1, b1, w2, b2, z, h)  # x as given: for a double backward
        ctx.gelu_tanh, ctx.x_shape = gelu_tanh, x.shape
        return y.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, x2, w1, b1, w2, b2, z, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that differentiates again
            approximate = "tanh" if ctx.gelu_tanh else "none"
            return reference_grads(reference_gelu_ffn, (x, w1, b1, w2, b2, approximate),
                                   ctx.needs_input_grad, (dy,))
        dy2 = _rows(dy)
        dw2, _, db2 = matmul(dy2.t(), h, rowsum=True)
        dz, _, _ = matmul(dy2, w2, epilogue=EPI_GELU_GRAD, z=z, gelu_tanh=ctx.gelu_tanh)
        dx, _, _ = matmul(dz, w1)
        dw1, _, db1 = matmul(dz.t(), x2, rowsum=True)
        return dx.reshape(ctx.x_shape), dw1, db1, dw2, db2, None


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                approximate: str) -> torch.Tensor:
    """gelu(x @ weight.T + bias): x [..., K], weight [N, K], bias [N]; approximate "tanh"/"none".
    Inside a torch.func transform: the reference formula (backends/higher_order.py)."""
    if functorch_active():
        return reference_linear_gelu(x, weight, bias, approximate)
    with torch.cuda.device_of(x):  # triton launches on the current device
        return _LinearGeluFunction.apply(x, weight, bias.contiguous(), approximate == "tanh")


def gelu_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, approximate: str) -> torch.Tensor:
    """linear_gelu(x, w1, b1) @ w2.T + b2: x [..., H], w1 [I, H], w2 [H, I] -> [..., H].
    Inside a torch.func transform: the reference formula (backends/higher_order.py)."""
    if functorch_active():
        return reference_gelu_ffn(x, w1, b1, w2, b2, approximate)
    with torch.cuda.device_of(x):
        return _GeluFfnFunction.apply(x, w1, b1.contiguous(), w2, b2.contiguous(),
                                      approximate == "tanh")
