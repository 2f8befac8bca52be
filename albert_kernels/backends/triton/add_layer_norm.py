"""Triton residual add + LayerNorm: y = LayerNorm(x + residual) * weight + bias over the last dim.

Rows are x.reshape(-1, N) (a view when possible: rows may be strided, the last dim has stride 1).
Statistics are fp32 whatever the input dtype, and the sum s = x + residual is formed in fp32 (never
rounded to the input dtype, where it may overflow). Each row is shifted by its first element,
s' = s - s_0, before its two-pass mean and variance: a constant row gives exactly mean 0, variance
0, output = bias, and a large common offset costs no accuracy (the mean of the unshifted row is
off by a rounding step, which rstd, up to 1/sqrt(eps) = 1e6, would magnify). Saved for backward:
x, residual, weight, and per row the fp32 mean of s' (the shifted mean) and rstd; backward forms
s_0 and s' again exactly as forward did (the sum is recomputed instead of stored: one fewer
[M, N] tensor written in forward and kept alive until backward).

Backward is deterministic: dx (also d residual) per row tile; dweight and dbias reduced in two
stages, partial sums per program into an fp32 [G, N] buffer, then a second kernel that adds the G
partials in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..higher_order import functorch_active, reference_grads
from ..reference import add_layer_norm as reference_add_layer_norm
from .common import ceil_div


@triton.jit
def _row_shift(X, RES, rows64, stride_xm, stride_rm, row_ok):
    """s_0 = x[row, 0] + residual[row, 0] in fp32, as a [BLOCK_M, 1] column (0 past M)."""
    x0 = tl.load(X + rows64 * stride_xm, mask=row_ok[:, None], other=0.0).to(tl.float32)
    r0 = tl.load(RES + rows64 * stride_rm, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return x0 + r0


@triton.jit
def _add_ln_fwd_kernel(X, RES, W, B, Y, MEAN, RSTD, M, N, stride_xm, stride_rm, stride_ym, eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_M rows per program, a whole row (BLOCK_N = next_power_of_2(N), masked) in registers.

    X, RES, Y: [M, N] rows at row * stride_*m (64-bit), columns contiguous. W, B: [N].
    MEAN (the mean of s - s_0, s_0 = x[row, 0] + residual[row, 0]), RSTD: fp32 [M], written
    for backward. All arithmetic in fp32.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.load(RES + rows64 * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    shift = _row_shift(X, RES, rows64, stride_xm, stride_rm, row_ok)
    s = tl.where(ok, x + r - shift, 0.0)
    n_float = N * 1.0  # N may arrive as a constexpr (N == 1): no .to()
    # Correctly rounded divisions and square root: a plain `/` compiles to div.full (2 ulp) and
    # tl.sqrt to sqrt.approx; rstd's error reaches every output element.
    mean = tl.math.div_rn(tl.sum(s, 1), n_float)
    centered = tl.where(ok, s - mean[:, None], 0.0)
    variance = tl.math.div_rn(tl.sum(centered * centered, 1), n_float)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64 * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _add_ln_bwd_dx_kernel(X, RES, W, DY, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, M, N,
                          stride_xm, stride_rm, stride_dym, stride_dxm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx for the row tiles pid, pid + G, pid + 2G, ... (G programs), and this program's partial
    dweight = sum(dy * xhat), dbias = sum(dy) over those rows, stored in row pid of the fp32
    [G, N] buffers DW_PARTIAL, DB_PARTIAL.

    xhat = (x + residual - s_0 - mean) * rstd is recomputed from the saved fp32 shifted mean
    and rstd, s_0 formed as forward formed it;
    dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)), all in fp32.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        r = tl.load(RES + rows64 * stride_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        shift = _row_shift(X, RES, rows64, stride_xm, stride_rm, row_ok)
        xhat = tl.where(ok, (x + r - shift - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        n_float = N * 1.0
        c1 = tl.math.div_rn(tl.sum(xhat * wdy, 1), n_float)  # not div.full, as in forward
        c2 = tl.math.div_rn(tl.sum(wdy, 1), n_float)
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64 * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


@triton.jit
def _add_ln_bwd_dwdb_kernel(DW_PARTIAL, DB_PARTIAL, DW, DB, G, N,
                            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second stage: DW[n] = sum_g DW_PARTIAL[g, n] (and DB likewise) for BLOCK_N columns per
    program, in fixed order (chunks of BLOCK_G rows, fp32), so the result is bitwise repeatable."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        ok = (g < G)[:, None] & col_ok[None, :]
        offs = g[:, None] * N + cols[None, :]
        dw += tl.sum(tl.load(DW_PARTIAL + offs, mask=ok, other=0.0), 0)
        db += tl.sum(tl.load(DB_PARTIAL + offs, mask=ok, other=0.0), 0)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_ok)
    tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_ok)


# ------------------------------------------------------------------------------------------------
REDUCE_BLOCK_G, REDUCE_BLOCK_N = 32, 128


def row_config(n: int) -> dict:
    """Rows per program and warps for a row length n: about 4096 elements per program."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(8, max(1, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def _num_partials(n_tiles: int, device: torch.device) -> int:
    """G, the number of backward programs (and partial rows): enough to fill the GPU twice."""
    if device.type == "cuda":
        return max(1, min(n_tiles, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 2))  # the interpreter runs programs one after the other


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        shape, n = x.shape, x.shape[-1]
        x2, r2 = _rows(x), _rows(residual)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        cfg = row_config(n)
        if m > 0:
            _add_ln_fwd_kernel[(ceil_div(m, cfg["BLOCK_M"]),)](
                x2, r2, weight, bias, y, mean, rstd, m, n, x2.stride(0), r2.stride(0), y.stride(0),
                eps, **cfg)
        # x, residual as given too: a double backward differentiates through them
        ctx.save_for_backward(x, residual, x2, r2, weight, bias, mean, rstd)
        ctx.shape, ctx.eps = shape, eps
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x, residual, x2, r2, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that differentiates again
            return reference_grads(reference_add_layer_norm, (x, residual, weight, bias, ctx.eps),
                                   ctx.needs_input_grad, (dy,))
        m, n = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        cfg = row_config(n)
        groups = _num_partials(ceil_div(m, cfg["BLOCK_M"]), x2.device)
        dw_partial = torch.zeros((groups, n), dtype=torch.float32, device=x2.device)
        db_partial = torch.zeros_like(dw_partial)
        if m > 0:
            _add_ln_bwd_dx_kernel[(groups,)](
                x2, r2, weight, dy2, dx, mean, rstd, dw_partial, db_partial, m, n,
                x2.stride(0), r2.stride(0), dy2.stride(0), dx.stride(0), **cfg)
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        _add_ln_bwd_dwdb_kernel[(ceil_div(n, REDUCE_BLOCK_N),)](
            dw_partial, db_partial, dw, db, groups, n, BLOCK_G=REDUCE_BLOCK_G,
            BLOCK_N=REDUCE_BLOCK_N, num_warps=4)
        dx = dx.reshape(ctx.shape)
        return dx, dx, dw, db, None


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x + residual): x, residual [..., N] (same dtype), weight, bias [N].
    Inside a torch.func transform: the reference formula (backends/higher_order.py)."""
    if functorch_active():
        return reference_add_layer_norm(x, residual, weight, bias, eps)
    with torch.cuda.device_of(x):  # triton launches on the current device
        return _AddLayerNormFunction.apply(x, residual, weight.contiguous(), bias.contiguous(), eps)
