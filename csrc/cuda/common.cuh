// Helpers shared by the CUDA kernels of albert_kernels (csrc/cuda/*.cu).
//
// - dtype plumbing: the kernels use CUDA's own element types (float, __half, __nv_bfloat16) and
//   convert explicitly (the extension builds with __CUDA_NO_HALF_CONVERSIONS__ and friends);
// - Pack<T, VEC>: an aligned vector of VEC elements for 16/8/4-byte loads and stores;
// - warp reductions, and the deterministic column-sum kernel that finishes every two-stage
//   reduction (per-block fp32 partials [G, N] -> sums [N], always added in the same order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace albert_kernels {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Element types and conversions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls `body` with `scalar_t` bound to the CUDA element type of `dtype` (fp32, fp16, bf16).
#define AK_DISPATCH_FLOAT_HALF_BF16(dtype, name, ...)                                         \
  [&] {                                                                                     \
    switch (dtype) {                                                                        \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                   \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                   \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }        \
      default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ",    \
                           dtype);                                                          \
    }                                                                                       \
  }()

template <typename T> inline T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Vector loads and stores
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// The widest vector (in elements, at most 16 bytes) that divides n and to which every pointer
// in `ptrs` is aligned: rows of n elements then start aligned, so no row needs a head or a tail.
template <typename T>
inline int pick_vec(int64_t n, std::initializer_list<const void*> ptrs) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    bool ok = n % vec == 0;
    for (const void* p : ptrs) ok = ok && (p == nullptr || aligned_to(p, vec * sizeof(T)));
    if (ok) return vec;
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `buf` is __shared__ float[32]; the sum is always formed in the same order.
__device__ __forceinline__ float block_sum(float v, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous call
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < nwarps; ++w) total += buf[w];
  return total;
}

// Stage 2 of every deterministic column reduction:
//   out[n] = sum_{g < G} partial[g, n]   (fp32, summed in the fixed order of g), cast to T.
// Block (32, 8): threadIdx.x owns one column of a 32-column slice, threadIdx.y strides over g;
// the 8 partial sums are then added in order of threadIdx.y.
template <typename T>
__global__ void __launch_bounds__(256) column_sum_kernel(const float* __restrict__ partial,
                                                        T* __restrict__ out, int64_t G, int64_t N) {
  __shared__ float buf[8][33];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (n < N)
    for (int64_t g = threadIdx.y; g < G; g += 8) acc += partial[g * N + n];
  buf[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += buf[y][threadIdx.x];
    out[n] = from_float<T>(total);
  }
}

template <typename T>
inline void launch_column_sum(const float* partial, T* out, int64_t G, int64_t N, cudaStream_t stream) {
  if (N == 0) return;
  column_sum_kernel<T><<<static_cast<unsigned>(ceil_div(N, 32)), dim3(32, 8), 0, stream>>>(
      partial, out, G, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace albert_kernels
