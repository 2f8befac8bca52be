// The small-M path: fp32 inference on packed weights, written for a handful of tokens (one short
// request; docs/performance.md "One short request: the small-M path") and used up to
// the token count where MKL's F.linear catches up, per ISA (backends/cpp/isa.py: 4096 on AVX2,
// 1024 on AVX-512).
//
// With a few token rows a linear layer reads its whole weight for a few rows of work. ALBERT
// shares one layer's weights across all depths, so the weights are packed ONCE into the layout
// the kernel streams and reused by every layer and every call.
//
//   pack_linear_weight(weight [S*N, K] fp32, segments S) -> packed [S * P, K, kNR] fp32
//     P = ceil(N / kNR) panels per segment; panel p of segment s holds W[s*N + p*kNR + j, k] at
//     [s*P + p, k, j] (zero past N). A segment is one output matrix: Q, K and V are three
//     segments of one packed weight, so one pass over it writes three separate [M, N] outputs.
//   packed_linear(x [M, K], packed, N, bias [S*N]?, gelu_approximate?, segments S) -> [M, N]
//     (S = 1) or [S, M, N]: x @ W_s^T + bias_s per segment, then GELU (approximate "tanh" or
//     "none", as F.gelu) if asked.
//   packed_albert_layer(...) -> [M, H]: one whole ALBERT layer (transformers' AlbertLayer in
//     eval mode) on packed tokens with cu_seqlens: QKV product -> varlen attention -> output
//     product -> add + LayerNorm -> FFN in + GELU -> FFN out -> add + LayerNorm, in one call, so
//     the host pays one dispatch per layer instead of ~10.
//
// The product (gemm_packed): work is split over panels (kNR output features each: 24 in the AVX2
// build, 48 in the AVX-512 one) across threads, each thread owning its panels in one parallel
// region; rows run in passes of kMC (fewer at large K, AVX-512); in each pass, each panel streams
// once through the cache in blocks of kKC inputs (24 KiB: L1), and every block is reused by all
// row tiles (AVX2: kMR = 4 rows x 24 columns, 12 ymm accumulators; AVX-512: 8 rows x 48 columns,
// 24 zmm accumulators; plus 3 weight vectors and 1 broadcast). Each block's partial sums start
// from zero in registers and are added to the output (two-level summation: rounding grows with
// kKC + K / kKC terms, not K); the last block adds the bias and applies GELU while the tile is in
// L1.
// Why our own kernel (benchmarks/small_m_gemm.py): at M = 8 oneDNN's packed GEMM (the best
// library path reachable from torch) ran the 12-layer loop at about 0.3x of its large-M rate.
#include "common.h"
#include "gelu_math.h"
#include "ops.h"

#include <optional>
#include <string_view>

namespace albert_kernels::cpu {
namespace {

// The register tile, per vector ISA of the build (build.py): kNR = 3 vectors of output features,
// kMR rows, so kMR * 3 accumulators + 3 weight vectors + 1 broadcast stay in registers
// (AVX2: 4 x 24, 16 ymm; AVX-512: 8 x 48, 28 of the 32 zmm), and kKC inputs per block so that a
// panel block (kKC * kNR floats, 24 KiB) stays in L1.
#if defined(CPU_CAPABILITY_AVX512)
using VecF = __m512;
constexpr int64_t kLanes = 16;
constexpr int kMR = 8;
constexpr int64_t kKC = 128;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
#elif defined(ALBERT_KERNELS_AVX2)
using VecF = __m256;
constexpr int64_t kLanes = 8;
constexpr int kMR = 4;
constexpr int64_t kKC = 256;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
#else
constexpr int64_t kLanes = 8;
constexpr int kMR = 4;
constexpr int64_t kKC = 256;
#endif
constexpr int64_t kNR = 3 * kLanes;  // output features per panel
// Rows per pass over the weights: a longer input runs as several passes of kMC rows, so a pass's
// rows of x stay in L2 while a panel streams through (at M = 1024, K = 3072 one pass ran at 0.9x
// MKL's rate; passes of 256 rows keep the rate measured at M = 256).
constexpr int64_t kMC = 256;
// AVX-512 build: at most kPassFloats of x per pass (768 KiB: 256 rows at K = 768), so that with
// K = 3072 a pass is 64 rows and stays in L2 too (one 256-row pass, 3 MiB, ran the 768x3072
// product at 0.84x MKL's rate at M = 1024). The AVX2 build keeps 256-row passes at every K (the
// rates it was measured at).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kPassFloats = 256 * 768;
#else
constexpr int64_t kPassFloats = INT64_MAX;
#endif
// Prefetching (kNR floats per k step, one prefetch per 64-byte line): with one row tile, it
// prefetches kPrefetchRows rows ahead in its own stream; with several, each prefetches its
// share of the next block while it computes on this one, so the next block is in L1 when it
// starts and the prefetches are spread over the whole block's time (one tile prefetching the
// whole next block while it computes, as before, measured ~8% slower at M = 32 and 128).
constexpr int64_t kPrefetchRows = 16;

// acc[r][0..kNR) = sum over k < K of A[r * lda + k] * B[k * kNR + j], r < MR; then C is
// (first ? acc : C + acc), + bias on the last block; ncols < kNR: only those columns of C.
// Prefetch: the first npf k steps each prefetch the next kNR floats from pf on.
template <int MR>
inline void tile(int64_t K, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                 int64_t ncols, bool first, const float* bias, const float* pf, int64_t npf) {
  alignas(64) float buf[MR][kNR];
#ifdef ALBERT_KERNELS_AVX2
  constexpr int64_t L = kLanes;
  VecF c0[MR], c1[MR], c2[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = vzero();
    c1[r] = c0[r];
    c2[r] = c0[r];
  }
  for (int64_t k = 0; k < K; ++k, B += kNR) {
    if (k < npf) {
#pragma GCC unroll 3
      for (int64_t o = 0; o < kNR; o += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + o), _MM_HINT_T0);
      }
      pf += kNR;
    }
    const VecF b0 = vload(B), b1 = vload(B + L), b2 = vload(B + 2 * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const VecF a = vbroadcast(A + r * lda + k);
      c0[r] = vfma(a, b0, c0[r]);
      c1[r] = vfma(a, b1, c1[r]);
      c2[r] = vfma(a, b2, c2[r]);
    }
  }
  if (ncols == kNR) {  // a whole panel: add the earlier blocks' sums and the bias in registers
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc;
      if (!first) {
        c0[r] = vadd(c0[r], vload(c));
        c1[r] = vadd(c1[r], vload(c + L));
        c2[r] = vadd(c2[r], vload(c + 2 * L));
      }
      if (bias) {
        c0[r] = vadd(c0[r], vload(bias));
        c1[r] = vadd(c1[r], vload(bias + L));
        c2[r] = vadd(c2[r], vload(bias + 2 * L));
      }
      vstore(c, c0[r]);
      vstore(c + L, c1[r]);
      vstore(c + 2 * L, c2[r]);
    }
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {  // the panel past N's last multiple of kNR: through a buffer
    vstore(buf[r], c0[r]);
    vstore(buf[r] + L, c1[r]);
    vstore(buf[r] + 2 * L, c2[r]);
  }
#else
  for (int r = 0; r < MR; ++r) {
    for (int64_t j = 0; j < kNR; ++j) buf[r][j] = 0.f;
  }
  for (int64_t k = 0; k < K; ++k, B += kNR) {
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * lda + k];
      for (int64_t j = 0; j < kNR; ++j) buf[r][j] = std::fma(a, B[j], buf[r][j]);
    }
  }
#endif
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    if (!first) {
      for (int64_t j = 0; j < ncols; ++j) buf[r][j] += c[j];
    }
    if (bias) {
      for (int64_t j = 0; j < ncols; ++j) buf[r][j] += bias[j];
    }
    std::memcpy(c, buf[r], ncols * sizeof(float));
  }
}

// One row tile of rows < kMR rows (the tile templates are instantiated for 1..kMR rows).
template <int MR = kMR>
inline void tile_rows(int rows, int64_t K, const float* A, int64_t lda, const float* B, float* C,
                      int64_t ldc, int64_t ncols, bool first, const float* bias, const float* pf,
                      int64_t npf) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      tile_rows<MR - 1>(rows, K, A, lda, B, C, ldc, ncols, first, bias, pf, npf);
      return;
    }
  }
  tile<MR>(K, A, lda, B, C, ldc, ncols, first, bias, pf, npf);
}

// GELU in place on rows x ncols of C (the finished tile, still in L1).
template <Gelu G>
void gelu_rows(float* C, int64_t ldc, int64_t rows, int64_t ncols) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    float* c = C + r * ldc;
    int64_t j = 0;
    for (; j + W <= ncols; j += W) GeluMath<float>::forward(G, V::loadu(c + j)).store(c + j);
    if (j < ncols) GeluMath<float>::forward(G, V::loadu(c + j, ncols - j)).store(c + j, ncols - j);
  }
}

// Panels [t0, t1) (of all segments' P panels each) of C_s[M, N] (s < segments; C_s = C + s *
// seg_stride, row stride ldc) = A [M, K] (row stride lda) @ W_s^T + bias[s * N, (s + 1) * N),
// then GELU if gelu is set; packed as pack_linear_weight. One thread's share of one pass.
void gemm_rows(int64_t t0, int64_t t1, int64_t M, int64_t K, const float* A, int64_t lda,
               const float* packed, int64_t segments, int64_t N, const float* bias, float* C,
               int64_t ldc, int64_t seg_stride, std::optional<Gelu> gelu) {
  const int64_t P = (N + kNR - 1) / kNR;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s = t / P, n0 = (t % P) * kNR, ncols = std::min(kNR, N - n0);
    const float* panel = packed + t * K * kNR;
    float* c = C + s * seg_stride + n0;
    const float* b = bias ? bias + s * N + n0 : nullptr;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kk = std::min(kKC, K - k0);
      const bool first = k0 == 0, last = k0 + kk == K;
      const float* bb = last ? b : nullptr;
      const float* blk = panel + k0 * kNR;
      // One row tile: it prefetches its own stream ahead. Several: tile i prefetches rows
      // [i * share, (i + 1) * share) of the next block (contiguous after this one: the next
      // block of this panel or the next panel's first).
      const int64_t full = M / kMR, rest = M % kMR, tiles = full + (rest > 0);
      const float* pf = blk + kPrefetchRows * kNR;
      int64_t share = kk;
      if (tiles > 1) {
        const int64_t next_kk = last ? std::min(kKC, K) : std::min(kKC, K - k0 - kk);
        pf = blk + kk * kNR;
        share = (next_kk + tiles - 1) / tiles;
      }
      for (int64_t i = 0; i < tiles; ++i, pf += share * kNR) {  // row tile i (t is the panel)
        const float* a = A + i * kMR * lda + k0;
        float* ct = c + i * kMR * ldc;
        tile_rows(i < full ? kMR : static_cast<int>(rest), kk, a, lda, blk, ct, ldc, ncols,
                  first, bb, pf, share);
      }
    }
    if (gelu == Gelu::Tanh) gelu_rows<Gelu::Tanh>(c, ldc, M, ncols);
    if (gelu == Gelu::Erf) gelu_rows<Gelu::Erf>(c, ldc, M, ncols);
  }
}

// gemm_rows on passes of at most kMC rows (and kPassFloats of x, in whole row tiles). One
// parallel region: each thread owns a range of panels (output columns) for every pass, so the
// passes need no barrier between them (a region per pass ran FFN out at 2 threads, on a loaded
// machine, at a quarter of its 1-thread rate from two passes on).
void gemm_packed(int64_t M, int64_t K, const float* A, int64_t lda, const float* packed,
                 int64_t segments, int64_t N, const float* bias, float* C, int64_t ldc,
                 int64_t seg_stride, std::optional<Gelu> gelu) {
  const int64_t mc = std::max<int64_t>(kMR, std::min(kMC, kPassFloats / K) / kMR * kMR);
  const int64_t panels = segments * ((N + kNR - 1) / kNR);
  at::parallel_for(0, panels, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
      gemm_rows(t0, t1, std::min(mc, M - m0), K, A + m0 * lda, lda, packed, segments, N, bias,
                C + m0 * ldc, ldc, seg_stride, gelu);
    }
  });
}

void check_f32(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dim, "-d float32 CPU tensor, got ",
              t.scalar_type(), " of shape ", t.sizes(), t.is_contiguous() ? "" : " (strided)");
}

// packed [S * P, K, kNR] for S segments of N outputs and K inputs.
void check_packed(const at::Tensor& packed, int64_t segments, int64_t N, int64_t K,
                  const char* op, const char* name) {
  check_f32(packed, op, name, 3);
  const int64_t P = (N + kNR - 1) / kNR;
  TORCH_CHECK(packed.size(0) == segments * P && packed.size(1) == K && packed.size(2) == kNR, op,
              ": ", name, " must be a pack_linear_weight result of shape [", segments * P, ", ",
              K, ", ", kNR, "] (", segments, " segment(s) of ", N, " outputs, ", K,
              " inputs), got ", packed.sizes());
}

void check_vec(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  check_f32(t, op, name, 1);
  TORCH_CHECK(t.size(0) == n, op, ": ", name, " must have ", n, " elements, got ", t.size(0));
}

std::optional<Gelu> parse_gelu(const std::optional<c10::string_view>& approximate) {
  if (!approximate.has_value()) return std::nullopt;
  return parse_approximate(std::string_view(approximate->data(), approximate->size()));
}

at::Tensor pack_linear_weight(const at::Tensor& weight, int64_t segments) {
  check_f32(weight, "pack_linear_weight", "weight", 2);
  TORCH_CHECK(segments >= 1 && weight.size(0) % segments == 0, "pack_linear_weight: segments ",
              "must be >= 1 and divide weight.size(0) = ", weight.size(0), ", got ", segments);
  const int64_t N = weight.size(0) / segments, K = weight.size(1), P = (N + kNR - 1) / kNR;
  at::Tensor packed = at::zeros({segments * P, K, kNR}, weight.options());
  const float* w = weight.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, segments * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / P, n0 = (t % P) * kNR, ncols = std::min(kNR, N - n0);
      for (int64_t j = 0; j < ncols; ++j) {
        const float* row = w + (s * N + n0 + j) * K;
        for (int64_t k = 0; k < K; ++k) dst[(t * K + k) * kNR + j] = row[k];
      }
    }
  });
  return packed;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias,
                         c10::optional<c10::string_view> gelu_approximate, int64_t segments) {
  constexpr const char* op = "packed_linear";
  check_f32(x, op, "x", 2);
  TORCH_CHECK(out_features >= 1, op, ": out_features must be >= 1, got ", out_features);
  TORCH_CHECK(segments >= 1, op, ": segments must be >= 1, got ", segments);
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(packed, segments, out_features, K, op, "packed_weight");
  if (bias.has_value()) check_vec(*bias, segments * out_features, op, "bias");
  const auto gelu = parse_gelu(gelu_approximate);
  at::Tensor out = segments == 1 ? at::empty({M, out_features}, x.options())
                                 : at::empty({segments, M, out_features}, x.options());
  if (M == 0) return out;
  gemm_packed(M, K, x.data_ptr<float>(), K, packed.data_ptr<float>(), segments, out_features,
              bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(),
              out_features, M * out_features, gelu);
  return out;
}

at::Tensor packed_albert_layer(
    const at::Tensor& hidden_states, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, const at::Tensor& dense_weight,
    const at::Tensor& dense_bias, const at::Tensor& attention_ln_weight,
    const at::Tensor& attention_ln_bias, double attention_ln_eps, const at::Tensor& ffn_weight,
    const at::Tensor& ffn_bias, const at::Tensor& ffn_output_weight,
    const at::Tensor& ffn_output_bias, const at::Tensor& full_ln_weight,
    const at::Tensor& full_ln_bias, double full_ln_eps, int64_t num_heads, double scale,
    c10::string_view gelu_approximate) {
  constexpr const char* op = "packed_albert_layer";
  check_f32(hidden_states, op, "hidden_states", 2);
  const int64_t M = hidden_states.size(0), H = hidden_states.size(1);
  TORCH_CHECK(num_heads >= 1 && H % num_heads == 0, op, ": num_heads must divide the hidden size ",
              H, ", got ", num_heads);
  const int64_t I = ffn_bias.dim() == 1 ? ffn_bias.size(0) : -1;
  check_packed(qkv_weight, 3, H, H, op, "qkv_weight");
  check_vec(qkv_bias, 3 * H, op, "qkv_bias");
  check_packed(dense_weight, 1, H, H, op, "dense_weight");
  check_vec(dense_bias, H, op, "dense_bias");
  check_vec(ffn_bias, I, op, "ffn_bias");
  check_packed(ffn_weight, 1, I, H, op, "ffn_weight");
  check_packed(ffn_output_weight, 1, H, I, op, "ffn_output_weight");
  check_vec(ffn_output_bias, H, op, "ffn_output_bias");
  for (const auto* t : {&attention_ln_weight, &attention_ln_bias, &full_ln_weight, &full_ln_bias}) {
    check_vec(*t, H, op, "a LayerNorm weight or bias");
  }
  const Gelu gelu = parse_approximate(std::string_view(gelu_approximate.data(),
                                                       gelu_approximate.size()));
  const auto f32 = hidden_states.options();
  if (M == 0) return at::empty({0, H}, f32);
  const float* h = hidden_states.data_ptr<float>();

  at::Tensor qkv = at::empty({3, M, num_heads, H / num_heads}, f32);
  gemm_packed(M, H, h, H, qkv_weight.data_ptr<float>(), 3, H, qkv_bias.data_ptr<float>(),
              qkv.data_ptr<float>(), H, M * H, std::nullopt);
  at::Tensor ctx = std::get<0>(varlen_attention_fwd(qkv[0], qkv[1], qkv[2], cu_seqlens,
                                                    cu_seqlens, max_seqlen, max_seqlen, scale,
                                                    0.0, 0, 0, false));
  at::Tensor attn = at::empty({M, H}, f32);
  gemm_packed(M, H, ctx.data_ptr<float>(), H, dense_weight.data_ptr<float>(), 1, H,
              dense_bias.data_ptr<float>(), attn.data_ptr<float>(), H, 0, std::nullopt);
  at::Tensor a = std::get<0>(add_layer_norm_fwd(attn, hidden_states, attention_ln_weight,
                                                attention_ln_bias, attention_ln_eps));
  at::Tensor act = at::empty({M, I}, f32);
  gemm_packed(M, H, a.data_ptr<float>(), H, ffn_weight.data_ptr<float>(), 1, I,
              ffn_bias.data_ptr<float>(), act.data_ptr<float>(), I, 0, gelu);
  at::Tensor f = std::move(attn);  // same shape, no longer needed
  gemm_packed(M, I, act.data_ptr<float>(), I, ffn_output_weight.data_ptr<float>(), 1, H,
              ffn_output_bias.data_ptr<float>(), f.data_ptr<float>(), H, 0, std::nullopt);
  return std::get<0>(add_layer_norm_fwd(f, a, full_ln_weight, full_ln_bias, full_ln_eps));
}

}  // namespace

int64_t packed_panel_width() { return kNR; }

// No tensor argument to dispatch on: the op is declared with its one kernel here, not in
// registration.cpp, which declares the schemas of the dispatched ops only.
TORCH_LIBRARY_FRAGMENT(albert_kernels, m) {
  m.def("packed_panel_width() -> int", &packed_panel_width);
}

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("pack_linear_weight", &pack_linear_weight);
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_albert_layer", &packed_albert_layer);
}

}  // namespace albert_kernels::cpu
