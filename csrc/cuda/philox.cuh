// Counter-based Philox4x32-10 for attention dropout: the same draws as Triton's
// `tl.randint(seed, offset)` (triton/language/random.py), so the CUDA, Triton, C++ CPU and
// reference backends all drop the same attention probabilities (docs/correctness.md; the PyTorch
// definition is albert_kernels/backends/dropout.py).
//
//   key     = (seed_lo, seed_hi)            the 64-bit seed's low and high words
//   counter = (offset_lo, offset_hi, 0, 0)  the 64-bit offset's low and high words
//   10 rounds with Random123's multipliers 0xD2511F53 / 0xCD9E8D57 and key bumps
//   0x9E3779B9 / 0xBB67AE85; the draw is the first output word.
//
// Element (s, h, i, j) of an attention (sequence or batch row s, head h, query i, key j) uses
// offset = philox_offset + ((s * H + h) * max_q + i) * max_k + j and is kept iff
// draw >= threshold, threshold = min(floor(p * 2^32), 2^32 - 1); kept entries are scaled by
// 1 / (1 - p). Nothing is stored: backward regenerates the forward's mask from (seed, offset).
//
// Plain C++ too (host, no CUDA headers needed), so a unit test can compile it with g++ and
// compare its draws with Triton's and PyTorch's (tests/test_cuda_philox.py).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AK_PHILOX_FN __host__ __device__ __forceinline__
#else
#define AK_PHILOX_FN inline
#endif

namespace albert_kernels {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;

AK_PHILOX_FN uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first 32-bit word of Philox4x32-10(counter = (offset_lo, offset_hi, 0, 0), key = seed).
AK_PHILOX_FN uint32_t draw(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = mulhi(kRoundA, c0), lo_a = kRoundA * c0;
    const uint32_t hi_b = mulhi(kRoundB, c2), lo_b = kRoundB * c2;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// keep iff draw >= threshold(p) = min(floor(p * 2^32), 2^32 - 1), for p in [0, 1) (host).
inline uint32_t threshold(double p) {
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Dropout of one attention call, as the kernels receive it.
struct Dropout {
  uint64_t seed;
  uint64_t offset;      // philox_offset of element (0, 0, 0, 0)
  uint32_t threshold;   // keep iff draw >= threshold
  float scale;          // 1 / (1 - p) (0 when p == 1: everything dropped)
  int max_q, max_k;     // the offsets' row counts (padded: L, L; varlen: max_seqlen_q, _k)
};

// Offset of element (s, h, 0, 0).
AK_PHILOX_FN uint64_t head_offset(const Dropout& d, int64_t s, int64_t h, int64_t heads) {
  return d.offset + static_cast<uint64_t>((s * heads + h) * d.max_q) * static_cast<uint64_t>(d.max_k);
}

// Is element (i, j) of the (s, h) block whose offset is `base` kept?
AK_PHILOX_FN bool keep(const Dropout& d, uint64_t base, int i, int j) {
  return draw(d.seed, base + static_cast<uint64_t>(i) * static_cast<uint64_t>(d.max_k) +
                          static_cast<uint64_t>(j)) >= d.threshold;
}

}  // namespace philox
}  // namespace albert_kernels
