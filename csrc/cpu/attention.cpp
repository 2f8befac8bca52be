// Flash-style softmax attention on CPU, padded ([B, H, L, D] + key_padding_mask) and packed
// variable-length ([T, H, D] + cu_seqlens) layouts. One implementation serves both: a
// "head slice" (one sequence, one head) is a set of query rows and a list of real key rows.
//
// Forward  attention_fwd(q, k, v, key_padding_mask?, scale, dropout_p, seed, offset,
//                        save_residual) -> (out, lse)
//          varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
//                               scale, dropout_p, seed, offset, save_residual) -> (out, lse)
//   save_residual is for CUDA's fp16/bf16 kernels (csrc/registration.cpp); here the backward
//   takes delta = rowsum(P * dP) from the recomputed probabilities and needs no residual.
//   q, k, v, out: [B, H, L, D] / q, out [Tq, H, D], k, v [Tk, H, D], contiguous, dtype T;
//   key_padding_mask bool [B, L] (True = real key); cu_seqlens_q / cu_seqlens_k int32 [B+1]:
//   sequence b's queries q[cu_q[b]:cu_q[b+1]] attend to keys k[cu_k[b]:cu_k[b+1]] only
//   (FlashAttention's flash_attn_varlen_func). lse: fp32 (fp64 for fp64 inputs), [B, H, L] /
//   [H, Tq], the natural log-sum-exp of the scaled scores of each query row; -inf for a row with
//   no real key (its output is zeros).
//   Dropout (dropout_p > 0; philox.h, albert_kernels/backends/dropout.py): as FlashAttention 2,
//   the running max and sum (so lse) see the undropped scores; the accumulator takes the dropped
//   P (kept entries 1, dropped 0) and the final 1 / l becomes 1 / ((1 - p) l). Element (i, j)
//   of slice s = sequence * H + head draws Philox at offset + (s * max_q + i) * max_k + pos(j)
//   (pos = the key's position in its row / sequence); backward regenerates the same mask from
//   (seed, offset). dropout_p == 0 runs the kernels as they were (one flag per key block).
//   Parallel over (sequence, head, query block of kBlockM rows); a task owns its output rows.
//   A task first gathers its sequence's *real* keys, converted to acc_t (fp32) and transposed,
//   into a zero-padded K^T [Dp, Np] and V [Np, Dp] (so padding costs no FLOPs, for any mask:
//   right, left or holes), then runs the online softmax over key blocks of kBlockN: the block of
//   scores S = (Q scale) K^T [kBlockM, kBlockN] (fp32) is the only piece of the L x L matrix
//   that ever exists.
//   All products are small_gemm (common.h); running max, sum and the output accumulator are
//   fp32; exponentials are fast_exp (common.h), the same in forward and backward. Saved for
//   backward: out and lse.
//   bf16 inputs on a CPU with AMX-BF16 (in the AVX-512 build): the forward's two products run
//   on AMX tiles instead (tdpbf16ps: bf16 pairs multiplied exactly, summed into fp32), as
//   flash-attention does on GPUs: S = scale (Q K^T) from Q and K as they are (bf16) with fp32
//   accumulation; the softmax statistics (m, l, lse) in fp32 from the fp32 scores; P rounded to
//   bf16 (relative error <= 2^-9 per entry, the bf16 output's own rounding) for O += P V with
//   fp32 accumulation, normalised by the fp32 l (the sum of the unrounded P). Keys are gathered
//   once per slice into the pair-interleaved layout the tiles read (K: [D/2, keys, 2],
//   V: [keys/2, D, 2]); query rows are padded to 16 and the reductions to 32 with zeros. The
//   fp32 path above stays the fallback (other builds, CPUs or kernels without AMX, and
//   ALBERT_KERNELS_CPU_BF16_ATTENTION=fp32, read at each call); the backward is fp32 in both.
//
// Backward attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask?, scale, dropout_p, seed,
//                        offset)
//          varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
//                               max_seqlen_q, max_seqlen_k, scale, dropout_p, seed, offset)
//     -> (grad_q, grad_k, grad_v)
//   Parallel over (sequence, head): a task owns dK, dV of its head slice (fp32 accumulators
//   [Np, Dp]) and dQ of its rows, so no two tasks write the same memory (deterministic). Per
//   query block of kBlockM rows it recomputes the [kBlockM, Np] panel P = exp(S - m)
//   against all real keys (linear in L, never L x L; m = the row's largest score), normalises
//   each row of it to sum 1 and masks the zero-padded columns to -inf before the exp, then
//     dP = dO V^T,  Di = rowsum(P dP),  dS = P (dP - Di) scale,
//     dV += P^T dO,  dK += dS^T Q,  dQ = dS K.
//   S = (Q scale) K^T (Q is scaled as it is loaded), as in the fp32 forward; the bf16 AMX
//   forward rounds its scores differently, which is why P is not taken from the forward's lse.
//   (`out` and `lse` are not read: Di from P dP is more accurate in fp32 than rowsum(dO * O).)
//   With dropout, Z = keep / (1 - p): dP = (dO V^T) Z, Di = rowsum(P dP), dS as above, and
//   dV += (P Z)^T dO.
//   Masked keys get zero gradients; rows with no real key give zero dQ. Keys outside a
//   sequence's range (padded slots, other sequences) are never read, whatever they hold.
#include "common.h"
#include "ops.h"
#include "philox.h"

#include <ATen/cpu/Utils.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace albert_kernels::cpu {
namespace {

constexpr int64_t kBlockM = 48;   // query rows per task / per block (a multiple of the 6-row tile)
constexpr int64_t kBlockN = 128;  // keys per online-softmax step
constexpr int64_t kPrefetchRows = 8;  // strided q / k / v rows asked for ahead of their use

// One (sequence, head): query rows at q_offset + row * row_stride (q, out, grad_out, grad_q),
// key rows at k_offset + row * row_stride (k, v, grad_k, grad_v), lse at lse[lse_offset + row].
struct HeadSlice {
  int64_t index;         // sequence * H + head: the slice index of the dropout offsets
  int64_t n_rows;        // query rows of the sequence
  int64_t row_stride;    // elements between consecutive tokens
  int64_t q_offset;      // element offset of query row 0
  int64_t k_offset;      // element offset of key row 0
  int64_t lse_offset;    // element offset of row 0 in lse
  const int64_t* keys;   // real key rows (positions); nullptr: key rows 0 .. n_keys - 1
  int64_t n_keys;
};

// Per-thread work buffers, acc_t, zero-padded to the gemm tile width.
template <typename acc>
struct Workspace {
  int64_t D, Dp, Np;
  std::vector<acc> kt, vt, k, v, q, o, s, p, dq, dk, dv, m, l, z;
  Workspace(int64_t D_, int64_t max_keys, bool backward)
      : D(D_), Dp(round_up(D_, kGemmNR<acc>)), Np(round_up(std::max<int64_t>(max_keys, 1), kGemmNR<acc>)) {
    kt.assign(Dp * Np, acc(0));
    k.assign(Np * Dp, acc(0));
    v.assign(Np * Dp, acc(0));
    q.assign(kBlockM * Dp, acc(0));
    o.assign(kBlockM * Dp, acc(0));
    s.assign(kBlockM * kBlockN, acc(0));
    m.assign(kBlockM, acc(0));
    l.assign(kBlockM, acc(0));
    z.assign(std::max(kBlockN, Np), acc(0));  // one row's dropout keep flags
    if (backward) {
      vt.assign(Dp * Np, acc(0));
      s.assign(kBlockM * Np, acc(0));
      p.assign(kBlockM * Np, acc(0));
      dq.assign(kBlockM * Dp, acc(0));
      dk.assign(Np * Dp, acc(0));
      dv.assign(Np * Dp, acc(0));
    }
  }
};

// One query row -> acc_t, times the softmax scale (so S = (q scale) k^T comes out scaled; exact
// for power-of-two scales such as 64 ** -0.5). Forward and backward both use it, so the
// recomputed scores round exactly as in forward.
template <typename scalar_t, typename acc>
void load_scaled_q(const scalar_t* src, acc* dst, int64_t D, acc scale) {
  load_row_into(src, dst, D);
  for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
}

// Gather the slice's real keys into K, V [ld, Dp] (acc_t rows; zero rows beyond n_keys, zero
// columns beyond D) and K^T [Dp, ld] (plus V^T [Dp, ld] for backward), by blocked transposes.
template <typename scalar_t, typename acc>
void gather_keys(const HeadSlice& hs, const scalar_t* k, const scalar_t* v,
                 Workspace<acc>& ws, int64_t ld, bool backward) {
  const int64_t D = ws.D, Dp = ws.Dp;
  const auto key_off = [&](int64_t j) {
    return hs.k_offset + (hs.keys ? hs.keys[j] : j) * hs.row_stride;
  };
  for (int64_t j = 0; j < std::min(kPrefetchRows, hs.n_keys); ++j) {
    prefetch_row(k + key_off(j), D * sizeof(scalar_t));
    prefetch_row(v + key_off(j), D * sizeof(scalar_t));
  }
  for (int64_t j = 0; j < ld; ++j) {
    if (j + kPrefetchRows < hs.n_keys) {
      prefetch_row(k + key_off(j + kPrefetchRows), D * sizeof(scalar_t));
      prefetch_row(v + key_off(j + kPrefetchRows), D * sizeof(scalar_t));
    }
    acc* krow = ws.k.data() + j * Dp;
    acc* vrow = ws.v.data() + j * Dp;
    if (j < hs.n_keys) {
      const int64_t off = key_off(j);
      load_row_into(k + off, krow, D);
      load_row_into(v + off, vrow, D);
    } else {
      std::fill(krow, krow + D, acc(0));
      std::fill(vrow, vrow + D, acc(0));
    }
  }
  transpose(ws.k.data(), Dp, ws.kt.data(), ld, ld, Dp);
  if (backward) transpose(ws.v.data(), Dp, ws.vt.data(), ld, ld, Dp);
}

// Online softmax over one block of (already scaled) scores S [rows, bn_pad], `valid` real
// columns. Updates the running max m and sum l, rescales the accumulator o, leaves
// P = exp(S - m) in S.
template <typename acc>
void softmax_block(acc* S, int64_t rows, int64_t bn_pad, int64_t valid, acc* m, acc* l, acc* o,
                   int64_t Dp) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc* s = S + r * bn_pad;
    for (int64_t j = valid; j < bn_pad; ++j) s[j] = neg_inf;  // zero-padded keys
    V vmax(neg_inf);
    for (int64_t j = 0; j < bn_pad; j += W) vmax = at::vec::maximum(vmax, V::loadu(s + j));
    const acc block_max = at::vec::vec_reduce_all<acc>(
        [](const V& a, const V& b) { return at::vec::maximum(a, b); }, vmax);
    const acc m_new = std::max(m[r], block_max);  // finite: the block has a real key
    V vsum(acc(0));
    for (int64_t j = 0; j < bn_pad; j += W) {
      V e = fast_exp<acc>(V::loadu(s + j) - V(m_new));
      e.store(s + j);
      vsum = vsum + e;
    }
    const acc block_sum = at::vec::vec_reduce_all<acc>([](const V& a, const V& b) { return a + b; }, vsum);
    if (m[r] == neg_inf) {  // first block: nothing accumulated yet
      l[r] = block_sum;
    } else {
      const acc alpha = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + block_sum;
      acc* orow = o + r * Dp;
      for (int64_t d = 0; d < Dp; d += W) (V::loadu(orow + d) * V(alpha)).store(orow + d);
    }
    m[r] = m_new;
  }
}

// Dropout of one block of probabilities P [rows, bn_pad] (keys j0 .. j0 + valid of the slice,
// query rows q0 ..): dropped entries become 0, kept ones stay (1 / (1 - p) is applied with 1 / l).
template <typename acc>
void drop_block(const Dropout& dp, const HeadSlice& hs, int64_t q0, int64_t rows, int64_t j0,
                int64_t valid, int64_t bn_pad, acc* S, acc* z) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  std::fill(z + valid, z + bn_pad, acc(0));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = dp.row_base(hs.index, q0 + r);
    if (hs.keys) {
      dp.keep_row(base, hs.keys + j0, valid, z);
    } else {
      dp.keep_row(base + j0, nullptr, valid, z);
    }
    acc* s = S + r * bn_pad;
    for (int64_t j = 0; j < bn_pad; j += W) (V::loadu(s + j) * V::loadu(z + j)).store(s + j);
  }
}

// Forward of query rows [q0, q1) of one head slice.
template <typename scalar_t, typename acc>
void forward_block(const HeadSlice& hs, int64_t q0, int64_t q1, const scalar_t* q,
                   scalar_t* out, acc* lse, acc scale, const Dropout& dp, Workspace<acc>& ws) {
  const int64_t D = ws.D, Dp = ws.Dp, rows = q1 - q0;
  const int64_t ld = round_up(std::max<int64_t>(hs.n_keys, 1), kGemmNR<acc>);
  std::vector<acc> obuf(Dp);
  if (hs.n_keys == 0) {  // no real key: zeros, lse = -inf
    for (int64_t i = q0; i < q1; ++i) {
      std::fill(obuf.begin(), obuf.end(), acc(0));
      store_row<scalar_t>(obuf.data(), out + hs.q_offset + i * hs.row_stride, D);
      lse[hs.lse_offset + i] = -std::numeric_limits<acc>::infinity();
    }
    return;
  }
  const scalar_t* q_rows = q + hs.q_offset + q0 * hs.row_stride;
  for (int64_t r = 0; r < std::min(rows, kPrefetchRows); ++r) {
    prefetch_row(q_rows + r * hs.row_stride, D * sizeof(scalar_t));
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) {
      prefetch_row(q_rows + (r + kPrefetchRows) * hs.row_stride, D * sizeof(scalar_t));
    }
    load_scaled_q(q_rows + r * hs.row_stride, ws.q.data() + r * Dp, D, scale);
    ws.m[r] = -std::numeric_limits<acc>::infinity();
    ws.l[r] = acc(0);
  }
  std::fill(ws.o.begin(), ws.o.end(), acc(0));
  for (int64_t j0 = 0; j0 < hs.n_keys; j0 += kBlockN) {
    const int64_t valid = std::min(kBlockN, hs.n_keys - j0);
    const int64_t bn_pad = round_up(valid, kGemmNR<acc>);
    // S = Q K^T for this key block; then P and the rescaled accumulator; then O += P V
    small_gemm<acc>(rows, bn_pad, D, ws.q.data(), Dp, 1, ws.kt.data() + j0, ld, ws.s.data(),
                    bn_pad, false);
    softmax_block<acc>(ws.s.data(), rows, bn_pad, valid, ws.m.data(), ws.l.data(), ws.o.data(),
                       Dp);
    if (dp.on) drop_block<acc>(dp, hs, q0, rows, j0, valid, bn_pad, ws.s.data(), ws.z.data());
    small_gemm<acc>(rows, Dp, bn_pad, ws.s.data(), bn_pad, 1, ws.v.data() + j0 * Dp, Dp,
                    ws.o.data(), Dp, true);
  }
  const acc keep_scale = dp.on ? static_cast<acc>(dp.keep_scale) : acc(1);
  for (int64_t r = 0; r < rows; ++r) {
    const acc inv = keep_scale / ws.l[r];
    for (int64_t d = 0; d < D; ++d) obuf[d] = ws.o[r * Dp + d] * inv;
    store_row<scalar_t>(obuf.data(), out + hs.q_offset + (q0 + r) * hs.row_stride, D);
    lse[hs.lse_offset + q0 + r] = ws.m[r] + std::log(ws.l[r]);
  }
}


// ---------------------------------------------------------------- bf16 forward on AMX tiles
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && defined(__x86_64__)
#define AK_ATTENTION_AMX 1
#define AK_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

constexpr int64_t kAmxK = 32;  // bf16 elements of the reduction per tile product

// The bf16 copies a thread works on, zero-padded: the query block Q [kBlockM, Dk] (Dk = D rounded
// to kAmxK), K in pairs [Dk / 2, ldk] (uint32 = two consecutive head-dim entries of one key),
// V in pairs [ldk / 2, Dp] (two consecutive keys of one head-dim column), one block of
// probabilities P [kBlockM, kBlockN] (bf16). ldk: the keys rounded to kAmxK.
// kraw and kv hold 32-bit words as float, for the fp32 transpose (common.h); they are never
// used as numbers.
struct AmxWork {
  int64_t Dk, Dp, Nk;
  std::vector<uint16_t> qb, pb;
  std::vector<float> kraw, kv;
  std::vector<uint32_t> vv;
  AmxWork(int64_t D, int64_t Dp_, int64_t max_keys)
      : Dk(round_up(D, kAmxK)), Dp(Dp_), Nk(round_up(std::max<int64_t>(max_keys, 1), kAmxK)),
        qb(kBlockM * Dk, 0), pb(kBlockM * kBlockN, 0), kraw(Nk * Dk / 2, 0.0f),
        kv(Dk / 2 * Nk, 0.0f), vv(Nk / 2 * Dp_, 0) {}
};

// The tile shapes: every tile 16 rows of 64 bytes (C: 16 x 16 fp32; A: 16 x 32 bf16;
// B: 16 pairs x 16 columns).
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AmxConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = 16;
    }
  }
};

// The slice's real keys in the pair layouts (zero beyond n_keys and beyond D). K: each key's row
// copied as Dk / 2 pairs (32-bit words), then the [ldk, Dk / 2] word matrix transposed with the
// fp32 transpose (bit moves only, no arithmetic). V: two keys' rows interleaved 16 columns at a
// time (zero-extended to 32 bits, the second shifted into the high half).
AK_AMX_TARGET void gather_keys_amx(const HeadSlice& hs, const c10::BFloat16* k,
                                   const c10::BFloat16* v, int64_t D, AmxWork& w, int64_t ldk) {
  const int64_t Dp = w.Dp, half = w.Dk / 2;
  const auto key_off = [&](int64_t j) {
    return hs.k_offset + (hs.keys ? hs.keys[j] : j) * hs.row_stride;
  };
  auto* raw = reinterpret_cast<uint16_t*>(w.kraw.data());
  for (int64_t j = 0; j < ldk; ++j) {
    uint16_t* dst = raw + j * w.Dk;
    if (j < hs.n_keys) {
      if (j + kPrefetchRows < hs.n_keys) {
        prefetch_row(k + key_off(j + kPrefetchRows), D * 2);
        prefetch_row(v + key_off(j + kPrefetchRows), D * 2);
      }
      std::memcpy(dst, k + key_off(j), D * 2);
      std::fill(dst + D, dst + w.Dk, uint16_t(0));
    } else {
      std::fill(dst, dst + w.Dk, uint16_t(0));
    }
  }
  transpose(w.kraw.data(), half, w.kv.data(), ldk, ldk, half);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < ldk; j += 2) {
    const bool has0 = j < hs.n_keys, has1 = j + 1 < hs.n_keys;
    const auto* v0 = has0 ? reinterpret_cast<const uint16_t*>(v + key_off(j)) : nullptr;
    const auto* v1 = has1 ? reinterpret_cast<const uint16_t*>(v + key_off(j + 1)) : nullptr;
    uint32_t* dst = w.vv.data() + j / 2 * Dp;
    for (int64_t d = 0; d < Dp; d += 16) {
      const __mmask16 m = d + 16 <= D ? __mmask16(0xFFFF)
                          : d < D    ? __mmask16((1u << (D - d)) - 1)
                                     : __mmask16(0);
      const __m256i a = v0 ? _mm256_maskz_loadu_epi16(m, v0 + d) : zero;
      const __m256i b = v1 ? _mm256_maskz_loadu_epi16(m, v1 + d) : zero;
      const __m512i pairs = _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                                            _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(dst + d, pairs);
    }
  }
}

// C [16 m_tiles, 16 NT] (+)= A B on tiles: A bf16 rows (a_stride bytes), `kchunks` chunks of
// kAmxK; B pairs (b_stride bytes per pair row; the next kAmxK chunk 16 rows down, the next
// column tile 64 bytes right); C fp32 (c_stride bytes), loaded first when `accumulate`.
// Tiles 0 .. NT-1 hold C, 4 holds A, 5 holds B.
template <int NT>
AK_AMX_TARGET inline void amx_tile_row(int64_t kchunks, const char* A, int64_t a_stride,
                                       const char* B, int64_t b_stride, char* C,
                                       int64_t c_stride, bool accumulate) {
#define AK_C_INIT(n)                                        \
  if constexpr (NT > n) {                                   \
    if (accumulate) _tile_loadd(n, C + n * 64, c_stride);   \
    else _tile_zero(n);                                     \
  }
#define AK_C_DOT(n)                                         \
  if constexpr (NT > n) {                                   \
    _tile_loadd(5, b + n * 64, b_stride);                   \
    _tile_dpbf16ps(n, 4, 5);                                \
  }
#define AK_C_STORE(n) \
  if constexpr (NT > n) _tile_stored(n, C + n * 64, c_stride);
  AK_C_INIT(0) AK_C_INIT(1) AK_C_INIT(2) AK_C_INIT(3)
  for (int64_t kk = 0; kk < kchunks; ++kk) {
    _tile_loadd(4, A + kk * kAmxK * 2, a_stride);
    const char* b = B + kk * 16 * b_stride;
    AK_C_DOT(0) AK_C_DOT(1) AK_C_DOT(2) AK_C_DOT(3)
  }
  AK_C_STORE(0) AK_C_STORE(1) AK_C_STORE(2) AK_C_STORE(3)
#undef AK_C_INIT
#undef AK_C_DOT
#undef AK_C_STORE
}

// C [M16, N] (+)= A B, M16 a multiple of 16 rows, N a multiple of 16 columns.
AK_AMX_TARGET void amx_gemm(int64_t M16, int64_t N, int64_t kchunks, const void* A,
                            int64_t a_stride, const void* B, int64_t b_stride, float* C,
                            int64_t c_stride, bool accumulate) {
  for (int64_t i = 0; i < M16; i += 16) {
    const char* a = static_cast<const char*>(A) + i * a_stride;
    char* c_row = reinterpret_cast<char*>(C) + i * c_stride;
    for (int64_t j = 0; j < N; j += 64) {
      const char* b = static_cast<const char*>(B) + j * 4;
      char* c = c_row + j * 4;
      switch (std::min<int64_t>(4, (N - j) / 16)) {
        case 4: amx_tile_row<4>(kchunks, a, a_stride, b, b_stride, c, c_stride, accumulate); break;
        case 3: amx_tile_row<3>(kchunks, a, a_stride, b, b_stride, c, c_stride, accumulate); break;
        case 2: amx_tile_row<2>(kchunks, a, a_stride, b, b_stride, c, c_stride, accumulate); break;
        default: amx_tile_row<1>(kchunks, a, a_stride, b, b_stride, c, c_stride, accumulate);
      }
    }
  }
}

// P [rows, n] fp32 (row stride n, n a multiple of 16) -> bf16 [rows16, ldp] (round to nearest
// even), zero in columns n .. ldp and rows rows .. rows16.
AK_AMX_TARGET void round_probs_bf16(const float* src, int64_t rows, int64_t rows16, int64_t n,
                                    int64_t ldp, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * n + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ldp + j), (__m256i)h);
    }
    std::fill(dst + r * ldp + n, dst + (r + 1) * ldp, uint16_t(0));
  }
  std::fill(dst + rows * ldp, dst + rows16 * ldp, uint16_t(0));
}

// Forward of query rows [q0, q1) of one head slice, keys already gathered into `w` (ldk).
AK_AMX_TARGET void forward_block_amx(const HeadSlice& hs, int64_t q0, int64_t q1,
                                     const c10::BFloat16* q, c10::BFloat16* out, float* lse,
                                     float scale, const Dropout& dp, Workspace<float>& ws,
                                     AmxWork& w, int64_t ldk) {
  const int64_t D = ws.D, Dp = ws.Dp, Dk = w.Dk, rows = q1 - q0, rows16 = round_up(rows, 16);
  std::vector<float> obuf(Dp);
  const c10::BFloat16* q_rows = q + hs.q_offset + q0 * hs.row_stride;
  for (int64_t r = 0; r < rows16; ++r) {
    uint16_t* dst = w.qb.data() + r * Dk;
    if (r < rows) {
      std::memcpy(dst, q_rows + r * hs.row_stride, D * sizeof(c10::BFloat16));
      std::fill(dst + D, dst + Dk, uint16_t(0));
      ws.m[r] = -std::numeric_limits<float>::infinity();
      ws.l[r] = 0.0f;
    } else {
      std::fill(dst, dst + Dk, uint16_t(0));
    }
  }
  std::fill(ws.o.begin(), ws.o.end(), 0.0f);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < hs.n_keys; j0 += kBlockN) {
    const int64_t valid = std::min(kBlockN, hs.n_keys - j0);
    const int64_t bn_pad = round_up(valid, kGemmNR<float>);
    const int64_t bk = round_up(valid, kAmxK);  // P's columns, a whole number of tile products
    float* S = ws.s.data();
    amx_gemm(rows16, bn_pad, Dk / kAmxK, w.qb.data(), Dk * 2, w.kv.data() + j0, ldk * 4, S,
             bn_pad * 4, false);
    for (int64_t i = 0; i < rows * bn_pad; i += 16) {
      _mm512_storeu_ps(S + i, _mm512_mul_ps(_mm512_loadu_ps(S + i), vscale));
    }
    softmax_block<float>(S, rows, bn_pad, valid, ws.m.data(), ws.l.data(), ws.o.data(), Dp);
    if (dp.on) drop_block<float>(dp, hs, q0, rows, j0, valid, bn_pad, S, ws.z.data());
    round_probs_bf16(S, rows, rows16, bn_pad, bk, w.pb.data());
    amx_gemm(rows16, Dp, bk / kAmxK, w.pb.data(), bk * 2, w.vv.data() + j0 / 2 * Dp, Dp * 4,
             ws.o.data(), Dp * 4, true);
  }
  const float keep_scale = dp.on ? static_cast<float>(dp.keep_scale) : 1.0f;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = keep_scale / ws.l[r];
    for (int64_t d = 0; d < D; ++d) obuf[d] = ws.o[r * Dp + d] * inv;
    store_row<c10::BFloat16>(obuf.data(), out + hs.q_offset + (q0 + r) * hs.row_stride, D);
    lse[hs.lse_offset + q0 + r] = ws.m[r] + std::log(ws.l[r]);
  }
}

AK_AMX_TARGET void amx_begin() {
  static const AmxConfig config;
  _tile_loadconfig(&config);
}

AK_AMX_TARGET void amx_end() { _tile_release(); }

// AMX-BF16 and AVX512-BF16 (cpuid leaf 7), and the OS's permission to use the tile state
// (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, through ATen), asked for once.
bool amx_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = (a >> 5) & 1;
    return tile && bf16 && avx512_bf16 && at::cpu::init_amx();
  }();
  return ready;
}
#endif  // CPU_CAPABILITY_AVX512

// Whether bf16 attention forwards run on AMX tiles: an AVX-512 build, a CPU (and OS) with
// AMX-BF16, and ALBERT_KERNELS_CPU_BF16_ATTENTION unset or "auto" ("fp32": the fp32 path;
// read at each call, so tests run both in one process).
bool bf16_amx_enabled() {
  const char* env = std::getenv("ALBERT_KERNELS_CPU_BF16_ATTENTION");
  if (env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "auto" || v == "fp32",
                "ALBERT_KERNELS_CPU_BF16_ATTENTION must be auto or fp32, got '", v, "'");
    if (v == "fp32") return false;
  }
#ifdef AK_ATTENTION_AMX
  return amx_ready();
#else
  return false;
#endif
}

// The zero-padded key columns n_keys .. ld of a backward score row: -inf, so that
// P = exp(S - lse) is exactly 0 there *before* it meets dP. Their score is 0 (zero K^T columns),
// and when every real score is far below 0 (lse <= -89, e.g. q.k ~ -3e4) exp(0 - lse) overflows
// (exp_u20 clamps its input and returns ~FLT_MAX or inf): multiplying that by dP = 0 made
// Di = rowsum(P dP) NaN, and with it the whole dQ row and dK. The forward does the same in
// softmax_block.
template <typename acc>
inline void mask_padded_scores(acc* s, int64_t n_keys, int64_t ld) {
  std::fill(s + n_keys, s + ld, -std::numeric_limits<acc>::infinity());
}

// The largest real score of a backward row (padded columns already -inf): the shift of its
// exponentials. The forward's lse is not used for it: lse is fp32 at the scores' magnitude
// (|lse| = 141 is 1.5e-5 from the true value, 3e4 is 2e-3) and was computed from the forward's
// scores, which round differently from these where the forward ran its products elsewhere (the
// bf16 AMX kernel: scale (Q K^T) instead of (Q scale) K^T); with the row's own maximum the
// largest P is exp(0) = 1 exactly, so a one-hot row gives dS = 0 exactly.
template <typename acc>
inline acc row_max(const acc* s, int64_t ld) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  V vmax(-std::numeric_limits<acc>::infinity());
  for (int64_t j = 0; j < ld; j += W) vmax = at::vec::maximum(vmax, V::loadu(s + j));
  return at::vec::vec_reduce_all<acc>(
      [](const V& a, const V& b) { return at::vec::maximum(a, b); }, vmax);
}

// One query row of the backward: S (scores) -> P, dp (dO V^T) -> dS / scale.
// P = exp(S - m) / rowsum(exp(S - m)), m = the row's largest real score (row_max): the row is
// normalised here, so sum_j dS_ij = 0 holds to rounding (with exp(S - lse) alone the row would
// sum to 1 + lse's error, times Di, and dQ = dS K with nearly parallel keys loses it all; dV
// gets the same relative error). The panel holds the whole row, so the max and the sum cost
// one pass each.
// Without dropout: Di = rowsum(P dP), dS = P (dP - Di); S keeps the unnormalised exp(S - m)
// and the returned 1 / rowsum scales the row's dO instead (D multiplies, not ld) for
// dV += P^T dO.
template <typename acc>
acc backward_row(acc* s, acc* dp, int64_t n_keys, int64_t ld) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const auto sum = [](const V& a, const V& b) { return a + b; };
  mask_padded_scores(s, n_keys, ld);
  const V vl(row_max(s, ld));
  V vsum(acc(0)), vdi(acc(0));
  for (int64_t j = 0; j < ld; j += W) {
    const V pv = fast_exp<acc>(V::loadu(s + j) - vl);
    pv.store(s + j);
    vsum = vsum + pv;
    vdi = at::vec::fmadd(pv, V::loadu(dp + j), vdi);
  }
  const acc inv = acc(1) / at::vec::vec_reduce_all<acc>(sum, vsum);  // >= 1 term of ~1
  const V vinv(inv), vd(at::vec::vec_reduce_all<acc>(sum, vdi) * inv);
  for (int64_t j = 0; j < ld; j += W) {
    (V::loadu(s + j) * vinv * (V::loadu(dp + j) - vd)).store(dp + j);  // dS / scale
  }
  return inv;
}

// The same with dropout, z = the row's keep flags (0 beyond n_keys), Z = z / (1 - p): P as
// above (normalised over every key, dropped or not), dP = (dO V^T) Z, Di = rowsum(P dP),
// dS = P (dP - Di), and S keeps P Z for dV += (P Z)^T dO.
template <typename acc>
void backward_row_dropout(acc* s, acc* dp, int64_t n_keys, int64_t ld, const acc* z,
                          acc keep_scale) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const auto sum = [](const V& a, const V& b) { return a + b; };
  mask_padded_scores(s, n_keys, ld);
  const V vl(row_max(s, ld)), vk(keep_scale);
  V vsum(acc(0)), vdi(acc(0));
  for (int64_t j = 0; j < ld; j += W) {
    const V pv = fast_exp<acc>(V::loadu(s + j) - vl);
    const V dpz = V::loadu(dp + j) * (V::loadu(z + j) * vk);
    pv.store(s + j);
    dpz.store(dp + j);
    vsum = vsum + pv;
    vdi = at::vec::fmadd(pv, dpz, vdi);
  }
  const acc inv = acc(1) / at::vec::vec_reduce_all<acc>(sum, vsum);
  const V vinv(inv), vd(at::vec::vec_reduce_all<acc>(sum, vdi) * inv);
  for (int64_t j = 0; j < ld; j += W) {
    const V pv = V::loadu(s + j) * vinv;
    (pv * (V::loadu(dp + j) - vd)).store(dp + j);     // dS / scale
    (pv * (V::loadu(z + j) * vk)).store(s + j);       // P Z, for dV
  }
}

// Backward of one whole head slice (all its query rows). A query block meets all the slice's
// keys at once: its scores S and dP are [kBlockM, Np] panels (linear in L), so that
// P is normalised over the whole row and Di = rowsum(P * dP) is computed from the very P used in
// dS (sum_j dS_ij = 0 holds to rounding; the usual rowsum(dO * O) shortcut is measurably less
// accurate in fp32).
template <typename scalar_t, typename acc>
void backward_slice(const HeadSlice& hs, const scalar_t* grad_out, const scalar_t* q,
                    const acc* lse, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,
                    acc scale, const Dropout& dp, Workspace<acc>& ws) {
  const int64_t D = ws.D, Dp = ws.Dp;
  if (hs.n_keys == 0) return;  // every gradient of the slice stays zero
  const int64_t ld = round_up(hs.n_keys, kGemmNR<acc>);
  std::fill(ws.dk.begin(), ws.dk.begin() + ld * Dp, acc(0));
  std::fill(ws.dv.begin(), ws.dv.begin() + ld * Dp, acc(0));
  std::vector<acc> do_buf(kBlockM * Dp, acc(0));
  acc* S = ws.s.data();  // scores, then P      [rows, ld]
  acc* P = ws.p.data();  // dP, then dS         [rows, ld]
  acc* z = ws.z.data();
  if (dp.on) std::fill(z + hs.n_keys, z + ld, acc(0));
  const acc keep_scale = static_cast<acc>(dp.keep_scale);
  for (int64_t q0 = 0; q0 < hs.n_rows; q0 += kBlockM) {
    const int64_t rows = std::min(kBlockM, hs.n_rows - q0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = hs.q_offset + (q0 + r) * hs.row_stride;
      load_scaled_q(q + off, ws.q.data() + r * Dp, D, scale);
      load_row_into(grad_out + off, do_buf.data() + r * Dp, D);
    }
    small_gemm<acc>(rows, ld, D, ws.q.data(), Dp, 1, ws.kt.data(), ld, S, ld, false);
    small_gemm<acc>(rows, ld, D, do_buf.data(), Dp, 1, ws.vt.data(), ld, P, ld, false);
    for (int64_t r = 0; r < rows; ++r) {
      if (dp.on) {
        dp.keep_row(dp.row_base(hs.index, q0 + r), hs.keys, hs.n_keys, z);
        backward_row_dropout<acc>(S + r * ld, P + r * ld, hs.n_keys, ld, z, keep_scale);
      } else {
        const acc inv = backward_row<acc>(S + r * ld, P + r * ld, hs.n_keys, ld);
        acc* do_row = do_buf.data() + r * Dp;  // dO's last use: dV += P^T dO below
        for (int64_t d = 0; d < D; ++d) do_row[d] *= inv;
      }
    }
    // dV += P^T dO, dK += (dS / scale)^T (Q scale) (A transposed via strides),
    // dQ = (dS / scale) K * scale
    small_gemm<acc>(ld, Dp, rows, S, 1, ld, do_buf.data(), Dp, ws.dv.data(), Dp, true);
    small_gemm<acc>(ld, Dp, rows, P, 1, ld, ws.q.data(), Dp, ws.dk.data(), Dp, true);
    small_gemm<acc>(rows, Dp, ld, P, ld, 1, ws.k.data(), Dp, ws.dq.data(), Dp, false);
    for (int64_t r = 0; r < rows; ++r) {
      acc* dq = ws.dq.data() + r * Dp;
      for (int64_t d = 0; d < D; ++d) dq[d] *= scale;
      store_row<scalar_t>(dq, grad_q + hs.q_offset + (q0 + r) * hs.row_stride, D);
    }
  }
  for (int64_t j = 0; j < hs.n_keys; ++j) {
    const int64_t key = hs.keys ? hs.keys[j] : j;
    const int64_t off = hs.k_offset + key * hs.row_stride;
    store_row<scalar_t>(ws.dk.data() + j * Dp, grad_k + off, D);
    store_row<scalar_t>(ws.dv.data() + j * Dp, grad_v + off, D);
  }
}

// The real keys of each batch row of a padded batch: keys[b * L + j] for j < counts[b].
struct KeyLists {
  std::vector<int64_t> keys, counts;
  KeyLists(const c10::optional<at::Tensor>& mask, int64_t B, int64_t L)
      : keys(B * L), counts(B, L) {
    const bool* mp = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j) {
        if (!mp || mp[b * L + j]) keys[b * L + n++] = j;
      }
      counts[b] = n;
    }
  }
};

// Head slices of a padded batch [B, H, L, D] (slice index = b * H + h) ...
inline HeadSlice padded_slice(const KeyLists& kl, int64_t b, int64_t h, int64_t H, int64_t L,
                              int64_t D) {
  const int64_t bh = b * H + h;
  return {bh, L, D, bh * L * D, bh * L * D, bh * L, kl.keys.data() + b * L, kl.counts[b]};
}

// ... and of a packed batch: q [Tq, H, D] (lse [H, Tq]), k and v [Tk, H, D].
inline HeadSlice varlen_slice(const int32_t* cu_q, const int32_t* cu_k, int64_t seq, int64_t h,
                              int64_t H, int64_t Tq, int64_t D) {
  const int64_t q_start = cu_q[seq], k_start = cu_k[seq];
  return {seq * H + h, cu_q[seq + 1] - q_start, H * D, q_start * H * D + h * D,
          k_start * H * D + h * D, h * Tq + q_start, nullptr, cu_k[seq + 1] - k_start};
}

// Forward driver: tasks = (slice, query block); `slice_of(task_slice)` builds the HeadSlice.
template <typename scalar_t, typename SliceFn>
void run_forward(int64_t n_slices, const std::vector<int64_t>& slice_rows, SliceFn slice_of,
                 int64_t D, int64_t max_keys, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, at::Tensor& out, at::Tensor& lse, double scale,
                 const Dropout& dp) {
  using acc = acc_t<scalar_t>;
  std::vector<int64_t> task_slice, task_q0;  // flattened (slice, query block) list
  for (int64_t s = 0; s < n_slices; ++s) {
    for (int64_t q0 = 0; q0 < slice_rows[s]; q0 += kBlockM) {
      task_slice.push_back(s);
      task_q0.push_back(q0);
    }
  }
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                 *vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc* lp = lse.data_ptr<acc>();
  // read (and checked) in every build, so a bad value is an error on any CPU
  [[maybe_unused]] const bool amx = std::is_same_v<scalar_t, c10::BFloat16> && bf16_amx_enabled();
#ifdef AK_ATTENTION_AMX
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx) {
      at::parallel_for(0, static_cast<int64_t>(task_slice.size()), 1, [&](int64_t t0, int64_t t1) {
        Workspace<acc> ws(D, max_keys, false);
        AmxWork w(D, ws.Dp, max_keys);
        amx_begin();  // the tile configuration is per thread
        int64_t gathered = -1;
        for (int64_t t = t0; t < t1; ++t) {
          const HeadSlice hs = slice_of(task_slice[t]);
          const int64_t q1 = std::min(task_q0[t] + kBlockM, hs.n_rows);
          if (hs.n_keys == 0) {  // no real key: the fp32 path writes zeros and lse = -inf
            forward_block<scalar_t, acc>(hs, task_q0[t], q1, qp, op, lp, static_cast<acc>(scale),
                                         dp, ws);
            continue;
          }
          const int64_t ldk = round_up(hs.n_keys, kAmxK);
          if (gathered != task_slice[t]) {
            gather_keys_amx(hs, kp, vp, D, w, ldk);
            gathered = task_slice[t];
          }
          forward_block_amx(hs, task_q0[t], q1, qp, op, lp, static_cast<float>(scale), dp, ws, w,
                            ldk);
        }
        amx_end();
      });
      return;
    }
  }
#endif
  at::parallel_for(0, static_cast<int64_t>(task_slice.size()), 1, [&](int64_t t0, int64_t t1) {
    Workspace<acc> ws(D, max_keys, false);
    int64_t gathered = -1;  // consecutive tasks of one slice reuse the gathered keys
    for (int64_t t = t0; t < t1; ++t) {
      const HeadSlice hs = slice_of(task_slice[t]);
      const int64_t ld = round_up(std::max<int64_t>(hs.n_keys, 1), kGemmNR<acc>);
      if (gathered != task_slice[t] && hs.n_keys > 0) {
        gather_keys<scalar_t, acc>(hs, kp, vp, ws, ld, false);
        gathered = task_slice[t];
      }
      forward_block<scalar_t, acc>(hs, task_q0[t], std::min(task_q0[t] + kBlockM, hs.n_rows), qp,
                                   op, lp, static_cast<acc>(scale), dp, ws);
    }
  });
}

template <typename scalar_t, typename SliceFn>
void run_backward(int64_t n_slices, SliceFn slice_of, int64_t D, int64_t max_keys,
                  const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& lse, at::Tensor& gq, at::Tensor& gk,
                  at::Tensor& gv, double scale, const Dropout& dp) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n_slices, 1, [&](int64_t s0, int64_t s1) {
    Workspace<acc> ws(D, max_keys, true);
    for (int64_t s = s0; s < s1; ++s) {
      const HeadSlice hs = slice_of(s);
      if (hs.n_keys == 0) continue;
      gather_keys<scalar_t, acc>(hs, k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ws,
                                 round_up(hs.n_keys, kGemmNR<acc>), true);
      backward_slice<scalar_t, acc>(hs, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                    lse.data_ptr<acc>(),
                                    gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                                    gv.data_ptr<scalar_t>(), static_cast<acc>(scale), dp, ws);
    }
  });
}

void check_contiguous(std::initializer_list<const at::Tensor*> ts, const char* op) {
  for (const at::Tensor* t : ts) TORCH_CHECK(t->is_contiguous(), op, ": expects contiguous inputs");
}

void check_dropout_p(double p, const char* op) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

// The padded layout: q, k, v [B, H, L, D] of one shape; the key lists of the mask.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask,
                                                 double scale, double dropout_p, int64_t seed,
                                                 int64_t offset, bool /*save_residual*/) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "attention_fwd: q, k, v must be [B, H, L, D] of one shape");
  check_contiguous({&q, &k, &v}, "attention_fwd");
  check_dropout_p(dropout_p, "attention_fwd");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->is_contiguous()),
              "attention_fwd: key_padding_mask must be contiguous bool [B, L]");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(stat_dtype(q.scalar_type())));
  const KeyLists kl(mask, B, L);
  const Dropout dp(dropout_p, seed, offset, L, L);
  std::vector<int64_t> rows(B * H, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_fwd", [&] {
    auto slice_of = [&](int64_t s) { return padded_slice(kl, s / H, s % H, H, L, D); };
    run_forward<scalar_t>(B * H, rows, slice_of, D, L, q, k, v, out, lse, scale, dp);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  check_contiguous({&grad_out, &q, &k, &v, &out, &lse}, "attention_bwd");
  check_dropout_p(dropout_p, "attention_bwd");
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q.scalar_type()), "attention_bwd: lse dtype");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  const KeyLists kl(mask, B, L);
  const Dropout dp(dropout_p, seed, offset, L, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_bwd", [&] {
    auto slice_of = [&](int64_t s) { return padded_slice(kl, s / H, s % H, H, L, D); };
    run_backward<scalar_t>(B * H, slice_of, D, L, grad_out, q, k, v, lse, gq, gk, gv, scale, dp);
  });
  return {gq, gk, gv};
}

// Varlen checks that keep memory accesses in range (the op layer validates the rest): both
// cu_seqlens int32 [B+1], non-decreasing from 0, ending within their tensors; with dropout the
// lengths must fit max_seqlen_q / max_seqlen_k, which lay out the random offsets. Returns the
// longest key sequence (the work buffers' size).
int64_t check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                     const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool dropout,
                     const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(1) == k.size(1) && q.size(2) == k.size(2),
              op, ": q must be [Tq, H, D] and k, v [Tk, H, D]");
  TORCH_CHECK(cu_q.scalar_type() == at::kInt && cu_k.scalar_type() == at::kInt &&
                  cu_q.dim() == 1 && cu_q.sizes() == cu_k.sizes() && cu_q.numel() >= 1,
              op, ": cu_seqlens_q and cu_seqlens_k must be int32 [B+1] of one size");
  const int32_t *cq = cu_q.data_ptr<int32_t>(), *ck = cu_k.data_ptr<int32_t>();
  const int64_t n_seq = cu_q.numel() - 1;
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0 && cq[n_seq] <= q.size(0) && ck[n_seq] <= k.size(0), op,
              ": cu_seqlens must start at 0 and end within q / k");
  int64_t longest_k = 0;
  for (int64_t s = 0; s < n_seq; ++s) {
    const int64_t nq = cq[s + 1] - cq[s], nk = ck[s + 1] - ck[s];
    TORCH_CHECK(nq >= 0 && nk >= 0, op, ": cu_seqlens must be non-decreasing");
    TORCH_CHECK(!dropout || (nq <= max_q && nk <= max_k), op,
                ": with dropout, every length must fit max_seqlen_q / max_seqlen_k");
    longest_k = std::max(longest_k, nk);
  }
  return longest_k;
}

}  // namespace

// Declared in ops.h: the small-M layer (small_m.cpp) calls it directly.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool /*save_residual*/) {
  check_contiguous({&q, &k, &v, &cu_seqlens_q, &cu_seqlens_k}, "varlen_attention_fwd");
  check_dropout_p(dropout_p, "varlen_attention_fwd");
  TORCH_CHECK(v.sizes() == k.sizes(), "varlen_attention_fwd: v must have k's shape");
  const int64_t max_keys = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p > 0, "varlen_attention_fwd");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), n_seq = cu_seqlens_q.size(0) - 1;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({H, T}, q.options().dtype(stat_dtype(q.scalar_type())));
  const int32_t *cq = cu_seqlens_q.data_ptr<int32_t>(), *ck = cu_seqlens_k.data_ptr<int32_t>();
  std::vector<int64_t> rows(n_seq * H);
  for (int64_t s = 0; s < n_seq * H; ++s) rows[s] = cq[s / H + 1] - cq[s / H];
  const Dropout dp(dropout_p, seed, offset, max_seqlen_q, max_seqlen_k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_fwd", [&] {
    auto slice_of = [&](int64_t s) { return varlen_slice(cq, ck, s / H, s % H, H, T, D); };
    run_forward<scalar_t>(n_seq * H, rows, slice_of, D, max_keys, q, k, v, out, lse, scale, dp);
  });
  return {out, lse};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    double dropout_p, int64_t seed, int64_t offset) {
  check_contiguous({&grad_out, &q, &k, &v, &out, &lse, &cu_seqlens_q, &cu_seqlens_k},
                   "varlen_attention_bwd");
  check_dropout_p(dropout_p, "varlen_attention_bwd");
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q.scalar_type()), "varlen_attention_bwd: lse dtype");
  const int64_t max_keys = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, dropout_p > 0, "varlen_attention_bwd");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), n_seq = cu_seqlens_q.size(0) - 1;
  at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  const int32_t *cq = cu_seqlens_q.data_ptr<int32_t>(), *ck = cu_seqlens_k.data_ptr<int32_t>();
  const Dropout dp(dropout_p, seed, offset, max_seqlen_q, max_seqlen_k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_bwd", [&] {
    auto slice_of = [&](int64_t s) { return varlen_slice(cq, ck, s / H, s % H, H, T, D); };
    run_backward<scalar_t>(n_seq * H, slice_of, D, max_keys, grad_out, q, k, v, lse, gq, gk, gv,
                           scale, dp);
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}

}  // namespace albert_kernels::cpu
