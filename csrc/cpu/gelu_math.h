// GELU and its derivative on one vector (csrc/cpu/gelu_ffn.cpp's epilogues and the small-M
// path's, csrc/cpu/small_m.cpp). approximate: "tanh" (transformers' gelu_new) or "none" (erf),
// as torch.nn.functional.gelu.
#pragma once

#include "common.h"

#include <string_view>

namespace albert_kernels::cpu {

enum class Gelu { Tanh, Erf };

inline Gelu parse_approximate(std::string_view approximate) {
  if (approximate == "tanh") return Gelu::Tanh;
  TORCH_CHECK(approximate == "none", "approximate must be 'tanh' or 'none', got ", approximate);
  return Gelu::Erf;
}

// GELU and its derivative on one vector, in acc_t, accurate on the whole real line.
// tanh form: 0.5 (1 + tanh(u)) == sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3), so
// gelu(x) = x * sigmoid(2u). With t = -2u = x (kA + kB x^2), e = exp(-|t|) in [0, 1] and
// r = 1 / (1 + e) in [1/2, 1]: sigmoid(2u) = 1 - e r where t <= 0 (exactly 1 where e = 0,
// whatever the reciprocal's last bit), e r where t > 0, and
// sigmoid(2u) (1 - sigmoid(2u)) = e r^2 on both sides: no 1 - s is ever formed, so neither tail
// cancels (the old 1 - s multiplied the reciprocal's rounding error by ~x^3: a gradient of 12760
// at x = 1e4). x is clamped to +-kClamp before t is formed: beyond it e is 0 in float and double
// alike (|t| > 1900), so nothing changes except that x^3 never overflows (fp16 / bf16 maxima).
// One exp and one reciprocal (an approximate reciprocal refined by a Newton step on AVX2, ~1 ulp;
// its argument is in [1, 2], so it never meets inf or a denormal).
// erf form: gelu(x) = 0.5 x erfc(-x / sqrt(2)): erfc keeps the left tail's relative accuracy,
// where 1 + erf(x / sqrt(2)) cancels to 0; the derivative adds x * pdf(x), and pdf(x) = 0 (not
// NaN) where x^2 would overflow (see cdf: one erfc and two exps, the pdf sharing one of them).
template <typename acc>
struct GeluMath {
  using V = Vec<acc>;
  static constexpr acc kSqrt2OverPi = acc(0.7978845608028654);
  static constexpr acc kCubic = acc(0.044715);
  static constexpr acc kA = acc(-2 * 0.7978845608028654);             // -2 sqrt(2/pi)
  static constexpr acc kB = acc(-2 * 0.7978845608028654 * 0.044715);  // kA * 0.044715
  static constexpr acc kInvSqrt2 = acc(0.7071067811865476);
  static constexpr acc kInvSqrt2Pi = acc(0.3989422804014327);
  static constexpr acc kClamp = acc(30);

  static V reciprocal(const V& d) {
#ifdef ALBERT_KERNELS_AVX2
    if constexpr (std::is_same_v<acc, float> && V::size() == 8) {
      const __m256 dv = d;
      const __m256 r = _mm256_rcp_ps(dv);  // 12 bits; one Newton step: r (2 - d r)
      return V(_mm256_mul_ps(r, _mm256_fnmadd_ps(dv, r, _mm256_set1_ps(2.f))));
    }
#endif
    return V(acc(1)) / d;
  }
  // sigmoid(2u) of the clamped xc, and (grad only) e r^2 = sigmoid(2u) (1 - sigmoid(2u)).
  static V sigmoid_2u(const V& xc, V* er2) {
    const V t = xc * at::vec::fmadd(V(kB), xc * xc, V(kA));
    const V e = fast_exp<acc>(t.abs().neg());
    const V r = reciprocal(V(acc(1)) + e);
    const V er = e * r;
    if (er2) *er2 = er * r;
    return V::blendv(V(acc(1)) - er, er, t > V(acc(0)));
  }
  static V clamp(const V& x) { return at::vec::clamp(x, V(-kClamp), V(kClamp)); }
  // Phi(x) = 0.5 erfc(-x / sqrt(2)) and (pdf != nullptr) pdf(x) = exp(-x^2 / 2) / sqrt(2 pi).
  // float: one erfc of a = |x| / sqrt(2) >= 0 for both signs, Phi = h where x < 0 and 1 - h
  // where x >= 0 (h = 0.5 erfc(a) <= 1/2: no cancellation either way), in Numerical Recipes'
  // erfcc form (Press et al., section 6.2; relative error < 1.2e-7 on a >= 0, the triton kernel's
  // backends/triton/gelu_ffn.py _erfc_nonneg): erfc(a) = t exp(-a^2 - 1.26551223 + t P(t)),
  // t = 1 / (1 + a / 2). exp(-a^2) and exp(t P(t) + C - err) are separate factors, a^2 = x^2 / 2
  // taken from x^2 with its rounding err (fma), so no rounding of a large exponent sum is
  // magnified; the first factor is the pdf's too (exp(-x^2 / 2) = exp(-a2) (1 - err)), which
  // the derivative gets for free. |x| is clamped to 17 (a = 12: exp(-a^2) = 0 in float) so x^2
  // never overflows. double (float64 inputs, gradcheck): Sleef's erfc and exp.
  static V cdf(const V& x, V* pdf) {
    if constexpr (std::is_same_v<acc, float>) {
      const V xc = at::vec::clamp(x, V(-17.f), V(17.f));
      const V t = reciprocal(at::vec::fmadd(xc.abs(), V(0.5f * kInvSqrt2), V(1.f)));
      V p(0.17087277f);
      for (const float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f,
                            0.09678418f, 0.37409196f, 1.00002368f}) {
        p = at::vec::fmadd(p, t, V(c));
      }
      const V x2 = xc * xc;
      const V a2 = V(0.5f) * x2;                                 // exact
      const V a2_err = V(0.5f) * at::vec::fmsub(xc, xc, x2);     // x^2 / 2 = a2 + a2_err
      const V e1 = fast_exp<acc>(a2.neg());
      const V e2 = fast_exp<acc>(at::vec::fmadd(p, t, V(-1.26551223f)) - a2_err);
      const V h = V(0.5f) * t * e1 * e2;                         // Phi(-|x|)
      if (pdf) *pdf = V(kInvSqrt2Pi) * at::vec::fmadd(e1, a2_err.neg(), e1);
      return V::blendv(V(1.f) - h, h, x < V(0.f));
    } else {
      if (pdf) *pdf = V(kInvSqrt2Pi) * (V(acc(-0.5)) * x * x).exp();
      return V(acc(0.5)) * (x * V(-kInvSqrt2)).erfc();
    }
  }
  static V forward(Gelu kind, const V& x) {
    if (kind == Gelu::Tanh) return x * sigmoid_2u(clamp(x), nullptr);
    return x * cdf(x, nullptr);
  }
  // Returns gelu'(x); writes gelu(x) to *y when y is not null (the same value forward gives).
  static V grad(Gelu kind, const V& x, V* y) {
    if (kind == Gelu::Tanh) {
      const V xc = clamp(x);
      V er2;
      const V s = sigmoid_2u(xc, &er2);
      if (y) *y = x * s;
      // d/dx [x s(2u)] = s + x s (1 - s) 2 du/dx = s + xc e r^2 2 sqrt(2/pi) (1 + 3 c xc^2):
      // xc in place of x is exact (e = 0 beyond the clamp)
      const V du2 = V(2 * kSqrt2OverPi) * at::vec::fmadd(V(3 * kCubic), xc * xc, V(acc(1)));
      return at::vec::fmadd(xc * er2, du2, s);
    }
    V pdf;
    const V c = cdf(x, &pdf);
    if (y) *y = x * c;
    return at::vec::fmadd(x, pdf, c);
  }
};

}  // namespace albert_kernels::cpu
