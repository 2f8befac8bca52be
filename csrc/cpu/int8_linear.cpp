// Opt-in int8 inference products (albert_kernels.quantize_dynamic): weights int8 per output
// channel, activations uint8 per token (row), int32 accumulation, an fp32 epilogue.
//
//   int8_pack_weight(weight_q int8 [N, K]) -> packed int8 [ceil(N / 16), ceil(K / 4), 16, 4]
//     panel p holds W[p*16 + j, g*4 + i] at [p, g, j, i] (zero past N and K): one 64-byte load is
//     16 output channels x 4 inputs, the operand of one AVX-512 VNNI vpdpbusd.
//   int8_quantize_rows(x fp32 [M, K], input_scale fp32 [K]?) -> (q uint8 [M, K], scale fp32 [M],
//     zero_point int32 [M]): y = x * input_scale (per input channel, when given), then per row
//     lo = min(min(y), 0), hi = max(max(y), 0), scale = (hi - lo) / 255 (1 where hi == lo),
//     zero_point = round(-lo / scale), q = clamp(round(y * (1 / scale)) + zero_point, 0, 255);
//     round is round-half-to-even. y ~= (q - zero_point) * scale.
//   int8_gemm(q uint8 [M, K], weight_packed, weight_q int8 [N, K], kernel) -> int32 [M, N]:
//     sum_k q[m, k] * W[n, k], exact in int32 (|sum| <= K * 255 * 127 < 2^31 for K < 66000).
//     kernel: "vnni" (AVX-512 VNNI vpdpbusd on the packed weight), "avx2" (the packed weight
//     widened to int16 and vpmaddwd: u8 * s8 products summed in pairs in int32, no int16
//     saturation, unlike vpmaddubsw), "portable" (plain loops, any CPU), "library"
//     (torch._int_mm on (q - 128) as int8 and weight_q, plus 128 * sum_k W[n, k]: oneDNN, on
//     AMX-INT8 / VNNI where the CPU has them; on a CPU without VNNI oneDNN's int8 product
//     saturates, so the Python side never picks it there).
//   int8_linear(x fp32 [M, K], weight_packed, weight_q, weight_scale fp32 [N], weight_sums int32
//     [N], bias fp32 [N]?, input_scale fp32 [K]?, gelu_approximate?, kernel, addend fp32 [M, N]?)
//     -> fp32 [M, N]: quantize_rows, gemm, then out = (acc - zero_point[m] * weight_sums[n]) *
//     (scale[m] * weight_scale[n]) + bias[n] + addend[m, n] in fp32, GELU ("none" / "tanh", as
//     F.gelu) when asked. (addend: the fp32 product of the input channels kept out of int8.)
//
// Inference only (no autograd), CPU only. The work is split over blocks of 64 output channels
// and tiles of 4 rows; each thread owns whole output tiles, so the result does not depend on the
// thread count. The VNNI and AVX2 kernels are compiled with function target attributes and run
// only where the Python side (backends/cpp/int8.py) saw the CPU flags they need.
#include "common.h"
#include "gelu_math.h"

#include <cmath>
#include <optional>
#include <string_view>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ALBERT_KERNELS_X86 1
#endif

namespace albert_kernels::cpu {
namespace {

constexpr int64_t kPanel = 16;   // output channels per packed panel
constexpr int64_t kGroup = 4;    // inputs per packed group
constexpr int64_t kBlockPanels = 4;  // panels per output block (64 channels)
constexpr int64_t kRows = 4;     // rows per tile

int64_t panels_of(int64_t n) { return (n + kPanel - 1) / kPanel; }
int64_t groups_of(int64_t k) { return (k + kGroup - 1) / kGroup; }

// --- quantization ------------------------------------------------------------------------------
void quantize_row(const float* x, const float* input_scale, int64_t k, float* tmp, uint8_t* q,
                  float* scale_out, int32_t* zp_out) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  const float* y = x;
  if (input_scale != nullptr) {
    int64_t j = 0;
    for (; j + W <= k; j += W) (V::loadu(x + j) * V::loadu(input_scale + j)).store(tmp + j);
    for (; j < k; ++j) tmp[j] = x[j] * input_scale[j];
    y = tmp;
  }
  V vlo(0.f), vhi(0.f);
  int64_t j = 0;
  for (; j + W <= k; j += W) {
    const V v = V::loadu(y + j);
    vlo = at::vec::minimum(vlo, v);
    vhi = at::vec::maximum(vhi, v);
  }
  float lo = 0.f, hi = 0.f;
  {
    float l[W], h[W];
    vlo.store(l);
    vhi.store(h);
    for (int64_t i = 0; i < W; ++i) {
      lo = std::min(lo, l[i]);
      hi = std::max(hi, h[i]);
    }
  }
  for (; j < k; ++j) {
    lo = std::min(lo, y[j]);
    hi = std::max(hi, y[j]);
  }
  float scale = (hi - lo) / 255.f;
  if (!(scale > 0.f) || !std::isfinite(scale)) scale = 1.f;
  const float inv = 1.f / scale;
  const float zp = std::nearbyint(-lo * inv);  // in [0, 255]: lo <= 0 <= hi
  *scale_out = scale;
  *zp_out = static_cast<int32_t>(zp);
  const V vinv(inv), vzp(zp), v0(0.f), v255(255.f);
  j = 0;
  float buf[W];
  for (; j + W <= k; j += W) {
    const V r = at::vec::clamp((V::loadu(y + j) * vinv).round() + vzp, v0, v255);
    r.store(buf);
    for (int64_t i = 0; i < W; ++i) q[j + i] = static_cast<uint8_t>(buf[i]);
  }
  for (; j < k; ++j) {
    const float r = std::nearbyint(y[j] * inv) + zp;
    q[j] = static_cast<uint8_t>(std::min(255.f, std::max(0.f, r)));
  }
}

// q [M, ldq] with ldq = ceil(K / 4) * 4 (the tail of each row zero).
void quantize_rows_into(const float* x, const float* input_scale, int64_t m, int64_t k,
                        int64_t ldq, uint8_t* q, float* scale, int32_t* zp) {
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(input_scale != nullptr ? k : 0);
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* qr = q + r * ldq;
      quantize_row(x + r * k, input_scale, k, tmp.data(), qr, scale + r, zp + r);
      for (int64_t j = k; j < ldq; ++j) qr[j] = 0;
    }
  });
}

// --- products: acc [rows, 16 * panels] (ld = ldc) of one tile ----------------------------------
#ifdef ALBERT_KERNELS_X86
// AVX-512 VNNI: per 4-input group, one 64-byte weight vector per panel, one broadcast of 4
// uint8 inputs per row, vpdpbusd (u8 x s8, 4 products summed into each int32 lane).
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile_vnni(const uint8_t* q, int64_t ldq, int64_t rows, const int8_t* wp, int64_t groups,
               int64_t panels, int32_t* c, int64_t ldc) {
  __m512i acc[kRows][kBlockPanels];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kBlockPanels; ++p) acc[r][p] = _mm512_setzero_si512();
  const int64_t pstride = groups * kPanel * kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i w[kBlockPanels];
    for (int p = 0; p < kBlockPanels; ++p)
      w[p] = p < panels ? _mm512_loadu_si512(wp + p * pstride + g * kPanel * kGroup)
                        : _mm512_setzero_si512();
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      int32_t x4;
      std::memcpy(&x4, q + r * ldq + g * kGroup, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      for (int p = 0; p < kBlockPanels; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], xb, w[p]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p)
      _mm512_storeu_si512(c + r * ldc + p * kPanel, acc[r][p]);
}

// AVX2: 16 bytes of a group's weight vector (4 channels x 4 inputs) widened to int16, times the
// row's 4 inputs widened to int16 and repeated 4 times: vpmaddwd gives, per channel, two int32
// partial sums (inputs 0+1 and 2+3), added by a horizontal add at the end.
__attribute__((target("avx2")))
void tile_avx2(const uint8_t* q, int64_t ldq, int64_t rows, const int8_t* wp, int64_t groups,
               int64_t panels, int32_t* c, int64_t ldc) {
  constexpr int kR = 2;  // rows per pass: 2 x 4 accumulators per panel + 4 weights + 2 inputs
  const int64_t pstride = groups * kPanel * kGroup;
  for (int64_t p = 0; p < panels; ++p) {
    const int8_t* wpanel = wp + p * pstride;
    for (int64_t r0 = 0; r0 < rows; r0 += kR) {
      const int nr = static_cast<int>(std::min<int64_t>(kR, rows - r0));
      __m256i acc[kR][4];
      for (int r = 0; r < kR; ++r)
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_setzero_si256();
      for (int64_t g = 0; g < groups; ++g) {
        const int8_t* wg = wpanel + g * kPanel * kGroup;
        __m256i w[4];
        for (int i = 0; i < 4; ++i)
          w[i] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * i)));
        for (int r = 0; r < nr; ++r) {
          int32_t x4;
          std::memcpy(&x4, q + (r0 + r) * ldq + g * kGroup, 4);
          const __m128i x16 = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(x4));  // 4 int16 (+ 4 zeros)
          const __m256i xb = _mm256_set1_epi64x(_mm_cvtsi128_si64(x16));
          for (int i = 0; i < 4; ++i)
            acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(xb, w[i]));
        }
      }
      for (int r = 0; r < nr; ++r) {
        // acc[i] lanes: channel 4i + j's two partial sums at 2j, 2j + 1 (j = 0..3)
        const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8);
        const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2], acc[r][3]), 0xD8);
        int32_t* out = c + (r0 + r) * ldc + p * kPanel;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), hi);
      }
    }
  }
}
#endif

void tile_portable(const uint8_t* q, int64_t ldq, int64_t rows, const int8_t* wp, int64_t groups,
                   int64_t panels, int32_t* c, int64_t ldc) {
  const int64_t pstride = groups * kPanel * kGroup;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = 0; p < panels; ++p) {
      int32_t acc[kPanel] = {0};
      const int8_t* wpanel = wp + p * pstride;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* xg = q + r * ldq + g * kGroup;
        const int8_t* wg = wpanel + g * kPanel * kGroup;
        for (int64_t j = 0; j < kPanel; ++j)
          for (int64_t i = 0; i < kGroup; ++i)
            acc[j] += static_cast<int32_t>(xg[i]) * static_cast<int32_t>(wg[j * kGroup + i]);
      }
      std::memcpy(c + r * ldc + p * kPanel, acc, sizeof(acc));
    }
  }
}

enum class Kernel { Vnni, Avx2, Portable, Library };

Kernel parse_kernel(std::string_view name) {
  if (name == "vnni" || name == "avx2") {
#ifndef ALBERT_KERNELS_X86
    TORCH_CHECK(false, "int8 kernel '", name, "' needs an x86-64 build");
#endif
#ifdef ALBERT_KERNELS_X86
    // never run an instruction the CPU lacks (SIGILL): a clear error instead
    if (name == "vnni") {
      TORCH_CHECK(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"),
                  "int8 kernel 'vnni': this CPU has no AVX-512 VNNI");
    } else {
      TORCH_CHECK(__builtin_cpu_supports("avx2"), "int8 kernel 'avx2': this CPU has no AVX2");
    }
#endif
    return name == "vnni" ? Kernel::Vnni : Kernel::Avx2;
  }
  if (name == "portable") return Kernel::Portable;
  TORCH_CHECK(name == "library", "kernel must be 'vnni', 'avx2', 'portable' or 'library', got ",
              name);
  return Kernel::Library;
}

// acc [M, ldc] (ldc = 16 * panels) from q [M, ldq] and the packed weight.
void gemm_packed(Kernel kernel, const uint8_t* q, int64_t m, int64_t ldq, const int8_t* wp,
                 int64_t groups, int64_t panels, int32_t* c, int64_t ldc) {
  const int64_t blocks = (panels + kBlockPanels - 1) / kBlockPanels;
  const int64_t tiles = (m + kRows - 1) / kRows;
  const int64_t pstride = groups * kPanel * kGroup;
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / tiles, t = it % tiles;  // row tiles inner: a block stays in cache
      const int64_t r0 = t * kRows, rows = std::min(kRows, m - r0);
      const int64_t p0 = b * kBlockPanels, np = std::min(kBlockPanels, panels - p0);
      const uint8_t* qt = q + r0 * ldq;
      const int8_t* wb = wp + p0 * pstride;
      int32_t* ct = c + r0 * ldc + p0 * kPanel;
      switch (kernel) {
#ifdef ALBERT_KERNELS_X86
        case Kernel::Vnni: tile_vnni(qt, ldq, rows, wb, groups, np, ct, ldc); break;
        case Kernel::Avx2: tile_avx2(qt, ldq, rows, wb, groups, np, ct, ldc); break;
#endif
        default: tile_portable(qt, ldq, rows, wb, groups, np, ct, ldc); break;
      }
    }
  });
}

void check_weights(const at::Tensor& packed, const at::Tensor& weight_q, int64_t k) {
  TORCH_CHECK(weight_q.device().is_cpu() && weight_q.scalar_type() == at::kChar &&
                  weight_q.dim() == 2 && weight_q.is_contiguous() && weight_q.size(1) == k,
              "weight_q must be a contiguous CPU int8 [N, K] tensor with K = ", k);
  const int64_t n = weight_q.size(0);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) == panels_of(n) && packed.size(1) == groups_of(k) &&
                  packed.size(2) == kPanel && packed.size(3) == kGroup,
              "weight_packed must be int8_pack_weight(weight_q) ([", panels_of(n), ", ",
              groups_of(k), ", 16, 4]), got ", packed.sizes());
}

// int32 [M, N] (library: the product on (q - 128), i.e. sum_k (q - 128) W; else sum_k q W).
at::Tensor gemm_impl(Kernel kernel, const at::Tensor& q, int64_t ldq, int64_t m, int64_t k,
                     const at::Tensor& packed, const at::Tensor& weight_q) {
  const int64_t n = weight_q.size(0);
  if (kernel == Kernel::Library) {
    // the uint8 rows as int8 (q - 128): the same bits with the top one flipped
    at::Tensor qs = q.narrow(1, 0, k).view(at::kChar).bitwise_xor(-128);
    return at::_int_mm(qs, weight_q.t());
  }
  const int64_t panels = panels_of(n), groups = groups_of(k), ldc = panels * kPanel;
  at::Tensor c = at::empty({m, ldc}, q.options().dtype(at::kInt));
  gemm_packed(kernel, q.data_ptr<uint8_t>(), m, ldq, packed.data_ptr<int8_t>(), groups, panels,
              c.data_ptr<int32_t>(), ldc);
  return ldc == n ? c : c.narrow(1, 0, n);
}

}  // namespace

at::Tensor int8_pack_weight(const at::Tensor& weight_q) {
  TORCH_CHECK(weight_q.device().is_cpu() && weight_q.scalar_type() == at::kChar &&
                  weight_q.dim() == 2,
              "weight_q must be a CPU int8 [N, K] tensor, got ", weight_q.scalar_type(), " ",
              weight_q.sizes());
  const at::Tensor w = weight_q.contiguous();
  const int64_t n = w.size(0), k = w.size(1), panels = panels_of(n), groups = groups_of(k);
  at::Tensor out = at::zeros({panels, groups, kPanel, kGroup}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t p = row / kPanel, j = row % kPanel;
    for (int64_t col = 0; col < k; ++col) {
      const int64_t g = col / kGroup, i = col % kGroup;
      dst[((p * groups + g) * kPanel + j) * kGroup + i] = src[row * k + col];
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_quantize_rows(
    const at::Tensor& x, const std::optional<at::Tensor>& input_scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a CPU float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  at::Tensor s_in;
  if (input_scale.has_value()) {
    s_in = input_scale->contiguous();
    TORCH_CHECK(s_in.scalar_type() == at::kFloat && s_in.numel() == k,
                "input_scale must be float32 [K], K = ", k);
  }
  at::Tensor q = at::empty({m, k}, xc.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m}, xc.options());
  at::Tensor zp = at::empty({m}, xc.options().dtype(at::kInt));
  quantize_rows_into(xc.data_ptr<float>(), s_in.defined() ? s_in.data_ptr<float>() : nullptr, m,
                     k, k, q.data_ptr<uint8_t>(), scale.data_ptr<float>(), zp.data_ptr<int32_t>());
  return {q, scale, zp};
}

at::Tensor int8_gemm(const at::Tensor& q, const at::Tensor& weight_packed,
                     const at::Tensor& weight_q, c10::string_view kernel_name) {
  const Kernel kernel = parse_kernel(std::string_view(kernel_name.data(), kernel_name.size()));
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kByte && q.dim() == 2,
              "q must be a CPU uint8 [M, K] tensor");
  const int64_t m = q.size(0), k = q.size(1);
  check_weights(weight_packed, weight_q, k);
  at::Tensor qp = q.contiguous();
  const int64_t ldq = round_up(k, kGroup);
  if (kernel != Kernel::Library && ldq != k) {
    qp = at::constant_pad_nd(qp, {0, ldq - k}, 0);
  }
  at::Tensor c = gemm_impl(kernel, qp, ldq, m, k, weight_packed, weight_q);
  if (kernel == Kernel::Library) {
    // sum_k q W = sum_k (q - 128) W + 128 sum_k W
    c = c + weight_q.sum({1}, false, at::kInt).mul(128).unsqueeze(0);
  }
  return c.contiguous();
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight_packed,
                       const at::Tensor& weight_q, const at::Tensor& weight_scale,
                       const at::Tensor& weight_sums, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& input_scale,
                       std::optional<c10::string_view> gelu_approximate,
                       c10::string_view kernel_name, const std::optional<at::Tensor>& addend) {
  const Kernel kernel = parse_kernel(std::string_view(kernel_name.data(), kernel_name.size()));
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a CPU float32 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  check_weights(weight_packed, weight_q, k);
  const int64_t n = weight_q.size(0);
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.numel() == n &&
                  weight_scale.is_contiguous(),
              "weight_scale must be contiguous float32 [N], N = ", n);
  TORCH_CHECK(weight_sums.scalar_type() == at::kInt && weight_sums.numel() == n &&
                  weight_sums.is_contiguous(),
              "weight_sums must be contiguous int32 [N], N = ", n);
  const float* bias_p = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == n, "bias must be float32 [N]");
    bias_p = b.data_ptr<float>();
  }
  at::Tensor s_in;
  if (input_scale.has_value()) {
    s_in = input_scale->contiguous();
    TORCH_CHECK(s_in.scalar_type() == at::kFloat && s_in.numel() == k,
                "input_scale must be float32 [K], K = ", k);
  }
  const float* add_p = nullptr;
  at::Tensor add;
  if (addend.has_value()) {
    add = addend->contiguous();
    TORCH_CHECK(add.scalar_type() == at::kFloat && add.dim() == 2 && add.size(0) == m &&
                    add.size(1) == n,
                "addend must be float32 [M, N] = [", m, ", ", n, "], got ", add.scalar_type(), " ",
                add.sizes());
    add_p = add.data_ptr<float>();
  }
  std::optional<Gelu> gelu;
  if (gelu_approximate.has_value()) {
    gelu = parse_approximate(std::string_view(gelu_approximate->data(), gelu_approximate->size()));
  }

  const int64_t ldq = kernel == Kernel::Library ? k : round_up(k, kGroup);
  at::Tensor q = at::empty({m, ldq}, xc.options().dtype(at::kByte));
  at::Tensor scale = at::empty({m}, xc.options());
  at::Tensor zp = at::empty({m}, xc.options().dtype(at::kInt));
  quantize_rows_into(xc.data_ptr<float>(), s_in.defined() ? s_in.data_ptr<float>() : nullptr, m,
                     k, ldq, q.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                     zp.data_ptr<int32_t>());
  at::Tensor acc = gemm_impl(kernel, q, ldq, m, k, weight_packed, weight_q);
  const int64_t ldc = acc.stride(0);
  const int32_t* accp = acc.data_ptr<int32_t>();
  // library: acc = sum (q - 128) W, so acc - (zp - 128) * sums; else acc - zp * sums
  const int32_t shift = kernel == Kernel::Library ? 128 : 0;

  at::Tensor out = at::empty({m, n}, xc.options());
  float* o = out.data_ptr<float>();
  const float* ws = weight_scale.data_ptr<float>();
  const int32_t* sums = weight_sums.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const int32_t* zpp = zp.data_ptr<int32_t>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    using V = Vec<float>;
    constexpr int64_t W = V::size();
    for (int64_t r = begin; r < end; ++r) {
      const int32_t off = zpp[r] - shift;
      const float sx = sp[r];
      const int32_t* a = accp + r * ldc;
      float* orow = o + r * n;
      for (int64_t j = 0; j < n; ++j) {
        // exact in int32: |acc| and |off * sums| are each < K * 255 * 127
        const int32_t v = a[j] - off * sums[j];
        orow[j] = static_cast<float>(v) * (sx * ws[j]) + (bias_p ? bias_p[j] : 0.f);
      }
      if (add_p != nullptr) {
        const float* arow = add_p + r * n;
        for (int64_t j = 0; j < n; ++j) orow[j] += arow[j];
      }
      if (gelu.has_value()) {
        int64_t j = 0;
        for (; j + W <= n; j += W) GeluMath<float>::forward(*gelu, V::loadu(orow + j)).store(orow + j);
        if (j < n) {
          const int64_t rest = n - j;
          GeluMath<float>::forward(*gelu, V::loadu(orow + j, rest)).store(orow + j, rest);
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(albert_kernels, m) {
  m.def("int8_pack_weight(Tensor weight_q) -> Tensor");
  m.def("int8_quantize_rows(Tensor x, Tensor? input_scale=None) -> (Tensor, Tensor, Tensor)");
  m.def("int8_gemm(Tensor q, Tensor weight_packed, Tensor weight_q, str kernel) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight_packed, Tensor weight_q, Tensor weight_scale,"
        " Tensor weight_sums, Tensor? bias=None, Tensor? input_scale=None,"
        " str? gelu_approximate=None, str kernel=\"portable\", Tensor? addend=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_quantize_rows", &int8_quantize_rows);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace albert_kernels::cpu
