"""Triton attention, FlashAttention-2 style, forward and backward, for two layouts.

* padded: q, k, v [B, H, L, D] with any strides whose last one is 1 (the model's [B, L, H, D]
  storage viewed as [B, H, L, D] included), and an optional key_padding_mask bool [B, L];
* packed varlen: q, k, v [T, H, D], sequence b owning rows cu_seqlens[b]:cu_seqlens[b+1].

One set of kernels serves both, with one compiled variant per (dtype, head dim): a program is
addressed by (block, head, sequence), and a small per-sequence table (SEQ_INFO, built by
``_Layout``) gives each sequence its first row, its length and its range of keys. In the padded
layout the per-batch key range [kv_lo, kv_hi) (first and last real key, precomputed from the
mask) lets every kernel skip key blocks that hold only padding, on either side (left or right
padding); inside the range the mask is still applied key by key, so any mask is handled. A
sequence with no real key has an empty range: its output rows and gradients are zeros.

Numerics: scores, the running max and sum of the online softmax, the saved log-sum-exp, delta and
all accumulators are fp32; the softmax runs in base 2 with log2(e) folded into the scale
(``qk_scale = scale * log2(e)``). Matrix products go through ``common.mma`` (tensor cores for
fp16/bf16, IEEE fp32 for fp32). Saved for backward: q, k, v, o and lse (fp32, base 2).
Backward is deterministic (no atomics): delta = rowsum(dO * O) in a preprocess kernel, dK/dV in
a kernel per key block, dQ in a kernel per query block.

Offsets: the per-program base offset (sequence, head, first row) is 64-bit; offsets inside a
block are 32-bit (a sequence's rows times a row stride stays far below 2^31).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import ceil_div, mma

LOG2E = 1.4426950408889634
SEQ_INFO_COLS = tl.constexpr(5)  # first row, length, kv_lo, kv_hi, number of real keys


@triton.jit
def _seq_bounds(SEQ_INFO, pid_b):
    """(first row, length, kv_lo, kv_hi) of sequence pid_b from SEQ_INFO int32 [B, SEQ_INFO_COLS].

    Keys outside [kv_lo, kv_hi) are padding; the range is empty (kv_lo >= kv_hi) for a sequence
    with no real key. The first row is 64-bit: it is multiplied by a row stride.
    """
    info = SEQ_INFO + SEQ_INFO_COLS * pid_b
    return (tl.load(info).to(tl.int64), tl.load(info + 1), tl.load(info + 2), tl.load(info + 3))


@triton.jit
def _ds_scale(SEQ_INFO, pid_b, sm_scale):
    """The factor from dS to dQ/dK: sm_scale, or exactly 0 for a sequence with one real key.

    Softmax over a single key is constant (p = 1), so its dS is exactly 0; computed as
    P * (dP - delta) with delta = rowsum(dO * O) it would be rounding noise (dP and delta are the
    same sum taken in different orders), where the true gradient is 0.
    """
    n_keys = tl.load(SEQ_INFO + SEQ_INFO_COLS * pid_b + 4)
    return tl.where(n_keys > 1, sm_scale, 0.0)


@triton.jit
def _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK):
    """bool [BLOCK_N]: key inside the real-key range and not padding (KEY_MASK nonzero)."""
    in_range = (offs_n >= kv_lo) & (offs_n < kv_hi)
    return in_range & (tl.load(KEY_MASK + offs_n, mask=in_range, other=0) != 0)


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, O, LSE, SEQ_INFO, KEY_MASK, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_ob, stride_oh, stride_om,
        stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O = softmax(Q K^T * scale, masked) V for one block of BLOCK_M queries of one head.

    Grid (cdiv(max_seqlen, BLOCK_M), H, B). Q, K, V, O: rows of HEAD_DIM contiguous elements,
    row r of (sequence b, head h) at b*stride_xb + h*stride_xh + (row0 + r)*stride_xm, with
    (row0, length, kv_lo, kv_hi) = SEQ_INFO[b] (stride_xb is 0 in the varlen layout, where row0 =
    cu_seqlens[b]). KEY_MASK: uint8, key n of sequence b at b*stride_maskb + n, nonzero = real key
    (a row of ones with stride_maskb = 0 when there is no mask). LSE: fp32, base-2 log-sum-exp of
    the scaled scores, at b*stride_lseb + h*stride_lseh + row0 + r; +inf for a row with no real
    key (whose output is 0). qk_scale = scale * log2(e).
    The program keeps q [BLOCK_M, HEAD_DIM] and the fp32 accumulator in registers and streams
    K/V blocks of BLOCK_N keys over the sequence's real-key range only.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    row0, seqlen, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= seqlen:  # varlen: this sequence is shorter than max_seqlen
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + row0 * stride_vm
    O += pid_b * stride_ob + pid_h * stride_oh + row0 * stride_om
    LSE += pid_b * stride_lseb + pid_h * stride_lseh + row0
    KEY_MASK += pid_b * stride_maskb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max of scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
        kt = tl.load(K + offs_n[None, :] * stride_km + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet: avoid -inf - -inf
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, tl.where(has_key, m_i + tl.math.log2(l_safe), float("inf")), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
        O, DO, DELTA, SEQ_INFO, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
        stride_dom, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA = rowsum(dO * O) in fp32 for BLOCK_M rows of one head; same layout as LSE.

    Grid (cdiv(max_seqlen, BLOCK_M), H, B); O and dO addressed as in the forward kernel.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    row0, seqlen, _, _ = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= seqlen:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seqlen
    o = tl.load(O + pid_b * stride_ob + pid_h * stride_oh + row0 * stride_om
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + pid_b * stride_dob + pid_h * stride_doh + row0 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_b * stride_lseb + pid_h * stride_lseh + row0 + offs_m, delta,
             mask=offs_m < seqlen)


@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_INFO, KEY_MASK, sm_scale, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
        stride_dkb, stride_dkh, stride_dkm, stride_dvb, stride_dvh, stride_dvm,
        stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV for one block of BLOCK_N keys of one head, looping over all BLOCK_M query blocks.

    Grid (cdiv(max_seqlen, BLOCK_N), H, B). Pointers as in the forward kernel; DK, DV have their
    own strides. The program owns its keys' dK and dV (fp32 accumulators, no atomics) and writes
    every one of them: zeros for a block that lies outside the real-key range. It recomputes
    P^T = exp2(K Q^T * qk_scale - lse) from the saved fp32 lse, then dV += P^T dO and
    dK += (P^T * (V dO^T - delta)) Q, scaled by sm_scale at the end (see _ds_scale).
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    row0, seqlen, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + row0 * stride_vm
    DO += pid_b * stride_dob + pid_h * stride_doh + row0 * stride_dom
    DK += pid_b * stride_dkb + pid_h * stride_dkh + row0 * stride_dkm
    DV += pid_b * stride_dvb + pid_h * stride_dvh + row0 * stride_dvm
    LSE += pid_b * stride_lseb + pid_h * stride_lseh + row0
    DELTA += pid_b * stride_lseb + pid_h * stride_lseh + row0
    KEY_MASK += pid_b * stride_maskb

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
    k = tl.load(K + offs_n[:, None] * stride_km + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # A block of padding only gets no query loop: its dK, dV are the zeros stored below.
    q_end = tl.where((start_n < kv_hi) & (start_n + BLOCK_N > kv_lo), seqlen, 0)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen
        qt = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        s_t = mma(k, qt, tl.zeros([BLOCK_N, BLOCK_M], tl.float32)) * qk_scale
        p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv = mma(p_t.to(do.dtype), do, dv)
        dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(qt.dtype), tl.trans(qt), dk)
    store_ok = offs_n[:, None] < seqlen
    dk = dk * _ds_scale(SEQ_INFO, pid_b, sm_scale)
    tl.store(DK + offs_n[:, None] * stride_dkm + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=store_ok)
    tl.store(DV + offs_n[:, None] * stride_dvm + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=store_ok)


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, SEQ_INFO, KEY_MASK, sm_scale, qk_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
        stride_dqb, stride_dqh, stride_dqm, stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for one block of BLOCK_M queries of one head, looping over the real-key range.

    Grid (cdiv(max_seqlen, BLOCK_M), H, B). The program owns its rows of dQ (fp32 accumulator):
    dQ = sm_scale * (P * (dO V^T - delta)) K, with P recomputed from the saved fp32 lse. A row
    with no real key gets dQ = 0.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    row0, seqlen, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= seqlen:
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + row0 * stride_vm
    DO += pid_b * stride_dob + pid_h * stride_doh + row0 * stride_dom
    DQ += pid_b * stride_dqb + pid_h * stride_dqh + row0 * stride_dqm
    LSE += pid_b * stride_lseb + pid_h * stride_lseh + row0
    DELTA += pid_b * stride_lseb + pid_h * stride_lseh + row0
    KEY_MASK += pid_b * stride_maskb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
        kt = tl.load(K + offs_n[None, :] * stride_km + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vm + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * qk_scale
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(kt.dtype), tl.trans(kt), dq)
    dq = dq * _ds_scale(SEQ_INFO, pid_b, sm_scale)
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Launch configurations: one per (kernel, head dim, dtype); no autotuning for attention. Chosen so
# that no config spills registers on sm_80 or sm_90 (checked by aot.py / test_triton_compile.py).
# fp32 runs its dots on FMA units, whose operand layouts take many more registers: small tiles.

def fwd_config(head_dim: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    if head_dim <= 32:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=8, num_stages=2)


def dkdv_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_N keys owned by a program, BLOCK_M queries streamed."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def dq_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_M queries owned by a program, BLOCK_N keys streamed."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32 if head_dim == 64 else 64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)


PREPROCESS_BLOCK_M = 64


class _Layout:
    """Where the sequences are, for the kernels: per-sequence SEQ_INFO int32 [B, 5] = (first row,
    length, kv_lo, kv_hi, number of real keys), the key mask, the LSE layout, and how to read
    strides of q-like tensors.

    Padded [B, H, L, D]: rows start at 0, length L, key range from the mask (or [0, L)).
    Varlen [T, H, D]: rows start at cu_seqlens[b], length and key range from cu_seqlens; the
    stride between sequences is 0 (the first row carries the offset).
    Without a mask, KEY_MASK is a row of ones read with stride 0, so every kernel has one variant.
    """

    def __init__(self, q: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 cu_seqlens: Optional[torch.Tensor], max_seqlen: int):
        self.varlen = cu_seqlens is not None
        device = q.device
        if self.varlen:
            self.batch, self.heads, self.seqlen = cu_seqlens.numel() - 1, q.shape[1], int(max_seqlen)
            starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
            self.seq_info = torch.stack([starts, lengths, torch.zeros_like(lengths), lengths,
                                         lengths], 1)
            total = q.shape[0]
            self.lse_shape, self.lse_strides = (self.heads, total), (0, total)
        else:
            self.batch, self.heads, self.seqlen = q.shape[0], q.shape[1], q.shape[2]
            info = torch.zeros(self.batch, 5, dtype=torch.int32, device=device)
            info[:, 1] = self.seqlen
            if key_padding_mask is None:
                info[:, 3:] = self.seqlen
            else:
                info[:, 2:4] = _real_key_range(key_padding_mask)
                info[:, 4] = key_padding_mask.sum(1)
            self.seq_info = info
            self.lse_shape = (self.batch, self.heads, self.seqlen)
            self.lse_strides = (self.heads * self.seqlen, self.seqlen)
        self.seq_info = self.seq_info.to(torch.int32).contiguous()
        if key_padding_mask is None:  # long enough for any key index, even past max_seqlen
            self.key_mask = torch.ones(max(q.shape[0] if self.varlen else self.seqlen, 1),
                                       dtype=torch.uint8, device=device)
            self.stride_maskb = 0
        else:
            self.key_mask = key_padding_mask.contiguous().view(torch.uint8)
            self.stride_maskb = self.key_mask.stride(0)

    def strides(self, t: torch.Tensor) -> tuple:
        """(stride between sequences, between heads, between rows) of q/k/v-shaped `t`."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def grid(self, block: int) -> tuple:
        return ceil_div(self.seqlen, block), self.heads, self.batch


def _real_key_range(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 [B, 2]: first real key and one past the last (lo >= hi when there is none)."""
    seqlen = key_padding_mask.shape[1]
    pos = torch.arange(seqlen, device=key_padding_mask.device, dtype=torch.int32)
    lo = torch.where(key_padding_mask, pos, seqlen).amin(1)
    hi = torch.where(key_padding_mask, pos + 1, 0).amax(1)
    return torch.stack([lo, hi], 1).to(torch.int32)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, layout: _Layout, scale: float):
    head_dim = q.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty(layout.lse_shape, dtype=torch.float32, device=q.device)
    cfg = fwd_config(head_dim, q.dtype)
    _attn_fwd_kernel[layout.grid(cfg["BLOCK_M"])](
        q, k, v, out, lse, layout.seq_info, layout.key_mask, scale * LOG2E,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        layout.stride_maskb, *layout.lse_strides, HEAD_DIM=head_dim, **cfg)
    return out, lse


def _backward(do, q, k, v, out, lse, layout: _Layout, scale: float):
    head_dim = q.shape[-1]
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[layout.grid(PREPROCESS_BLOCK_M)](
        out, do, delta, layout.seq_info, *layout.strides(out), *layout.strides(do),
        *layout.lse_strides, HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qkv_do_strides = (*layout.strides(q), *layout.strides(k), *layout.strides(v),
                      *layout.strides(do))
    cfg = dkdv_config(head_dim, q.dtype)
    _attn_bwd_dkdv_kernel[layout.grid(cfg["BLOCK_N"])](
        q, k, v, do, dk, dv, lse, delta, layout.seq_info, layout.key_mask, scale, scale * LOG2E,
        *qkv_do_strides, *layout.strides(dk), *layout.strides(dv),
        layout.stride_maskb, *layout.lse_strides, HEAD_DIM=head_dim, **cfg)
    cfg = dq_config(head_dim, q.dtype)
    _attn_bwd_dq_kernel[layout.grid(cfg["BLOCK_M"])](
        q, k, v, do, dq, lse, delta, layout.seq_info, layout.key_mask, scale, scale * LOG2E,
        *qkv_do_strides, *layout.strides(dq),
        layout.stride_maskb, *layout.lse_strides, HEAD_DIM=head_dim, **cfg)
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        layout = _Layout(q, key_padding_mask, cu_seqlens, max_seqlen)
        if q.numel() == 0 or layout.seqlen == 0 or layout.batch == 0:
            out, lse = torch.zeros_like(q), None
        else:
            out, lse = _forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        if lse is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None
        dq, dk, dv = _backward(_unit_last(do), q, k, v, out, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """q, k, v [B, H, L, D] (last stride 1, else copied); key_padding_mask bool [B, L] or None."""
    with torch.cuda.device_of(q):  # triton launches on the current device
        return _AttentionFunction.apply(q, k, v, key_padding_mask, None, 0, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float) -> torch.Tensor:
    """q, k, v [T, H, D]; cu_seqlens int32 [B+1]; max_seqlen bounds the query blocks."""
    with torch.cuda.device_of(q):
        return _AttentionFunction.apply(q, k, v, None, cu_seqlens, max_seqlen, scale)
