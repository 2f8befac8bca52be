// Flash-style softmax attention on CPU, padded ([B, H, L, D] + key_padding_mask) and packed
// variable-length ([T, H, D] + cu_seqlens) layouts. One implementation serves both: a
// "head slice" (one sequence, one head) is a set of query rows and a list of real key rows.
//
// Forward  attention_fwd(q, k, v, key_padding_mask?, scale) -> (out, lse)
//          varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale) -> (out, lse)
//   q, k, v, out: [B, H, L, D] / [T, H, D] contiguous, dtype T; key_padding_mask bool [B, L]
//   (True = real key); cu_seqlens int32 [B+1]. lse: fp32 (fp64 for fp64 inputs), [B, H, L] /
//   [H, T], the natural log-sum-exp of the scaled scores of each query row; -inf for a row with
//   no real key (its output is zeros).
//   Parallel over (sequence, head, query block of kBlockM rows); a task owns its output rows.
//   A task first gathers its sequence's *real* keys, converted to acc_t (fp32) and transposed,
//   into a zero-padded K^T [Dp, Np] and V [Np, Dp] (so padding costs no FLOPs, for any mask:
//   right, left or holes), then runs the online softmax over key blocks of kBlockN: the block of
//   scores S = (Q scale) K^T [kBlockM, kBlockN] (fp32) is the only piece of the L x L matrix
//   that ever exists.
//   All products are small_gemm (common.h); running max, sum and the output accumulator are
//   fp32; exponentials are fast_exp (common.h), the same in forward and backward. Saved for
//   backward: out and lse.
//
// Backward attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask?, scale)
//          varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
//     -> (grad_q, grad_k, grad_v)
//   Parallel over (sequence, head): a task owns dK, dV of its head slice (fp32 accumulators
//   [Np, Dp]) and dQ of its rows, so no two tasks write the same memory (deterministic). Per
//   query block of kBlockM rows it recomputes the [kBlockM, Np] panel P = exp(S - lse)
//   against all real keys (linear in L, never L x L), then
//     dP = dO V^T,  Di = rowsum(P dP),  dS = P (dP - Di) scale,
//     dV += P^T dO,  dK += dS^T Q,  dQ = dS K.
//   S = (Q scale) K^T in forward and backward alike: Q is scaled as it is loaded.
//   (`out` is not read: Di from P dP is more accurate in fp32 than rowsum(dO * O).)
//   Masked keys get zero gradients; rows with no real key give zero dQ.
#include "common.h"

#include <cmath>
#include <limits>

namespace albert_kernels::cpu {
namespace {

constexpr int64_t kBlockM = 48;   // query rows per task / per block (a multiple of the 6-row tile)
constexpr int64_t kBlockN = 128;  // keys per online-softmax step
constexpr int64_t kPrefetchRows = 8;  // strided q / k / v rows asked for ahead of their use

// One (sequence, head): rows of q/k/v/out/grads at base + row * row_stride, lse at lse[row].
template <typename scalar_t>
struct HeadSlice {
  int64_t n_rows;        // query rows (== key positions) of the sequence
  int64_t row_stride;    // elements between consecutive tokens
  int64_t offset;        // element offset of row 0 in q/k/v/out
  int64_t lse_offset;    // element offset of row 0 in lse
  const int64_t* keys;   // real key rows (indices < n_rows); nullptr: all rows are keys
  int64_t n_keys;
};

// Per-thread work buffers, acc_t, zero-padded to the gemm tile width.
template <typename acc>
struct Workspace {
  int64_t D, Dp, Np;
  std::vector<acc> kt, vt, k, v, q, o, s, p, dq, dk, dv, m, l;
  Workspace(int64_t D_, int64_t max_keys, bool backward)
      : D(D_), Dp(round_up(D_, kGemmNR<acc>)), Np(round_up(std::max<int64_t>(max_keys, 1), kGemmNR<acc>)) {
    kt.assign(Dp * Np, acc(0));
    k.assign(Np * Dp, acc(0));
    v.assign(Np * Dp, acc(0));
    q.assign(kBlockM * Dp, acc(0));
    o.assign(kBlockM * Dp, acc(0));
    s.assign(kBlockM * kBlockN, acc(0));
    m.assign(kBlockM, acc(0));
    l.assign(kBlockM, acc(0));
    if (backward) {
      vt.assign(Dp * Np, acc(0));
      s.assign(kBlockM * Np, acc(0));
      p.assign(kBlockM * Np, acc(0));
      dq.assign(kBlockM * Dp, acc(0));
      dk.assign(Np * Dp, acc(0));
      dv.assign(Np * Dp, acc(0));
    }
  }
};

// One query row -> acc_t, times the softmax scale (so S = (q scale) k^T comes out scaled; exact
// for power-of-two scales such as 64 ** -0.5). Forward and backward both use it, so the
// recomputed scores round exactly as in forward.
template <typename scalar_t, typename acc>
void load_scaled_q(const scalar_t* src, acc* dst, int64_t D, acc scale) {
  load_row_into(src, dst, D);
  for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
}

// Gather the slice's real keys into K, V [ld, Dp] (acc_t rows; zero rows beyond n_keys, zero
// columns beyond D) and K^T [Dp, ld] (plus V^T [Dp, ld] for backward), by blocked transposes.
template <typename scalar_t, typename acc>
void gather_keys(const HeadSlice<scalar_t>& hs, const scalar_t* k, const scalar_t* v,
                 Workspace<acc>& ws, int64_t ld, bool backward) {
  const int64_t D = ws.D, Dp = ws.Dp;
  const auto key_off = [&](int64_t j) {
    return hs.offset + (hs.keys ? hs.keys[j] : j) * hs.row_stride;
  };
  for (int64_t j = 0; j < std::min(kPrefetchRows, hs.n_keys); ++j) {
    prefetch_row(k + key_off(j), D * sizeof(scalar_t));
    prefetch_row(v + key_off(j), D * sizeof(scalar_t));
  }
  for (int64_t j = 0; j < ld; ++j) {
    if (j + kPrefetchRows < hs.n_keys) {
      prefetch_row(k + key_off(j + kPrefetchRows), D * sizeof(scalar_t));
      prefetch_row(v + key_off(j + kPrefetchRows), D * sizeof(scalar_t));
    }
    acc* krow = ws.k.data() + j * Dp;
    acc* vrow = ws.v.data() + j * Dp;
    if (j < hs.n_keys) {
      const int64_t off = key_off(j);
      load_row_into(k + off, krow, D);
      load_row_into(v + off, vrow, D);
    } else {
      std::fill(krow, krow + D, acc(0));
      std::fill(vrow, vrow + D, acc(0));
    }
  }
  transpose(ws.k.data(), Dp, ws.kt.data(), ld, ld, Dp);
  if (backward) transpose(ws.v.data(), Dp, ws.vt.data(), ld, ld, Dp);
}

// Online softmax over one block of (already scaled) scores S [rows, bn_pad], `valid` real
// columns. Updates the running max m and sum l, rescales the accumulator o, leaves
// P = exp(S - m) in S.
template <typename acc>
void softmax_block(acc* S, int64_t rows, int64_t bn_pad, int64_t valid, acc* m, acc* l, acc* o,
                   int64_t Dp) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc* s = S + r * bn_pad;
    for (int64_t j = valid; j < bn_pad; ++j) s[j] = neg_inf;  // zero-padded keys
    V vmax(neg_inf);
    for (int64_t j = 0; j < bn_pad; j += W) vmax = at::vec::maximum(vmax, V::loadu(s + j));
    const acc block_max = at::vec::vec_reduce_all<acc>(
        [](const V& a, const V& b) { return at::vec::maximum(a, b); }, vmax);
    const acc m_new = std::max(m[r], block_max);  // finite: the block has a real key
    V vsum(acc(0));
    for (int64_t j = 0; j < bn_pad; j += W) {
      V e = fast_exp<acc>(V::loadu(s + j) - V(m_new));
      e.store(s + j);
      vsum = vsum + e;
    }
    const acc block_sum = at::vec::vec_reduce_all<acc>([](const V& a, const V& b) { return a + b; }, vsum);
    if (m[r] == neg_inf) {  // first block: nothing accumulated yet
      l[r] = block_sum;
    } else {
      const acc alpha = std::exp(m[r] - m_new);
      l[r] = l[r] * alpha + block_sum;
      acc* orow = o + r * Dp;
      for (int64_t d = 0; d < Dp; d += W) (V::loadu(orow + d) * V(alpha)).store(orow + d);
    }
    m[r] = m_new;
  }
}

// Forward of query rows [q0, q1) of one head slice.
template <typename scalar_t, typename acc>
void forward_block(const HeadSlice<scalar_t>& hs, int64_t q0, int64_t q1, const scalar_t* q,
                   scalar_t* out, acc* lse, acc scale, Workspace<acc>& ws) {
  const int64_t D = ws.D, Dp = ws.Dp, rows = q1 - q0;
  const int64_t ld = round_up(std::max<int64_t>(hs.n_keys, 1), kGemmNR<acc>);
  std::vector<acc> obuf(Dp);
  if (hs.n_keys == 0) {  // no real key: zeros, lse = -inf
    for (int64_t i = q0; i < q1; ++i) {
      std::fill(obuf.begin(), obuf.end(), acc(0));
      store_row<scalar_t>(obuf.data(), out + hs.offset + i * hs.row_stride, D);
      lse[hs.lse_offset + i] = -std::numeric_limits<acc>::infinity();
    }
    return;
  }
  const scalar_t* q_rows = q + hs.offset + q0 * hs.row_stride;
  for (int64_t r = 0; r < std::min(rows, kPrefetchRows); ++r) {
    prefetch_row(q_rows + r * hs.row_stride, D * sizeof(scalar_t));
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) {
      prefetch_row(q_rows + (r + kPrefetchRows) * hs.row_stride, D * sizeof(scalar_t));
    }
    load_scaled_q(q_rows + r * hs.row_stride, ws.q.data() + r * Dp, D, scale);
    ws.m[r] = -std::numeric_limits<acc>::infinity();
    ws.l[r] = acc(0);
  }
  std::fill(ws.o.begin(), ws.o.end(), acc(0));
  for (int64_t j0 = 0; j0 < hs.n_keys; j0 += kBlockN) {
    const int64_t valid = std::min(kBlockN, hs.n_keys - j0);
    const int64_t bn_pad = round_up(valid, kGemmNR<acc>);
    // S = Q K^T for this key block; then P and the rescaled accumulator; then O += P V
    small_gemm<acc>(rows, bn_pad, D, ws.q.data(), Dp, 1, ws.kt.data() + j0, ld, ws.s.data(),
                    bn_pad, false);
    softmax_block<acc>(ws.s.data(), rows, bn_pad, valid, ws.m.data(), ws.l.data(), ws.o.data(),
                       Dp);
    small_gemm<acc>(rows, Dp, bn_pad, ws.s.data(), bn_pad, 1, ws.v.data() + j0 * Dp, Dp,
                    ws.o.data(), Dp, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const acc inv = acc(1) / ws.l[r];
    for (int64_t d = 0; d < D; ++d) obuf[d] = ws.o[r * Dp + d] * inv;
    store_row<scalar_t>(obuf.data(), out + hs.offset + (q0 + r) * hs.row_stride, D);
    lse[hs.lse_offset + q0 + r] = ws.m[r] + std::log(ws.l[r]);
  }
}

// Backward of one whole head slice (all its query rows). A query block meets all the slice's
// keys at once: its scores S and dP are [kBlockM, Np] panels (linear in L), so that
// Di = rowsum(P * dP) is computed from the very P used in dS (sum_j dS_ij = 0 holds to rounding;
// the usual rowsum(dO * O) shortcut is measurably less accurate in fp32).
template <typename scalar_t, typename acc>
void backward_slice(const HeadSlice<scalar_t>& hs, const scalar_t* grad_out, const scalar_t* q,
                    const acc* lse, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_v,
                    acc scale, Workspace<acc>& ws) {
  using V = Vec<acc>;
  constexpr int64_t W = V::size();
  const int64_t D = ws.D, Dp = ws.Dp;
  if (hs.n_keys == 0) return;  // every gradient of the slice stays zero
  const int64_t ld = round_up(hs.n_keys, kGemmNR<acc>);
  std::fill(ws.dk.begin(), ws.dk.begin() + ld * Dp, acc(0));
  std::fill(ws.dv.begin(), ws.dv.begin() + ld * Dp, acc(0));
  std::vector<acc> do_buf(kBlockM * Dp, acc(0));
  acc* S = ws.s.data();  // scores, then P      [rows, ld]
  acc* P = ws.p.data();  // dP, then dS         [rows, ld]
  for (int64_t q0 = 0; q0 < hs.n_rows; q0 += kBlockM) {
    const int64_t rows = std::min(kBlockM, hs.n_rows - q0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t off = hs.offset + (q0 + r) * hs.row_stride;
      load_scaled_q(q + off, ws.q.data() + r * Dp, D, scale);
      load_row_into(grad_out + off, do_buf.data() + r * Dp, D);
    }
    small_gemm<acc>(rows, ld, D, ws.q.data(), Dp, 1, ws.kt.data(), ld, S, ld, false);
    small_gemm<acc>(rows, ld, D, do_buf.data(), Dp, 1, ws.vt.data(), ld, P, ld, false);
    for (int64_t r = 0; r < rows; ++r) {
      acc* s = S + r * ld;
      acc* dp = P + r * ld;
      const V vl(lse[hs.lse_offset + q0 + r]);
      V vdi(acc(0));
      for (int64_t j = 0; j < ld; j += W) {
        const V pv = fast_exp<acc>(V::loadu(s + j) - vl);
        pv.store(s + j);
        vdi = at::vec::fmadd(pv, V::loadu(dp + j), vdi);
      }
      acc di = at::vec::vec_reduce_all<acc>([](const V& a, const V& b) { return a + b; }, vdi);
      // padded keys: dP = 0 there (zero V^T columns), so they added nothing to di; P := 0
      for (int64_t j = hs.n_keys; j < ld; ++j) s[j] = 0;
      const V vd(di);
      for (int64_t j = 0; j < ld; j += W) {
        (V::loadu(s + j) * (V::loadu(dp + j) - vd)).store(dp + j);  // dS / scale
      }
    }
    // dV += P^T dO, dK += (dS / scale)^T (Q scale) (A transposed via strides),
    // dQ = (dS / scale) K * scale
    small_gemm<acc>(ld, Dp, rows, S, 1, ld, do_buf.data(), Dp, ws.dv.data(), Dp, true);
    small_gemm<acc>(ld, Dp, rows, P, 1, ld, ws.q.data(), Dp, ws.dk.data(), Dp, true);
    small_gemm<acc>(rows, Dp, ld, P, ld, 1, ws.k.data(), Dp, ws.dq.data(), Dp, false);
    for (int64_t r = 0; r < rows; ++r) {
      acc* dq = ws.dq.data() + r * Dp;
      for (int64_t d = 0; d < D; ++d) dq[d] *= scale;
      store_row<scalar_t>(dq, grad_q + hs.offset + (q0 + r) * hs.row_stride, D);
    }
  }
  for (int64_t j = 0; j < hs.n_keys; ++j) {
    const int64_t key = hs.keys ? hs.keys[j] : j;
    const int64_t off = hs.offset + key * hs.row_stride;
    store_row<scalar_t>(ws.dk.data() + j * Dp, grad_k + off, D);
    store_row<scalar_t>(ws.dv.data() + j * Dp, grad_v + off, D);
  }
}

// The real keys of each batch row of a padded batch: keys[b * L + j] for j < counts[b].
struct KeyLists {
  std::vector<int64_t> keys, counts;
  KeyLists(const c10::optional<at::Tensor>& mask, int64_t B, int64_t L)
      : keys(B * L), counts(B, L) {
    const bool* mp = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < L; ++j) {
        if (!mp || mp[b * L + j]) keys[b * L + n++] = j;
      }
      counts[b] = n;
    }
  }
};

// Head slices of a padded batch [B, H, L, D] (slice index = b * H + h) ...
template <typename scalar_t>
HeadSlice<scalar_t> padded_slice(const KeyLists& kl, int64_t b, int64_t h, int64_t H, int64_t L,
                                 int64_t D) {
  const int64_t bh = b * H + h;
  return {L, D, bh * L * D, bh * L, kl.keys.data() + b * L, kl.counts[b]};
}

// ... and of a packed batch [T, H, D] (lse [H, T]).
template <typename scalar_t>
HeadSlice<scalar_t> varlen_slice(const int32_t* cu, int64_t seq, int64_t h, int64_t H, int64_t T,
                                 int64_t D) {
  const int64_t start = cu[seq], n = cu[seq + 1] - cu[seq];
  return {n, H * D, start * H * D + h * D, h * T + start, nullptr, n};
}

// Forward driver: tasks = (slice, query block); `slice_of(task_slice)` builds the HeadSlice.
template <typename scalar_t, typename SliceFn>
void run_forward(int64_t n_slices, const std::vector<int64_t>& slice_rows, SliceFn slice_of,
                 int64_t D, int64_t max_keys, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, at::Tensor& out, at::Tensor& lse, double scale) {
  using acc = acc_t<scalar_t>;
  std::vector<int64_t> task_slice, task_q0;  // flattened (slice, query block) list
  for (int64_t s = 0; s < n_slices; ++s) {
    for (int64_t q0 = 0; q0 < slice_rows[s]; q0 += kBlockM) {
      task_slice.push_back(s);
      task_q0.push_back(q0);
    }
  }
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                 *vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc* lp = lse.data_ptr<acc>();
  at::parallel_for(0, static_cast<int64_t>(task_slice.size()), 1, [&](int64_t t0, int64_t t1) {
    Workspace<acc> ws(D, max_keys, false);
    int64_t gathered = -1;  // consecutive tasks of one slice reuse the gathered keys
    for (int64_t t = t0; t < t1; ++t) {
      const HeadSlice<scalar_t> hs = slice_of(task_slice[t]);
      const int64_t ld = round_up(std::max<int64_t>(hs.n_keys, 1), kGemmNR<acc>);
      if (gathered != task_slice[t] && hs.n_keys > 0) {
        gather_keys<scalar_t, acc>(hs, kp, vp, ws, ld, false);
        gathered = task_slice[t];
      }
      forward_block<scalar_t, acc>(hs, task_q0[t], std::min(task_q0[t] + kBlockM, hs.n_rows), qp,
                                   op, lp, static_cast<acc>(scale), ws);
    }
  });
}

template <typename scalar_t, typename SliceFn>
void run_backward(int64_t n_slices, SliceFn slice_of, int64_t D, int64_t max_keys,
                  const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                  at::Tensor& gq, at::Tensor& gk, at::Tensor& gv, double scale) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n_slices, 1, [&](int64_t s0, int64_t s1) {
    Workspace<acc> ws(D, max_keys, true);
    for (int64_t s = s0; s < s1; ++s) {
      const HeadSlice<scalar_t> hs = slice_of(s);
      if (hs.n_keys == 0) continue;
      gather_keys<scalar_t, acc>(hs, k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), ws,
                                 round_up(hs.n_keys, kGemmNR<acc>), true);
      backward_slice<scalar_t, acc>(hs, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                                    lse.data_ptr<acc>(),
                                    gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(),
                                    gv.data_ptr<scalar_t>(), static_cast<acc>(scale), ws);
    }
  });
}

void check_contiguous(std::initializer_list<const at::Tensor*> ts, const char* op) {
  for (const at::Tensor* t : ts) TORCH_CHECK(t->is_contiguous(), op, ": expects contiguous inputs");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask,
                                                 double scale) {
  TORCH_CHECK(q.dim() == 4, "attention_fwd: q must be [B, H, L, D]");
  check_contiguous({&q, &k, &v}, "attention_fwd");
  TORCH_CHECK(!mask.has_value() || (mask->scalar_type() == at::kBool && mask->is_contiguous()),
              "attention_fwd: key_padding_mask must be contiguous bool [B, L]");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(stat_dtype(q.scalar_type())));
  const KeyLists kl(mask, B, L);
  std::vector<int64_t> rows(B * H, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_fwd", [&] {
    auto slice_of = [&](int64_t s) { return padded_slice<scalar_t>(kl, s / H, s % H, H, L, D); };
    run_forward<scalar_t>(B * H, rows, slice_of, D, L, q, k, v, out, lse, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale) {
  check_contiguous({&grad_out, &q, &k, &v, &out, &lse}, "attention_bwd");
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q.scalar_type()), "attention_bwd: lse dtype");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  const KeyLists kl(mask, B, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attn_bwd", [&] {
    auto slice_of = [&](int64_t s) { return padded_slice<scalar_t>(kl, s / H, s % H, H, L, D); };
    run_backward<scalar_t>(B * H, slice_of, D, L, grad_out, q, k, v, out, lse, gq, gk, gv, scale);
  });
  return {gq, gk, gv};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double scale) {
  TORCH_CHECK(q.dim() == 3 && cu_seqlens.scalar_type() == at::kInt,
              "varlen_attention_fwd: q must be [T, H, D] and cu_seqlens int32");
  check_contiguous({&q, &k, &v, &cu_seqlens}, "varlen_attention_fwd");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), n_seq = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({H, T}, q.options().dtype(stat_dtype(q.scalar_type())));
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  std::vector<int64_t> rows(n_seq * H);
  for (int64_t s = 0; s < n_seq * H; ++s) rows[s] = cu[s / H + 1] - cu[s / H];
  max_seqlen = 0;  // sized from cu_seqlens itself, whatever the caller passed
  for (int64_t n : rows) max_seqlen = std::max(max_seqlen, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_fwd", [&] {
    auto slice_of = [&](int64_t s) { return varlen_slice<scalar_t>(cu, s / H, s % H, H, T, D); };
    run_forward<scalar_t>(n_seq * H, rows, slice_of, D, max_seqlen, q, k, v, out, lse, scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double scale) {
  check_contiguous({&grad_out, &q, &k, &v, &out, &lse, &cu_seqlens}, "varlen_attention_bwd");
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q.scalar_type()), "varlen_attention_bwd: lse dtype");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), n_seq = cu_seqlens.size(0) - 1;
  at::Tensor gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  max_seqlen = 0;  // sized from cu_seqlens itself, whatever the caller passed
  for (int64_t s = 0; s < n_seq; ++s) max_seqlen = std::max<int64_t>(max_seqlen, cu[s + 1] - cu[s]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_bwd", [&] {
    auto slice_of = [&](int64_t s) { return varlen_slice<scalar_t>(cu, s / H, s % H, H, T, D); };
    run_backward<scalar_t>(n_seq * H, slice_of, D, max_seqlen, grad_out, q, k, v, out, lse, gq,
                           gk, gv, scale);
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(albert_kernels, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd);
}

}  // namespace albert_kernels::cpu
