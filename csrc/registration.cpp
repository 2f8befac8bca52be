// The one registration file of the albert_kernels extension: the op schemas.
//
// Implementations register per device with TORCH_LIBRARY_IMPL(albert_kernels, CPU / CUDA, m) in
// csrc/cpu/*.cpp and csrc/cuda/*.cu. Fake (meta) kernels and autograd are registered from Python
// (albert_kernels/backends/extension/ops.py) with torch.library, so torch.compile traces through.
//
// Layout conventions (the Python wrappers make inputs contiguous before calling):
//   x, residual, grad_out of add_layer_norm: [M, N] row-major; mean, rstd: float32 [M].
//   linear_gelu / gelu_ffn: x [M, K], weights [N, K] (nn.Linear layout); `pre` is the saved
//     pre-activation x @ W1^T + b1, [M, I], in the input dtype.
//   attention: q, k, v, out [B, H, L, D] contiguous; key_padding_mask bool [B, L] or None;
//     lse float32 [B, H, L] (natural log-sum-exp of the scaled scores; -inf for a row with no key);
//     on CUDA [2, B, H, L]: the row max of the scaled scores and log2 of the row sum kept apart
//     (their sum rounds at the max's magnitude: csrc/cuda/attention.cu). Only the backward reads it.
//     save_residual (forward; set when a backward will run): on CUDA fp16/bf16 the forward also
//     keeps what rounding the fp32 output to the input dtype lost, so that the backward's
//     delta = rowsum(dO * O) is as exact as from an fp32 output: lse is then [2 + D / 2, B, H, L]
//     fp32, planes 2.. holding that residual in the input dtype, laid out as out. Other devices
//     and dtypes ignore it.
//   varlen_attention: q, out [Tq, H, D], k, v [Tk, H, D] contiguous; cu_seqlens_q,
//     cu_seqlens_k int32 [B+1] (sequence b: queries cu_q[b]:cu_q[b+1] attend to keys
//     cu_k[b]:cu_k[b+1], as FlashAttention's flash_attn_varlen_func); lse float32 [H, Tq]
//     (CUDA: [2, H, Tq], as above).
//   pack_linear_weight / packed_linear / packed_albert_layer: the small-M inference path, CPU
//     float32 only, no autograd (csrc/cpu/small_m.cpp has the packed layout): weight [S*N, K]
//     -> packed [S * ceil(N / R), K, R], R = packed_panel_width() (the register tile's width for
//     the build's vector ISA: 24 with AVX2, 48 with AVX-512; a property of the build with no
//     tensor to dispatch on, so small_m.cpp declares it beside its kernel);
//     packed_linear(x [M, K]) -> [M, N]
//     ([S, M, N] for S > 1 segments), bias and GELU (gelu_approximate "tanh" / "none"; None: no
//     activation) in the epilogue;
//     packed_albert_layer(hidden_states [M, H], cu_seqlens int32 [B+1], ...) -> [M, H], one whole
//     ALBERT layer in eval mode (qkv_weight: Q, K, V packed as 3 segments).
//   Attention dropout (both layouts): dropout_p in [0, 1) on the softmax probabilities, kept
//     entries scaled by 1 / (1 - p); (seed, offset) key the Philox4x32-10 stream of
//     albert_kernels/backends/dropout.py (element offsets use L, L or max_seqlen_q,
//     max_seqlen_k); forward and backward get the same (seed, offset) and regenerate the mask.
//     dropout_p == 0: seed and offset are ignored.
#include <torch/library.h>

TORCH_LIBRARY(albert_kernels, m) {
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps)"
        " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm_bwd(Tensor grad_out, Tensor x, Tensor residual, Tensor weight,"
        " Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("linear_gelu_fwd(Tensor x, Tensor weight, Tensor bias, str approximate)"
        " -> (Tensor out, Tensor pre)");
  m.def("linear_gelu_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor pre, str approximate)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def("gelu_ffn_fwd(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, str approximate)"
        " -> (Tensor out, Tensor pre)");
  m.def("gelu_ffn_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor pre,"
        " str approximate) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2,"
        " Tensor grad_b2)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale,"
        " float dropout_p, int seed, int offset, bool save_residual=False)"
        " -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q,"
        " Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p,"
        " int seed, int offset, bool save_residual=False) -> (Tensor out, Tensor lse)");
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
        " Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, float scale, float dropout_p, int seed, int offset)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("pack_linear_weight(Tensor weight, int segments=1) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed_weight, int out_features, Tensor? bias=None,"
        " str? gelu_approximate=None, int segments=1) -> Tensor");
  m.def("packed_albert_layer(Tensor hidden_states, Tensor cu_seqlens, int max_seqlen,"
        " Tensor qkv_weight, Tensor qkv_bias, Tensor dense_weight, Tensor dense_bias,"
        " Tensor attention_ln_weight, Tensor attention_ln_bias, float attention_ln_eps,"
        " Tensor ffn_weight, Tensor ffn_bias, Tensor ffn_output_weight, Tensor ffn_output_bias,"
        " Tensor full_ln_weight, Tensor full_ln_bias, float full_ln_eps, int num_heads,"
        " float scale, str gelu_approximate) -> Tensor");
}
