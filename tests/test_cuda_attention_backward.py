"""Two details of the CUDA attention backward (csrc/cuda/attention.cu), as the Triton kernels
have them:

- `save_residual` (csrc/registration.cpp): on CUDA fp16/bf16 the forward keeps what rounding its
  fp32 output to the input dtype lost, in planes 2.. of `lse`, and the backward's
  delta = rowsum(dO * O) adds dO . residual (Triton's o_lo), so nearly one-hot rows keep their
  dq within budget. The op wrappers ask for it only when autograd will run the backward. CPU: the
  flag is accepted and ignored (cpp takes delta from P dP).
- a sequence with one real key gets dq = dk = 0 exactly, with dropout too (ds_scale; Triton's
  _ds_scale): softmax over one key is constant.

The CUDA checks run on a GPU only; the flag's logic and the fake shapes are checked here."""
import pytest
import torch

from albert_kernels.backends import unavailable_reason
from albert_kernels.backends.extension import ops as ext_ops
from attention_helpers import check_fwd_bwd, dense_padded, dense_varlen

cuda_only = pytest.mark.skipif(unavailable_reason("cuda", "cuda") is not None,
                               reason=f"cuda backend: {unavailable_reason('cuda', 'cuda')}")
cpp_only = pytest.mark.skipif(unavailable_reason("cpp", "cpu") is not None,
                              reason=f"cpp backend: {unavailable_reason('cpp', 'cpu')}")


def test_residual_is_asked_for_only_when_a_backward_will_run():
    x = torch.zeros(2)
    assert not ext_ops._wants_residual(x, x, x)
    y = torch.zeros(2, requires_grad=True)
    assert ext_ops._wants_residual(x, y, x)
    with torch.no_grad():
        assert not ext_ops._wants_residual(x, y, x)


def test_fake_statistics_shape():
    """The fake (meta) kernels give what the CUDA kernels allocate: 2 planes, or 2 + D / 2 with
    the residual in fp16/bf16; CPU keeps its [B, H, L] log-sum-exp whatever the flag."""
    with torch.device("meta"):
        q = torch.empty(2, 3, 5, 64, dtype=torch.float16)
    assert ext_ops._lse_shape(q, (2, 3, 5), True) == (2, 3, 5)  # not CUDA: the lse itself

    class _OnCuda:  # the shape rule reads only the device type, dtype and head dim
        device = torch.device("cuda")
        shape = (2, 3, 5, 64)

        def __init__(self, dtype):
            self.dtype = dtype

    assert ext_ops._lse_shape(_OnCuda(torch.float16), (2, 3, 5), True) == (34, 2, 3, 5)
    assert ext_ops._lse_shape(_OnCuda(torch.bfloat16), (2, 3, 5), False) == (2, 2, 3, 5)
    assert ext_ops._lse_shape(_OnCuda(torch.float32), (2, 3, 5), True) == (2, 2, 3, 5)


@cpp_only
def test_cpu_ignores_the_flag():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 32) for _ in range(3))
    ao = torch.ops.albert_kernels
    out0, lse0 = ao.attention_fwd(q, k, v, None, 0.2, 0.0, 0, 0)
    out1, lse1 = ao.attention_fwd(q, k, v, None, 0.2, 0.0, 0, 0, True)
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1) and lse1.shape == (1, 2, 6)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_residual_planes_and_values(dtype):
    """With the flag: [2 + D / 2, B, H, L] statistics whose planes 2.. hold out's rounding
    residual r = x - T(x) of the kernel's fp32 output x: |r| at most half an ulp of out, out + r
    rounds back to out, r not all zero, out + r no farther from float64 than out; without the
    flag: 2 planes and the same out."""
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 70, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
    mask[1, 50:] = False
    ao = torch.ops.albert_kernels
    out, lse = ao.attention_fwd(q, k, v, mask, 0.125, 0.0, 0, 0, True)
    assert lse.shape == (2 + D // 2, B, H, L) and lse.dtype == torch.float32
    plain_out, plain = ao.attention_fwd(q, k, v, mask, 0.125, 0.0, 0, 0, False)
    assert plain.shape == (2, B, H, L) and torch.equal(out, plain_out)
    assert torch.equal(lse[:2], plain)
    residual = lse[2:].contiguous().view(dtype).view(B, H, L, D).float()
    half_ulp = out.float().abs() * torch.finfo(dtype).eps / 2
    assert (residual.abs() <= half_ulp * 1.01 + 1e-30).all()
    assert (residual != 0).float().mean() > 0.5
    back = (out.float() + residual).to(dtype)
    assert (back != out).float().mean() < 0.01  # only ties, after r itself was rounded to T
    gold = dense_padded(q.double(), k.double(), v.double(), mask, 0.125)
    err_plain = (out.double() - gold).abs().mean()
    err_fixed = (out.double() + residual.double() - gold).abs().mean()
    assert err_fixed <= err_plain, (err_fixed, err_plain)


@cuda_only
def test_cuda_varlen_residual_through_autograd():
    """The wrapper passes the flag when q requires grad: the saved statistics carry the residual
    and the backward accepts them (output and gradients against float64 within the fp16
    budget)."""
    gen = torch.Generator().manual_seed(1)
    T, H, D = 40, 2, 32
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device="cuda")
    qkv = [torch.randn(T, H, D, generator=gen, dtype=torch.float64).cuda() for _ in range(3)]
    grad_out = torch.randn(T, H, D, generator=gen, dtype=torch.float64).cuda()
    check_fwd_bwd(lambda q, k, v: ext_ops.varlen_attention(q, k, v, cu, cu, 25, 25, D ** -0.5),
                  lambda q, k, v: dense_varlen(q, k, v, cu, cu, D ** -0.5),
                  qkv, torch.float16, grad_out, "cuda varlen fp16 with the residual")


@cuda_only
def test_cuda_single_key_sequence_gets_zero_dq_dk_with_dropout():
    torch.manual_seed(2)
    H, D = 2, 64
    cu = torch.tensor([0, 1, 9], dtype=torch.int32, device="cuda")  # sequence 0: one token
    qkv = [torch.randn(9, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
           for _ in range(3)]
    out = ext_ops.varlen_attention(*qkv, cu, cu, 8, 8, D ** -0.5, dropout_p=0.3)
    out.backward(torch.randn_like(out))
    q, k, _ = qkv
    assert torch.equal(q.grad[:1], torch.zeros_like(q.grad[:1]))
    assert torch.equal(k.grad[:1], torch.zeros_like(k.grad[:1]))
    assert q.grad[1:].abs().sum() > 0  # the other sequence's gradients are not zeroed
