// Attention dropout's random numbers on the CPU: Philox4x32-10 exactly as Triton's
// tl.randint(seed, offset) draws it (triton/language/random.py), which is Random123's
// philox4x32_R(10, ctr, key):
//   key = (seed_lo, seed_hi) of the int64 seed; counter = (offset_lo, offset_hi, 0, 0) of the
//   int64 offset; multipliers 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85;
//   the draw is the first output word.
// The definition and the offsets each attention element uses are in
// albert_kernels/backends/dropout.py (the PyTorch copy the tests compare against); the CUDA copy
// is csrc/cuda/philox.cuh. An element is kept iff draw >= threshold, with
// threshold = min(floor(p * 2^32), 2^32 - 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace albert_kernels::cpu {

inline uint32_t philox_draw(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t{0xCD9E8D57u} * c2;
    const uint64_t pa = uint64_t{0xD2511F53u} * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The dropout of one attention call. `on` is false for p == 0: kernels then take the paths they
// had before dropout existed (the flag is tested once per block of keys, never per element).
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  int64_t offset = 0;       // philox_offset of the call
  int64_t max_q = 0, max_k = 0;
  uint32_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)

  Dropout() = default;
  Dropout(double p, int64_t seed_, int64_t offset_, int64_t max_q_, int64_t max_k_)
      : on(p > 0.0), seed(static_cast<uint64_t>(seed_)), offset(offset_), max_q(max_q_),
        max_k(max_k_), threshold(dropout_threshold(p)), keep_scale(1.0 / (1.0 - p)) {}

  // Offset of element (slice, i, key 0), slice = sequence * H + head.
  int64_t row_base(int64_t slice, int64_t i) const {
    return offset + (slice * max_q + i) * max_k;
  }

  // z[j] = 1 if key position pos(j) of the row starting at `base` is kept, else 0, j < n.
  // pos(j) = keys[j] (padded layout with a key list) or j (keys == nullptr).
  template <typename acc>
  void keep_row(int64_t base, const int64_t* keys, int64_t n, acc* z) const {
    if (keys == nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        z[j] = philox_draw(seed, static_cast<uint64_t>(base + j)) >= threshold ? acc(1) : acc(0);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        z[j] = philox_draw(seed, static_cast<uint64_t>(base + keys[j])) >= threshold ? acc(1)
                                                                                     : acc(0);
      }
    }
  }
};

}  // namespace albert_kernels::cpu
