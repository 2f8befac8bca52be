"""The reference backend against the independent float64 formulas of tests/formulas.py:
attention, varlen_attention, add_layer_norm, linear_gelu and gelu_ffn, in every dtype, and
gradcheck in float64. (Padding: tests/test_padding.py; the error budget: tests/test_budget.py.)
"""
import pytest
import torch

import albert_kernels as ak
from formulas import (F64, LOW, REF, assert_close64, attention_formula, gelu_erf_formula,
                      gelu_ffn_formula, gelu_tanh_formula, gradcheck, layer_norm_formula, leaf,
                      linear_gelu_formula, ln_inputs, machine_eps, make_mask, randn,
                      varlen_formula)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("mask_kind", [None, "right", "left", "random", "all_pad_row"])
def test_attention_matches_formula(mask_kind, dtype):
    B, H, L, D = 3, 2, 7, 16
    q, k, v = (randn(B, H, L, D, dtype=dtype, seed=s) for s in (1, 2, 3))
    mask = make_mask(mask_kind, B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    assert torch.isfinite(out).all()
    assert_close64(out, attention_formula(q, k, v, mask), dtype)


def test_attention_all_padding_row_is_zero_not_nan_forward_and_backward():
    B, H, L, D = 2, 2, 5, 8
    q, k, v = (randn(B, H, L, D, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(randn(B, H, L, D, seed=4))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))  # no key: no dependence on q
    # Fully masked batch: every row zero.
    out = ak.attention(q, k, v, key_padding_mask=torch.zeros(B, L, dtype=torch.bool), backend=REF)
    assert torch.equal(out, torch.zeros_like(out))


def test_attention_masked_keys_get_zero_weight():
    """Changing k or v at padded positions must not change anything."""
    B, H, L, D = 2, 2, 6, 8
    q, k, v = (randn(B, H, L, D, seed=s) for s in (1, 2, 3))
    mask = make_mask("right", B, L, seed=5)
    mask[:, -1] = False
    k2, v2 = k.clone(), v.clone()
    for b in range(B):
        k2[b, :, ~mask[b]] = 50.0
        v2[b, :, ~mask[b]] = 1e4
    a = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    b = ak.attention(q, k2, v2, key_padding_mask=mask, backend=REF)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2])
def test_attention_custom_scale(scale):
    B, H, L, D = 2, 2, 6, 8
    q, k, v = (randn(B, H, L, D, dtype=F64, seed=s) for s in (1, 2, 3))
    mask = make_mask("right", B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, scale=scale, backend=REF)
    assert_close64(out, attention_formula(q, k, v, mask, scale), F64)
    # and it differs from the default scale, so the argument is really used
    default = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert not torch.allclose(out, default)


def test_attention_single_token():
    q, k, v = (randn(1, 1, 1, 64, seed=s) for s in (1, 2, 3))
    out = ak.attention(q, k, v, backend=REF)
    torch.testing.assert_close(out, v)   # one key: weight 1
    assert_close64(out, attention_formula(q, k, v), torch.float32)


def test_attention_non_contiguous_inputs():
    B, H, L, D = 2, 3, 5, 8
    q, k, v = (randn(B, L, H, D, seed=s).transpose(1, 2) for s in (1, 2, 3))
    assert not q.is_contiguous()
    mask = make_mask("left", B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert_close64(out, attention_formula(q, k, v, mask), torch.float32)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_attention_scores_beyond_fp16_range_are_computed_in_fp32(dtype):
    """q = k with |q|^2 near 8e4: q.k overflows fp16 (65504) while the scaled scores (~2e4) and
    the output are well inside it. Scores and softmax are fp32, so output and gradients are
    finite and agree with float64; forming q.k in fp16 gave NaN."""
    B, H, L, D = 2, 2, 6, 16
    q = randn(B, H, L, D, dtype=F64, seed=1, scale=70.0)
    k = q.clone()
    v = randn(B, H, L, D, dtype=F64, seed=3)
    assert float((q * k).sum(-1).max()) > 7e4
    mask = make_mask("left", B, L)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    gold = [t.detach().to(dtype).to(F64).requires_grad_() for t in (q, k, v)]
    out = ak.attention(*low, key_padding_mask=mask, backend=REF)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close64(out, attention_formula(*low, mask), dtype)
    out64 = ak.attention(*gold, key_padding_mask=mask, backend=REF)
    grad = randn(B, H, L, D, dtype=F64, seed=4)
    out.backward(grad.to(dtype))
    out64.backward(grad)
    for name, a, b in zip("qkv", low, gold):
        assert torch.isfinite(a.grad).all(), name
        scale = float(b.grad.abs().max())
        tol = 16 * torch.finfo(dtype).eps * max(scale, 1.0)
        torch.testing.assert_close(a.grad.to(F64), b.grad, rtol=0, atol=tol, msg=name)


# varlen_attention
# ---------------------------------------------------------------------------------------------

def _cu(lengths):
    return torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [F64, torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("lengths", [[5, 1, 7], [0, 4, 0, 3], [1], [6, 0], [0], [0, 0, 0]],
                         ids=str)
def test_varlen_attention_matches_formula(lengths, dtype):
    H, D = 2, 8
    T = sum(lengths)
    q, k, v = (randn(T, H, D, dtype=dtype, seed=s) for s in (1, 2, 3))
    out = ak.varlen_attention(q, k, v, _cu(lengths), max(lengths), backend=REF)
    assert out.shape == (T, H, D) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_close64(out, varlen_formula(q, k, v, lengths), dtype)


def test_varlen_attention_empty_batch_is_differentiable():
    """T = 0 (every sequence empty): the output must still be part of the graph, like the padded
    op with B = 0, so that backward / compare_op work (zero-sized gradients)."""
    q, k, v = (torch.zeros(0, 2, 8, requires_grad=True) for _ in range(3))
    out = ak.varlen_attention(q, k, v, _cu([0, 0]), 0, backend=REF)
    assert out.requires_grad
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.zeros_like(out))
    assert dq.shape == q.shape


def test_varlen_attention_custom_scale_and_equivalence_with_padded():
    """Packed sequences == the padded op with a right-padding mask, on the real rows."""
    lengths, H, D, scale = [4, 1, 6], 2, 8, 0.7
    T, B, L = sum(lengths), len(lengths), max(lengths)
    q, k, v = (randn(T, H, D, dtype=F64, seed=s) for s in (1, 2, 3))
    out = ak.varlen_attention(q, k, v, _cu(lengths), L, scale=scale, backend=REF)
    assert_close64(out, varlen_formula(q, k, v, lengths, scale), F64)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    pad = lambda t: torch.zeros(B * L, H, D, dtype=F64).index_copy(0, idx, t).reshape(B, L, H, D)
    qp, kp, vp = (pad(t).transpose(1, 2) for t in (q, k, v))
    padded = ak.attention(qp, kp, vp, key_padding_mask=mask, scale=scale, backend=REF)
    torch.testing.assert_close(padded.transpose(1, 2).reshape(B * L, H, D)[idx], out)


def test_varlen_attention_sequences_do_not_see_each_other():
    lengths, H, D = [3, 4], 1, 8
    q, k, v = (randn(7, H, D, seed=s) for s in (1, 2, 3))
    a = ak.varlen_attention(q, k, v, _cu(lengths), 4, backend=REF)
    k2, v2 = k.clone(), v.clone()
    k2[3:] += 5.0
    v2[3:] -= 9.0
    b = ak.varlen_attention(q, k2, v2, _cu(lengths), 4, backend=REF)
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3:], b[3:])


# ---------------------------------------------------------------------------------------------
# add_layer_norm
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("shape", [(4, 64), (5, 100), (3, 37), (2, 3, 37), (1, 1000), (0, 16)],
                         ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_add_layer_norm_matches_formula(shape, dtype):
    x, r, w, b = ln_inputs(shape, dtype)
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    assert out.shape == shape and out.dtype == dtype
    gold = layer_norm_formula(x.to(F64) + r.to(F64), w, b, 1e-12)
    assert_close64(out, gold, dtype)


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.5])
def test_add_layer_norm_eps_inside_sqrt(eps):
    """eps is added to the biased variance: visible when the variance is small."""
    x, r, w, b = ln_inputs((3, 40), F64)
    x = x * 1e-2
    r = r * 1e-2
    out = ak.add_layer_norm(x, r, w, b, eps, backend=REF)
    assert_close64(out, layer_norm_formula(x + r, w, b, eps), F64)


def test_add_layer_norm_constant_row_gives_bias():
    x, r, w, b = ln_inputs((2, 24), torch.float32)
    x[0] = 3.25
    r[0] = -1.0
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    torch.testing.assert_close(out[0], b)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(6, 64), (4, 100), (2, 3, 1000)], ids=str)
def test_add_layer_norm_low_precision_stats_in_fp32(dtype, shape):
    """fp16/bf16 in -> same dtype out; normalisation as in fp32, then one rounding to dtype.

    The sum x + residual is formed in fp32 (never rounded to the input dtype), then
    the statistics are exact to well under one output ulp, so the result is within one ulp of
    dtype of the float64 formula on the exact sum.
    """
    x, r, w, b = ln_inputs(shape, dtype)
    # A large common offset makes low-precision statistics (sum of squares in fp16) visibly wrong.
    x = (x.to(F64) + 40.0).to(dtype)
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    assert out.dtype == dtype and out.shape == shape
    gold = layer_norm_formula(x.to(F64) + r.to(F64), w, b, 1e-12)   # x + r is exact in fp32
    err = (out.to(F64) - gold).abs()
    # atol: fp32 statistics of values around 40 are good to a few 1e-6
    assert bool((err <= machine_eps(dtype) * gold.abs() + 2e-5).all()), float(err.max())


def test_add_layer_norm_non_contiguous():
    x, r, w, b = ln_inputs((5, 48), torch.float32)
    wide = randn(5, 56, seed=9)
    xs = wide[:, :48]
    assert not xs.is_contiguous()
    out = ak.add_layer_norm(xs, r, w, b, backend=REF)
    assert_close64(out, layer_norm_formula(xs.to(F64) + r.to(F64), w, b, 1e-12), torch.float32)


# ---------------------------------------------------------------------------------------------
# linear_gelu and gelu_ffn
# ---------------------------------------------------------------------------------------------

def _lin_inputs(lead, K, N, dtype, seed=0):
    x = randn(*lead, K, dtype=dtype, seed=seed)
    w = randn(N, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    b = randn(N, dtype=dtype, seed=seed + 2, scale=0.1)
    return x, w, b


def test_gelu_formulas_differ_and_match_known_values():
    """Sanity of the test's own formulas: GELU(1) = 0.8413447..., tanh form close but not equal."""
    one = torch.tensor([1.0], dtype=F64)
    assert abs(float(gelu_erf_formula(one)) - 0.8413447460685429) < 1e-15
    assert abs(float(gelu_tanh_formula(one)) - 0.8411919906082768) < 1e-12


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [F64, torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("lead", [(7,), (2, 3), (0,)], ids=str)
def test_linear_gelu_matches_formula(lead, dtype, approximate):
    x, w, b = _lin_inputs(lead, 24, 40, dtype)
    out = ak.linear_gelu(x, w, b, approximate=approximate, backend=REF)
    assert out.shape == (*lead, 40) and out.dtype == dtype
    assert_close64(out, linear_gelu_formula(x, w, b, approximate), dtype)


def test_linear_gelu_default_is_tanh_and_forms_differ():
    x, w, b = _lin_inputs((16,), 8, 12, F64)
    x = x * 3  # large enough |h| that the two forms differ measurably
    default = ak.linear_gelu(x, w, b, backend=REF)
    assert_close64(default, linear_gelu_formula(x, w, b, "tanh"), F64)
    erf = ak.linear_gelu(x, w, b, approximate="none", backend=REF)
    assert (default - erf).abs().max() > 1e-6


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [F64, torch.float32] + LOW, ids=str)
def test_gelu_ffn_matches_formula(dtype, approximate):
    H, I = 20, 36
    x = randn(2, 5, H, dtype=dtype, seed=1)
    w1 = randn(I, H, dtype=dtype, seed=2, scale=H ** -0.5)
    b1 = randn(I, dtype=dtype, seed=3, scale=0.1)
    w2 = randn(H, I, dtype=dtype, seed=4, scale=I ** -0.5)
    b2 = randn(H, dtype=dtype, seed=5, scale=0.1)
    out = ak.gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, backend=REF)
    assert out.shape == (2, 5, H) and out.dtype == dtype
    assert_close64(out, gelu_ffn_formula(x, w1, b1, w2, b2, approximate), dtype)


# ---------------------------------------------------------------------------------------------
# float64 everywhere and gradcheck
# ---------------------------------------------------------------------------------------------

def test_float64_works_everywhere():
    q = randn(1, 2, 3, 4, dtype=F64)
    assert ak.attention(q, q, q, backend=REF).dtype == F64
    qp = randn(3, 2, 4, dtype=F64)
    assert ak.varlen_attention(qp, qp, qp, _cu([1, 2]), 2, backend=REF).dtype == F64
    x, r, w, b = ln_inputs((2, 8), F64)
    assert ak.add_layer_norm(x, r, w, b, backend=REF).dtype == F64
    assert ak.linear_gelu(x, w[None].expand(3, 8).contiguous(), b[:3], backend=REF).dtype == F64
    w1 = randn(6, 8, dtype=F64)
    assert ak.gelu_ffn(x, w1, b[:6], w1.t().contiguous(), b, backend=REF).dtype == F64




@pytest.mark.parametrize("mask_kind", [None, "right", "all_pad_row"])
def test_gradcheck_attention(mask_kind):
    B, H, L, D = 2, 1, 3, 4
    q, k, v = (leaf(B, H, L, D, seed=s) for s in (1, 2, 3))
    mask = make_mask(mask_kind, B, L, seed=1)
    fn = lambda q, k, v: ak.attention(q, k, v, key_padding_mask=mask, scale=0.6, backend=REF)
    assert gradcheck(fn, (q, k, v))


def test_gradcheck_varlen_attention_with_empty_sequence():
    lengths = [2, 0, 3]
    q, k, v = (leaf(5, 1, 4, seed=s) for s in (1, 2, 3))
    fn = lambda q, k, v: ak.varlen_attention(q, k, v, _cu(lengths), 3, backend=REF)
    assert gradcheck(fn, (q, k, v))


def test_gradcheck_add_layer_norm():
    x, r = leaf(2, 2, 5, seed=1), leaf(2, 2, 5, seed=2)
    w, b = leaf(5, seed=3), leaf(5, seed=4)
    fn = lambda x, r, w, b: ak.add_layer_norm(x, r, w, b, 1e-5, backend=REF)
    assert gradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_linear_gelu_and_gelu_ffn(approximate):
    x, w1, b1 = leaf(3, 4, seed=1), leaf(5, 4, seed=2), leaf(5, seed=3)
    w2, b2 = leaf(4, 5, seed=4), leaf(4, seed=5)
    lg = lambda x, w, b: ak.linear_gelu(x, w, b, approximate=approximate, backend=REF)
    assert gradcheck(lg, (x, w1, b1))
    ffn = lambda *a: ak.gelu_ffn(*a, approximate=approximate, backend=REF)
    assert gradcheck(ffn, (x, w1, b1, w2, b2))
