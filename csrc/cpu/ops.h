// CPU op implementations that other CPU kernels call directly (C++ to C++, no dispatcher): the
// small-M encoder layer (small_m.cpp) runs attention and add + LayerNorm through them. Their
// contracts are the op schemas' (csrc/registration.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace albert_kernels::cpu {

// add_layer_norm.cpp: (out, mean, rstd) of LayerNorm(x + residual).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& bias, double eps);

// attention.cpp: (out [T, H, D], lse [H, T]) of packed variable-length attention.
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    double dropout_p, int64_t seed, int64_t offset, bool save_residual);

// small_m.cpp: output features per panel of pack_linear_weight's layout (the register tile's
// width for the vector ISA this library was built for: 24 with AVX2, 48 with AVX-512).
int64_t packed_panel_width();

}  // namespace albert_kernels::cpu
