// GELU feed-forward on CPU: linear_gelu = gelu(x @ W^T + b) and ALBERT's whole FFN
// gelu_ffn = linear_gelu(x, W1, b1) @ W2^T + b2. approximate: "tanh" (gelu_new) or "none" (erf).
//
// The matrix products stay with ATen's BLAS (at::mm / at::addmm, MKL here); what is fused is
// everything around them.
//
// Forward  linear_gelu_fwd(x, weight, bias, approximate) -> (out, pre)
//          gelu_ffn_fwd(x, w1, b1, w2, b2, approximate)  -> (out, pre)
//   x [M, K] contiguous; weights [N, K] (nn.Linear layout); biases [N]; all dtype T.
//   pre = x @ W1^T + b1, [M, I], dtype T: saved for backward (gelu(pre) is recomputed there).
//   The GEMM runs without bias (beta = 0); one epilogue pass (bias_gelu_rows) then adds b1,
//   writes pre back and writes gelu(pre): the bias costs no pass of its own. linear_gelu: one
//   GEMM over all rows, then the epilogue in parallel over rows. gelu_ffn: rows are processed
//   in blocks of kBlockRows (kReducedBlockRows for bf16 / fp16): the block's GEMM is followed at once by the epilogue over that
//   block while it is still in cache, then the second GEMM on the block's activation, so the
//   [M, I] activation is never written out whole. The epilogue computes in acc_t (fp32); its
//   exp is fast_exp (common.h), shared with the backward.
//
// Backward linear_gelu_bwd(grad_out, x, weight, pre, approximate) -> (grad_x, grad_w, grad_b)
//          gelu_ffn_bwd(grad_out, x, w1, w2, pre, approximate)
//              -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)
//   One fused pass over pre (parallel over fixed chunks of kReduceRows rows, each task owning
//   whole chunks) computes dpre = grad_act * gelu'(pre) (and, for gelu_ffn, act = gelu(pre),
//   sharing the exp / erf) and the chunk's fp32 partial sums of dpre for grad_b; the partials are
//   added in chunk order (deterministic). grad_b2 is a deterministic column sum of grad_out.
//   The weight and input gradients are GEMMs on dpre.
#include "common.h"
#include "gelu_math.h"

#include <cmath>
#include <string_view>

namespace albert_kernels::cpu {
namespace {

constexpr int64_t kBlockRows = 256;  // rows per GEMM + epilogue block
// ... for bf16 / fp16: their products go to oneDNN (AMX or AVX512-BF16 where the CPU has them),
// which reorders the weight on every call, so short blocks cost a reorder each: 1-thread bf16
// products of 3072x768 / 768x3072 at M = 2048 ran at 342-372 / 317-371 GFLOP/s in 256-row calls
// and 409-450 / 389-431 in 1024-row ones (Xeon with AMX; a 1024-row bf16 activation of
// intermediate size 3072 is 6 MiB).
constexpr int64_t kReducedBlockRows = 1024;

int64_t block_rows(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf ? kReducedBlockRows : kBlockRows;
}

// The GEMM's epilogue, for a block of `rows` x N, parallel over rows: z = x + bias written to
// `z_out` and out = gelu(z) (fused_forward passes its GEMM output as both x and z_out: z lands
// over it as the pre-activation saved for backward). The
// GEMM itself runs without bias (beta = 0), so the bias costs no pass of its own. The GELU
// kind is a template parameter (no branch per vector) and everything the inner loop reads is
// a local, so the compiler keeps constants and pointers in registers.
template <Gelu K, typename scalar_t>
void bias_gelu_rows_k(const scalar_t* x, const scalar_t* bias, scalar_t* z_out, scalar_t* out,
                      int64_t rows, int64_t N) {
  using acc = acc_t<scalar_t>;
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  std::vector<acc> b_acc(N + W, acc(0));  // bias in acc_t, padded so the loops need no tail
  load_row_into(bias, b_acc.data(), N);
  const acc* bias_acc = b_acc.data();
  at::parallel_for(0, rows, 16, [=](int64_t r0, int64_t r1) {
    const int64_t n = N;
    const acc* __restrict__ bp = bias_acc;
    std::vector<acc> z_buf(n + W, acc(0)), out_buf(n + W);
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<scalar_t, acc>) {  // fp32 / fp64: no buffers
        const acc* p = x + r * n;  // may alias zr (not restrict): fused_forward writes z over x
        acc* zr = z_out + r * n;
        acc* __restrict__ o = out + r * n;
        int64_t j = 0;
        for (; j + W <= n; j += W) {
          const V z = V::loadu(p + j) + V::loadu(bp + j);
          z.store(zr + j);
          GeluMath<acc>::forward(K, z).store(o + j);
        }
        if (j < n) {
          const V z = V::loadu(p + j, n - j) + V::loadu(bp + j, n - j);
          z.store(zr + j, n - j);
          GeluMath<acc>::forward(K, z).store(o + j, n - j);
        }
      } else {
        acc* z = z_buf.data();
        load_row_into(x + r * n, z, n);
        for (int64_t j = 0; j < n; j += W) {
          const V zv = V::loadu(z + j) + V::loadu(bp + j);
          zv.store(z + j);
          GeluMath<acc>::forward(K, zv).store(out_buf.data() + j);
        }
        store_row<scalar_t>(z, z_out + r * n, n);
        store_row<scalar_t>(out_buf.data(), out + r * n, n);
      }
    }
  });
}

template <typename scalar_t>
void bias_gelu_rows(Gelu kind, const scalar_t* x, const scalar_t* bias, scalar_t* z_out,
                    scalar_t* out, int64_t rows, int64_t N) {
  if (kind == Gelu::Tanh) {
    bias_gelu_rows_k<Gelu::Tanh>(x, bias, z_out, out, rows, N);
  } else {
    bias_gelu_rows_k<Gelu::Erf>(x, bias, z_out, out, rows, N);
  }
}

// The fused backward pass: dpre = grad * gelu'(pre) (may write over grad), optionally
// act = gelu(pre), and the deterministic column sum of dpre into grad_bias.
template <typename scalar_t>
void gelu_bwd_rows(Gelu kind, const scalar_t* pre, const scalar_t* grad, scalar_t* dpre,
                   scalar_t* act, int64_t M, int64_t N, scalar_t* grad_bias) {
  using acc = acc_t<scalar_t>;
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const int64_t Np = round_up(N, W);
  ColumnSums<acc> sums(M, Np);
  at::parallel_for(0, sums.chunks(), 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc> p_buf(Np, acc(0)), g_buf(Np, acc(0)), d_buf(Np), a_buf(Np);
    for (int64_t c = c0; c < c1; ++c) {
      acc* part = sums.partial(c);
      for (int64_t r = sums.row_begin(c); r < sums.row_end(c); ++r) {
        load_row_into(pre + r * N, p_buf.data(), N);
        load_row_into(grad + r * N, g_buf.data(), N);  // padded tail stays 0 -> adds 0
        for (int64_t j = 0; j < Np; j += W) {
          V y;
          const V d = V::loadu(g_buf.data() + j) *
                      GeluMath<acc>::grad(kind, V::loadu(p_buf.data() + j), act ? &y : nullptr);
          d.store(d_buf.data() + j);
          if (act) y.store(a_buf.data() + j);
          (V::loadu(part + j) + d).store(part + j);
        }
        store_row<scalar_t>(d_buf.data(), dpre + r * N, N);
        if (act) store_row<scalar_t>(a_buf.data(), act + r * N, N);
      }
    }
  });
  std::vector<acc> total(Np);
  sums.finish(total.data());
  for (int64_t j = 0; j < N; ++j) grad_bias[j] = static_cast<scalar_t>(total[j]);
}

// Deterministic column sum of a [M, N] matrix (grad_b2 of gelu_ffn).
template <typename scalar_t>
void column_sum(const scalar_t* g, int64_t M, int64_t N, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  ColumnSums<acc> sums(M, N);
  at::parallel_for(0, sums.chunks(), 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc> buf(N);
    for (int64_t c = c0; c < c1; ++c) {
      acc* part = sums.partial(c);
      for (int64_t r = sums.row_begin(c); r < sums.row_end(c); ++r) {
        const acc* row = load_row(g + r * N, buf.data(), N);
        for (int64_t j = 0; j < N; ++j) part[j] += row[j];
      }
    }
  });
  sums.finish(out);
}

// pre = x @ w1^T + b1 and out = gelu(pre), block by block; with w2, b2 defined also
// out2 = out_block @ w2^T + b2 (the gelu_ffn forward; `out` is then a block-sized scratch).
void fused_forward(Gelu kind, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   at::Tensor& pre, at::Tensor& act, const at::Tensor* w2 = nullptr,
                   const at::Tensor* b2 = nullptr, at::Tensor* out2 = nullptr) {
  const int64_t M = x.size(0), N = w1.size(0);
  const at::Tensor w1t = w1.t();
  // linear_gelu (no second GEMM): one GEMM over all rows (BLAS is fastest on the whole matrix),
  // then one parallel GELU pass. gelu_ffn: blocks of block_rows(), so the activation stays small.
  const int64_t block = out2 ? block_rows(x.scalar_type()) : std::max<int64_t>(M, 1);
  for (int64_t r0 = 0; r0 < M; r0 += block) {
    const int64_t rows = std::min(block, M - r0);
    at::Tensor pre_blk = pre.narrow(0, r0, rows);
    at::mm_out(pre_blk, x.narrow(0, r0, rows), w1t);
    at::Tensor act_blk = out2 ? act.narrow(0, 0, rows) : act.narrow(0, r0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_fwd", [&] {
      scalar_t* z = pre_blk.data_ptr<scalar_t>();
      bias_gelu_rows<scalar_t>(kind, z, b1.data_ptr<scalar_t>(), z, act_blk.data_ptr<scalar_t>(),
                               rows, N);
    });
    if (out2) {
      at::Tensor out_blk = out2->narrow(0, r0, rows);
      at::addmm_out(out_blk, *b2, act_blk, w2->t());
    }
  }
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& bias,
                                                   c10::string_view approximate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "linear_gelu_fwd: x must be contiguous [M, K]");
  const Gelu kind = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  at::Tensor pre = at::empty({x.size(0), weight.size(0)}, x.options());
  at::Tensor out = at::empty_like(pre);
  fused_forward(kind, x, weight, bias, pre, out);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                const at::Tensor& b1, const at::Tensor& w2,
                                                const at::Tensor& b2,
                                                c10::string_view approximate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "gelu_ffn_fwd: x must be contiguous [M, H]");
  const Gelu kind = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  const int64_t M = x.size(0);
  at::Tensor pre = at::empty({M, w1.size(0)}, x.options());
  at::Tensor act_scratch =
      at::empty({std::min(M, block_rows(x.scalar_type())), w1.size(0)}, x.options());
  at::Tensor out = at::empty({M, w2.size(0)}, x.options());
  fused_forward(kind, x, w1, b1, pre, act_scratch, &w2, &b2, &out);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& pre, c10::string_view approximate) {
  TORCH_CHECK(grad_out.is_contiguous() && pre.is_contiguous() && x.is_contiguous(),
              "linear_gelu_bwd: expects contiguous grad_out, x, pre");
  const Gelu kind = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  const int64_t M = pre.size(0), N = pre.size(1);
  at::Tensor dpre = at::empty_like(pre);
  at::Tensor grad_b = at::empty({N}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_bwd", [&] {
    gelu_bwd_rows<scalar_t>(kind, pre.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                            dpre.data_ptr<scalar_t>(), nullptr, M, N,
                            grad_b.data_ptr<scalar_t>());
  });
  return {at::mm(dpre, weight), at::mm(dpre.t(), x), grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre, c10::string_view approximate) {
  TORCH_CHECK(grad_out.is_contiguous() && pre.is_contiguous() && x.is_contiguous(),
              "gelu_ffn_bwd: expects contiguous grad_out, x, pre");
  const Gelu kind = parse_approximate(std::string_view(approximate.data(), approximate.size()));
  const int64_t M = pre.size(0), I = pre.size(1), H = grad_out.size(1);
  at::Tensor grad_b2 = at::empty({H}, w2.options());
  at::Tensor grad_b1 = at::empty({I}, w1.options());
  at::Tensor dpre = at::mm(grad_out, w2);  // d act, overwritten in place by d pre
  at::Tensor act = at::empty_like(pre);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_bwd", [&] {
    column_sum<scalar_t>(grad_out.data_ptr<scalar_t>(), M, H, grad_b2.data_ptr<scalar_t>());
    gelu_bwd_rows<scalar_t>(kind, pre.data_ptr<scalar_t>(), dpre.data_ptr<scalar_t>(),
                            dpre.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), M, I,
                            grad_b1.data_ptr<scalar_t>());
  });
  at::Tensor grad_w2 = at::mm(grad_out.t(), act);
  return {at::mm(dpre, w1), at::mm(dpre.t(), x), grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd);
  m.impl("gelu_ffn_fwd", &gelu_ffn_fwd);
  m.impl("gelu_ffn_bwd", &gelu_ffn_bwd);
}

}  // namespace albert_kernels::cpu
