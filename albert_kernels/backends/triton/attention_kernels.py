"""The Triton attention kernels (FlashAttention-2 style): forward, and the three backward kernels,
with dropout as a constexpr variant. attention.py holds the launch code and says what they
compute; the layouts they read are described at each kernel.
"""
import triton
import triton.language as tl

from .common import mma, mul_rn

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jitted code reads no plain globals
SEQ_INFO_COLS = tl.constexpr(7)  # q first row, q length, k first row, k length, kv_lo, kv_hi, real keys
# ROW_STATS: fp32 [rows, 3] per (sequence, head) = (row max of the scaled scores, log2 of the
# row's sum of exp(s - max), delta): one pointer for the three, as there was one each for lse
# and delta before the statistics were split.
ROW_STATS_COLS = tl.constexpr(3)


@triton.jit
def _seq_bounds(SEQ_INFO, pid_b):
    """(q_row0, q_len, k_row0, k_len, kv_lo, kv_hi) of sequence pid_b from SEQ_INFO int32
    [B, SEQ_INFO_COLS].

    Query rows of the sequence are q_row0 + [0, q_len), its key rows k_row0 + [0, k_len). Keys
    outside [kv_lo, kv_hi) are padding; the range is empty (kv_lo >= kv_hi) for a sequence with no
    real key. The first rows are 64-bit: they are multiplied by a row stride.
    """
    info = SEQ_INFO + SEQ_INFO_COLS * pid_b
    return (tl.load(info).to(tl.int64), tl.load(info + 1), tl.load(info + 2).to(tl.int64),
            tl.load(info + 3), tl.load(info + 4), tl.load(info + 5))


@triton.jit
def _ds_scale(SEQ_INFO, pid_b, sm_scale):
    """The factor from dS to dQ/dK: sm_scale, or exactly 0 for a sequence with one real key.

    Softmax over a single key is constant (p = 1), so its dS is exactly 0 (with or without
    dropout). Without dropout P * (dP - delta) is exactly 0 there already (delta is dP's own
    dot, see _attn_bwd_preprocess_kernel); with dropout O = V / (1 - p) is rounded before delta
    is taken, and dP is scaled after its dot, so the two differ by rounding noise.
    """
    n_keys = tl.load(SEQ_INFO + SEQ_INFO_COLS * pid_b + 6)
    return tl.where(n_keys > 1, sm_scale, 0.0)


@triton.jit
def _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK):
    """bool [BLOCK_N]: key inside the real-key range and not padding (KEY_MASK nonzero)."""
    in_range = (offs_n >= kv_lo) & (offs_n < kv_hi)
    return in_range & (tl.load(KEY_MASK + offs_n, mask=in_range, other=0) != 0)


@triton.jit
def _dropout_rng(RNG, pid_b, pid_h):
    """(seed, Philox offset of element (0, 0) of this (sequence, head), threshold, offsets per
    query row) from RNG int64 [5] = (seed, philox_offset, threshold, max_q * max_k, max_k).

    The offset of element (s, h, i, j) is philox_offset + ((s * H + h) * max_q + i) * max_k + j
    (docs/correctness.md, attention dropout; backends/dropout.py is the PyTorch definition).
    """
    seed = tl.load(RNG)
    n_heads = tl.num_programs(2)
    base = tl.load(RNG + 1) + (pid_b * n_heads + pid_h) * tl.load(RNG + 3)
    return seed, base, tl.load(RNG + 2).to(tl.uint32), tl.load(RNG + 4)


@triton.jit
def _keep(seed, base, threshold, row_len, rows, cols):
    """bool, rows x cols broadcast: (query i = rows, key j = cols) survives dropout, i.e. the
    first Philox4x32-10 word (tl.randint) at offset base + i * row_len + j is >= threshold."""
    return tl.randint(seed, base + rows.to(tl.int64) * row_len + cols) >= threshold


@triton.jit(do_not_specialize=["store_lo"])
def _attn_fwd_kernel(
        Q, K, V, O, O_LO, ROW_STATS, SEQ_INFO, KEY_MASK, RNG, sm_scale, drop_scale,
        store_lo,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_ob, stride_oh, stride_om,
        stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DROPOUT: tl.constexpr):
    """O = dropout(softmax(Q K^T * scale, masked)) V for one block of BLOCK_M queries of one head.

    Grid (B, cdiv(max_q, BLOCK_M), H): sequences on x, whose limit is 2^31 - 1 (see _Layout.grid
    in attention.py). Q, K, V, O: rows of HEAD_DIM contiguous elements, query row r of
    (sequence b, head h) at b*stride_qb + h*stride_qh + (q_row0 + r)*stride_qm, key row r at the
    same with k_row0 and K's strides, (q_row0, ..., kv_hi) = SEQ_INFO[b] (stride_xb is 0 in the
    varlen layout, where the first rows are cu_seqlens_q[b] / cu_seqlens_k[b]).
    KEY_MASK: uint8, key n of sequence b at b*stride_maskb + n, nonzero = real key (a row of ones
    with stride_maskb = 0 when there is no mask). The softmax statistics of the scaled scores
    s = q.k * sm_scale (before dropout), fp32, in ROW_STATS at b*stride_lseb + h*stride_lseh +
    (q_row0 + r) * 3: max_j s_j (natural units; +inf for a row with no real key, whose output is
    0), then log2(sum_j exp(s_j - max)) (0 there); the third column is the backward's delta. The
    product q.k * sm_scale is rounded on its own (common.mul_rn), here and in both backward
    kernels, so that the backward recomputes bit for bit the scores whose max the forward saved
    (fused into the next subtraction it would differ by up to half an ulp of the score: P off by
    ~1e-3 on a one-hot row at |s| ~ 1e4). The softmax subtracts the max in natural
    units and only then multiplies by log2(e) for exp2: s * log2(e) would be rounded at the
    scores' magnitude (ulp(185) = 1.5e-5 at |s| = 128) before the max cancels it. The backward
    recomputes P from the two statistics, kept apart for the same reason (max + log(sum) would
    round at the max's magnitude). O_LO (O's dtype and strides), written only when store_lo is
    nonzero (fp16/bf16 outputs whose backward will run; a runtime flag, not a variant): the
    part of the fp32 output that O's rounding lost, O_fp32 - O, rounded to O's dtype (read by
    _attn_bwd_preprocess_kernel).
    DROPOUT (constexpr; False compiles the plain kernel): a probability is kept iff its Philox
    draw passes (_keep, RNG as in _dropout_rng); the kept sum is scaled by drop_scale = 1/(1-p).
    The program keeps q [BLOCK_M, HEAD_DIM] and the fp32 accumulator in registers and streams
    K/V blocks of BLOCK_N keys over the sequence's real-key range only.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    q_row0, q_len, k_row0, _, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= q_len:  # varlen: this sequence is shorter than max_q
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + q_row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + k_row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + k_row0 * stride_vm
    O += pid_b * stride_ob + pid_h * stride_oh + q_row0 * stride_om
    O_LO += pid_b * stride_ob + pid_h * stride_oh + q_row0 * stride_om
    ROW_STATS += pid_b * stride_lseb + pid_h * stride_lseh + q_row0 * ROW_STATS_COLS
    KEY_MASK += pid_b * stride_maskb
    if DROPOUT:
        seed, rng_base, threshold, rng_row = _dropout_rng(RNG, pid_b, pid_h)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max of the scaled scores
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
        kt = tl.load(K + offs_n[None, :] * stride_km + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        s = mul_rn(mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)), sm_scale)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real key yet: avoid -inf - -inf
        p = tl.math.exp2((s - m_ref[:, None]) * LOG2E)  # max subtracted before the log2(e) rounds
        alpha = tl.math.exp2((m_i - m_ref) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser l_i sums every probability, dropped or not
            p = tl.where(_keep(seed, rng_base, threshold, rng_row, offs_m[:, None], offs_n[None, :]),
                         p, 0.0)
        v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DROPOUT:
        o = o * drop_scale
    o_hi = o.to(O.dtype.element_ty)
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], o_hi, mask=row_ok[:, None])
    if store_lo != 0:
        tl.store(O_LO + offs_m[:, None] * stride_om + offs_d[None, :],
                 (o - o_hi.to(tl.float32)).to(O.dtype.element_ty), mask=row_ok[:, None])
    stats = ROW_STATS + offs_m * ROW_STATS_COLS
    tl.store(stats, tl.where(has_key, m_i, float("inf")), mask=row_ok)
    tl.store(stats + 1, tl.math.log2(l_safe), mask=row_ok)


@triton.jit(do_not_specialize=["has_lo"])
def _attn_bwd_preprocess_kernel(
        O, O_LO, DO, ROW_STATS, SEQ_INFO, has_lo, stride_ob, stride_oh, stride_om, stride_dob, stride_doh,
        stride_dom, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = dO_i . O_i in fp32 for BLOCK_M query rows of one head, into column 2 of
    ROW_STATS (see _attn_fwd_kernel).

    Grid (B, cdiv(max_q, BLOCK_M), H); O and dO addressed as Q in the forward kernel. With
    dropout this is still sum_j P_ij dP_ij (O holds the dropped, rescaled sum).

    Taken as the diagonal of the dot dO O^T, that is with the arithmetic of dP = dO V^T (the
    same mma over the same head_dim, which rounds each element alike wherever it sits in the
    tile), not as an elementwise row sum: on a one-hot softmax row (O_i = V_j exactly) delta_i
    is then bit for bit dP_ij, and dS = P (dP - delta) cancels to exactly 0, as in float64. A
    row sum adds the same products in another order and leaves rounding noise of dP's size
    (dq, dk ~4e-5 at scaled scores ~3e4, where the gradient is 0). The extra work is one
    BLOCK_M x BLOCK_M x HEAD_DIM dot per block of queries, next to the backward's
    BLOCK_M x max_k x HEAD_DIM ones.

    fp16/bf16: O is the output rounded to its dtype (2^-11, 2^-8 relative), and an error of
    that size in delta reaches dQ, dK as P (dP - delta) (2x PyTorch's own error on fp16 rows
    that are nearly one-hot at scaled scores ~1e3). So delta adds rowsum(dO * O_LO), the part
    of the fp32 output the rounding lost (the forward kernel's O_LO): delta is then as exact as
    from an fp32 O. O_LO is 0 on a one-hot row, so that term adds exactly 0 there.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    q_row0, q_len, _, _, _, _ = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < q_len
    o = tl.load(O + pid_b * stride_ob + pid_h * stride_oh + q_row0 * stride_om
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + pid_b * stride_dob + pid_h * stride_doh + q_row0 * stride_dom
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok, other=0.0)
    prods = mma(do, tl.trans(o), tl.zeros([BLOCK_M, BLOCK_M], tl.float32))  # dO O^T
    delta = tl.sum(tl.where(offs_m[:, None] == offs_m[None, :], prods, 0.0), 1)  # its diagonal
    if has_lo != 0:  # fp16/bf16: O_LO as the forward kernel wrote it
        o_lo = tl.load(O_LO + pid_b * stride_ob + pid_h * stride_oh + q_row0 * stride_om
                       + offs_m[:, None] * stride_om + offs_d[None, :], mask=row_ok, other=0.0)
        delta += tl.sum(o_lo.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(ROW_STATS + pid_b * stride_lseb + pid_h * stride_lseh
             + (q_row0 + offs_m) * ROW_STATS_COLS + 2, delta,
             mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, ROW_STATS, SEQ_INFO, KEY_MASK, RNG, sm_scale,
        drop_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
        stride_dkb, stride_dkh, stride_dkm, stride_dvb, stride_dvh, stride_dvm,
        stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DROPOUT: tl.constexpr):
    """dK, dV for one block of BLOCK_N keys of one head, looping over all BLOCK_M query blocks.

    Grid (B, cdiv(max_k, BLOCK_N), H). Pointers as in the forward kernel; DK, DV have their own
    strides. The program owns its keys' dK and dV (fp32 accumulators, no atomics) and writes
    every one of them: zeros for a block that lies outside the real-key range. It recomputes
    P^T = exp2((K Q^T * sm_scale - max) * log2(e) - log2sum) from the forward's statistics (see
    _attn_fwd_kernel) and, with DROPOUT, the forward's
    keep mask Z (scaled by drop_scale): dV += (P^T * Z^T) dO, dP^T = (V dO^T) * Z^T,
    dK += (P^T * (dP^T - delta)) Q, scaled by sm_scale at the end (see _ds_scale).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    q_row0, q_len, k_row0, k_len, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + q_row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + k_row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + k_row0 * stride_vm
    DO += pid_b * stride_dob + pid_h * stride_doh + q_row0 * stride_dom
    DK += pid_b * stride_dkb + pid_h * stride_dkh + k_row0 * stride_dkm
    DV += pid_b * stride_dvb + pid_h * stride_dvh + k_row0 * stride_dvm
    ROW_STATS += pid_b * stride_lseb + pid_h * stride_lseh + q_row0 * ROW_STATS_COLS
    KEY_MASK += pid_b * stride_maskb
    if DROPOUT:
        seed, rng_base, threshold, rng_row = _dropout_rng(RNG, pid_b, pid_h)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
    k = tl.load(K + offs_n[:, None] * stride_km + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vm + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # A block of padding only gets no query loop: its dK, dV are the zeros stored below.
    q_end = tl.where((start_n < kv_hi) & (start_n + BLOCK_N > kv_lo), q_len, 0)
    for start_m in range(0, q_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        qt = tl.load(Q + offs_m[None, :] * stride_qm + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None],
                     other=0.0)
        stats = ROW_STATS + offs_m * ROW_STATS_COLS
        row_max = tl.load(stats, mask=row_ok, other=float("inf"))
        row_log2sum = tl.load(stats + 1, mask=row_ok, other=0.0)
        delta = tl.load(stats + 2, mask=row_ok, other=0.0)
        s_t = mul_rn(mma(k, qt, tl.zeros([BLOCK_N, BLOCK_M], tl.float32)), sm_scale)
        p_t = tl.math.exp2((s_t - row_max[None, :]) * LOG2E - row_log2sum[None, :])
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32))
        if DROPOUT:
            keep_t = _keep(seed, rng_base, threshold, rng_row, offs_m[None, :], offs_n[:, None])
            dv = mma(tl.where(keep_t, p_t * drop_scale, 0.0).to(do.dtype), do, dv)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv = mma(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(qt.dtype), tl.trans(qt), dk)
    store_ok = offs_n[:, None] < k_len
    dk = dk * _ds_scale(SEQ_INFO, pid_b, sm_scale)
    tl.store(DK + offs_n[:, None] * stride_dkm + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=store_ok)
    tl.store(DV + offs_n[:, None] * stride_dvm + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=store_ok)


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, DO, DQ, ROW_STATS, SEQ_INFO, KEY_MASK, RNG, sm_scale,
        drop_scale,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_km,
        stride_vb, stride_vh, stride_vm, stride_dob, stride_doh, stride_dom,
        stride_dqb, stride_dqh, stride_dqm, stride_maskb, stride_lseb, stride_lseh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DROPOUT: tl.constexpr):
    """dQ for one block of BLOCK_M queries of one head, looping over the real-key range.

    Grid (B, cdiv(max_q, BLOCK_M), H). The program owns its rows of dQ (fp32 accumulator):
    dQ = sm_scale * (P * (dP - delta)) K with dP = (dO V^T) * Z (Z the forward's keep mask over
    1-p, DROPOUT only) and P recomputed from the forward's row max and log2-sum (as in
    _attn_bwd_dkdv_kernel). A row with no real key gets 0.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_h = tl.program_id(2).to(tl.int64)
    q_row0, q_len, k_row0, _, kv_lo, kv_hi = _seq_bounds(SEQ_INFO, pid_b)
    if pid_m * BLOCK_M >= q_len:
        return
    Q += pid_b * stride_qb + pid_h * stride_qh + q_row0 * stride_qm
    K += pid_b * stride_kb + pid_h * stride_kh + k_row0 * stride_km
    V += pid_b * stride_vb + pid_h * stride_vh + k_row0 * stride_vm
    DO += pid_b * stride_dob + pid_h * stride_doh + q_row0 * stride_dom
    DQ += pid_b * stride_dqb + pid_h * stride_dqh + q_row0 * stride_dqm
    ROW_STATS += pid_b * stride_lseb + pid_h * stride_lseh + q_row0 * ROW_STATS_COLS
    KEY_MASK += pid_b * stride_maskb
    if DROPOUT:
        seed, rng_base, threshold, rng_row = _dropout_rng(RNG, pid_b, pid_h)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    stats = ROW_STATS + offs_m * ROW_STATS_COLS
    delta = tl.load(stats + 2, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range((kv_lo // BLOCK_N) * BLOCK_N, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = _key_valid(offs_n, kv_lo, kv_hi, KEY_MASK)
        kt = tl.load(K + offs_n[None, :] * stride_km + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vm + offs_d[:, None], mask=key_ok[None, :], other=0.0)
        s = mul_rn(mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)), sm_scale)
        # read per key block (L1 hits), not held across the loop: held, ptxas spilled 16 B
        # instead of 8 at head dim 64 in fp16/bf16 on sm_80
        row_max = tl.load(stats, mask=row_ok, other=float("inf"))
        row_log2sum = tl.load(stats + 1, mask=row_ok, other=0.0)
        p = tl.math.exp2((s - row_max[:, None]) * LOG2E - row_log2sum[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
        if DROPOUT:
            keep = _keep(seed, rng_base, threshold, rng_row, offs_m[:, None], offs_n[None, :])
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(kt.dtype), tl.trans(kt), dq)
    dq = dq * _ds_scale(SEQ_INFO, pid_b, sm_scale)
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])
