// Shared helpers of the C++ CPU kernels (csrc/cpu/*.cpp).
//
// - acc_t<scalar_t>: the compute type. float for float32 / float16 / bfloat16 (so statistics,
//   softmax and every accumulator are fp32 whatever the input dtype), double for float64.
// - load_row / store_row: convert one row between the storage dtype and acc_t.
// - small_gemm: a register-blocked fp32 (or fp64) matrix product for the attention blocks,
//   written with at::vec::Vectorized so it compiles to the ISA the build chose (AVX2+FMA,
//   AVX-512 or the portable default).
// - ColumnSums: deterministic column sums over rows (bias / LayerNorm weight gradients): rows are
//   cut into fixed chunks of kReduceRows, each chunk sums into its own partial row, and the
//   partials are added in chunk order, so the result does not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
// AVX2 + FMA intrinsics are available (AVX2 and AVX-512 builds): the hand-written float paths.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define ALBERT_KERNELS_AVX2 1
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace albert_kernels::cpu {

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for fp32/fp16/bf16, double for fp64

template <typename T>
using Vec = at::vec::Vectorized<T>;

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Inline vector copy of a short row (attention rows are 64 floats: a libc memcpy call per row
// costs more than the copy).
template <typename T>
inline void copy_row(const T* src, T* dst, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) Vec<T>::loadu(src + j).store(dst + j);
  for (; j < n; ++j) dst[j] = src[j];
}

// bf16 / fp16 row [n] -> float, vectorised: at::vec::convert has no vector path for this
// direction (it converts element by element: ~0.6 ns each on AVX-512, 3x the cost of the whole
// bias + GELU epilogue on the same row).
template <typename scalar_t>
inline void widen_row(const scalar_t* src, float* dst, int64_t n) {
  using VR = Vec<scalar_t>;
  constexpr int64_t W = VR::size(), H = Vec<float>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const auto halves = at::vec::convert_to_float<scalar_t>(VR::loadu(src + j));
    std::get<0>(halves).store(dst + j);
    std::get<1>(halves).store(dst + j + H);
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Row [n] of storage dtype -> acc_t. When the types agree no copy is made: the returned pointer
// is `src` itself; otherwise the row is converted into `buf` (at least n elements).
template <typename scalar_t>
inline const acc_t<scalar_t>* load_row(const scalar_t* src, acc_t<scalar_t>* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return src;
  } else {
    widen_row(src, buf, n);
    return buf;
  }
}

// Copy-converting variant that always writes into `dst` (for zero-padded work buffers).
template <typename scalar_t>
inline void load_row_into(const scalar_t* src, acc_t<scalar_t>* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    copy_row(src, dst, n);
  } else {
    widen_row(src, dst, n);
  }
}

// acc_t row -> storage dtype.
template <typename scalar_t>
inline void store_row(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    if (src != dst) copy_row(src, dst, n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Where a kernel computes a row in acc_t: straight into the output when the types agree,
// else into a buffer that store_row converts afterwards.
template <typename scalar_t>
inline acc_t<scalar_t>* out_row(scalar_t* dst, acc_t<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    return dst;
  } else {
    return buf;
  }
}

// Ask for a row that will be read soon (attention reads rows of one head at a stride of the
// whole token, which the hardware prefetcher follows poorly).
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// exp for the softmax / GELU kernels: ATen's fast exp_u20 (polynomial, <= 20 ulp, about twice
// the speed of the Sleef u10 exp) for float; the exact exp otherwise (fp64 gradcheck). Forward
// and backward of a kernel both call this one, so recomputed values round identically.
template <typename T>
inline Vec<T> fast_exp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// ---------------------------------------------------------------------------------------------
// small_gemm: C[M, N] (+)= A[M, K] * B[K, N], T = float or double.
//   A is addressed as A[i * a_rs + k * a_cs] (so a transposed A costs nothing: swap the strides),
//   B is row-major with leading dimension ldb, C row-major with ldc.
//   N must be a multiple of kGemmNR<T> (the work buffers are zero-padded to it).
// Micro-tile: MR rows x two vectors (NR = 16 floats with AVX2); the B panel (K x NR) stays in L1
// across the row tiles. Every C element is one fma chain over k in increasing order, whatever
// the tile it falls in, so a product recomputed with other M, N rounds identically.
// float on an AVX2/AVX-512 build: a hand-scheduled 6 x 16 tile in raw AVX2 intrinsics (12 ymm
// accumulators + 2 B vectors + 1 broadcast = 15 of the 16 registers; written with
// at::vec::Vectorized the same tile spills). Otherwise (double, portable builds): 4 x 2 vectors
// with at::vec.
template <typename T>
constexpr int64_t kGemmNR = 2 * Vec<T>::size();

#ifdef ALBERT_KERNELS_AVX2
template <>
inline constexpr int64_t kGemmNR<float> = 16;

template <int MR>
inline void gemm_tile_avx2(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
    c1[r] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
  }
  const float* a = A;
  const float* b = B;
  for (int64_t k = 0; k < K; ++k, a += a_cs, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_rs);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
  }
}
#endif

template <typename T, int MR>
inline void gemm_tile_vec(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B,
                          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? Vec<T>::loadu(C + r * ldc) : Vec<T>(T(0));
    c1[r] = accumulate ? Vec<T>::loadu(C + r * ldc + W) : Vec<T>(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> b0 = Vec<T>::loadu(B + k * ldb);
    const Vec<T> b1 = Vec<T>::loadu(B + k * ldb + W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> a(A[r * a_rs + k * a_cs]);
      c0[r] = at::vec::fmadd(a, b0, c0[r]);
      c1[r] = at::vec::fmadd(a, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r].store(C + r * ldc);
    c1[r].store(C + r * ldc + W);
  }
}

// One MR x kGemmNR tile: the AVX2 one for float where there is one, else the at::vec one.
template <typename T, int MR>
inline void gemm_tile(int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t ldb,
                      T* C, int64_t ldc, bool accumulate) {
#ifdef ALBERT_KERNELS_AVX2
  if constexpr (std::is_same_v<T, float>) {
    gemm_tile_avx2<MR>(K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
  } else
#endif
  {
    gemm_tile_vec<T, MR>(K, A, a_rs, a_cs, B, ldb, C, ldc, accumulate);
  }
}

template <typename T>
inline void small_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs,
                       const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NR = kGemmNR<T>;
#ifdef ALBERT_KERNELS_AVX2
  constexpr int MR = std::is_same_v<T, float> ? 6 : 4;
#else
  constexpr int MR = 4;
#endif
  for (int64_t j = 0; j < N; j += NR) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
      gemm_tile<T, MR>(K, A + i * a_rs, a_rs, a_cs, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    }
    const T* a = A + i * a_rs;
    T* c = C + i * ldc + j;
    switch (M - i) {  // the last rows, fewer than MR
      case 5: gemm_tile<T, 5>(K, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate); break;
      case 4: gemm_tile<T, 4>(K, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate); break;
      case 3: gemm_tile<T, 3>(K, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate); break;
      case 2: gemm_tile<T, 2>(K, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate); break;
      case 1: gemm_tile<T, 1>(K, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// transpose: dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols. float on an AVX2 build
// moves 8 x 8 blocks through registers (the attention kernels transpose K and V once per head
// slice; element by element that was a fifth of the forward's time).
#ifdef ALBERT_KERNELS_AVX2
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // rows 0-3 and 4-7 of each 128-bit lane, columns grouped by two
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int b = 4 * h;
    r[b + 0] = _mm256_shuffle_ps(t[b + 0], t[b + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[b + 1] = _mm256_shuffle_ps(t[b + 0], t[b + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[b + 2] = _mm256_shuffle_ps(t[b + 1], t[b + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[b + 3] = _mm256_shuffle_ps(t[b + 1], t[b + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

template <typename T>
inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  int64_t r0 = 0, c0 = 0;
#ifdef ALBERT_KERNELS_AVX2
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 8 <= rows; r0 += 8) {
      for (int64_t c = 0; c + 8 <= cols; c += 8) {
        transpose_8x8(src + r0 * lds + c, lds, dst + c * ldd + r0, ldd);
      }
    }
    c0 = cols / 8 * 8;  // left: the column tail of the block rows, and the row tail
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < r0 ? c0 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic column sums. Usage:
//   ColumnSums<float> sums(M, N);
//   at::parallel_for(0, sums.chunks(), 1, [&](int64_t c0, int64_t c1) {
//     for (c in [c0, c1)) { float* part = sums.partial(c); for rows in sums.rows(c) ... part[j] += }
//   });
//   sums.finish(out_ptr)   // out[j] = sum over chunks in order, converted to the output dtype
constexpr int64_t kReduceRows = 32;

template <typename T>
struct ColumnSums {
  int64_t M, N, n_chunks;
  std::vector<T> partials;  // [n_chunks, N], zero-initialised

  ColumnSums(int64_t M_, int64_t N_, int64_t n_sums = 1)
      : M(M_), N(N_), n_chunks((M_ + kReduceRows - 1) / kReduceRows),
        partials(static_cast<size_t>(n_chunks * N_ * n_sums), T(0)) {}

  int64_t chunks() const { return n_chunks; }
  int64_t row_begin(int64_t c) const { return c * kReduceRows; }
  int64_t row_end(int64_t c) const { return std::min(M, (c + 1) * kReduceRows); }
  // Partial row of chunk c for sum number `which` (several sums can share one object).
  T* partial(int64_t c, int64_t which = 0) {
    return partials.data() + (which * n_chunks + c) * N;
  }

  // out[j] = sum_c partial(c, which)[j], summed in chunk order (parallel over columns).
  template <typename out_t>
  void finish(out_t* out, int64_t which = 0) {
    const T* base = partials.data() + which * n_chunks * N;
    at::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
      std::vector<T> acc(static_cast<size_t>(j1 - j0), T(0));
      for (int64_t c = 0; c < n_chunks; ++c) {
        const T* p = base + c * N;
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += p[j];
      }
      for (int64_t j = j0; j < j1; ++j) out[j] = static_cast<out_t>(acc[j - j0]);
    });
  }
};

// float for fp32/fp16/bf16 inputs, double for fp64: the dtype of saved statistics (mean, rstd,
// lse), so that float64 gradcheck sees exact statistics.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace albert_kernels::cpu
