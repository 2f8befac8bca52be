// Residual add + LayerNorm on CUDA: out = LayerNorm(x + residual) * weight + bias over the last dim.
//
// Layouts (the op wrappers pass contiguous tensors; these functions also accept any rank and
// read it as rows of N = size(-1)):
//   x, residual, grad_out, out, grad_x : [M, N] row-major, dtype T (fp32, fp16 or bf16)
//   weight, bias, grad_weight, grad_bias: [N], dtype T
//   mean, rstd                          : float32 [M]   (saved by forward for backward)
// Everything is computed in fp32: s = x + residual is formed in fp32 (never rounded to T), and
// shifted by the row's first element, s' = s - s_0 (s_0 = x[row, 0] + residual[row, 0]): a
// constant row then has mean 0 and variance 0 exactly (out = bias), and a large common offset
// costs no accuracy (one rounding step of the unshifted mean, times rstd <= 1/sqrt(eps) = 1e6 for
// ALBERT, is what the shift removes). Mean and the biased variance of s' by two passes over the
// row held in registers, rstd = 1 / sqrt(var + eps). `mean` holds the mean of s' (the shifted
// mean). Backward recomputes s_0 and s' from x and residual exactly as forward formed them, so
// only mean and rstd are saved:  xhat = (s' - mean) * rstd,  g = grad_out * weight,
//             grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))   (== grad_residual),
//             grad_weight = sum_rows(grad_out * xhat),  grad_bias = sum_rows(grad_out).
//
// Kernels (VEC = elements per vector access: 16 bytes when N and every pointer allow it, else the
// widest of 8/4/2 bytes that does, else scalar; see pick_vec — rows then never need a tail):
//   *_warp_kernel   N <= 1024: one warp per row, 4 rows per 128-thread block; each lane keeps its
//                   vectors of the row (lane, lane + 32, ...) in registers.
//   *_block_kernel  1024 < N <= 4096: one 256-thread block per row; each thread keeps SLOTS =
//                   16 / VEC vectors (tid, tid + 256, ...) in registers. N > 4096: the streaming
//                   variant (SLOTS == 0, scalar accesses) re-reads the row from global memory (L2)
//                   in each pass instead.
// grad_weight / grad_bias are reduced deterministically in two stages: backward block g handles a
// fixed set of rows in a fixed order and accumulates their column sums in fp32 (per warp or per
// thread, in shared memory), then writes them to partial[g, :] (fp32 [G, N], G <= 4 x SMs);
// column_sum_kernel adds the G partial rows in order. No atomics anywhere.
#include <torch/library.h>

#include <type_traits>

#include "common.cuh"

namespace albert_kernels {
namespace cuda {
namespace {

constexpr int kMaxWarpN = 1024;      // rows up to this length go one warp per row
constexpr int kWarpsPerBlock = 4;    // warp kernels: rows per block
constexpr int kBlockThreads = 256;   // block kernels: threads per row
constexpr int kBlockElems = 16;      // block kernels: elements per thread kept in registers
constexpr int kMaxBlockN = kBlockThreads * kBlockElems;  // longer rows: streaming kernels

// s_0 = x[base] + residual[base] in fp32: the shift of the row starting at `base`.
template <typename T>
__device__ __forceinline__ float row_shift(const T* x, const T* res, int64_t base) {
  return to_float(x[base]) + to_float(res[base]);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// One warp per row. Lane `lane` owns vectors lane + 32 * k, k < SLOTS (SLOTS * 32 * VEC >= N).
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
add_ln_fwd_warp_kernel(const T* __restrict__ x, const T* __restrict__ res,
                       const T* __restrict__ weight, const T* __restrict__ bias,
                       T* __restrict__ out, float* __restrict__ mean_out,
                       float* __restrict__ rstd_out, int64_t M, int N, float eps) {
  constexpr int SLOTS = kMaxWarpN / (32 * VEC);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= M) return;
  const int nvec = N / VEC;
  const int64_t base = row * N;
  const float shift = row_shift(x, res, base);

  float s[SLOTS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < SLOTS; ++k) {
    const int v = lane + 32 * k;
    if (v < nvec) {
      float xv[VEC], rv[VEC];
      load_vec<T, VEC>(x + base + v * VEC, xv);
      load_vec<T, VEC>(res + base + v * VEC, rv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) { s[k][j] = xv[j] + rv[j] - shift; sum += s[k][j]; }
    }
  }
  const float mean = warp_sum(sum) / N;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < SLOTS; ++k)
    if (lane + 32 * k < nvec)
#pragma unroll
      for (int j = 0; j < VEC; ++j) { const float d = s[k][j] - mean; sq += d * d; }
  const float rstd = rsqrtf(warp_sum(sq) / N + eps);

#pragma unroll
  for (int k = 0; k < SLOTS; ++k) {
    const int v = lane + 32 * k;
    if (v < nvec) {
      float wv[VEC], bv[VEC], y[VEC];
      load_vec<T, VEC>(weight + v * VEC, wv);
      load_vec<T, VEC>(bias + v * VEC, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = (s[k][j] - mean) * rstd * wv[j] + bv[j];
      store_vec<T, VEC>(out + base + v * VEC, y);
    }
  }
  if (lane == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// One block per row (rows blockIdx.x, blockIdx.x + gridDim.x, ...). SLOTS > 0: thread tid keeps
// vectors tid + THREADS * k, k < SLOTS, in registers (SLOTS * THREADS * VEC >= N).
// (SLOTS = kBlockElems / VEC.) SLOTS == 0: streaming; every pass re-reads x and residual.
template <typename T, int VEC, int SLOTS>
__global__ void __launch_bounds__(kBlockThreads)
add_ln_fwd_block_kernel(const T* __restrict__ x, const T* __restrict__ res,
                        const T* __restrict__ weight, const T* __restrict__ bias,
                        T* __restrict__ out, float* __restrict__ mean_out,
                        float* __restrict__ rstd_out, int64_t M, int N, float eps) {
  constexpr int CACHE = SLOTS > 0 ? SLOTS : 1;
  __shared__ float buf[32];
  const int nvec = N / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const float shift = row_shift(x, res, base);
    float s[CACHE][VEC];
    auto load_s = [&](int v, float (&dst)[VEC]) {
      float xv[VEC], rv[VEC];
      load_vec<T, VEC>(x + base + static_cast<int64_t>(v) * VEC, xv);
      load_vec<T, VEC>(res + base + static_cast<int64_t>(v) * VEC, rv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) dst[j] = xv[j] + rv[j] - shift;
    };

    float sum = 0.f;
    if constexpr (SLOTS > 0) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int v = threadIdx.x + kBlockThreads * k;
        if (v < nvec) {
          load_s(v, s[k]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) sum += s[k][j];
        }
      }
    } else {
      for (int v = threadIdx.x; v < nvec; v += kBlockThreads) {
        load_s(v, s[0]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += s[0][j];
      }
    }
    const float mean = block_sum(sum, buf) / N;

    float sq = 0.f;
    if constexpr (SLOTS > 0) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k)
        if (threadIdx.x + kBlockThreads * k < nvec)
#pragma unroll
          for (int j = 0; j < VEC; ++j) { const float d = s[k][j] - mean; sq += d * d; }
    } else {
      for (int v = threadIdx.x; v < nvec; v += kBlockThreads) {
        load_s(v, s[0]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) { const float d = s[0][j] - mean; sq += d * d; }
      }
    }
    const float rstd = rsqrtf(block_sum(sq, buf) / N + eps);

    auto write = [&](int v, const float (&sv)[VEC]) {
      float wv[VEC], bv[VEC], y[VEC];
      load_vec<T, VEC>(weight + static_cast<int64_t>(v) * VEC, wv);
      load_vec<T, VEC>(bias + static_cast<int64_t>(v) * VEC, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[j] = (sv[j] - mean) * rstd * wv[j] + bv[j];
      store_vec<T, VEC>(out + base + static_cast<int64_t>(v) * VEC, y);
    };
    if constexpr (SLOTS > 0) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int v = threadIdx.x + kBlockThreads * k;
        if (v < nvec) write(v, s[k]);
      }
    } else {
      for (int v = threadIdx.x; v < nvec; v += kBlockThreads) {
        load_s(v, s[0]);
        write(v, s[0]);
      }
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// One warp per row; warp w of block g handles rows (g * WARPS + w) + k * (gridDim.x * WARPS), in
// order. Each warp accumulates grad_weight / grad_bias for the rows it handles in its own slice of
// shared memory (acc_w / acc_b [warp][1024], fp32; no other warp touches it). Lane `lane` owns the
// entries (k * VEC + j) * 32 + lane, i.e. column (lane + 32 * k) * VEC + j: a bank-conflict-free
// layout. At the end the block's warps are added in warp order into partial_{w,b}[g, :].
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
add_ln_bwd_warp_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                       const T* __restrict__ res, const T* __restrict__ weight,
                       const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                       T* __restrict__ grad_x, float* __restrict__ partial_w,
                       float* __restrict__ partial_b, int64_t M, int N) {
  constexpr int SLOTS = kMaxWarpN / (32 * VEC);
  __shared__ float acc_w[kWarpsPerBlock][kMaxWarpN];
  __shared__ float acc_b[kWarpsPerBlock][kMaxWarpN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nvec = N / VEC;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  float* my_w = acc_w[warp];
  float* my_b = acc_b[warp];
#pragma unroll
  for (int i = lane; i < kMaxWarpN; i += 32) { my_w[i] = 0.f; my_b[i] = 0.f; }

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < M;
       row += row_stride) {
    const int64_t base = row * N;
    const float mean = mean_in[row], rstd = rstd_in[row];
    const float shift = row_shift(x, res, base);
    float xhat[SLOTS][VEC], g[SLOTS][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int k = 0; k < SLOTS; ++k) {
      const int v = lane + 32 * k;
      if (v < nvec) {
        float xv[VEC], rv[VEC], dy[VEC], wv[VEC];
        load_vec<T, VEC>(x + base + v * VEC, xv);
        load_vec<T, VEC>(res + base + v * VEC, rv);
        load_vec<T, VEC>(grad_out + base + v * VEC, dy);
        load_vec<T, VEC>(weight + v * VEC, wv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[k][j] = (xv[j] + rv[j] - shift - mean) * rstd;
          g[k][j] = dy[j] * wv[j];
          sum_g += g[k][j];
          sum_gx += g[k][j] * xhat[k][j];
          my_w[(k * VEC + j) * 32 + lane] += dy[j] * xhat[k][j];
          my_b[(k * VEC + j) * 32 + lane] += dy[j];
        }
      }
    }
    const float mean_g = warp_sum(sum_g) / N, mean_gx = warp_sum(sum_gx) / N;
#pragma unroll
    for (int k = 0; k < SLOTS; ++k) {
      const int v = lane + 32 * k;
      if (v < nvec) {
        float dx[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) dx[j] = rstd * (g[k][j] - mean_g - xhat[k][j] * mean_gx);
        store_vec<T, VEC>(grad_x + base + v * VEC, dx);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kMaxWarpN; i += blockDim.x) {
    const int l = i & 31, kj = i >> 5, k = kj / VEC, j = kj % VEC;
    const int n = (l + 32 * k) * VEC + j;
    if (n >= N) continue;
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) { sw += acc_w[w][i]; sb += acc_b[w][i]; }
    partial_w[static_cast<int64_t>(blockIdx.x) * N + n] = sw;
    partial_b[static_cast<int64_t>(blockIdx.x) * N + n] = sb;
  }
}

// One block per row; block g handles rows g, g + gridDim.x, ... in order.
// SLOTS > 0: each thread keeps its vectors' xhat and g in registers for the second pass, and
// accumulates its columns' grad_weight / grad_bias in shared memory (thread-owned entries
// (k * VEC + j) * THREADS + tid, fp32), written to partial_{w,b}[g, :] at the end.
// SLOTS == 0 (streaming): both passes re-read the row, and the column sums accumulate directly in
// the block's own partial row in global memory (no other block touches it).
template <typename T, int VEC, int SLOTS>
__global__ void __launch_bounds__(kBlockThreads)
add_ln_bwd_block_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                        const T* __restrict__ res, const T* __restrict__ weight,
                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                        T* __restrict__ grad_x, float* __restrict__ partial_w,
                        float* __restrict__ partial_b, int64_t M, int N) {
  constexpr int CACHE = SLOTS > 0 ? SLOTS : 1;
  constexpr int ACC = SLOTS > 0 ? SLOTS * VEC * kBlockThreads : 1;
  __shared__ float buf[32];
  __shared__ float acc_w[ACC], acc_b[ACC];
  const int tid = threadIdx.x;
  const int nvec = N / VEC;
  float* pw = partial_w + static_cast<int64_t>(blockIdx.x) * N;
  float* pb = partial_b + static_cast<int64_t>(blockIdx.x) * N;
  if constexpr (SLOTS > 0) {
    for (int i = tid; i < ACC; i += kBlockThreads) { acc_w[i] = 0.f; acc_b[i] = 0.f; }
  } else {
    for (int n = tid; n < N; n += kBlockThreads) { pw[n] = 0.f; pb[n] = 0.f; }
  }

  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const float mean = mean_in[row], rstd = rstd_in[row];
    const float shift = row_shift(x, res, base);
    // xhat, g and grad_out of vector v of this row
    auto load_row = [&](int v, float (&xh)[VEC], float (&gg)[VEC], float (&dy)[VEC]) {
      const int64_t off = static_cast<int64_t>(v) * VEC;
      float xv[VEC], rv[VEC], wv[VEC];
      load_vec<T, VEC>(x + base + off, xv);
      load_vec<T, VEC>(res + base + off, rv);
      load_vec<T, VEC>(grad_out + base + off, dy);
      load_vec<T, VEC>(weight + off, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xh[j] = (xv[j] + rv[j] - shift - mean) * rstd;
        gg[j] = dy[j] * wv[j];
      }
    };

    float xhat[CACHE][VEC], g[CACHE][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
    if constexpr (SLOTS > 0) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int v = tid + kBlockThreads * k;
        if (v < nvec) {
          float dy[VEC];
          load_row(v, xhat[k], g[k], dy);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            sum_g += g[k][j];
            sum_gx += g[k][j] * xhat[k][j];
            acc_w[(k * VEC + j) * kBlockThreads + tid] += dy[j] * xhat[k][j];
            acc_b[(k * VEC + j) * kBlockThreads + tid] += dy[j];
          }
        }
      }
    } else {
      for (int v = tid; v < nvec; v += kBlockThreads) {
        float dy[VEC];
        load_row(v, xhat[0], g[0], dy);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sum_g += g[0][j];
          sum_gx += g[0][j] * xhat[0][j];
          pw[v * VEC + j] += dy[j] * xhat[0][j];
          pb[v * VEC + j] += dy[j];
        }
      }
    }
    const float mean_g = block_sum(sum_g, buf) / N;
    const float mean_gx = block_sum(sum_gx, buf) / N;

    auto write = [&](int v, const float (&xh)[VEC], const float (&gg)[VEC]) {
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dx[j] = rstd * (gg[j] - mean_g - xh[j] * mean_gx);
      store_vec<T, VEC>(grad_x + base + static_cast<int64_t>(v) * VEC, dx);
    };
    if constexpr (SLOTS > 0) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int v = tid + kBlockThreads * k;
        if (v < nvec) write(v, xhat[k], g[k]);
      }
    } else {
      for (int v = tid; v < nvec; v += kBlockThreads) {
        float dy[VEC];
        load_row(v, xhat[0], g[0], dy);
        write(v, xhat[0], g[0]);
      }
    }
  }

  if constexpr (SLOTS > 0) {
#pragma unroll
    for (int k = 0; k < SLOTS; ++k) {
      const int v = tid + kBlockThreads * k;
      if (v < nvec)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          pw[v * VEC + j] = acc_w[(k * VEC + j) * kBlockThreads + tid];
          pb[v * VEC + j] = acc_b[(k * VEC + j) * kBlockThreads + tid];
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
void launch_fwd(const T* x, const T* r, const T* w, const T* b, T* y, float* mean, float* rstd,
                int64_t M, int N, float eps, cudaStream_t stream) {
  if (N <= kMaxWarpN) {
    const auto blocks = static_cast<unsigned>(ceil_div(M, kWarpsPerBlock));
    add_ln_fwd_warp_kernel<T, VEC><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        x, r, w, b, y, mean, rstd, M, N, eps);
  } else {
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(M, 1 << 20));
    if (N <= kMaxBlockN) {
      add_ln_fwd_block_kernel<T, VEC, kBlockElems / VEC><<<blocks, kBlockThreads, 0, stream>>>(
          x, r, w, b, y, mean, rstd, M, N, eps);
    } else if constexpr (VEC == 1) {
      add_ln_fwd_block_kernel<T, 1, 0><<<blocks, kBlockThreads, 0, stream>>>(
          x, r, w, b, y, mean, rstd, M, N, eps);
    } else {
      TORCH_CHECK(false, "add_layer_norm_fwd: rows longer than ", kMaxBlockN, " use VEC = 1");
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block g writes partial_{w,b}[g, :] (fp32 [G, N]), g < G.
template <typename T, int VEC>
void launch_bwd(const T* dy, const T* x, const T* r, const T* w, const float* mean,
                const float* rstd, T* dx, float* pw, float* pb, int64_t G, int64_t M, int N,
                cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(G);
  if (N <= kMaxWarpN) {
    add_ln_bwd_warp_kernel<T, VEC><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        dy, x, r, w, mean, rstd, dx, pw, pb, M, N);
  } else if (N <= kMaxBlockN) {
    add_ln_bwd_block_kernel<T, VEC, kBlockElems / VEC><<<blocks, kBlockThreads, 0, stream>>>(
        dy, x, r, w, mean, rstd, dx, pw, pb, M, N);
  } else if constexpr (VEC == 1) {
    add_ln_bwd_block_kernel<T, 1, 0><<<blocks, kBlockThreads, 0, stream>>>(
        dy, x, r, w, mean, rstd, dx, pw, pb, M, N);
  } else {
    TORCH_CHECK(false, "add_layer_norm_bwd: rows longer than ", kMaxBlockN, " use VEC = 1");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn(std::integral_constant<int, VEC>) for the vector width `vec` of T: 16-byte vectors, or
// 8/4/2-byte ones, or scalars (see pick_vec). A template, so that only T's widths are instantiated.
template <typename T, typename Fn>
void dispatch_vec(int vec, Fn&& fn) {
  if constexpr (sizeof(T) == 2) {
    if (vec == 8) return fn(std::integral_constant<int, 8>{});
  }
  if (vec == 4) return fn(std::integral_constant<int, 4>{});
  if (vec == 2) return fn(std::integral_constant<int, 2>{});
  return fn(std::integral_constant<int, 1>{});
}

// The vector width used for a row of N elements: pick_vec's, except that rows too long for the
// register-cached block kernels (N > kMaxBlockN) go through the scalar streaming kernels.
template <typename T>
int vec_for(int64_t N, std::initializer_list<const void*> ptrs) {
  return N > kMaxBlockN ? 1 : pick_vec<T>(N, ptrs);
}

void check_inputs(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have rank >= 1");
  for (const auto& t : others) {
    TORCH_CHECK(t.device() == x.device(), op, ": all tensors must be on ", x.device());
  }
  TORCH_CHECK(x.size(-1) <= std::numeric_limits<int>::max(), op, ": last dim too large");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x_in, const at::Tensor& res_in, const at::Tensor& weight_in,
    const at::Tensor& bias_in, double eps) {
  check_inputs("add_layer_norm_fwd", x_in, {res_in, weight_in, bias_in});
  TORCH_CHECK(x_in.sizes() == res_in.sizes(), "add_layer_norm_fwd: x and residual shapes differ");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(-1);
  const int64_t M = N == 0 ? 0 : x_in.numel() / N;
  TORCH_CHECK(weight_in.numel() == N && bias_in.numel() == N,
              "add_layer_norm_fwd: weight and bias must have N = ", N, " elements");
  const auto x = x_in.contiguous(), res = res_in.contiguous().to(x.scalar_type());
  const auto weight = weight_in.contiguous().to(x.scalar_type());
  const auto bias = bias_in.contiguous().to(x.scalar_type());
  auto out = at::empty_like(x);
  const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  auto mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  auto rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {out, mean.fill_(0.f), rstd.fill_(0.f)};

  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "add_layer_norm_fwd", [&] {
    using T = scalar_t;
    const int vec = vec_for<T>(N, {x.data_ptr(), res.data_ptr(), weight.data_ptr(),
                                   bias.data_ptr(), out.data_ptr()});
    dispatch_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      launch_fwd<T, VEC>(ptr<T>(x), ptr<T>(res), ptr<T>(weight), ptr<T>(bias), ptr<T>(out),
                         ptr<float>(mean), ptr<float>(rstd), M, static_cast<int>(N),
                         static_cast<float>(eps), stream);
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& res_in,
    const at::Tensor& weight_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  check_inputs("add_layer_norm_bwd", x_in, {grad_in, res_in, weight_in, mean_in, rstd_in});
  TORCH_CHECK(x_in.sizes() == res_in.sizes() && x_in.sizes() == grad_in.sizes(),
              "add_layer_norm_bwd: grad_out, x and residual shapes differ");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(-1);
  const int64_t M = N == 0 ? 0 : x_in.numel() / N;
  TORCH_CHECK(weight_in.numel() == N, "add_layer_norm_bwd: weight must have N = ", N, " elements");
  TORCH_CHECK(mean_in.numel() == M && rstd_in.numel() == M,
              "add_layer_norm_bwd: mean and rstd must have M = ", M, " elements");
  const auto dtype = x_in.scalar_type();
  const auto x = x_in.contiguous(), res = res_in.contiguous().to(dtype);
  const auto dy = grad_in.contiguous().to(dtype), weight = weight_in.contiguous().to(dtype);
  const auto mean = mean_in.contiguous().to(at::kFloat), rstd = rstd_in.contiguous().to(at::kFloat);
  auto grad_x = at::empty_like(x);
  auto grad_w = at::empty({N}, x.options());
  auto grad_b = at::empty({N}, x.options());
  if (N == 0) return {grad_x, grad_w, grad_b};
  if (M == 0) return {grad_x, grad_w.zero_(), grad_b.zero_()};

  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(dtype, "add_layer_norm_bwd", [&] {
    using T = scalar_t;
    const int vec = vec_for<T>(N, {x.data_ptr(), res.data_ptr(), dy.data_ptr(), weight.data_ptr(),
                                   grad_x.data_ptr()});
    // G partial rows: enough blocks to fill the GPU once, never more than there are rows.
    const int64_t G = N <= kMaxWarpN
        ? std::min<int64_t>(ceil_div(M, kWarpsPerBlock), 4LL * sm_count())
        : std::min<int64_t>(M, 2LL * sm_count());
    auto partial = at::empty({2, G, N}, x.options().dtype(at::kFloat));
    float* pw = ptr<float>(partial);
    float* pb = pw + G * N;
    dispatch_vec<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      launch_bwd<T, VEC>(ptr<T>(dy), ptr<T>(x), ptr<T>(res), ptr<T>(weight), ptr<float>(mean),
                         ptr<float>(rstd), ptr<T>(grad_x), pw, pb, G, M, static_cast<int>(N), stream);
    });
    launch_column_sum<T>(pw, ptr<T>(grad_w), G, N, stream);
    launch_column_sum<T>(pb, ptr<T>(grad_b), G, N, stream);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda
}  // namespace albert_kernels

TORCH_LIBRARY_IMPL(albert_kernels, CUDA, m) {
  m.impl("add_layer_norm_fwd", &albert_kernels::cuda::add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &albert_kernels::cuda::add_layer_norm_bwd);
}
