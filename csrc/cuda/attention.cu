// Softmax attention on CUDA: FlashAttention-2-style forward and backward, padded and varlen.
//
// Layouts (contiguous; the op wrappers make them so):
//   padded:  q, k, v, out, grad_* [B, H, L, D]; key_padding_mask bool [B, L] (True = real key) or
//            none; lse float32 [2, B, H, L] (the softmax statistics, see Numerics; fp16/bf16
//            with save_residual [2 + D / 2, B, H, L]).
//   varlen:  q, out, grad_q [Tq, H, D], k, v, grad_k, grad_v [Tk, H, D]; cu_seqlens_q,
//            cu_seqlens_k int32 [B+1]: sequence b's queries cu_q[b]:cu_q[b+1] attend to its keys
//            cu_k[b]:cu_k[b+1] only (FlashAttention's varlen API); lse float32 [2, H, Tq].
// Both are read through a per-(sequence, head) view (Seq): query i of the view is at
// q_base + i * stride, key j at k_base + j * stride (stride D padded, H * D varlen), query i's
// statistics at lse_base + i of each plane of lse. A sequence with queries and no key gives zero rows and zero gradients.
//
// Dropout (template flag DROPOUT; false compiles the kernels without it): probability (i, j) of
// (sequence s, head h) is kept iff its Philox4x32-10 draw at
// offset + ((s * H + h) * max_q + i) * max_k + j passes the threshold (philox.cuh, the same draws
// as Triton's tl.randint and backends/dropout.py); kept ones are scaled by 1 / (1 - p). The
// softmax statistics (m, l) are those of the undropped scores; O = (P * Z) V with
// Z = keep / (1 - p); backward regenerates Z: dV = (P * Z)^T dO, dP = (dO V^T) * Z,
// dS = P * (dP - delta), delta = dO . O as without dropout.
// Head dims: 32, 64 and 128 (templates); others are rejected. All offsets are 64-bit.
//
// Numerics (as the Triton kernels, backends/triton/attention.py): scores, the online softmax
// statistics (running max m and sum l), the output accumulator and every gradient accumulator are
// fp32. The scaled scores s * scale stay in natural units; the row max is subtracted there and
// only the difference is multiplied by log2(e) for exp2 (s * scale * log2(e) would round at the
// scores' magnitude before the max cancels it: P was ~5e-6 off at scores ~ -128). Saved for
// backward: out and the statistics as the op's `lse`, fp32 [2, rows]: plane 0 the row max m,
// plane 1 log2(l), apart (m + log(l) would round at m's magnitude); backward recomputes
// P = exp2((s * scale - m) * log2(e) - log2(l)) (recompute_p), with s * scale rounded as in
// forward (scaled). delta_i = dO_i . O_i is computed with dP's own arithmetic
// (attn_bwd_delta_kernel), so that a one-hot row's dS = P (dP - delta) is exactly 0. fp16/bf16
// with save_residual (the op wrappers set it when autograd will run the backward): the forward
// also stores what rounding the fp32 output to T lost (store_rows<..., RESIDUAL>; lse's planes 2..,
// in T, out's layout) and delta adds dO_i . residual_i, so delta is as exact as from an fp32
// output (as Triton's o_lo: nearly one-hot fp16 rows exceeded the dq budget without it). A query
// row with no real key (all keys masked, or an empty sequence) has l = 0: it outputs 0 and its
// statistics are (+inf, 0), so its recomputed probabilities, and so all of its gradients, are
// exactly 0.
// Key blocks whose keys are all padding are skipped (forward and dq); a dk/dv CTA whose keys are
// all padding writes zeros and exits.
//
// fp16 / bf16: tensor cores through mma.sync.m16n8k16 (inline PTX), operands staged in shared
// memory by cp.async and read with ldmatrix (rows padded by 16 bytes: no bank conflicts).
//   attn_fwd_tc_kernel    CTA = 4 warps = 64 query rows (16 per warp) of one (sequence, head);
//                         loops over key blocks of 64: S = Q K^T (registers), online softmax,
//                         O += P V with P taken straight from the S accumulators. The next key
//                         block's K is fetched while the softmax and P V run, its V while the
//                         next S runs.
//   attn_bwd_delta_kernel delta_i = dO_i . O_i (fp32, a plane of lse's layout): the diagonal of
//                         the tensor-core product dO O^T (fp16/bf16; plus dO_i . residual_i when
//                         the forward kept it), a sequential dot (fp32).
//   attn_bwd_dkdv_tc_kernel CTA = 64 keys (16 per warp) of one (sequence, head), loops over all
//                         query blocks (BWD_BM rows): recomputes P^T from the statistics,
//                         dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//   attn_bwd_dq_tc_kernel CTA = 64 query rows (16 per warp), loops over key blocks: recomputes
//                         P, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//   dq is computed by its own kernel rather than by atomics from the dk/dv CTAs: every gradient
//   is written exactly once by one CTA, so backward is deterministic (at the cost of recomputing
//   Q K^T and dO V^T once more).
// fp32: the same algorithm on CUDA cores (no fp32 tensor-core path, no TF32):
//   attn_fwd_simt_kernel / attn_bwd_dkdv_simt_kernel / attn_bwd_dq_simt_kernel, CTA = 4 warps,
//   tiles of 32 queries x 32 keys; a lane owns one key (scores) or 1/32 of the head dim (outputs).
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "philox.cuh"

namespace albert_kernels {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;  // every attention kernel: 4 warps

struct AttnParams {
  const void* q; const void* k; const void* v;
  const void* out;    // backward: the forward output
  const void* dout;   // backward: grad of out
  void* o;            // forward: output
  void* dq; void* dk; void* dv;
  float* row_max;     // forward: written; backward: read (plane 0 of the op's lse tensor)
  float* row_log2sum; // same layout (plane 1 of lse)
  float* delta;       // backward scratch, row_max's layout
  void* o_lo;         // fp16/bf16 with save_residual: out's rounding residual, in T, out's layout
                      // (planes 2.. of lse); forward: written if set; backward: added to delta
  const bool* mask;   // padded: [B, L] or null
  const int* n_keys;  // backward, padded with a mask: real keys per sequence [B] (ds_scale)
  const int* cu_seqlens_q;  // varlen: [B + 1] or null
  const int* cu_seqlens_k;  // varlen: [B + 1] or null
  int H;
  int L;              // padded length (unused for varlen)
  int64_t Tq;         // varlen: total query tokens (each plane of lse is [H, Tq])
  float scale;
  philox::Dropout drop;  // read by the DROPOUT instantiations only
};

// One (sequence, head): query i at q_base + i * stride, key j at k_base + j * stride, query i's
// lse at lse_base + i; rng = dropout offset of its element (0, 0).
struct Seq {
  int64_t q_base, k_base, stride, lse_base;
  int q_len, k_len;
  const bool* mask;
  uint64_t rng;
};

template <int D>
__device__ __forceinline__ Seq seq_of(const AttnParams& p, int64_t bh) {
  const int64_t b = bh / p.H, h = bh % p.H;
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.q_len = p.cu_seqlens_q[b + 1] - q0;
    s.k_len = p.cu_seqlens_k[b + 1] - k0;
    s.stride = static_cast<int64_t>(p.H) * D;
    s.q_base = q0 * s.stride + h * D;
    s.k_base = k0 * s.stride + h * D;
    s.lse_base = h * p.Tq + q0;
    s.mask = nullptr;
  } else {
    s.q_len = s.k_len = p.L;
    s.stride = D;
    s.q_base = s.k_base = bh * p.L * D;
    s.lse_base = bh * p.L;
    s.mask = p.mask != nullptr ? p.mask + b * p.L : nullptr;
  }
  s.rng = philox::head_offset(p.drop, b, h, p.H);
  return s;
}

// The factor from dS to dQ and dK: scale, or exactly 0 for a sequence with one real key. Softmax
// over a single key is constant (P = 1), so its dS is 0; without dropout P (dP - delta) is exactly
// 0 there already (delta is dP's own arithmetic), with dropout O = V / (1 - p) is rounded before
// delta is taken and dP is scaled after its dot, so they differ by rounding (as Triton's
// _ds_scale). Read at the end of a backward kernel (blockIdx.x is its (sequence, head)), so that
// no register holds the count through the loops (keeping it in Seq made dk/dv spill on sm_90).
__device__ __forceinline__ float ds_scale(const AttnParams& p, const Seq& s) {
  int n_keys = s.k_len;  // varlen: the sequence's keys; padded: L, less padding when masked
  if (p.cu_seqlens_q == nullptr && p.n_keys != nullptr) n_keys = p.n_keys[blockIdx.x / p.H];
  return n_keys > 1 ? p.scale : 0.f;
}

__device__ __forceinline__ bool key_valid(const Seq& s, int j) {
  return j < s.k_len && (s.mask == nullptr || s.mask[j]);
}

// Is probability (query i, key j) of this (sequence, head) kept by dropout?
__device__ __forceinline__ bool kept(const AttnParams& p, const Seq& s, int i, int j) {
  return philox::keep(p.drop, s.rng, i, j);
}

// The forward's softmax statistics of a query row for backward: (row max, log2 of the row sum);
// (+inf, 0) outside the sequence, as the forward writes them for a row without a real key, so
// that the recomputed probabilities (prob below) are exactly 0 there.
__device__ __forceinline__ float2 row_stats(const AttnParams& p, const Seq& s, int row) {
  if (row >= s.q_len) return make_float2(INFINITY, 0.f);
  return make_float2(p.row_max[s.lse_base + row], p.row_log2sum[s.lse_base + row]);
}

// The scaled score s * scale, never fused into a following add (nvcc contracts a * b + c into one
// FMA where it can): forward and the two backward kernels must round it alike, or the recomputed
// probability of a one-hot row's key (s * scale - max = 0) is not exactly 1.
__device__ __forceinline__ float scaled(float s, float scale) { return __fmul_rn(s, scale); }

// The probability recomputed in backward from the score scaled (natural units, padding bias
// added) and the row's statistics: exp2((x - max) * log2(e) - log2(sum)), the max subtracted
// before the log2(e) rounds (as in the forward), never from max + log(sum) (which rounds at
// the max's magnitude: ulp(128) = 1.5e-5).
__device__ __forceinline__ float recompute_p(float x, float row_max, float row_log2sum) {
  return exp2f((x - row_max) * kLog2e - row_log2sum);
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+): cp.async, ldmatrix, mma.sync m16n8k16
// Fragment layout of m16n8k16 (lane = 4 * g + t): A (16x16, row-major) a0: (g, 2t..2t+1),
// a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..); B (16x8) b0: (k = 2t..2t+1, n = g),
// b1: (k = 2t+8.., n = g); C (16x8) c0,c1: (g, 2t..2t+1), c2,c3: (g+8, 2t..2t+1).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-fills instead of reading when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem))
               : "memory");
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// C accumulators of 16 x 16k (two n-tiles per k-step) -> A fragments of the next product.
__device__ __forceinline__ void zero(float (&c)[4]) { c[0] = c[1] = c[2] = c[3] = 0.f; }

template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Tensor-core tiles in shared memory: row pitch D + 8 elements (16-byte pad).
template <int D> constexpr int pitch() { return D + 8; }

// Rows [row0, row0 + ROWS) of a view (token stride `stride`) -> smem [ROWS][D + 8] by cp.async;
// rows at or past len are zero-filled. K / V tiles pass their key block's additive bias
// (shared memory, [ROWS], 0 = real key, -inf = padding or past the sequence, as next_key_block
// writes it): then every row whose bias is not 0 is zero-filled instead, so that NaN or inf in a
// padded key / value slot never enters a product (S = Q K^T, P V, dP = dO V^T, dS K), where
// the -inf bias alone would leave 0 * NaN. The zero-fill is cp.async's own (src-size 0): no
// load, and no register beyond the bias read.
// Without a bias but with a key mask (`mask`, [len] bool or null: the dK/dV kernel's own key
// tile, loaded once per CTA), rows whose key is padding are zero-filled the same way.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* g, int64_t stride, int row0, int len,
                                                const float* bias = nullptr, const bool* mask = nullptr) {
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  static_assert(ROWS * CHUNKS % kThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
  for (int i = 0; i < ROWS * CHUNKS / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    // the bias is -inf past the sequence too (key_valid), so it replaces the length test
    const bool valid = bias != nullptr ? bias[r] == 0.f
                                       : row0 + r < len && (mask == nullptr || mask[row0 + r]);
    const T* src = valid ? g + static_cast<int64_t>(row0 + r) * stride + col : g;
    cp_async_16(smem + r * pitch<D>() + col, src, valid);
  }
}

// acc[n-tiles of 8 cols, 2 per ldmatrix] += A (16 x D of a row-major smem tile at rows row0) times
// B^T where B is a row-major smem tile [cols][D] (rows col0..): i.e. acc = A_rows @ B_rows^T.
// NT = number of 8-wide n-tiles (must be even).
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a_smem, int a_row0,
                                        const T* b_smem, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_smem + (a_row0 + (lane & 15)) * pitch<D>() + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_smem + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * pitch<D>() + ks * 16 +
                         ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[D/8 n-tiles] += P (16 x K, given as accumulators p[K/8][4]) times a row-major smem tile
// [K][D] (rows 0..K-1): the P V / P^T dO / dS K / dS^T Q products.
template <typename T, int D, int K>
__device__ __forceinline__ void mma_pv(float (&acc)[D / 8][4], const float (&p)[K / 8][4],
                                       const T* b_smem, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_smem + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch<D>() +
                               dp * 16 + (lane >> 4) * 8);
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Stores a warp's 16 x D accumulator tile (rows row0 + g and row0 + g + 8 of a view with `len`
// rows, token stride `stride`) times `mul`, rounded to T. RESIDUAL: stores instead what that
// rounding loses, x - T(x) for each value x (itself in T, same layout): the backward adds
// dO . residual to delta (docs/correctness.md).
template <typename T, int D, bool RESIDUAL = false>
__device__ __forceinline__ void store_rows(T* g_base, int64_t stride, int len, int row0,
                                           const float (&acc)[D / 8][4], float mul0, float mul1, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int ra = row0 + g, rb = ra + 8;
  // __fmul_rn: the product is rounded to fp32 before the residual's subtraction (no FMA)
  const auto value = [](float a, float mul) {
    const float x = __fmul_rn(a, mul);
    if constexpr (RESIDUAL) return x - to_float(from_float<T>(x));
    return x;
  };
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = j * 8 + 2 * t;
    if (ra < len)
      *reinterpret_cast<uint32_t*>(g_base + ra * stride + col) =
          pack2<T>(value(acc[j][0], mul0), value(acc[j][1], mul0));
    if (rb < len)
      *reinterpret_cast<uint32_t*>(g_base + rb * stride + col) =
          pack2<T>(value(acc[j][2], mul1), value(acc[j][3], mul1));
  }
}

// a . b over D floats, summed in order d = 0, 1, ... (fp32 dP and delta must sum alike)
template <int D>
__device__ __forceinline__ float dot_f32(const float* a, const float* b) {
  float acc = 0.f;
#pragma unroll 16
  for (int d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

// The first key block at or after nb with a real key; its additive key bias (0 or -inf per key)
// goes to bias[0, BN). Contains barriers: every thread of the CTA must call it.
template <int BN>
__device__ __forceinline__ int next_key_block(const Seq& s, int nb, int n_blocks, float* bias) {
  for (; nb < n_blocks; ++nb) {
    bool valid = false;
    if (threadIdx.x < BN) {
      valid = key_valid(s, nb * BN + threadIdx.x);
      bias[threadIdx.x] = valid ? 0.f : -INFINITY;
    }
    if (__syncthreads_or(valid)) break;
  }
  return nb;
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 forward
// ---------------------------------------------------------------------------------------------
constexpr int kTcBlockM = 64;  // query rows per forward / dq CTA (16 per warp)
constexpr int kTcBlockN = 64;  // keys per forward / dq iteration; keys per dk/dv CTA
// dk/dv: queries per step (with dropout at D = 128: 16, else sm_80 spills a few registers)
template <int D, bool DROPOUT = false>
constexpr int bwd_block_m() { return D >= 128 ? (DROPOUT ? 16 : 32) : 64; }

template <typename T, int D>
constexpr size_t fwd_tc_smem() {
  return (kTcBlockM + 2 * kTcBlockN) * pitch<D>() * sizeof(T) + 2 * kTcBlockN * sizeof(float);
}

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc_kernel(const AttnParams p) {
  constexpr int BM = kTcBlockM, BN = kTcBlockN, NT_S = BN / 8, NT_O = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + BM * pitch<D>();
  T* Vs = Ks + BN * pitch<D>();
  float* bias_s = reinterpret_cast<float*>(Vs + BN * pitch<D>());  // [2][BN], double-buffered

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int m0 = blockIdx.y * BM;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  const T* q = static_cast<const T*>(p.q) + s.q_base;
  const T* k = static_cast<const T*>(p.k) + s.k_base;
  const T* v = static_cast<const T*>(p.v) + s.k_base;
  const int n_blocks = (s.k_len + BN - 1) / BN;

  load_tile_async<T, D, BM>(Qs, q, s.stride, m0, s.q_len);
  int nb = next_key_block<BN>(s, 0, n_blocks, bias_s);
  if (nb < n_blocks) load_tile_async<T, D, BN>(Ks, k, s.stride, nb * BN, s.k_len, bias_s);
  cp_async_commit();  // group: Q + K(nb)
  if (nb < n_blocks) load_tile_async<T, D, BN>(Vs, v, s.stride, nb * BN, s.k_len, bias_s);
  cp_async_commit();  // group: V(nb)

  float o[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) zero(o[j]);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  int buf = 0;

  while (nb < n_blocks) {
    cp_async_wait<1>();  // Q and K(nb) have landed
    __syncthreads();
    float sc[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) zero(sc[j]);
    mma_abt<T, D, NT_S>(sc, Qs, warp * 16, Ks, lane);
    __syncthreads();  // every warp is done with Ks
    const int nb_next = next_key_block<BN>(s, nb + 1, n_blocks, bias_s + (buf ^ 1) * BN);
    if (nb_next < n_blocks)
      load_tile_async<T, D, BN>(Ks, k, s.stride, nb_next * BN, s.k_len, bias_s + (buf ^ 1) * BN);
    cp_async_commit();

    // Online softmax over this block (rows g and g + 8 of the warp's 16; a quad shares a row).
    const float* bias = bias_s + buf * BN;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = scaled(sc[j][e], p.scale) + bias[j * 8 + 2 * t + (e & 1)];  // natural units
        mx[e >> 1] = fmaxf(mx[e >> 1], sc[j][e]);
      }
    float base[2], alpha[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no real key yet: avoid (-inf) - (-inf)
      alpha[r] = exp2f((m_run[r] - base[r]) * kLog2e);
      m_run[r] = mx[r];
    }
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sc[j][e] = exp2f((sc[j][e] - base[e >> 1]) * kLog2e);  // max subtracted before log2(e)
        rowsum[e >> 1] += sc[j][e];
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rowsum[r];
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];
    if constexpr (DROPOUT) {  // l_run above sums every probability, dropped or not
      const int row = m0 + warp * 16 + (lane >> 2);
#pragma unroll
      for (int j = 0; j < NT_S; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!kept(p, s, row + 8 * (e >> 1), nb * BN + j * 8 + 2 * t + (e & 1))) sc[j][e] = 0.f;
    }

    cp_async_wait<1>();  // V(nb) has landed
    __syncthreads();
    mma_pv<T, D, BN>(o, sc, Vs, lane);
    __syncthreads();  // every warp is done with Vs
    if (nb_next < n_blocks)
      load_tile_async<T, D, BN>(Vs, v, s.stride, nb_next * BN, s.k_len, bias_s + (buf ^ 1) * BN);
    cp_async_commit();
    nb = nb_next;
    buf ^= 1;
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffffu, l_run[r], 2);
    inv[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
    if constexpr (DROPOUT) inv[r] *= p.drop.scale;
  }
  const int row0 = m0 + warp * 16;
  store_rows<T, D>(static_cast<T*>(p.o) + s.q_base, s.stride, s.q_len, row0, o, inv[0], inv[1], lane);
  if (p.o_lo != nullptr)
    store_rows<T, D, true>(static_cast<T*>(p.o_lo) + s.q_base, s.stride, s.q_len, row0, o, inv[0],
                           inv[1], lane);
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + (lane >> 2) + 8 * r;
      if (row < s.q_len) {
        p.row_max[s.lse_base + row] = l_run[r] > 0.f ? m_run[r] : INFINITY;
        p.row_log2sum[s.lse_base + row] = l_run[r] > 0.f ? log2f(l_run[r]) : 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: delta_i = dO_i . O_i, in dP's own arithmetic
// ---------------------------------------------------------------------------------------------
constexpr int kDeltaRows = 64;  // rows per CTA (16 per warp)

template <typename T, int D>
constexpr size_t delta_smem() {
  return std::is_same_v<T, float> ? 0 : 2 * kDeltaRows * pitch<D>() * sizeof(T);
}

// delta_i = dO_i . O_i (fp32, row_max's layout), computed as dP = dO V^T is: on a one-hot
// softmax row (P_ij = 1, O_i = V_j exactly) delta_i is then bit for bit dP_ij and
// dS = P (dP - delta) is exactly 0, as in float64 (a row sum in another order than dP's left
// rounding noise of dP's size: dq, dk ~4e-5 at scaled scores ~3e4, where the gradient is 0).
//   fp16 / bf16: the diagonal of the tensor-core product dO O^T (mma_abt over the same head dim
//     in the same k-steps as dP's, each element rounded alike wherever it sits in the tile);
//     each warp multiplies its 16 rows of dO by the same 16 rows of O.
//   fp32: one thread per row, dot_f32 (the sequential sum of the SIMT kernels' dP).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const AttnParams p) {
  const Seq s = seq_of<D>(p, blockIdx.x);
  const int m0 = blockIdx.y * kDeltaRows;
  if (m0 >= s.q_len) return;
  const T* o = static_cast<const T*>(p.out) + s.q_base;
  const T* dout = static_cast<const T*>(p.dout) + s.q_base;
  if constexpr (std::is_same_v<T, float>) {
    const int row = m0 + threadIdx.x;
    if (threadIdx.x < kDeltaRows && row < s.q_len)
      p.delta[s.lse_base + row] = dot_f32<D>(dout + row * s.stride, o + row * s.stride);
  } else {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* dOs = reinterpret_cast<T*>(smem_raw);
    T* Os = dOs + kDeltaRows * pitch<D>();
    __shared__ float lo_s[kDeltaRows];  // dO_i . residual_i (0 without a residual)
    load_tile_async<T, D, kDeltaRows>(dOs, dout, s.stride, m0, s.q_len);
    load_tile_async<T, D, kDeltaRows>(Os, o, s.stride, m0, s.q_len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (threadIdx.x < kDeltaRows) {
      const int row = m0 + threadIdx.x;
      float acc = 0.f;
      if (p.o_lo != nullptr && row < s.q_len) {
        const T* lo = static_cast<const T*>(p.o_lo) + s.q_base + row * s.stride;
        const T* d_o = dOs + threadIdx.x * pitch<D>();
#pragma unroll 8
        for (int d = 0; d < D; ++d) acc += to_float(d_o[d]) * to_float(lo[d]);
      }
      lo_s[threadIdx.x] = acc;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float prods[2][4];  // dO O^T of the warp's 16 rows: columns 0-7, 8-15
    zero(prods[0]);
    zero(prods[1]);
    mma_abt<T, D, 2>(prods, dOs, warp * 16, Os + warp * 16 * pitch<D>(), lane);
    // diagonal: (g, g) is c[g & 1] of n-tile 0 in lane (g, t = g / 2); (g + 8, g + 8) is
    // c[2 + (g & 1)] of n-tile 1 in the same lane (selects, not a dynamic index: no local memory)
    if (t == g >> 1) {
      const int row = m0 + warp * 16 + g;
      const bool odd = g & 1;
      const int r = warp * 16 + g;
      if (row < s.q_len) p.delta[s.lse_base + row] = (odd ? prods[0][1] : prods[0][0]) + lo_s[r];
      if (row + 8 < s.q_len)
        p.delta[s.lse_base + row + 8] = (odd ? prods[1][3] : prods[1][2]) + lo_s[r + 8];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 backward: dk, dv
// ---------------------------------------------------------------------------------------------
template <typename T, int D, bool DROPOUT = false>
constexpr size_t dkdv_tc_smem() {
  return (2 * kTcBlockN + 2 * bwd_block_m<D, DROPOUT>()) * pitch<D>() * sizeof(T) +
         3 * bwd_block_m<D, DROPOUT>() * sizeof(float);
}

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_tc_kernel(const AttnParams p) {
  constexpr int BN = kTcBlockN, BM = bwd_block_m<D, DROPOUT>(), NT_S = BM / 8, NT_O = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + BN * pitch<D>();
  T* Qs = Vs + BN * pitch<D>();
  T* dOs = Qs + BM * pitch<D>();
  float* max_s = reinterpret_cast<float*>(dOs + BM * pitch<D>());  // [BM] row max
  float* log2sum_s = max_s + BM;                                   // [BM] log2 of the row sum
  float* delta_s = log2sum_s + BM;                                 // [BM]

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int n0 = blockIdx.y * BN;
  if (n0 >= s.k_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int key_row0 = n0 + warp * 16;
  T* dk = static_cast<T*>(p.dk) + s.k_base;
  T* dv = static_cast<T*>(p.dv) + s.k_base;
  float acc_k[NT_O][4], acc_v[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) { zero(acc_k[j]); zero(acc_v[j]); }

  const bool any_key = __syncthreads_or(threadIdx.x < BN && key_valid(s, n0 + threadIdx.x));
  if (!any_key) {  // all keys of this block are padding: their gradients are 0
    store_rows<T, D>(dk, s.stride, s.k_len, key_row0, acc_k, 0.f, 0.f, lane);
    store_rows<T, D>(dv, s.stride, s.k_len, key_row0, acc_v, 0.f, 0.f, lane);
    return;
  }
  const bool valid_a = key_valid(s, key_row0 + g), valid_b = key_valid(s, key_row0 + g + 8);
  const T* q = static_cast<const T*>(p.q) + s.q_base;
  const T* dout = static_cast<const T*>(p.dout) + s.q_base;
  // padded keys arrive as zero rows: their P^T is selected to 0 below, and dP^T = V dO^T then
  // is 0 too instead of NaN (0 * NaN in dS^T = P^T (dP^T - delta), dK's rows)
  load_tile_async<T, D, BN>(Ks, static_cast<const T*>(p.k) + s.k_base, s.stride, n0, s.k_len, nullptr, s.mask);
  load_tile_async<T, D, BN>(Vs, static_cast<const T*>(p.v) + s.k_base, s.stride, n0, s.k_len, nullptr, s.mask);
  cp_async_commit();

  for (int mb = 0; mb * BM < s.q_len; ++mb) {
    load_tile_async<T, D, BM>(Qs, q, s.stride, mb * BM, s.q_len);
    load_tile_async<T, D, BM>(dOs, dout, s.stride, mb * BM, s.q_len);
    cp_async_commit();
    if (threadIdx.x < BM) {
      const int row = mb * BM + threadIdx.x;
      const float2 st = row_stats(p, s, row);
      max_s[threadIdx.x] = st.x;
      log2sum_s[threadIdx.x] = st.y;
      delta_s[threadIdx.x] = row < s.q_len ? p.delta[s.lse_base + row] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();

    // P^T from S^T * scale and the row statistics (recompute_p): [16 keys x BM queries] per warp
    float pt[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) zero(pt[j]);
    mma_abt<T, D, NT_S>(pt, Ks, warp * 16, Qs, lane);
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = e < 2 ? valid_a : valid_b;
        const int col = j * 8 + 2 * t + (e & 1);
        pt[j][e] = valid ? recompute_p(scaled(pt[j][e], p.scale), max_s[col], log2sum_s[col]) : 0.f;
      }
    if constexpr (!DROPOUT) mma_pv<T, D, BM>(acc_v, pt, dOs, lane);  // dV += P^T dO

    // dS^T = P^T * (dP^T - delta), dP^T = V dO^T (times Z^T with dropout)
    float ds[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) zero(ds[j]);
    mma_abt<T, D, NT_S>(ds, Vs, warp * 16, dOs, lane);
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * t + (e & 1);
        if constexpr (DROPOUT) {  // P^T becomes (P * Z)^T once dS^T has used P^T
          const bool keep = kept(p, s, mb * BM + col, key_row0 + g + 8 * (e >> 1));
          ds[j][e] = pt[j][e] * ((keep ? ds[j][e] * p.drop.scale : 0.f) - delta_s[col]);
          pt[j][e] = keep ? pt[j][e] * p.drop.scale : 0.f;
        } else {
          ds[j][e] = pt[j][e] * (ds[j][e] - delta_s[col]);
        }
      }
    if constexpr (DROPOUT) mma_pv<T, D, BM>(acc_v, pt, dOs, lane);  // dV += (P * Z)^T dO
    mma_pv<T, D, BM>(acc_k, ds, Qs, lane);  // dK += dS^T Q (times scale at the end)
    __syncthreads();  // every warp is done with Qs, dOs and the row statistics
  }
  const float dk_scale = ds_scale(p, s);
  store_rows<T, D>(dk, s.stride, s.k_len, key_row0, acc_k, dk_scale, dk_scale, lane);
  store_rows<T, D>(dv, s.stride, s.k_len, key_row0, acc_v, 1.f, 1.f, lane);
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 backward: dq
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
constexpr size_t dq_tc_smem() {
  return (2 * kTcBlockM + 2 * kTcBlockN) * pitch<D>() * sizeof(T) + kTcBlockN * sizeof(float);
}

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_tc_kernel(const AttnParams p) {
  constexpr int BM = kTcBlockM, BN = kTcBlockN, NT_S = BN / 8, NT_O = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + BM * pitch<D>();
  T* Ks = dOs + BM * pitch<D>();
  T* Vs = Ks + BN * pitch<D>();
  float* bias_s = reinterpret_cast<float*>(Vs + BN * pitch<D>());  // [BN]

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int m0 = blockIdx.y * BM;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = m0 + warp * 16;
  const T* k = static_cast<const T*>(p.k) + s.k_base;
  const T* v = static_cast<const T*>(p.v) + s.k_base;
  load_tile_async<T, D, BM>(Qs, static_cast<const T*>(p.q) + s.q_base, s.stride, m0, s.q_len);
  load_tile_async<T, D, BM>(dOs, static_cast<const T*>(p.dout) + s.q_base, s.stride, m0, s.q_len);
  cp_async_commit();
  float2 stats[2];
  float delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + 8 * r;
    stats[r] = row_stats(p, s, row);
    delta[r] = row < s.q_len ? p.delta[s.lse_base + row] : 0.f;
  }
  float acc[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) zero(acc[j]);

  const int n_blocks = (s.k_len + BN - 1) / BN;
  for (int nb = next_key_block<BN>(s, 0, n_blocks, bias_s); nb < n_blocks;
       nb = next_key_block<BN>(s, nb + 1, n_blocks, bias_s)) {
    load_tile_async<T, D, BN>(Ks, k, s.stride, nb * BN, s.k_len, bias_s);
    load_tile_async<T, D, BN>(Vs, v, s.stride, nb * BN, s.k_len, bias_s);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    float pr[NT_S][4], ds[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) { zero(pr[j]); zero(ds[j]); }
    mma_abt<T, D, NT_S>(pr, Qs, warp * 16, Ks, lane);   // S = Q K^T
    mma_abt<T, D, NT_S>(ds, dOs, warp * 16, Vs, lane);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < NT_S; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, col = j * 8 + 2 * t + (e & 1);
        const float prob = recompute_p(scaled(pr[j][e], p.scale) + bias_s[col], stats[r].x, stats[r].y);
        if constexpr (DROPOUT) {
          const bool keep = kept(p, s, row0 + g + 8 * r, nb * BN + col);
          ds[j][e] = prob * ((keep ? ds[j][e] * p.drop.scale : 0.f) - delta[r]);
        } else {
          ds[j][e] = prob * (ds[j][e] - delta[r]);
        }
      }
    mma_pv<T, D, BN>(acc, ds, Ks, lane);  // dQ += dS K (times scale at the end)
    __syncthreads();  // every warp is done with Ks, Vs, bias_s
  }
  cp_async_wait<0>();
  const float dq_scale = ds_scale(p, s);
  store_rows<T, D>(static_cast<T*>(p.dq) + s.q_base, s.stride, s.q_len, row0, acc, dq_scale, dq_scale, lane);
}

// ---------------------------------------------------------------------------------------------
// fp32 (CUDA cores): tiles of 32 queries x 32 keys; 4 warps own 8 rows (or keys) each.
// ---------------------------------------------------------------------------------------------
constexpr int kSimtTile = 32;
constexpr int kSimtRowsPerWarp = kSimtTile / 4;

// Rows [row0, row0 + 32) of a view -> smem [32][P] (zero past len). With a key block's bias
// (shared memory [32], 0 = real key, -inf = padding or past the sequence): zero wherever the bias
// is not 0, as load_tile_async (padded K / V slots never enter a product).
template <int D, int P>
__device__ __forceinline__ void load_tile_f32(float* smem, const float* g, int64_t stride, int row0, int len,
                                              const float* bias = nullptr) {
  for (int i = threadIdx.x; i < kSimtTile * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const bool valid = bias != nullptr ? bias[r] == 0.f : row0 + r < len;
    smem[r * P + d] = valid ? g[static_cast<int64_t>(row0 + r) * stride + d] : 0.f;
  }
}

template <int D>
constexpr size_t fwd_simt_smem() { return (kSimtTile * D + kSimtTile * (D + 1) + kSimtTile * D + kSimtTile) * sizeof(float); }

// Lane j scores key j of the tile; lane l owns output dims l, l + 32, ...
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_fwd_simt_kernel(const AttnParams p) {
  constexpr int BT = kSimtTile, RPW = kSimtRowsPerWarp, DL = D / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);  // [BT][D]
  float* Ks = Qs + BT * D;                         // [BT][D + 1]
  float* Vs = Ks + BT * (D + 1);                   // [BT][D]
  float* bias_s = Vs + BT * D;                     // [BT]

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int m0 = blockIdx.y * BT;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* k = static_cast<const float*>(p.k) + s.k_base;
  const float* v = static_cast<const float*>(p.v) + s.k_base;
  load_tile_f32<D, D>(Qs, static_cast<const float*>(p.q) + s.q_base, s.stride, m0, s.q_len);

  float o[RPW][DL], m_run[RPW], l_run[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
#pragma unroll
    for (int c = 0; c < DL; ++c) o[r][c] = 0.f;
  }
  for (int n0 = 0; n0 < s.k_len; n0 += BT) {
    __syncthreads();  // the previous tile is consumed
    bool valid = false;
    if (threadIdx.x < BT) {
      valid = key_valid(s, n0 + threadIdx.x);
      bias_s[threadIdx.x] = valid ? 0.f : -INFINITY;
    }
    if (!__syncthreads_or(valid)) continue;  // all padding: skip the block
    load_tile_f32<D, D + 1>(Ks, k, s.stride, n0, s.k_len, bias_s);
    load_tile_f32<D, D>(Vs, v, s.stride, n0, s.k_len, bias_s);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float* qrow = Qs + (warp * RPW + r) * D;
      const float sc = scaled(dot_f32<D>(qrow, Ks + lane * (D + 1)), p.scale) + bias_s[lane];
      const float mx = fmaxf(m_run[r], warp_max(sc));
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f((m_run[r] - base) * kLog2e);
      float pj = exp2f((sc - base) * kLog2e);  // the max subtracted before log2(e) rounds
      l_run[r] = l_run[r] * alpha + warp_sum(pj);  // every probability, dropped or not
      m_run[r] = mx;
      if constexpr (DROPOUT) {
        if (!kept(p, s, m0 + warp * RPW + r, n0 + lane)) pj = 0.f;
      }
#pragma unroll
      for (int c = 0; c < DL; ++c) o[r][c] *= alpha;
      for (int j = 0; j < BT; ++j) {
        const float pb = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
        for (int c = 0; c < DL; ++c) o[r][c] += pb * Vs[j * D + lane + 32 * c];
      }
    }
  }
  float* out = static_cast<float*>(p.o) + s.q_base;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = m0 + warp * RPW + r;
    if (row >= s.q_len) continue;
    const float inv = (l_run[r] > 0.f ? 1.f / l_run[r] : 0.f) * (DROPOUT ? p.drop.scale : 1.f);
#pragma unroll
    for (int c = 0; c < DL; ++c) out[row * s.stride + lane + 32 * c] = o[r][c] * inv;
    if (lane == 0) {
      p.row_max[s.lse_base + row] = l_run[r] > 0.f ? m_run[r] : INFINITY;
      p.row_log2sum[s.lse_base + row] = l_run[r] > 0.f ? log2f(l_run[r]) : 0.f;
    }
  }
}

template <int D>
constexpr size_t dkdv_simt_smem() { return (2 * kSimtTile * D + 2 * kSimtTile * (D + 1) + 3 * kSimtTile) * sizeof(float); }

// CTA: 32 keys (warp w owns keys 8w..8w+7); lane i scores query i of each 32-query tile; lane l
// owns gradient dims l, l + 32, ...
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_simt_kernel(const AttnParams p) {
  constexpr int BT = kSimtTile, KPW = kSimtRowsPerWarp, DL = D / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Ks = reinterpret_cast<float*>(smem_raw);  // [BT][D]
  float* Vs = Ks + BT * D;                         // [BT][D]
  float* Qs = Vs + BT * D;                         // [BT][D + 1]
  float* dOs = Qs + BT * (D + 1);                  // [BT][D + 1]
  float* max_s = dOs + BT * (D + 1);               // [BT] row max
  float* log2sum_s = max_s + BT;                   // [BT] log2 of the row sum
  float* delta_s = log2sum_s + BT;                 // [BT]

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int n0 = blockIdx.y * BT;
  if (n0 >= s.k_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc_k[KPW][DL], acc_v[KPW][DL];
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk)
#pragma unroll
    for (int c = 0; c < DL; ++c) { acc_k[kk][c] = 0.f; acc_v[kk][c] = 0.f; }

  const bool any_key = __syncthreads_or(threadIdx.x < BT && key_valid(s, n0 + threadIdx.x));
  if (any_key) {
    load_tile_f32<D, D>(Ks, static_cast<const float*>(p.k) + s.k_base, s.stride, n0, s.k_len);
    load_tile_f32<D, D>(Vs, static_cast<const float*>(p.v) + s.k_base, s.stride, n0, s.k_len);
    const float* q = static_cast<const float*>(p.q) + s.q_base;
    const float* dout = static_cast<const float*>(p.dout) + s.q_base;
    for (int mb = 0; mb < s.q_len; mb += BT) {
      __syncthreads();  // the previous query tile is consumed
      load_tile_f32<D, D + 1>(Qs, q, s.stride, mb, s.q_len);
      load_tile_f32<D, D + 1>(dOs, dout, s.stride, mb, s.q_len);
      if (threadIdx.x < BT) {
        const int row = mb + threadIdx.x;
        const float2 st = row_stats(p, s, row);
        max_s[threadIdx.x] = st.x;
        log2sum_s[threadIdx.x] = st.y;
        delta_s[threadIdx.x] = row < s.q_len ? p.delta[s.lse_base + row] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KPW; ++kk) {
        const int key = warp * KPW + kk;
        if (!key_valid(s, n0 + key)) continue;  // warp-uniform
        const float sc = dot_f32<D>(Qs + lane * (D + 1), Ks + key * D);
        const float dp = dot_f32<D>(dOs + lane * (D + 1), Vs + key * D);
        float pi = recompute_p(scaled(sc, p.scale), max_s[lane], log2sum_s[lane]);
        float dsi;
        if constexpr (DROPOUT) {  // pi becomes (P * Z)^T once dS^T has used P^T
          const bool keep = kept(p, s, mb + lane, n0 + key);
          dsi = pi * ((keep ? dp * p.drop.scale : 0.f) - delta_s[lane]);
          pi = keep ? pi * p.drop.scale : 0.f;
        } else {
          dsi = pi * (dp - delta_s[lane]);
        }
        for (int i = 0; i < BT; ++i) {
          const float pb = __shfl_sync(0xffffffffu, pi, i);
          const float db = __shfl_sync(0xffffffffu, dsi, i);
#pragma unroll
          for (int c = 0; c < DL; ++c) {
            acc_v[kk][c] += pb * dOs[i * (D + 1) + lane + 32 * c];
            acc_k[kk][c] += db * Qs[i * (D + 1) + lane + 32 * c];
          }
        }
      }
    }
  }
  float* dk = static_cast<float*>(p.dk) + s.k_base;
  float* dv = static_cast<float*>(p.dv) + s.k_base;
  const float dk_scale = ds_scale(p, s);
#pragma unroll
  for (int kk = 0; kk < KPW; ++kk) {
    const int row = n0 + warp * KPW + kk;
    if (row >= s.k_len) continue;
#pragma unroll
    for (int c = 0; c < DL; ++c) {
      dk[row * s.stride + lane + 32 * c] = acc_k[kk][c] * dk_scale;
      dv[row * s.stride + lane + 32 * c] = acc_v[kk][c];
    }
  }
}

template <int D>
constexpr size_t dq_simt_smem() { return (2 * kSimtTile * D + 2 * kSimtTile * (D + 1) + 4 * kSimtTile) * sizeof(float); }

// CTA: 32 queries (warp w owns rows 8w..8w+7); lane j scores key j of each 32-key tile.
template <int D, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_simt_kernel(const AttnParams p) {
  constexpr int BT = kSimtTile, RPW = kSimtRowsPerWarp, DL = D / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);  // [BT][D]
  float* dOs = Qs + BT * D;                        // [BT][D]
  float* Ks = dOs + BT * D;                        // [BT][D + 1]
  float* Vs = Ks + BT * (D + 1);                   // [BT][D + 1]
  float* bias_s = Vs + BT * (D + 1);               // [BT]
  // the row statistics and delta in shared memory (read as broadcasts), not in registers
  float* max_s = bias_s + BT;                      // [BT] row max
  float* log2sum_s = max_s + BT;                   // [BT] log2 of the row sum
  float* delta_s = log2sum_s + BT;                 // [BT]

  const Seq s = seq_of<D>(p, blockIdx.x);
  const int m0 = blockIdx.y * BT;
  if (m0 >= s.q_len) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x < BT) {  // read after the key loop's first barrier
    const int row = m0 + threadIdx.x;
    const float2 st = row_stats(p, s, row);
    max_s[threadIdx.x] = st.x;
    log2sum_s[threadIdx.x] = st.y;
    delta_s[threadIdx.x] = row < s.q_len ? p.delta[s.lse_base + row] : 0.f;
  }
  load_tile_f32<D, D>(Qs, static_cast<const float*>(p.q) + s.q_base, s.stride, m0, s.q_len);
  load_tile_f32<D, D>(dOs, static_cast<const float*>(p.dout) + s.q_base, s.stride, m0, s.q_len);
  const float* k = static_cast<const float*>(p.k) + s.k_base;
  const float* v = static_cast<const float*>(p.v) + s.k_base;
  float acc[RPW][DL];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int c = 0; c < DL; ++c) acc[r][c] = 0.f;
  }
  for (int n0 = 0; n0 < s.k_len; n0 += BT) {
    __syncthreads();  // the previous key tile is consumed
    bool valid = false;
    if (threadIdx.x < BT) {
      valid = key_valid(s, n0 + threadIdx.x);
      bias_s[threadIdx.x] = valid ? 0.f : -INFINITY;
    }
    if (!__syncthreads_or(valid)) continue;
    load_tile_f32<D, D + 1>(Ks, k, s.stride, n0, s.k_len, bias_s);
    load_tile_f32<D, D + 1>(Vs, v, s.stride, n0, s.k_len, bias_s);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int local = warp * RPW + r;
      const float sc = dot_f32<D>(Qs + local * D, Ks + lane * (D + 1));
      const float dp = dot_f32<D>(dOs + local * D, Vs + lane * (D + 1));
      const float pj = recompute_p(scaled(sc, p.scale) + bias_s[lane], max_s[local], log2sum_s[local]);
      float dsj;
      if constexpr (DROPOUT) {
        dsj = pj * ((kept(p, s, m0 + local, n0 + lane) ? dp * p.drop.scale : 0.f) - delta_s[local]);
      } else {
        dsj = pj * (dp - delta_s[local]);
      }
      for (int j = 0; j < BT; ++j) {
        const float db = __shfl_sync(0xffffffffu, dsj, j);
#pragma unroll
        for (int c = 0; c < DL; ++c) acc[r][c] += db * Ks[j * (D + 1) + lane + 32 * c];
      }
    }
  }
  float* dq = static_cast<float*>(p.dq) + s.q_base;
  const float dq_scale = ds_scale(p, s);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = m0 + warp * RPW + r;
    if (row >= s.q_len) continue;
#pragma unroll
    for (int c = 0; c < DL; ++c) dq[row * s.stride + lane + 32 * c] = acc[r][c] * dq_scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------
// Raises Kernel's dynamic shared memory limit to `smem` (needed above 48 KB) on the current
// device, once per (kernel, device): the attribute stays set for the process, and the call costs
// tens of microseconds of host time, too much to repeat on every launch (latency, CUDA graph
// capture). `smem` is a compile-time constant of each kernel, so the first value is the value.
// Devices 64 and up (no such machine in sight) set it on every launch.
template <auto Kernel>
void allow_dynamic_smem(size_t smem) {
  static std::atomic<uint64_t> done_on_devices{0};
  const int device = c10::cuda::current_device();
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done_on_devices.load(std::memory_order_acquire) & bit) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  done_on_devices.fetch_or(bit, std::memory_order_release);
}

template <auto Kernel>
void launch(int64_t bh, int64_t row_blocks, size_t smem, const AttnParams& p, cudaStream_t stream) {
  if (bh == 0 || row_blocks == 0) return;
  TORCH_CHECK(row_blocks <= 65535, "attention: sequence too long (", row_blocks, " row blocks)");
  TORCH_CHECK(bh <= INT32_MAX, "attention: too many (sequence, head) pairs");
  if (smem > 48 * 1024) allow_dynamic_smem<Kernel>(smem);
  Kernel<<<dim3(static_cast<unsigned>(bh), static_cast<unsigned>(row_blocks)), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dynamic shared memory per block must fit the opt-in limit of every target: 163 KB on sm_80
// (227 KB on sm_90). Largest here (D = 128): dq fp16/bf16 69.9 KB, dk/dv fp32 66.0 KB.
constexpr size_t kMaxDynamicSmem = 163 * 1024;
static_assert(fwd_tc_smem<__half, 128>() <= kMaxDynamicSmem && dq_tc_smem<__half, 128>() <= kMaxDynamicSmem &&
                  dkdv_tc_smem<__half, 128>() <= kMaxDynamicSmem && fwd_simt_smem<128>() <= kMaxDynamicSmem &&
                  dkdv_simt_smem<128>() <= kMaxDynamicSmem && dq_simt_smem<128>() <= kMaxDynamicSmem,
              "attention tiles exceed the shared memory of sm_80");

// bh = (sequences x heads); max_q / max_k = longest query / key run of a sequence.
template <typename T, int D, bool DROPOUT>
void run_fwd(const AttnParams& p, int64_t bh, int64_t max_q, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    launch<attn_fwd_simt_kernel<D, DROPOUT>>(bh, ceil_div(max_q, kSimtTile), fwd_simt_smem<D>(), p,
                                             stream);
  } else {
    launch<attn_fwd_tc_kernel<T, D, DROPOUT>>(bh, ceil_div(max_q, kTcBlockM), fwd_tc_smem<T, D>(), p,
                                              stream);
  }
}

template <typename T, int D, bool DROPOUT>
void run_bwd(const AttnParams& p, int64_t bh, int64_t max_q, int64_t max_k, cudaStream_t stream) {
  launch<attn_bwd_delta_kernel<T, D>>(bh, ceil_div(max_q, kDeltaRows), delta_smem<T, D>(), p, stream);
  if constexpr (std::is_same_v<T, float>) {
    launch<attn_bwd_dkdv_simt_kernel<D, DROPOUT>>(bh, ceil_div(max_k, kSimtTile), dkdv_simt_smem<D>(),
                                                  p, stream);
    launch<attn_bwd_dq_simt_kernel<D, DROPOUT>>(bh, ceil_div(max_q, kSimtTile), dq_simt_smem<D>(), p,
                                                stream);
  } else {
    launch<attn_bwd_dkdv_tc_kernel<T, D, DROPOUT>>(bh, ceil_div(max_k, kTcBlockN),
                                                   dkdv_tc_smem<T, D, DROPOUT>(), p, stream);
    launch<attn_bwd_dq_tc_kernel<T, D, DROPOUT>>(bh, ceil_div(max_q, kTcBlockM), dq_tc_smem<T, D>(),
                                                 p, stream);
  }
}

// The supported head dims: keep in sync with HEAD_DIMS in albert_kernels/backends/cuda.
#define AK_DISPATCH_HEAD_DIM(op, d, ...)                                                    \
  [&] {                                                                                   \
    switch (d) {                                                                          \
      case 32: { constexpr int HEAD_DIM = 32; return __VA_ARGS__(); }                    \
      case 64: { constexpr int HEAD_DIM = 64; return __VA_ARGS__(); }                    \
      case 128: { constexpr int HEAD_DIM = 128; return __VA_ARGS__(); }                  \
      default: TORCH_CHECK(false, op, ": the cuda backend supports head dims 32, 64 and 128, got ", d); \
    }                                                                                     \
  }()

// Dropout on or off: the kernels without dropout are separate instantiations (no cost when off).
#define AK_DISPATCH_DROPOUT(on, ...)                                  \
  [&] {                                                               \
    if (on) { constexpr bool DROPOUT = true; return __VA_ARGS__(); }  \
    constexpr bool DROPOUT = false;                                   \
    return __VA_ARGS__();                                             \
  }()

// Contiguous, and 16-byte aligned (cp.async reads 16-byte chunks): a misaligned view is copied.
at::Tensor prepare(const at::Tensor& t) {
  auto c = t.contiguous();
  return aligned_to(c.data_ptr(), 16) ? c : c.clone();
}

// q [.., D]; k and v of one shape with q's heads and head dim (rank 4: q's shape exactly).
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank) {
  TORCH_CHECK(q.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && k.sizes() == v.sizes(), op,
              ": q, k, v must have rank ", rank, " and k, v the same shape");
  const bool same = rank == 4 ? k.sizes() == q.sizes()
                              : k.size(1) == q.size(1) && k.size(2) == q.size(2);
  TORCH_CHECK(same, op, ": k and v must match q's ", rank == 4 ? "shape" : "heads and head dim");
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == q.scalar_type(), op,
                ": q, k, v must share device and dtype");
  }
}

// The dropout of a call: threshold = min(floor(p * 2^32), 2^32 - 1), scale 1 / (1 - p)
// (backends/dropout.py); p == 0 leaves it off.
philox::Dropout make_dropout(const char* op, double p, int64_t seed, int64_t offset, int64_t max_q,
                             int64_t max_k) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(max_q <= INT32_MAX && max_k <= INT32_MAX, op, ": sequences too long");
  philox::Dropout d{};
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  d.threshold = philox::threshold(p);
  d.scale = static_cast<float>(1.0 / (1.0 - p));
  d.max_q = static_cast<int>(max_q);
  d.max_k = static_cast<int>(max_k);
  return d;
}

// The softmax statistics tensor (the ops' `lse`): fp32 [2, *rows] = (row max of the scaled scores,
// log2 of the row's sum of exp(s - max)); `rows` = [B, H, L] padded, [H, Tq] varlen. With
// save_residual (fp16/bf16) [2 + D / 2, *rows]: planes 2.. hold out's rounding residual in out's
// dtype and layout (rows * D values of 2 bytes), which the backward adds to delta.
int64_t stats_planes(const at::Tensor& q, int64_t head_dim, bool save_residual) {
  return save_residual && q.scalar_type() != at::kFloat ? 2 + head_dim / 2 : 2;
}

void set_stats(AttnParams& p, const at::Tensor& stats) {
  const int64_t rows = stats.numel() / stats.size(0);
  p.row_max = const_cast<float*>(stats.data_ptr<float>());
  p.row_log2sum = p.row_max + rows;
  p.o_lo = stats.size(0) > 2 ? static_cast<void*>(p.row_max + 2 * rows) : nullptr;
}

// Rows of no sequence or without a key: max +inf, log2-sum 0 (their probabilities are 0), no
// residual.
at::Tensor empty_stats(at::Tensor stats) {
  stats.select(0, 0).fill_(INFINITY);
  stats.narrow(0, 1, stats.size(0) - 1).zero_();
  return stats;
}

// The backward's check of the forward's statistics: [2, *rows], or [2 + D / 2, *rows] for
// fp16/bf16 with the residual.
void check_stats(const char* op, const at::Tensor& stats, const at::Tensor& q, int64_t head_dim,
                 int64_t rows, const char* shape) {
  const bool plain = stats.dim() >= 1 && stats.size(0) == 2;
  const bool residual = stats.dim() >= 1 && q.scalar_type() != at::kFloat &&
                        stats.size(0) == 2 + head_dim / 2;
  TORCH_CHECK((plain || residual) && stats.numel() == stats.size(0) * rows, op, ": lse must be the ",
              "forward's float32 ", shape, " (row max, log2 row sum; fp16/bf16 with save_residual: ",
              2 + head_dim / 2, " planes), got ", stats.sizes());
}

AttnParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  AttnParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.scale = static_cast<float>(scale);
  return p;
}

// Runs run_fwd / run_bwd for q's dtype and head dim, with or without dropout (p > 0).
void dispatch_fwd(const char* op, const at::Tensor& q, int64_t head_dim, double dropout_p,
                  const AttnParams& p, int64_t bh, int64_t max_q, cudaStream_t stream) {
  AK_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    AK_DISPATCH_HEAD_DIM(op, head_dim, [&] {
      AK_DISPATCH_DROPOUT(dropout_p > 0.0, [&] { run_fwd<scalar_t, HEAD_DIM, DROPOUT>(p, bh, max_q, stream); });
    });
  });
}

void dispatch_bwd(const char* op, const at::Tensor& q, int64_t head_dim, double dropout_p,
                  const AttnParams& p, int64_t bh, int64_t max_q, int64_t max_k, cudaStream_t stream) {
  AK_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), op, [&] {
    AK_DISPATCH_HEAD_DIM(op, head_dim, [&] {
      AK_DISPATCH_DROPOUT(dropout_p > 0.0, [&] {
        run_bwd<scalar_t, HEAD_DIM, DROPOUT>(p, bh, max_q, max_k, stream);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Ops: padded
// ---------------------------------------------------------------------------------------------
const bool* padded_mask(const char* op, const std::optional<at::Tensor>& mask_in, at::Tensor& mask,
                        const at::Tensor& q) {
  if (!mask_in.has_value()) return nullptr;
  mask = mask_in->contiguous();
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                  mask.size(1) == q.size(2) && mask.device() == q.device(),
              op, ": key_padding_mask must be bool [B, L] on q's device");
  return mask.data_ptr<bool>();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& mask_in, double scale,
                                                 double dropout_p, int64_t seed, int64_t offset,
                                                 bool save_residual) {
  check_qkv("attention_fwd", q_in, k_in, v_in, 4);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(L <= INT32_MAX && H <= INT32_MAX, "attention_fwd: sizes too large");
  const auto q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  auto out = at::empty_like(q);
  auto lse = at::empty({stats_planes(q, D, save_residual), B, H, L}, q.options().dtype(at::kFloat));
  AttnParams p = base_params(q, k, v, scale);
  at::Tensor mask;
  p.mask = padded_mask("attention_fwd", mask_in, mask, q);
  p.drop = make_dropout("attention_fwd", dropout_p, seed, offset, L, L);
  p.H = static_cast<int>(H);
  p.L = static_cast<int>(L);
  p.o = out.data_ptr();
  set_stats(p, lse);
  if (q.numel() == 0) return {out, empty_stats(lse)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_fwd("attention_fwd", q, D, dropout_p, p, B * H, L, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& mask_in,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  check_qkv("attention_bwd", q_in, k_in, v_in, 4);
  TORCH_CHECK(grad_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "attention_bwd: grad_out and out must have q's shape");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), L = q_in.size(2), D = q_in.size(3);
  const auto q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const auto out = prepare(out_in.to(q.scalar_type())), dout = prepare(grad_in.to(q.scalar_type()));
  const auto lse = lse_in.to(at::kFloat).contiguous();
  check_stats("attention_bwd", lse, q, D, B * H * L, "[2, B, H, L]");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0) return {dq, dk, dv};
  auto delta = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  AttnParams p = base_params(q, k, v, scale);
  at::Tensor mask;
  p.mask = padded_mask("attention_bwd", mask_in, mask, q);
  at::Tensor n_keys;  // real keys per sequence, for ds_scale
  if (p.mask != nullptr) {
    n_keys = mask.sum({1}, false, at::kInt);
    p.n_keys = n_keys.data_ptr<int>();
  }
  p.drop = make_dropout("attention_bwd", dropout_p, seed, offset, L, L);
  p.H = static_cast<int>(H);
  p.L = static_cast<int>(L);
  p.out = out.data_ptr(); p.dout = dout.data_ptr();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  set_stats(p, lse);
  p.delta = delta.data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_bwd("attention_bwd", q, D, dropout_p, p, B * H, L, L, stream);
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Ops: varlen (separate query and key sequences)
// ---------------------------------------------------------------------------------------------
AttnParams varlen_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_q, const at::Tensor& cu_k, double scale) {
  for (const auto* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->numel() >= 1 &&
                    cu->device() == q.device(),
                op, ": cu_seqlens_q and cu_seqlens_k must be int32 [B + 1] on q's device");
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op, ": cu_seqlens_q and cu_seqlens_k must have the same length");
  TORCH_CHECK(q.size(1) <= INT32_MAX, op, ": too many heads");
  AttnParams p = base_params(q, k, v, scale);
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
  p.H = static_cast<int>(q.size(1));
  p.Tq = q.size(0);
  return p;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& cu_q_in,
    const at::Tensor& cu_k_in, int64_t max_q, int64_t max_k, double scale, double dropout_p, int64_t seed,
    int64_t offset, bool save_residual) {
  const char* op = "varlen_attention_fwd";
  check_qkv(op, q_in, k_in, v_in, 3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const auto q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const auto cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({stats_planes(q, D, save_residual), H, T}, q.options().dtype(at::kFloat));
  AttnParams p = varlen_params(op, q, k, v, cu_q, cu_k, scale);
  p.drop = make_dropout(op, dropout_p, seed, offset, max_q, max_k);
  p.o = out.data_ptr();
  set_stats(p, lse);
  const int64_t batch = cu_q.numel() - 1;
  if (q.numel() == 0 || batch == 0) return {out.zero_(), empty_stats(lse)};
  // every row is written: a sequence without keys (or all of them, k empty) gives 0, max +inf
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_fwd(op, q, D, dropout_p, p, batch * H, max_q, stream);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_q_in, const at::Tensor& cu_k_in,
    int64_t max_q, int64_t max_k, double scale, double dropout_p, int64_t seed, int64_t offset) {
  const char* op = "varlen_attention_bwd";
  check_qkv(op, q_in, k_in, v_in, 3);
  TORCH_CHECK(grad_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              op, ": grad_out and out must have q's shape");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t T = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const auto q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const auto cu_q = cu_q_in.contiguous(), cu_k = cu_k_in.contiguous();
  const auto out = prepare(out_in.to(q.scalar_type())), dout = prepare(grad_in.to(q.scalar_type()));
  const auto lse = lse_in.to(at::kFloat).contiguous();
  check_stats(op, lse, q, D, H * T, "[2, H, Tq]");
  // key rows that belong to no sequence (past cu_seqlens_k[-1]) get zero gradients
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t batch = cu_q.numel() - 1;
  // keys no sequence owns (or a batch without queries) get zero gradients; the kernels write
  // every key of every sequence
  if (q.numel() == 0 || batch == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  auto delta = at::empty({H, T}, q.options().dtype(at::kFloat));
  AttnParams p = varlen_params(op, q, k, v, cu_q, cu_k, scale);
  p.drop = make_dropout(op, dropout_p, seed, offset, max_q, max_k);
  p.out = out.data_ptr(); p.dout = dout.data_ptr();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  set_stats(p, lse);
  p.delta = delta.data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_bwd(op, q, D, dropout_p, p, batch * H, max_q, max_k, stream);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cuda
}  // namespace albert_kernels

TORCH_LIBRARY_IMPL(albert_kernels, CUDA, m) {
  m.impl("attention_fwd", &albert_kernels::cuda::attention_fwd);
  m.impl("attention_bwd", &albert_kernels::cuda::attention_bwd);
  m.impl("varlen_attention_fwd", &albert_kernels::cuda::varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &albert_kernels::cuda::varlen_attention_bwd);
}
