"""Triton attention, FlashAttention-2 style, forward and backward, for two layouts; the kernels
are in attention_kernels.py, this module launches them.

* padded: q, k, v [B, H, L, D] with any strides whose last one is 1 (the model's [B, L, H, D]
  storage viewed as [B, H, L, D] included), and an optional key_padding_mask bool [B, L];
* packed varlen: q [Tq, H, D], k, v [Tk, H, D]; sequence b's queries q[cu_q[b]:cu_q[b+1]] attend
  to its keys k[cu_k[b]:cu_k[b+1]] only (separate cu_seqlens_q / cu_seqlens_k, as
  FlashAttention's flash_attn_varlen_func); a sequence with queries and no key gives zero rows.

One set of kernels serves both, with one compiled variant per (dtype, head dim, dropout on/off):
a program is addressed by (block, head, sequence), and a small per-sequence table (SEQ_INFO, built
by ``_Layout``) gives each sequence its first query and key rows, their counts and its range of
real keys. In the padded layout the per-batch key range [kv_lo, kv_hi) (first and last real key,
precomputed from the mask) lets every kernel skip key blocks that hold only padding, on either
side (left or right padding); inside the range the mask is still applied key by key, so any mask
is handled. Masked or out-of-sequence keys and values are never loaded (NaN there is harmless).
A sequence with no real key has an empty range: its output rows and gradients are zeros.

Dropout (dropout_p > 0; the DROPOUT constexpr, so p == 0 runs the kernels without it): inside the
fused kernels, as FlashAttention 2 does it. Probability (i, j) of (sequence s, head h) is kept iff
tl.randint(seed, philox_offset + ((s * H + h) * max_q + i) * max_k + j) >= threshold, with
(seed, philox_offset) drawn from torch's generator by backends/dropout.py (the definition every
backend shares, docs/correctness.md); kept ones are scaled by 1 / (1 - p). The softmax statistics
are those of the undropped scores; backward regenerates the mask from (seed, offset).

Numerics: scores, the running max and sum of the online softmax, the saved statistics, delta
and all accumulators are fp32. The softmax subtracts the row max from the scaled scores in
natural units and only then multiplies by log2(e) for exp2 (folding log2(e) into the scale, as
FlashAttention does, rounds s * log2(e) at the scores' magnitude before the max cancels it: P
was ~5e-6 off at scores ~ -128). Matrix products go through ``common.mma`` (tensor cores for
fp16/bf16, IEEE fp32 for fp32). Saved for backward: q, k, v, o, for fp16/bf16 o_lo (what
rounding the fp32 output to o lost, in o's dtype: one more output-sized tensor) and the row
statistics, fp32 [lse layout, 3]: the row max (natural units) and log2 of the row's sum of
exp(s - max), apart (their sum, the log-sum-exp, would round at the max's magnitude), and a
column for the backward's delta. Backward
is deterministic (no atomics): delta_i = dO_i . O_i in a preprocess kernel, as the diagonal of
the dot dO O^T so that it rounds as dP = dO V^T does (a one-hot softmax row then gets
dS = P (dP - delta) = 0 exactly), plus dO_i . o_lo_i (delta as exact as from an fp32 output),
dK/dV in a kernel per key block, dQ in a kernel per query block.

Offsets: the per-program base offset (sequence, head, first row) is 64-bit; offsets inside a
block are 32-bit (a sequence's rows times a row stride stays far below 2^31).
"""
from __future__ import annotations

from typing import Optional

import torch

# aot.py finds the kernels among this module's names
from .attention_kernels import (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                _attn_bwd_preprocess_kernel, _attn_fwd_kernel)
from ..higher_order import functorch_active, reference_grads
from ..reference import attention as reference_attention
from ..reference import varlen_attention as reference_varlen_attention
from ..reference.attention import attention_with_seed, varlen_attention_with_seed
from .common import ceil_div

# ------------------------------------------------------------------------------------------------
# Launch configurations: one per (kernel, head dim, dtype); no autotuning for attention. Chosen so
# that no config spills registers on sm_80 or sm_90 (checked by aot.py / test_triton_compile.py).
# fp32 runs its dots on FMA units, whose operand layouts take many more registers: small tiles.

# CUDA's limits on a launch grid's (x, y, z) program counts.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


def fwd_config(head_dim: int, dtype: torch.dtype, dropout: bool = False) -> dict:
    if dtype == torch.float32:  # D=128, 32 keys: 255 registers + 32 B spill (triton 3.6 sm_90)
        return dict(BLOCK_M=32, BLOCK_N=32 if head_dim <= 64 else 16,
                    num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    if head_dim <= 32:  # dropout's Philox on 64 scores per thread: 255 registers + spills (sm_80)
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if dropout else 4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=8, num_stages=2)


def dkdv_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_N keys owned by a program, BLOCK_M queries streamed."""
    if dtype == torch.float32:  # D=64 with 4 warps: 255 registers on triton 3.6; 8 warps: 80-102
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if head_dim <= 32 else 8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def dq_config(head_dim: int, dtype: torch.dtype) -> dict:
    """BLOCK_M queries owned by a program, BLOCK_N keys streamed."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=32 if head_dim == 64 else 64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)


def preprocess_block_m(dtype: torch.dtype) -> int:
    """Query rows per program of the delta kernel (a BLOCK_M x BLOCK_M dot: fp32's FMA operand
    layouts hold both [BLOCK_M, head_dim] tiles in registers, so fewer rows there)."""
    return 32 if dtype == torch.float32 else 64


class _Layout:
    """Where the sequences are, for the kernels: per-sequence SEQ_INFO int32 [B, 7] = (first query
    row, query count, first key row, key count, kv_lo, kv_hi, number of real keys), the key mask,
    the LSE layout, the dropout shape (max_q, max_k), and how to read strides of q-like tensors.

    Padded [B, H, L, D]: rows start at 0, L queries and L keys, key range from the mask (or
    [0, L)). Varlen q [Tq, H, D], k/v [Tk, H, D]: query rows start at cu_seqlens_q[b], key rows at
    cu_seqlens_k[b]; counts and key range from the two; the stride between sequences is 0 (the
    first rows carry the offsets). Without a mask, KEY_MASK is a row of ones read with stride 0,
    so every kernel has one variant.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor], max_q: int, max_k: int):
        self.varlen = cu_q is not None
        device = q.device
        if self.varlen:
            self.batch, self.heads = cu_q.numel() - 1, q.shape[1]
            self.max_q, self.max_k = int(max_q), int(max_k)
            q_len, k_len = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
            self.seq_info = torch.stack([cu_q[:-1], q_len, cu_k[:-1], k_len,
                                         torch.zeros_like(k_len), k_len, k_len], 1)
            total = q.shape[0]
            self.lse_shape, self.lse_strides = (self.heads, total), (0, total)
        else:
            self.batch, self.heads, seqlen = q.shape[0], q.shape[1], q.shape[2]
            self.max_q = self.max_k = seqlen
            info = torch.zeros(self.batch, 7, dtype=torch.int32, device=device)
            info[:, 1] = info[:, 3] = seqlen
            if key_padding_mask is None:
                info[:, 5:] = seqlen
            else:
                info[:, 4:6] = _real_key_range(key_padding_mask)
                info[:, 6] = key_padding_mask.sum(1)
            self.seq_info = info
            self.lse_shape = (self.batch, self.heads, seqlen)
            self.lse_strides = (self.heads * seqlen, seqlen)
        self.seq_info = self.seq_info.to(torch.int32).contiguous()
        if key_padding_mask is None:  # long enough for any key index of any sequence
            self.key_mask = torch.ones(max(k.shape[0] if self.varlen else self.max_k, 1),
                                       dtype=torch.uint8, device=device)
            self.stride_maskb = 0
        else:
            self.key_mask = key_padding_mask.contiguous().view(torch.uint8)
            self.stride_maskb = self.key_mask.stride(0)

    @property
    def stats_strides(self) -> tuple:
        """(between sequences, between heads) of the row statistics [*lse_shape, 3], in floats."""
        return tuple(3 * x for x in self.lse_strides)

    @property
    def empty(self) -> bool:
        """Nothing for a kernel to do: no query, or no key anywhere (every output row is 0)."""
        return self.batch == 0 or self.heads == 0 or self.max_q == 0 or self.max_k == 0

    def strides(self, t: torch.Tensor) -> tuple:
        """(stride between sequences, between heads, between rows) of q/k/v-shaped `t`."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def grid(self, block: int, over_keys: bool = False) -> tuple:
        """(sequences, blocks of `block` queries, or keys with `over_keys`, heads).

        Sequences go on x, the axis CUDA allows 2^31 - 1 programs on: a varlen batch easily has
        more than the 65535 that y and z allow. Raises ValueError when a count exceeds its axis.
        """
        grid = (self.batch, ceil_div(self.max_k if over_keys else self.max_q, block), self.heads)
        for count, limit, what in zip(grid, GRID_LIMITS, ("sequences", "row blocks", "heads")):
            if count > limit:
                raise ValueError(f"triton attention: {count} {what} exceed CUDA's grid limit "
                                 f"{limit} on that axis (grid {grid}, block {block} rows)")
        return grid


def _real_key_range(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 [B, 2]: first real key and one past the last (lo >= hi when there is none)."""
    seqlen = key_padding_mask.shape[1]
    pos = torch.arange(seqlen, device=key_padding_mask.device, dtype=torch.int32)
    lo = torch.where(key_padding_mask, pos, seqlen).amin(1)
    hi = torch.where(key_padding_mask, pos + 1, 0).amax(1)
    return torch.stack([lo, hi], 1).to(torch.int32)


class _Dropout:
    """The dropout of one forward call: its 1/(1-p) scale and RNG int64 [5] on the device =
    (seed, philox_offset, threshold, max_q * max_k, max_k), read by the kernels' _dropout_rng.

    (seed, philox_offset) come from backends/dropout.py's draw_seed_offset (torch's generator of
    the device, FlashAttention 2's scheme; the seed as a signed int64 with the same bits) and the
    threshold from its ``threshold`` (keep iff draw >= threshold), the rule every backend shares.
    One tensor argument rather than scalars: no recompilation when a value changes size or
    happens to be 1 or a multiple of 16.
    """

    def __init__(self, p: float, layout: _Layout, device: torch.device):
        from .. import dropout
        self.scale = 1.0 / (1.0 - p)
        n = layout.batch * layout.heads * layout.max_q * layout.max_k
        self.seed, self.offset = dropout.draw_seed_offset(device, n)
        self.rng = torch.tensor([self.seed, self.offset, dropout.threshold(p),
                                 layout.max_q * layout.max_k, layout.max_k],
                                dtype=torch.int64, device=device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, layout: _Layout, scale: float, drop: Optional[_Dropout], for_backward: bool):
    """(out, out_lo, stats): stats fp32 [*lse_shape, 3] = (row max of the scaled scores, log2 of
    the row's sum of exp(s - max), delta: written by the backward); out_lo (fp16/bf16 when `for_backward`, else None) = the fp32
    output minus out, in out's dtype and strides (for delta, see _attn_bwd_preprocess_kernel)."""
    head_dim = q.shape[-1]
    out = torch.empty_like(q)
    out_lo = torch.empty_like(out) if for_backward and out.dtype != torch.float32 else None
    assert out_lo is None or out_lo.stride() == out.stride()  # the kernel reads it with O's
    stats = torch.empty((*layout.lse_shape, 3), dtype=torch.float32, device=q.device)
    cfg = fwd_config(head_dim, q.dtype, drop is not None)
    rng = drop.rng if drop is not None else layout.seq_info  # any pointer: not read
    lo = out if out_lo is None else out_lo  # any pointer when not written
    _attn_fwd_kernel[layout.grid(cfg["BLOCK_M"])](
        q, k, v, out, lo, stats, layout.seq_info, layout.key_mask, rng, scale,
        drop.scale if drop is not None else 1.0, int(out_lo is not None),
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        layout.stride_maskb, *layout.stats_strides, HEAD_DIM=head_dim, DROPOUT=drop is not None,
        **cfg)
    return out, out_lo, stats


def _backward(do, q, k, v, out, out_lo, stats, layout: _Layout, scale: float,
              drop: Optional[_Dropout]):
    head_dim = q.shape[-1]
    block_m = preprocess_block_m(q.dtype)
    _attn_bwd_preprocess_kernel[layout.grid(block_m)](
        out, out if out_lo is None else out_lo, do, stats, layout.seq_info, int(out_lo is not None),
        *layout.strides(out), *layout.strides(do), *layout.stats_strides, HEAD_DIM=head_dim,
        BLOCK_M=block_m, num_warps=4)
    # varlen: key rows that belong to no sequence (past cu_seqlens_k[-1]) get zero gradients
    new = torch.zeros_like if layout.varlen else torch.empty_like
    dq, dk, dv = torch.empty_like(q), new(k), new(v)
    qkv_do_strides = (*layout.strides(q), *layout.strides(k), *layout.strides(v),
                      *layout.strides(do))
    common = (layout.seq_info, layout.key_mask, drop.rng if drop is not None else layout.seq_info,
              scale, drop.scale if drop is not None else 1.0)
    flags = dict(HEAD_DIM=head_dim, DROPOUT=drop is not None)
    cfg = dkdv_config(head_dim, q.dtype)
    _attn_bwd_dkdv_kernel[layout.grid(cfg["BLOCK_N"], over_keys=True)](
        q, k, v, do, dk, dv, stats, *common, *qkv_do_strides, *layout.strides(dk),
        *layout.strides(dv), layout.stride_maskb, *layout.stats_strides, **flags, **cfg)
    cfg = dq_config(head_dim, q.dtype)
    _attn_bwd_dq_kernel[layout.grid(cfg["BLOCK_M"])](
        q, k, v, do, dq, stats, *common, *qkv_do_strides, *layout.strides(dq),
        layout.stride_maskb, *layout.stats_strides, **flags, **cfg)
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, cu_q, cu_k, max_q, max_k, scale, dropout_p):
        given = (q, k, v)  # as given (not copied): a double backward differentiates them
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        layout = _Layout(q, k, key_padding_mask, cu_q, cu_k, max_q, max_k)
        drop = _Dropout(dropout_p, layout, q.device) if dropout_p > 0 else None
        if q.numel() == 0 or k.numel() == 0 or layout.empty:
            out, out_lo, stats = torch.zeros_like(q), None, None
        else:
            out, out_lo, stats = _forward(q, k, v, layout, scale, drop,
                                          for_backward=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*given, q, k, v, out, out_lo, stats)
        ctx.layout, ctx.scale, ctx.drop = layout, scale, drop
        ctx.call = (key_padding_mask, cu_q, cu_k, max_q, max_k, dropout_p)
        return out

    @staticmethod
    def backward(ctx, do):
        q0, k0, v0, q, k, v, out, out_lo, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference with the forward's mask
            key_padding_mask, cu_q, cu_k, max_q, max_k, dropout_p = ctx.call
            seed_offset = None if ctx.drop is None else (ctx.drop.seed, ctx.drop.offset)
            if cu_q is None:
                fn = lambda q, k, v: attention_with_seed(q, k, v, key_padding_mask, ctx.scale,
                                                         dropout_p, seed_offset)
            else:
                fn = lambda q, k, v: varlen_attention_with_seed(
                    q, k, v, cu_q, cu_k, max_q, max_k, ctx.scale, dropout_p, seed_offset)
            grads = reference_grads(fn, (q0, k0, v0), ctx.needs_input_grad[:3], (do,))
            return (*grads, None, None, None, None, None, None, None)
        if stats is None:
            grads = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        else:
            grads = _backward(_unit_last(do), q, k, v, out, out_lo, stats, ctx.layout, ctx.scale,
                              ctx.drop)
        return (*grads, None, None, None, None, None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], scale: float,
              dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [B, H, L, D] (last stride 1, else copied); key_padding_mask bool [B, L] or None.

    dropout_p > 0 drops attention probabilities inside the kernel (Philox mask of element
    (b, h, i, j) at offset philox_offset + ((b * H + h) * L + i) * L + j, see _Dropout).
    Inside a torch.func transform: the reference formula (backends/higher_order.py).
    """
    if functorch_active():
        return reference_attention(q, k, v, key_padding_mask, scale, dropout_p)
    with torch.cuda.device_of(q):  # triton launches on the current device
        return _AttentionFunction.apply(q, k, v, key_padding_mask, None, None, 0, 0, scale,
                                        dropout_p)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q [Tq, H, D], k/v [Tk, H, D]; cu_seqlens_q/_k int32 [B+1]: sequence b's queries
    q[cu_q[b]:cu_q[b+1]] attend to keys k[cu_k[b]:cu_k[b+1]] only (flash_attn_varlen_func);
    max_seqlen_q/_k bound the blocks and set the dropout offsets (element (b, h, i, j) at
    philox_offset + ((b * H + h) * max_seqlen_q + i) * max_seqlen_k + j). A sequence with no key
    gives zero rows and zero gradients. Inside a torch.func transform: the reference formula."""
    if functorch_active():
        return reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, scale, dropout_p)
    with torch.cuda.device_of(q):
        return _AttentionFunction.apply(q, k, v, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, dropout_p)
