// Residual add + LayerNorm on CPU: out = LayerNorm(x + residual) * weight + bias, over rows.
//
// Forward  add_layer_norm_fwd(x, residual, weight, bias, eps) -> (out, mean, rstd)
//   x, residual, out: [M, N] contiguous, storage dtype T (fp32 / fp16 / bf16 / fp64).
//   weight, bias: [N], dtype T.   mean, rstd: [M], fp32 (fp64 for fp64 inputs).
//   Parallel over rows: each task owns whole rows. A row's sum s = x + r is formed once in
//   acc_t (fp32: never rounded to T, so an fp16 sum above 65504 is fine) and shifted by the row's
//   first element, s' = s - s_0, in a per-thread row buffer (L1-resident for N <= 4096); then
//   mean and variance are two passes over that buffer (two-pass: no cancellation), then one pass
//   writes out. The shift makes the statistics exact where a rounding step of the mean would be
//   magnified by rstd (up to 1/sqrt(eps) = 1e6 for ALBERT's eps): a constant row gives s' = 0,
//   mean 0, variance 0 exactly, so out = bias; a near-constant row with a large common offset
//   loses nothing (s - s_0 is exact when s and s_0 are within a factor of 2, Sterbenz).
//   Saved for backward: `mean` holds the mean of s' (the shifted mean), and rstd; backward
//   recomputes s_0 and s' from x and residual exactly as forward formed them.
//
// Backward add_layer_norm_bwd(grad_out, x, residual, weight, mean, rstd)
//     -> (grad_x, grad_weight, grad_bias)
//   grad_x == grad_residual (returned once; the autograd formula hands it to both inputs).
//   xhat = ((x + r) - s_0 - mean) * rstd, with s_0 = x[0] + r[0] and the shifted mean of forward.
//   Rows are cut into fixed chunks of kReduceRows; a task owns whole chunks: it writes grad_x
//   of its rows and its chunk's partial sums of grad_out * xhat (-> grad_weight) and grad_out
//   (-> grad_bias), all fp32; the partials are then added in chunk order, so the weight and bias
//   gradients are bitwise reproducible for any thread count.
#include "common.h"
#include "ops.h"

#include <cmath>

namespace albert_kernels::cpu {
namespace {

template <typename scalar_t>
void add_ln_fwd_kernel(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& bias, double eps, at::Tensor& out, at::Tensor& mean,
                       at::Tensor& rstd) {
  using acc = acc_t<scalar_t>;
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc* mean_p = mean.data_ptr<acc>();
  acc* rstd_p = rstd.data_ptr<acc>();
  std::vector<acc> w(N), b(N);  // weight and bias in acc_t, converted once
  load_row_into(weight.data_ptr<scalar_t>(), w.data(), N);
  load_row_into(bias.data_ptr<scalar_t>(), b.data(), N);

  // Rows per task: a row is only ~N * 12 bytes of traffic, so tasks are made large enough
  // (>= 64 rows) that the per-task overhead vanishes; the buffers are allocated once per task.
  const int64_t grain = std::max<int64_t>(64, M / (4 * std::max(1, at::get_num_threads())));
  at::parallel_for(0, M, grain, [&, N](int64_t row0, int64_t row1) {  // N by value: no reloads
    std::vector<acc> s_buf(round_up(N, W)), xbuf(N), rbuf(N), obuf(N);
    // raw local pointers: the stores below must not make the compiler reload them every step
    acc* __restrict__ s = s_buf.data();
    const acc* __restrict__ wp = w.data();
    const acc* __restrict__ bp = b.data();
    auto add = [](const V& a, const V& b) { return a + b; };
    for (int64_t row = row0; row < row1; ++row) {
      const int64_t off = row * N;
      const acc* xr = load_row(xp + off, xbuf.data(), N);
      const acc* rr = load_row(rp + off, rbuf.data(), N);
      const acc shift = xr[0] + rr[0];
      const V vshift(shift);
      // pass 1: s' = (x + r) - shift, sum (four independent accumulators: no add-latency chain)
      V vs0(acc(0)), vs1(acc(0)), vs2(acc(0)), vs3(acc(0));
      int64_t j = 0;
      for (; j + 4 * W <= N; j += 4 * W) {
        V a0 = V::loadu(xr + j) + V::loadu(rr + j) - vshift;
        V a1 = V::loadu(xr + j + W) + V::loadu(rr + j + W) - vshift;
        V a2 = V::loadu(xr + j + 2 * W) + V::loadu(rr + j + 2 * W) - vshift;
        V a3 = V::loadu(xr + j + 3 * W) + V::loadu(rr + j + 3 * W) - vshift;
        a0.store(s + j);
        a1.store(s + j + W);
        a2.store(s + j + 2 * W);
        a3.store(s + j + 3 * W);
        vs0 = vs0 + a0; vs1 = vs1 + a1; vs2 = vs2 + a2; vs3 = vs3 + a3;
      }
      for (; j + W <= N; j += W) {
        V sv = V::loadu(xr + j) + V::loadu(rr + j) - vshift;
        sv.store(s + j);
        vs0 = vs0 + sv;
      }
      V vsum = (vs0 + vs1) + (vs2 + vs3);
      acc sum = at::vec::vec_reduce_all<acc>(add, vsum);
      for (; j < N; ++j) { s[j] = xr[j] + rr[j] - shift; sum += s[j]; }
      const acc mu = sum / acc(N);
      // pass 2: variance around the exact mean
      const V vmu(mu);
      V vq0(acc(0)), vq1(acc(0)), vq2(acc(0)), vq3(acc(0));
      for (j = 0; j + 4 * W <= N; j += 4 * W) {
        V d0 = V::loadu(s + j) - vmu;
        V d1 = V::loadu(s + j + W) - vmu;
        V d2 = V::loadu(s + j + 2 * W) - vmu;
        V d3 = V::loadu(s + j + 3 * W) - vmu;
        vq0 = at::vec::fmadd(d0, d0, vq0);
        vq1 = at::vec::fmadd(d1, d1, vq1);
        vq2 = at::vec::fmadd(d2, d2, vq2);
        vq3 = at::vec::fmadd(d3, d3, vq3);
      }
      for (; j + W <= N; j += W) {
        V d = V::loadu(s + j) - vmu;
        vq0 = at::vec::fmadd(d, d, vq0);
      }
      V vsq = (vq0 + vq1) + (vq2 + vq3);
      acc sq = at::vec::vec_reduce_all<acc>(add, vsq);
      for (; j < N; ++j) { acc d = s[j] - mu; sq += d * d; }
      const acc rs = acc(1) / std::sqrt(sq / acc(N) + acc(eps));
      mean_p[row] = mu;
      rstd_p[row] = rs;
      // pass 3: out = (s' - mu) * rstd * w + b
      acc* __restrict__ o = out_row(op + off, obuf.data());
      const V vrs(rs);
      const int64_t n = N;  // a local bound: the stores to o must not force reloads of N
      for (j = 0; j + 2 * W <= n; j += 2 * W) {
        V y0 = (V::loadu(s + j) - vmu) * vrs;
        V y1 = (V::loadu(s + j + W) - vmu) * vrs;
        at::vec::fmadd(y0, V::loadu(wp + j), V::loadu(bp + j)).store(o + j);
        at::vec::fmadd(y1, V::loadu(wp + j + W), V::loadu(bp + j + W)).store(o + j + W);
      }
      for (; j + W <= n; j += W) {
        V y = (V::loadu(s + j) - vmu) * vrs;
        at::vec::fmadd(y, V::loadu(wp + j), V::loadu(bp + j)).store(o + j);
      }
      for (; j < n; ++j) o[j] = (s[j] - mu) * rs * wp[j] + bp[j];
      store_row(o, op + off, N);
    }
  });
}

template <typename scalar_t>
void add_ln_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& x,
                       const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_x,
                       at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc = acc_t<scalar_t>;
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const int64_t M = x.size(0), N = x.size(1);
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* rp = residual.data_ptr<scalar_t>();
  const acc* mean_p = mean.data_ptr<acc>();
  const acc* rstd_p = rstd.data_ptr<acc>();
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  std::vector<acc> w(N);
  load_row_into(weight.data_ptr<scalar_t>(), w.data(), N);
  ColumnSums<acc> sums(M, N, /*n_sums=*/2);  // 0: sum dy * xhat (dweight), 1: sum dy (dbias)

  at::parallel_for(0, sums.chunks(), 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc> xhat(N), wdy(N), gbuf(N), xbuf(N), rbuf(N), obuf(N);
    for (int64_t c = c0; c < c1; ++c) {
      acc* dw = sums.partial(c, 0);
      acc* db = sums.partial(c, 1);
      for (int64_t row = sums.row_begin(c); row < sums.row_end(c); ++row) {
        const int64_t off = row * N;
        const acc* dy = load_row(gp + off, gbuf.data(), N);
        const acc* xr = load_row(xp + off, xbuf.data(), N);
        const acc* rr = load_row(rp + off, rbuf.data(), N);
        const acc shift = xr[0] + rr[0];  // forward's s_0, formed the same way
        const V vshift(shift), vmu(mean_p[row]), vrs(rstd_p[row]);
        // pass 1: xhat, w * dy, the two row means, and the weight / bias partials
        V v_a(acc(0)), v_b(acc(0));  // sum (w dy) * xhat, sum w dy
        int64_t j = 0;
        for (; j + W <= N; j += W) {
          V xh = (V::loadu(xr + j) + V::loadu(rr + j) - vshift - vmu) * vrs;
          V g = V::loadu(dy + j);
          V wg = V::loadu(w.data() + j) * g;
          xh.store(xhat.data() + j);
          wg.store(wdy.data() + j);
          v_a = at::vec::fmadd(wg, xh, v_a);
          v_b = v_b + wg;
          at::vec::fmadd(g, xh, V::loadu(dw + j)).store(dw + j);
          (V::loadu(db + j) + g).store(db + j);
        }
        auto add = [](const V& a, const V& b) { return a + b; };
        acc sa = at::vec::vec_reduce_all<acc>(add, v_a);
        acc sb = at::vec::vec_reduce_all<acc>(add, v_b);
        for (; j < N; ++j) {
          const acc xh = (xr[j] + rr[j] - shift - mean_p[row]) * rstd_p[row];
          const acc wg = w[j] * dy[j];
          xhat[j] = xh; wdy[j] = wg;
          sa += wg * xh; sb += wg;
          dw[j] += dy[j] * xh; db[j] += dy[j];
        }
        // pass 2: dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))
        const acc ma = sa / acc(N), mb = sb / acc(N);
        const V vma(ma), vmb(mb);
        acc* o = out_row(gxp + off, obuf.data());
        for (j = 0; j + W <= N; j += W) {
          V t = V::loadu(wdy.data() + j) - vmb - V::loadu(xhat.data() + j) * vma;
          (t * vrs).store(o + j);
        }
        for (; j < N; ++j) o[j] = (wdy[j] - mb - xhat[j] * ma) * rstd_p[row];
        store_row(o, gxp + off, N);
      }
    }
  });
  sums.finish(grad_weight.data_ptr<scalar_t>(), 0);  // weight, bias have x's dtype
  sums.finish(grad_bias.data_ptr<scalar_t>(), 1);
}

}  // namespace

// Declared in ops.h: the small-M layer (small_m.cpp) calls it directly.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() &&
                  weight.is_contiguous() && bias.is_contiguous(),
              "add_layer_norm_fwd: expects contiguous x, residual [M, N] and weight, bias [N]");
  const int64_t M = x.size(0);
  auto stat_opts = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({M}, stat_opts);
  at::Tensor rstd = at::empty({M}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_ln_fwd", [&] {
    add_ln_fwd_kernel<scalar_t>(x, residual, weight, bias, eps, out, mean, rstd);
  });
  return {out, mean, rstd};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x.dim() == 2 && grad_out.is_contiguous() && x.is_contiguous() &&
                  residual.is_contiguous() && weight.is_contiguous() && mean.is_contiguous() &&
                  rstd.is_contiguous(),
              "add_layer_norm_bwd: expects contiguous [M, N] tensors");
  TORCH_CHECK(mean.scalar_type() == stat_dtype(x.scalar_type()),
              "add_layer_norm_bwd: mean / rstd must be ", stat_dtype(x.scalar_type()));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_ln_bwd", [&] {
    add_ln_bwd_kernel<scalar_t>(grad_out, x, residual, weight, mean, rstd, grad_x, grad_weight,
                                grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd);
  m.impl("add_layer_norm_bwd", &add_layer_norm_bwd);
}

}  // namespace albert_kernels::cpu
