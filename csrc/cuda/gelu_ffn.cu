// Linear + GELU and the ALBERT feed-forward block on CUDA: cuBLASLt GEMMs with fused epilogues.
//
//   linear_gelu_fwd: pre = x @ W^T + b,  out = gelu(pre)
//   gelu_ffn_fwd:    pre = x @ W1^T + b1, h = gelu(pre), out = h @ W2^T + b2
// Layouts (row-major, contiguous; the op wrappers flatten leading dims): x [M, K] (K = H for the
// FFN), W / W1 [N, K] (nn.Linear layout; N = I for the FFN), W2 [H, I], biases [N], pre [M, N].
// `pre` is the only activation saved for backward (h is recomputed from it). All GEMMs accumulate
// in fp32 (CUBLAS_COMPUTE_32F, never TF32, never reduced-precision split-K reduction); GELU and
// its derivative are evaluated in fp32; bias gradients are fp32 sums.
//
// Which variant is fused where (T = input dtype; "Lt" = cuBLASLt, "aligned" = every matrix,
// bias and aux pointer 16-byte aligned and every leading dimension a multiple of 16 bytes, aux
// leading dimension (= N or I) a multiple of 8 — checked per call by lt_aligned()):
//   forward GEMM  x @ W^T + b -> gelu:
//     fp16/bf16, "tanh", aligned  Lt GELU_AUX_BIAS: D = gelu(pre), aux = pre, one kernel.
//     fp32 or "none", aligned     Lt BIAS (D = pre), then bias_act_kernel: out = gelu(pre).
//     not aligned                 cublasGemmEx (D = x @ W^T), then bias_act_kernel adds the bias
//                                 in place (pre) and writes out = gelu(pre) in one pass.
//   FFN second GEMM h @ W2^T + b2: Lt BIAS when aligned, else cublasGemmEx + bias_act_kernel.
//   gelu_ffn_bwd:
//     d_pre = (grad_out @ W2) * gelu'(pre), grad_b1 = sum_rows(d_pre):
//       fp16/bf16, "tanh", aligned  Lt DGELU_BGRAD (aux = pre), one kernel;
//       otherwise                   GEMM, then act_grad_colsum_kernel (dgelu + bias-grad partials
//                                   in one pass) + column_sum_kernel.
//     grad_W2 = grad_out^T @ gelu(pre), grad_b2 = sum_rows(grad_out):
//       aligned  Lt BGRADB (bias gradient fused into the weight-gradient GEMM);
//       otherwise GEMM + act_grad_colsum_kernel<kNone> (column sums only) + column_sum_kernel.
//     grad_W1 = d_pre^T @ x, grad_x = d_pre @ W1: plain GEMMs (Lt when aligned, else GemmEx).
//   linear_gelu_bwd: grad_out is an input, so no GEMM produces the product that gelu' multiplies:
//     act_grad_colsum_kernel computes d_pre = grad_out * gelu'(pre) and the grad_bias partials in
//     one pass; then grad_W = d_pre^T @ x and grad_x = d_pre @ W (plain GEMMs).
// If cuBLASLt has no algorithm for a fused epilogue (its heuristic returns none), the unfused path
// of the same row is taken, so the result never depends on an epilogue being available.
//
// Why fp32 and "none" are not fused: cuBLASLt's GELU epilogue is the tanh approximation (PyTorch's
// own test of _addmm_activation, test_linalg._test_addmm_addmv, compares it with
// F.gelu(approximate="tanh")), so it cannot produce the erf GELU; and its fp32 accuracy is not
// documented while the fp32 error budget (docs/correctness.md) is a few ulps, so fp32 uses our
// own GELU.
//
// Elementwise kernels (memory-bound; VEC = 16-byte vectors when N and every pointer allow, else
// scalars):
//   bias_act_kernel        grid-stride over vectors of [M, N]: v = acc (+ bias[col]); writes
//                          pre = v (if asked) and out = act(v). Works in place (acc == pre, or
//                          acc == out).
//   act_grad_colsum_kernel block (32, 8) owns 32 column-vectors x one chunk of rows: d = grad *
//                          act'(pre) (act none: d = grad), writes d (if asked) and the chunk's fp32
//                          column sums into partial[chunk, :]; column_sum_kernel (common.cuh) adds
//                          the chunks in fixed order: deterministic bias gradients.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <list>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/cuda/Exceptions.h>
#include <torch/library.h>

#include "common.cuh"

namespace albert_kernels {
namespace cuda {
namespace {

enum Act : int { kNone = 0, kGeluTanh = 1, kGeluErf = 2 };

Act parse_act(c10::string_view approximate) {
  if (approximate == "tanh") return kGeluTanh;
  if (approximate == "none") return kGeluErf;
  TORCH_CHECK(false, "approximate must be 'tanh' or 'none', got '", std::string(approximate), "'");
  return kNone;
}

// ---------------------------------------------------------------------------------------------
// GELU in fp32 (accurate expf / erfcf, not the approximate intrinsics), on the whole real line.
// tanh: 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). With e = exp(-|2u|)
// and r = 1 / (1 + e): sigmoid(2u) = 1 - e r (u >= 0; exactly 1 where e = 0) or e r (u < 0), and
// sigmoid (1 - sigmoid) = e r^2,
// so no 1 + tanh or 1 - s cancels in either tail. x is clamped to +-kGeluClamp inside u (e is 0
// beyond, |2u| > 1900), so x^3 never overflows (bf16 maximum) and the derivative never forms
// 0 * inf. erf: Phi(x) = 0.5 erfc(-x / sqrt(2)), where 1 + erf(x / sqrt(2)) would cancel in the
// left tail. (cuBLASLt's own GELU epilogue, used for fp16 / bf16 "tanh" when aligned, is not ours:
// its tails are as cuBLAS computes them.)
// ---------------------------------------------------------------------------------------------
constexpr float kSqrt2OverPi = 0.7978845608028654f;   // sqrt(2 / pi)
constexpr float kGeluCoeff = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)
constexpr float kGeluClamp = 30.f;

// sigmoid(2u) of the clamped xc; *er2 = e r^2 = sigmoid(2u) (1 - sigmoid(2u)) when er2 is set.
__device__ __forceinline__ float gelu_sigmoid(float xc, float* er2) {
  const float two_u = 2.f * kSqrt2OverPi * (xc + kGeluCoeff * xc * xc * xc);
  const float e = expf(-fabsf(two_u));
  const float r = 1.f / (1.f + e);
  const float er = e * r;
  if (er2) *er2 = er * r;
  return two_u >= 0.f ? 1.f - er : er;
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float x) {
  if constexpr (ACT == kGeluTanh) {
    return x * gelu_sigmoid(fminf(fmaxf(x, -kGeluClamp), kGeluClamp), nullptr);
  } else if constexpr (ACT == kGeluErf) {
    return x * (0.5f * erfcf(-x * kInvSqrt2));
  } else {
    return x;
  }
}

// d act(x) / dx
template <int ACT>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (ACT == kGeluTanh) {
    const float xc = fminf(fmaxf(x, -kGeluClamp), kGeluClamp);  // exact: e r^2 = 0 beyond
    float er2;
    const float s = gelu_sigmoid(xc, &er2);
    return s + xc * er2 * (2.f * kSqrt2OverPi) * (1.f + 3.f * kGeluCoeff * xc * xc);
  } else if constexpr (ACT == kGeluErf) {
    return 0.5f * erfcf(-x * kInvSqrt2) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  } else {
    return 1.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels
// ---------------------------------------------------------------------------------------------

// acc, pre, out: [M, N]; bias: [N] or null; pre: null or the buffer to receive acc + bias (may be
// acc itself); out: act(acc + bias), may be acc itself too (the unfused path without activation
// adds the bias in place). So none of acc, pre, out is __restrict__: each element is read before
// it is written, by the same thread. Grid-stride loop over vectors of VEC elements (N % VEC == 0).
template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(256)
bias_act_kernel(const T* acc, const T* __restrict__ bias, T* pre, T* out, int64_t M, int64_t N) {
  const int64_t nvec = M * N / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC;
    float a[VEC];
    load_vec<T, VEC>(acc + e, a);
    if (bias != nullptr) {
      float b[VEC];
      load_vec<T, VEC>(bias + e % N, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) a[j] += b[j];
    }
    if (pre != nullptr) store_vec<T, VEC>(pre + e, a);
    float y[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = act_fwd<ACT>(a[j]);
    store_vec<T, VEC>(out + e, y);
  }
}

// grad, pre, d_out: [M, N]; partial: fp32 [gridDim.y, N].
// Block (32, 8) at (bx, by): column-vectors cv = bx * 32 + threadIdx.x (columns cv*VEC ..+VEC),
// rows [by * rows_per_chunk, min(M, (by + 1) * rows_per_chunk)), threadIdx.y striding by 8.
// d = grad * act'(pre) (ACT == kNone: d = grad, pre unused); d_out (if not null) receives d;
// partial[by, col] = sum of d over the chunk's rows, added in a fixed order.
// d_out may alias grad (in place).
template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(256)
act_grad_colsum_kernel(const T* grad, const T* __restrict__ pre, T* d_out,
                       float* __restrict__ partial, int64_t M, int64_t N, int64_t rows_per_chunk) {
  __shared__ float buf[8][32 * VEC + 1];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(M, row_begin + rows_per_chunk);
  float sum[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sum[j] = 0.f;
  if (col < N) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += 8) {
      const int64_t e = r * N + col;
      float d[VEC];
      load_vec<T, VEC>(grad + e, d);
      if constexpr (ACT != kNone) {
        float p[VEC];
        load_vec<T, VEC>(pre + e, p);
#pragma unroll
        for (int j = 0; j < VEC; ++j) d[j] *= act_grad<ACT>(p[j]);
      }
      if (d_out != nullptr) store_vec<T, VEC>(d_out + e, d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[j] += d[j];
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) buf[threadIdx.y][threadIdx.x * VEC + j] = sum[j];
  __syncthreads();
  for (int i = threadIdx.y * 32 + threadIdx.x; i < 32 * VEC; i += 256) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 * VEC + i;
    if (c >= N) continue;
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) total += buf[y][i];
    partial[static_cast<int64_t>(blockIdx.y) * N + c] = total;
  }
}

#define AK_DISPATCH_ACT(act, ...)                                             \
  [&] {                                                                     \
    switch (act) {                                                          \
      case kGeluTanh: { constexpr int ACT = kGeluTanh; return __VA_ARGS__(); } \
      case kGeluErf: { constexpr int ACT = kGeluErf; return __VA_ARGS__(); }   \
      default: { constexpr int ACT = kNone; return __VA_ARGS__(); }            \
    }                                                                       \
  }()

// Elementwise kernels come in two widths: 16-byte vectors, or scalars.
#define AK_DISPATCH_WIDE_OR_SCALAR(T, wide, ...)                                              \
  [&] {                                                                                     \
    if (wide) { constexpr int VEC = 16 / sizeof(T); return __VA_ARGS__(); }                 \
    constexpr int VEC = 1;                                                                  \
    return __VA_ARGS__();                                                                   \
  }()

template <typename T>
void bias_act(const T* acc, const T* bias, T* pre, T* out, int64_t M, int64_t N, int act,
              cudaStream_t stream) {
  if (M * N == 0) return;
  const bool wide = pick_vec<T>(N, {acc, bias, pre, out}) == 16 / static_cast<int>(sizeof(T));
  AK_DISPATCH_ACT(act, [&] {
    AK_DISPATCH_WIDE_OR_SCALAR(T, wide, [&] {
      const int64_t blocks = std::min<int64_t>(ceil_div(M * N / VEC, 256), 8LL * sm_count());
      bias_act_kernel<T, ACT, VEC><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          acc, bias, pre, out, M, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// d_out = grad * act'(pre) (or grad for kNone), and bias_grad = sum_rows(d): deterministic.
template <typename T>
void act_grad_colsum(const T* grad, const T* pre, T* d_out, T* bias_grad, int64_t M, int64_t N,
                     int act, const at::Tensor& like, cudaStream_t stream) {
  if (N == 0) return;
  const bool wide = pick_vec<T>(N, {grad, pre, d_out}) == 16 / static_cast<int>(sizeof(T));
  const int vec = wide ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int64_t blocks_x = ceil_div(N / vec, 32);
  // Enough chunks of rows to fill the GPU a few times over, at least 8 rows per chunk.
  const int64_t chunks_wanted = std::max<int64_t>(1, 4LL * sm_count() / blocks_x);
  const int64_t rows_per_chunk = std::max<int64_t>(8, ceil_div(M, chunks_wanted));
  const int64_t G = M == 0 ? 0 : ceil_div(M, rows_per_chunk);
  auto partial = at::empty({std::max<int64_t>(G, 1), N}, like.options().dtype(at::kFloat));
  if (G > 0) {
    AK_DISPATCH_ACT(act, [&] {
      AK_DISPATCH_WIDE_OR_SCALAR(T, wide, [&] {
        act_grad_colsum_kernel<T, ACT, VEC>
            <<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(G)), dim3(32, 8), 0,
               stream>>>(grad, pre, d_out, ptr<float>(partial), M, N, rows_per_chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  launch_column_sum<T>(ptr<float>(partial), bias_grad, G, N, stream);
}

// ---------------------------------------------------------------------------------------------
// GEMMs. Column-major view (cuBLAS's): D[m, n] = op(A)[m, k] @ op(B)[k, n]; a row-major [r, c]
// matrix is a column-major [c, r] one with ld = c.
// ---------------------------------------------------------------------------------------------
template <typename T> constexpr cudaDataType_t cuda_dtype();
template <> constexpr cudaDataType_t cuda_dtype<float>() { return CUDA_R_32F; }
template <> constexpr cudaDataType_t cuda_dtype<__half>() { return CUDA_R_16F; }
template <> constexpr cudaDataType_t cuda_dtype<__nv_bfloat16>() { return CUDA_R_16BF; }

struct Gemm {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a; int64_t lda;
  const void* b; int64_t ldb;
  void* d; int64_t ldd;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;    // BIAS: input [m]; BGRADB: output [n]; DGELU_BGRAD: output [m]
  void* aux = nullptr;     // GELU_AUX_BIAS: output pre [m, n]; DGELU_BGRAD: input pre
  int64_t ld_aux = 0;
};

// Stored (not transposed) shape of an operand.
inline int64_t rows_of(bool trans, int64_t r, int64_t c) { return trans ? c : r; }
inline int64_t cols_of(bool trans, int64_t r, int64_t c) { return trans ? r : c; }

template <typename T>
bool lt_aligned(const Gemm& g) {
  constexpr int64_t elems16 = 16 / sizeof(T);
  bool ok = aligned_to(g.a, 16) && aligned_to(g.b, 16) && aligned_to(g.d, 16) &&
            g.lda % elems16 == 0 && g.ldb % elems16 == 0 && g.ldd % elems16 == 0;
  if (g.bias != nullptr) ok = ok && aligned_to(g.bias, 16);
  if (g.aux != nullptr) ok = ok && aligned_to(g.aux, 16) && g.ld_aux % 8 == 0 && g.ld_aux % elems16 == 0;
  return ok && g.k > 0;
}

inline uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && !aligned_to(p, a)) a /= 2;
  return a;
}

struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescriptors() = default;
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Everything a cuBLASLt plan depends on: the device, dtype, shapes, leading dimensions, epilogue,
// which epilogue pointers are set, and the operands' alignments (the heuristic's preferences).
// Not the pointers themselves: bias and aux are set on the descriptor at each call.
struct LtPlanKey {
  int device;
  cudaDataType_t dtype;
  bool trans_a, trans_b, has_bias, has_aux;
  int64_t m, n, k, lda, ldb, ldd, ld_aux;
  cublasLtEpilogue_t epilogue;
  uint32_t align_a, align_b, align_d;

  auto fields() const {
    return std::tie(device, dtype, trans_a, trans_b, has_bias, has_aux, m, n, k, lda, ldb, ldd,
                    ld_aux, epilogue, align_a, align_b, align_d);
  }
  bool operator==(const LtPlanKey& o) const { return fields() == o.fields(); }
};

// The descriptors of one problem and the algorithm cuBLASLt's heuristic chose for it (found ==
// false: it offered none, and the caller takes its unfused path).
struct LtPlan {
  LtDescriptors desc;
  cublasLtMatmulHeuristicResult_t heuristic = {};
  bool found = false;
};

// Builds the descriptors of g and asks the heuristic once. Throws on a cuBLASLt error.
template <typename T>
std::shared_ptr<LtPlan> make_lt_plan(const Gemm& g, const LtPlanKey& key) {
  auto plan = std::make_shared<LtPlan>();
  LtDescriptors& desc = plan->desc;
  const cudaDataType_t dt = cuda_dtype<T>();
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  auto set_op = [&](cublasLtMatmulDescAttributes_t attr, const void* v, size_t size) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.op, attr, v, size));
  };
  set_op(CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  set_op(CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  set_op(CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue));
  // The heuristic sees this call's epilogue pointers; later calls set their own (same alignment:
  // lt_aligned requires 16 bytes for both).
  if (g.bias != nullptr) set_op(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias));
  if (g.aux != nullptr) {
    set_op(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux));
    set_op(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.ld_aux, sizeof(g.ld_aux));
  }
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(
      &desc.a, dt, rows_of(g.trans_a, g.m, g.k), cols_of(g.trans_a, g.m, g.k), g.lda));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(
      &desc.b, dt, rows_of(g.trans_b, g.k, g.n), cols_of(g.trans_b, g.k, g.n), g.ldb));
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&desc.d, dt, g.m, g.n, g.ldd));

  const int major = at::cuda::getDeviceProperties(key.device)->major;
  const uint64_t workspace_size = (major >= 9 ? 32u : 4u) << 20;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref));
  auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attr, const void* v, size_t size) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, attr, v, size));
  };
  set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_size, sizeof(workspace_size));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a, sizeof(key.align_a));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b, sizeof(key.align_b));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_d, sizeof(key.align_d));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_d, sizeof(key.align_d));
  // Split-K partial sums are reduced in fp32 (the compute type), never in the output type.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  set_pref(CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes));

  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      at::cuda::getCurrentCUDABlasLtHandle(), desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref,
      1, &plan->heuristic, &found);
  plan->found = status == CUBLAS_STATUS_SUCCESS && found > 0;
  return plan;
}

// The plans of the most recent problems, most recent first. A model runs a handful of GEMM shapes
// over and over; building the descriptors and running the heuristic on every call costs tens of
// microseconds of host time (and the heuristic has no business inside a CUDA graph capture).
// Guarded by a mutex, held from the lookup through the cublasLtMatmul call: the call sets the
// plan's bias / aux pointers on its shared descriptor, then enqueues (host-side work only).
constexpr size_t kLtPlanCacheSize = 64;
std::mutex lt_plan_mutex;
std::list<std::pair<LtPlanKey, std::shared_ptr<LtPlan>>> lt_plans;

// Runs g through cuBLASLt. Returns false (having done nothing) when cuBLASLt offers no algorithm
// for this problem and epilogue; the caller then takes its unfused path.
template <typename T>
bool lt_matmul(const Gemm& g, const at::Tensor& like, cudaStream_t stream) {
  const LtPlanKey key{static_cast<int>(c10::cuda::current_device()), cuda_dtype<T>(), g.trans_a,
                      g.trans_b, g.bias != nullptr, g.aux != nullptr, g.m, g.n, g.k, g.lda, g.ldb,
                      g.ldd, g.aux != nullptr ? g.ld_aux : 0, g.epilogue, alignment_of(g.a),
                      alignment_of(g.b), alignment_of(g.d)};
  std::lock_guard<std::mutex> lock(lt_plan_mutex);
  auto it = std::find_if(lt_plans.begin(), lt_plans.end(),
                         [&](const auto& entry) { return entry.first == key; });
  if (it != lt_plans.end()) {
    lt_plans.splice(lt_plans.begin(), lt_plans, it);  // most recent first
  } else {
    lt_plans.emplace_front(key, make_lt_plan<T>(g, key));
    if (lt_plans.size() > kLtPlanCacheSize) lt_plans.pop_back();
  }
  LtPlan& plan = *lt_plans.front().second;
  if (!plan.found) return false;

  auto set_op = [&](cublasLtMatmulDescAttributes_t attr, const void* v, size_t size) {
    TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc.op, attr, v, size));
  };
  if (g.bias != nullptr) set_op(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias));
  if (g.aux != nullptr) set_op(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux));
  auto workspace = at::empty({static_cast<int64_t>(plan.heuristic.workspaceSize) + 1},
                             like.options().dtype(at::kByte));
  const float alpha = 1.f, beta = 0.f;
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(at::cuda::getCurrentCUDABlasLtHandle(), plan.desc.op, &alpha,
                                      g.a, plan.desc.a, g.b, plan.desc.b, &beta, g.d, plan.desc.d,
                                      g.d, plan.desc.d, &plan.heuristic.algo, workspace.data_ptr(),
                                      plan.heuristic.workspaceSize, stream));
  return true;
}

// Plain GEMM (g.epilogue must be DEFAULT) through cublasGemmEx: any alignment, fp32 accumulation,
// no TF32 and no reduced-precision reduction whatever the handle's math mode was.
template <typename T>
void gemm_ex(const Gemm& g) {
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  cublasMath_t saved;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle, &saved));
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(
      handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH |
                                        CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  const float alpha = 1.f, beta = 0.f;
  const cudaDataType_t dt = cuda_dtype<T>();
  const cublasStatus_t status = cublasGemmEx(
      handle, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), &alpha, g.a, dt,
      static_cast<int>(g.lda), g.b, dt, static_cast<int>(g.ldb), &beta, g.d, dt,
      static_cast<int>(g.ldd), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  cublasSetMathMode(handle, saved);
  TORCH_CUDABLAS_CHECK(status);
}

// D = op(A) op(B) with no epilogue: cuBLASLt when aligned (and it has an algorithm), else GemmEx.
// k == 0 gives zeros.
template <typename T>
void gemm(Gemm g, const at::Tensor& like, cudaStream_t stream) {
  g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  g.bias = g.aux = nullptr;
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    TORCH_CHECK(g.ldd == g.m, "gemm: k == 0 needs a packed output");
    C10_CUDA_CHECK(cudaMemsetAsync(g.d, 0, g.m * g.n * sizeof(T), stream));
    return;
  }
  TORCH_CHECK(g.m <= INT32_MAX && g.n <= INT32_MAX && g.k <= INT32_MAX,
              "gemm: dimensions must fit in int32");
  if (lt_aligned<T>(g) && lt_matmul<T>(g, like, stream)) return;
  gemm_ex<T>(g);
}

// Tries g (with its epilogue) through cuBLASLt; false if not aligned or no algorithm.
template <typename T>
bool try_fused(const Gemm& g, const at::Tensor& like, cudaStream_t stream) {
  return g.m > 0 && g.n > 0 && g.m <= INT32_MAX && g.n <= INT32_MAX && g.k <= INT32_MAX &&
         lt_aligned<T>(g) && lt_matmul<T>(g, like, stream);
}

// ---------------------------------------------------------------------------------------------
// Building blocks of the ops
// ---------------------------------------------------------------------------------------------

// out [M, N] = act(x [M, K] @ w[N, K]^T + b [N]); pre [M, N] (or null) receives x @ w^T + b.
template <typename T>
void dense_act(const T* x, const T* w, const T* b, T* pre, T* out, int64_t M, int64_t N,
               int64_t K, int act, const at::Tensor& like, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  // Column-major: D [N, M] = (W as [K, N] col-major)^T @ (x as [K, M] col-major).
  Gemm g{/*trans_a=*/true, /*trans_b=*/false, N, M, K, w, K, x, K, out, N};
  g.bias = const_cast<T*>(b);
  if (act == kGeluTanh && !std::is_same_v<T, float> && pre != nullptr) {
    g.epilogue = CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    g.aux = pre;
    g.ld_aux = N;
    if (try_fused<T>(g, like, stream)) return;
  }
  // GEMM + bias in cuBLASLt into pre (or out when there is no activation), then the activation.
  T* dst = act == kNone ? out : pre;
  g.d = dst;
  g.epilogue = CUBLASLT_EPILOGUE_BIAS;
  g.aux = nullptr;
  if (try_fused<T>(g, like, stream)) {
    if (act != kNone) bias_act<T>(pre, nullptr, nullptr, out, M, N, act, stream);
    return;
  }
  // Unfused: plain GEMM, then bias (+ activation) in one elementwise pass.
  gemm<T>(g, like, stream);
  bias_act<T>(dst, b, act == kNone ? nullptr : pre, out, M, N, act, stream);
}

// [..., cols] -> contiguous [rows, cols] (rows = product of the leading dims, also when cols == 0).
at::Tensor flat2d(const at::Tensor& t, int64_t cols) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == cols, "expected a tensor [..., ", cols, "], got ",
              t.sizes());
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.contiguous().view({rows, cols});
}

void check_cuda(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
  for (const auto& t : others) {
    TORCH_CHECK(t.device() == x.device(), op, ": all tensors must be on ", x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": all tensors must have dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
  }
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto sizes = x.sizes().vec();
  sizes.back() = last;
  return sizes;
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x_in, const at::Tensor& w_in,
                                                   const at::Tensor& b_in,
                                                   c10::string_view approximate) {
  check_cuda("linear_gelu_fwd", x_in, {w_in, b_in});
  const int act = parse_act(approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t K = x_in.size(-1), N = w_in.size(0);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == K && b_in.numel() == N,
              "linear_gelu_fwd: weight must be [N, K] and bias [N]");
  const auto x = flat2d(x_in, K), w = w_in.contiguous(), b = b_in.contiguous();
  const int64_t M = x.size(0);
  auto pre = at::empty({M, N}, x.options()), out = at::empty({M, N}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "linear_gelu_fwd", [&] {
    using T = scalar_t;
    dense_act<T>(ptr<T>(x), ptr<T>(w), ptr<T>(b), ptr<T>(pre), ptr<T>(out), M, N, K, act, x, stream);
  });
  return {out.view(with_last(x_in, N)), pre.view(with_last(x_in, N))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const at::Tensor& pre_in, c10::string_view approximate) {
  check_cuda("linear_gelu_bwd", x_in, {grad_in, w_in, pre_in});
  const int act = parse_act(approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t K = x_in.size(-1), N = w_in.size(0);
  const auto x = flat2d(x_in, K), w = w_in.contiguous();
  const auto dy = flat2d(grad_in, N), pre = flat2d(pre_in, N);
  const int64_t M = x.size(0);
  TORCH_CHECK(dy.size(0) == M && pre.size(0) == M, "linear_gelu_bwd: row counts differ");
  auto grad_x = at::empty({M, K}, x.options());
  auto grad_w = at::empty({N, K}, x.options());
  auto grad_b = at::empty({N}, x.options());
  auto d_pre = at::empty({M, N}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "linear_gelu_bwd", [&] {
    using T = scalar_t;
    act_grad_colsum<T>(ptr<T>(dy), ptr<T>(pre), ptr<T>(d_pre), ptr<T>(grad_b), M, N, act, x, stream);
    // grad_x [M, K] = d_pre @ W: column-major D [K, M] = (W as [K, N]) @ (d_pre as [N, M]).
    gemm<T>(Gemm{false, false, K, M, N, ptr<T>(w), K, ptr<T>(d_pre), N, ptr<T>(grad_x), K}, x, stream);
    // grad_W [N, K] = d_pre^T @ x: column-major D [K, N] = (x as [K, M]) @ (d_pre as [N, M])^T.
    gemm<T>(Gemm{false, true, K, N, M, ptr<T>(x), K, ptr<T>(d_pre), N, ptr<T>(grad_w), K}, x, stream);
  });
  return {grad_x.view(x_in.sizes()), grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd(const at::Tensor& x_in, const at::Tensor& w1_in,
                                                const at::Tensor& b1_in, const at::Tensor& w2_in,
                                                const at::Tensor& b2_in,
                                                c10::string_view approximate) {
  check_cuda("gelu_ffn_fwd", x_in, {w1_in, b1_in, w2_in, b2_in});
  const int act = parse_act(approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t H = x_in.size(-1), I = w1_in.size(0);
  TORCH_CHECK(w1_in.dim() == 2 && w1_in.size(1) == H && b1_in.numel() == I &&
                  w2_in.dim() == 2 && w2_in.size(1) == I && b2_in.numel() == w2_in.size(0),
              "gelu_ffn_fwd: expected w1 [I, H], b1 [I], w2 [H2, I], b2 [H2]");
  const int64_t H2 = w2_in.size(0);
  const auto x = flat2d(x_in, H), w1 = w1_in.contiguous(), b1 = b1_in.contiguous();
  const auto w2 = w2_in.contiguous(), b2 = b2_in.contiguous();
  const int64_t M = x.size(0);
  auto pre = at::empty({M, I}, x.options()), h = at::empty({M, I}, x.options());
  auto out = at::empty({M, H2}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "gelu_ffn_fwd", [&] {
    using T = scalar_t;
    dense_act<T>(ptr<T>(x), ptr<T>(w1), ptr<T>(b1), ptr<T>(pre), ptr<T>(h), M, I, H, act, x, stream);
    dense_act<T>(ptr<T>(h), ptr<T>(w2), ptr<T>(b2), nullptr, ptr<T>(out), M, H2, I, kNone, x, stream);
  });
  return {out.view(with_last(x_in, H2)), pre.view(with_last(x_in, I))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1_in,
    const at::Tensor& w2_in, const at::Tensor& pre_in, c10::string_view approximate) {
  check_cuda("gelu_ffn_bwd", x_in, {grad_in, w1_in, w2_in, pre_in});
  const int act = parse_act(approximate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t H = x_in.size(-1), I = w1_in.size(0), H2 = w2_in.size(0);
  const auto x = flat2d(x_in, H), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const auto dy = flat2d(grad_in, H2), pre = flat2d(pre_in, I);
  const int64_t M = x.size(0);
  TORCH_CHECK(dy.size(0) == M && pre.size(0) == M, "gelu_ffn_bwd: row counts differ");
  auto grad_x = at::empty({M, H}, x.options());
  auto grad_w1 = at::empty({I, H}, x.options()), grad_b1 = at::empty({I}, x.options());
  auto grad_w2 = at::empty({H2, I}, x.options()), grad_b2 = at::empty({H2}, x.options());
  auto h = at::empty({M, I}, x.options()), d_pre = at::empty({M, I}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AK_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "gelu_ffn_bwd", [&] {
    using T = scalar_t;
    if (M == 0) {  // no rows: every weight and bias gradient is zero
      grad_w1.zero_(); grad_b1.zero_(); grad_w2.zero_(); grad_b2.zero_();
      return;
    }
    // h = gelu(pre), recomputed (the forward kept only pre).
    bias_act<T>(ptr<T>(pre), nullptr, nullptr, ptr<T>(h), M, I, act, stream);

    // grad_W2 [H2, I] = grad_out^T @ h, grad_b2 = sum_rows(grad_out):
    // column-major D [I, H2] = (h as [I, M]) @ (grad_out as [H2, M])^T; BGRADB reduces B over k.
    Gemm w2_grad{false, true, I, H2, M, ptr<T>(h), I, ptr<T>(dy), H2, ptr<T>(grad_w2), I};
    w2_grad.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    w2_grad.bias = ptr<T>(grad_b2);
    if (!try_fused<T>(w2_grad, x, stream)) {
      gemm<T>(w2_grad, x, stream);
      act_grad_colsum<T>(ptr<T>(dy), nullptr, nullptr, ptr<T>(grad_b2), M, H2, kNone, x, stream);
    }

    // d_pre [M, I] = (grad_out @ W2) * gelu'(pre), grad_b1 = sum_rows(d_pre):
    // column-major D [I, M] = (W2 as [I, H2]) @ (grad_out as [H2, M]).
    Gemm dh{false, false, I, M, H2, ptr<T>(w2), I, ptr<T>(dy), H2, ptr<T>(d_pre), I};
    bool fused = false;
    if (act == kGeluTanh && !std::is_same_v<T, float>) {
      Gemm dgelu = dh;
      dgelu.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
      dgelu.aux = ptr<T>(pre);
      dgelu.ld_aux = I;
      dgelu.bias = ptr<T>(grad_b1);
      fused = try_fused<T>(dgelu, x, stream);
    }
    if (!fused) {
      gemm<T>(dh, x, stream);  // d_pre holds grad_out @ W2 ...
      act_grad_colsum<T>(ptr<T>(d_pre), ptr<T>(pre), ptr<T>(d_pre), ptr<T>(grad_b1), M, I, act,
                         x, stream);  // ... and now d_pre, in place
    }

    // grad_W1 [I, H] = d_pre^T @ x: column-major D [H, I] = (x as [H, M]) @ (d_pre as [I, M])^T.
    gemm<T>(Gemm{false, true, H, I, M, ptr<T>(x), H, ptr<T>(d_pre), I, ptr<T>(grad_w1), H}, x, stream);
    // grad_x [M, H] = d_pre @ W1: column-major D [H, M] = (W1 as [H, I]) @ (d_pre as [I, M]).
    gemm<T>(Gemm{false, false, H, M, I, ptr<T>(w1), H, ptr<T>(d_pre), I, ptr<T>(grad_x), H}, x, stream);
  });
  return {grad_x.view(x_in.sizes()), grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace
}  // namespace cuda
}  // namespace albert_kernels

TORCH_LIBRARY_IMPL(albert_kernels, CUDA, m) {
  m.impl("linear_gelu_fwd", &albert_kernels::cuda::linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &albert_kernels::cuda::linear_gelu_bwd);
  m.impl("gelu_ffn_fwd", &albert_kernels::cuda::gelu_ffn_fwd);
  m.impl("gelu_ffn_bwd", &albert_kernels::cuda::gelu_ffn_bwd);
}
