"""The reference backend against independent float64 formulas written out here, and the error
budget helper (docs/correctness.md) against results whose verdict is known.

The formulas below deliberately avoid the PyTorch functions the reference uses (softmax, matmul,
F.layer_norm, F.gelu, F.linear, index_select/index_put): they are the textbook definitions,
computed in float64, so that a bug shared by the reference and PyTorch's own op would still show.
"""
import math

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import Budget, check_budget, compare_op

REF = "reference"
F64 = torch.float64
LOW = [torch.float16, torch.bfloat16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale).to(dtype)


def _eps(dtype):
    return torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------
# Independent float64 formulas
# ---------------------------------------------------------------------------------------------

def attention_formula(q, k, v, mask=None, scale=None):
    """Row by row: s_j = scale * <q_i, k_j> over real keys, p = exp(s - max) / sum, out = sum p_j v_j.
    A row without any real key is zero."""
    q, k, v = (t.detach().to(F64) for t in (q, k, v))
    B, H, L, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, L, D, dtype=F64)
    for b in range(B):
        real = list(range(L)) if mask is None else [j for j in range(L) if bool(mask[b, j])]
        if not real:
            continue
        kr, vr = k[b][:, real], v[b][:, real]                         # [H, n, D]
        s = torch.einsum("hid,hjd->hij", q[b], kr) * scale            # [H, L, n]
        e = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        p = e / e.sum(dim=-1, keepdim=True)
        out[b] = torch.einsum("hij,hjd->hid", p, vr)
    return out


def varlen_formula(q, k, v, lengths, scale=None):
    """Each packed sequence through the padded formula on its own, [n, H, D] -> [1, H, n, D]."""
    out = torch.zeros(q.shape, dtype=F64)
    start = 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            qs, ks, vs = (t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out[sl] = attention_formula(qs, ks, vs, None, scale)[0].transpose(0, 1)
        start += n
    return out


def layer_norm_formula(s, weight, bias, eps):
    """(s - mean) / sqrt(biased var + eps) * w + b over the last dim, float64."""
    s, w, b = (t.detach().to(F64) for t in (s, weight, bias))
    n = s.shape[-1]
    mean = s.sum(dim=-1, keepdim=True) / n
    var = ((s - mean) ** 2).sum(dim=-1, keepdim=True) / n
    return (s - mean) / torch.sqrt(var + eps) * w + b


def gelu_tanh_formula(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def gelu_erf_formula(h):
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


GELU = {"tanh": gelu_tanh_formula, "none": gelu_erf_formula}


def linear_formula(x, w, b):
    x, w, b = (t.detach().to(F64) for t in (x, w, b))
    return torch.einsum("...k,nk->...n", x, w) + b


def linear_gelu_formula(x, w, b, approximate):
    return GELU[approximate](linear_formula(x, w, b))


def gelu_ffn_formula(x, w1, b1, w2, b2, approximate):
    h = linear_gelu_formula(x, w1, b1, approximate)
    w2, b2 = w2.detach().to(F64), b2.detach().to(F64)
    return torch.einsum("...i,hi->...h", h, w2) + b2


def make_mask(kind, B, L, seed=0):
    g = _gen(seed)
    if kind is None:
        return None
    if kind == "random":  # holes anywhere, not a prefix or suffix; row 0 kept non-empty
        m = torch.rand(B, L, generator=g) < 0.6
        m[0, 0] = True
        return m
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    if kind == "all_pad_row":
        lengths[1] = 0
    pos = torch.arange(L)
    if kind == "left":
        return pos[None, :] >= (L - lengths)[:, None]
    return pos[None, :] < lengths[:, None]     # "right" and "all_pad_row"


def assert_close64(actual, expected, dtype):
    """Tolerance by the dtype the op ran in: tight in float64, a few ulps of the inputs' dtype
    otherwise (low precision references round at every step)."""
    tol = {F64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(actual.detach().to(F64), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("mask_kind", [None, "right", "left", "random", "all_pad_row"])
def test_attention_matches_formula(mask_kind, dtype):
    B, H, L, D = 3, 2, 7, 16
    q, k, v = (_randn(B, H, L, D, dtype=dtype, seed=s) for s in (1, 2, 3))
    mask = make_mask(mask_kind, B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    assert torch.isfinite(out).all()
    assert_close64(out, attention_formula(q, k, v, mask), dtype)


def test_attention_all_padding_row_is_zero_not_nan_forward_and_backward():
    B, H, L, D = 2, 2, 5, 8
    q, k, v = (_randn(B, H, L, D, seed=s).requires_grad_() for s in (1, 2, 3))
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.backward(_randn(B, H, L, D, seed=4))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))  # no key: no dependence on q
    # Fully masked batch: every row zero.
    out = ak.attention(q, k, v, key_padding_mask=torch.zeros(B, L, dtype=torch.bool), backend=REF)
    assert torch.equal(out, torch.zeros_like(out))


def test_attention_masked_keys_get_zero_weight():
    """Changing k or v at padded positions must not change anything."""
    B, H, L, D = 2, 2, 6, 8
    q, k, v = (_randn(B, H, L, D, seed=s) for s in (1, 2, 3))
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
    q, k, v = (_randn(B, H, L, D, dtype=F64, seed=s) for s in (1, 2, 3))
    mask = make_mask("right", B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, scale=scale, backend=REF)
    assert_close64(out, attention_formula(q, k, v, mask, scale), F64)
    # and it differs from the default scale, so the argument is really used
    default = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert not torch.allclose(out, default)


def test_attention_single_token():
    q, k, v = (_randn(1, 1, 1, 64, seed=s) for s in (1, 2, 3))
    out = ak.attention(q, k, v, backend=REF)
    torch.testing.assert_close(out, v)   # one key: weight 1
    assert_close64(out, attention_formula(q, k, v), torch.float32)


def test_attention_non_contiguous_inputs():
    B, H, L, D = 2, 3, 5, 8
    q, k, v = (_randn(B, L, H, D, seed=s).transpose(1, 2) for s in (1, 2, 3))
    assert not q.is_contiguous()
    mask = make_mask("left", B, L)
    out = ak.attention(q, k, v, key_padding_mask=mask, backend=REF)
    assert_close64(out, attention_formula(q, k, v, mask), torch.float32)


# ---------------------------------------------------------------------------------------------
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
    q, k, v = (_randn(T, H, D, dtype=dtype, seed=s) for s in (1, 2, 3))
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
    q, k, v = (_randn(T, H, D, dtype=F64, seed=s) for s in (1, 2, 3))
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
    q, k, v = (_randn(7, H, D, seed=s) for s in (1, 2, 3))
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

def _ln_inputs(shape, dtype, seed=0):
    n = shape[-1]
    x = _randn(*shape, dtype=dtype, seed=seed)
    r = _randn(*shape, dtype=dtype, seed=seed + 1)
    w = (1 + 0.1 * _randn(n, seed=seed + 2, dtype=F64)).to(dtype)
    b = _randn(n, dtype=dtype, seed=seed + 3, scale=0.1)
    return x, r, w, b


@pytest.mark.parametrize("shape", [(4, 64), (5, 100), (3, 37), (2, 3, 37), (1, 1000), (0, 16)],
                         ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_add_layer_norm_matches_formula(shape, dtype):
    x, r, w, b = _ln_inputs(shape, dtype)
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    assert out.shape == shape and out.dtype == dtype
    gold = layer_norm_formula(x.to(F64) + r.to(F64), w, b, 1e-12)
    assert_close64(out, gold, dtype)


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.5])
def test_add_layer_norm_eps_inside_sqrt(eps):
    """eps is added to the biased variance: visible when the variance is small."""
    x, r, w, b = _ln_inputs((3, 40), F64)
    x = x * 1e-2
    r = r * 1e-2
    out = ak.add_layer_norm(x, r, w, b, eps, backend=REF)
    assert_close64(out, layer_norm_formula(x + r, w, b, eps), F64)


def test_add_layer_norm_constant_row_gives_bias():
    x, r, w, b = _ln_inputs((2, 24), torch.float32)
    x[0] = 3.25
    r[0] = -1.0
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    torch.testing.assert_close(out[0], b)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [(6, 64), (4, 100), (2, 3, 1000)], ids=str)
def test_add_layer_norm_low_precision_stats_in_fp32(dtype, shape):
    """fp16/bf16 in -> same dtype out; normalisation as in fp32, then one rounding to dtype.

    The sum x + residual is formed in the input dtype (what plain PyTorch gives), then the
    statistics are exact to well under one output ulp, so the result is within one ulp of
    dtype of the float64 formula on that sum.
    """
    x, r, w, b = _ln_inputs(shape, dtype)
    # A large common offset makes low-precision statistics (sum of squares in fp16) visibly wrong.
    x = (x.to(F64) + 40.0).to(dtype)
    out = ak.add_layer_norm(x, r, w, b, backend=REF)
    assert out.dtype == dtype and out.shape == shape
    s = (x + r).to(F64)                      # the sum rounded in the input dtype
    gold = layer_norm_formula(s, w, b, 1e-12)
    err = (out.to(F64) - gold).abs()
    # atol: fp32 statistics of values around 40 are good to a few 1e-6
    assert bool((err <= _eps(dtype) * gold.abs() + 2e-5).all()), float(err.max())
    # and close to the formula on the exact sum too: the only extra error is rounding x + r
    # (|x + r| ~ 40: half an ulp is 16 eps, divided by std ~ 1.4) plus the output rounding.
    exact = layer_norm_formula(x.to(F64) + r.to(F64), w, b, 1e-12)
    torch.testing.assert_close(out.to(F64), exact, rtol=0, atol=32 * _eps(dtype))


def test_add_layer_norm_non_contiguous():
    x, r, w, b = _ln_inputs((5, 48), torch.float32)
    wide = _randn(5, 56, seed=9)
    xs = wide[:, :48]
    assert not xs.is_contiguous()
    out = ak.add_layer_norm(xs, r, w, b, backend=REF)
    assert_close64(out, layer_norm_formula(xs.to(F64) + r.to(F64), w, b, 1e-12), torch.float32)


# ---------------------------------------------------------------------------------------------
# linear_gelu and gelu_ffn
# ---------------------------------------------------------------------------------------------

def _lin_inputs(lead, K, N, dtype, seed=0):
    x = _randn(*lead, K, dtype=dtype, seed=seed)
    w = _randn(N, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    b = _randn(N, dtype=dtype, seed=seed + 2, scale=0.1)
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
    x = _randn(2, 5, H, dtype=dtype, seed=1)
    w1 = _randn(I, H, dtype=dtype, seed=2, scale=H ** -0.5)
    b1 = _randn(I, dtype=dtype, seed=3, scale=0.1)
    w2 = _randn(H, I, dtype=dtype, seed=4, scale=I ** -0.5)
    b2 = _randn(H, dtype=dtype, seed=5, scale=0.1)
    out = ak.gelu_ffn(x, w1, b1, w2, b2, approximate=approximate, backend=REF)
    assert out.shape == (2, 5, H) and out.dtype == dtype
    assert_close64(out, gelu_ffn_formula(x, w1, b1, w2, b2, approximate), dtype)


# ---------------------------------------------------------------------------------------------
# unpad / pad
# ---------------------------------------------------------------------------------------------

def unpad_loops(hidden, mask):
    B, L = mask.shape
    rows, indices, cu, longest = [], [], [0], 0
    for b in range(B):
        n = 0
        for l in range(L):
            if bool(mask[b, l]):
                rows.append(hidden[b, l])
                indices.append(b * L + l)
                n += 1
        cu.append(cu[-1] + n)
        longest = max(longest, n)
    packed = torch.stack(rows) if rows else hidden.new_zeros(0, *hidden.shape[2:])
    return packed, indices, cu, longest


def pad_loops(packed, indices, B, L):
    out = [[None] * L for _ in range(B)]
    for row, i in zip(packed, indices):
        out[i // L][i % L] = row
    zero = packed.new_zeros(packed.shape[1:])
    return torch.stack([torch.stack([r if r is not None else zero for r in line]) for line in out]) \
        if B and L else packed.new_zeros(B, L, *packed.shape[1:])


MASKS = ["right", "left", "random", "all_pad_row", "none_real", "all_real"]


def _padding_mask(kind, B, L):
    if kind == "none_real":
        return torch.zeros(B, L, dtype=torch.bool)
    if kind == "all_real":
        return torch.ones(B, L, dtype=torch.bool)
    return make_mask(kind, B, L, seed=3)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8], ids=str)
@pytest.mark.parametrize("kind", MASKS)
def test_unpad_pad_match_loops(kind, mask_dtype):
    B, L = 3, 6
    hidden = _randn(B, L, 5, seed=1)
    bool_mask = _padding_mask(kind, B, L)
    mask = bool_mask.to(mask_dtype)
    packed, indices, cu, max_seqlen = ak.unpad(hidden, mask)
    e_packed, e_idx, e_cu, e_max = unpad_loops(hidden, bool_mask)
    assert torch.equal(packed, e_packed)
    assert indices.dtype == torch.int64 and indices.tolist() == e_idx
    assert cu.dtype == torch.int32 and cu.tolist() == e_cu
    assert isinstance(max_seqlen, int) and max_seqlen == e_max
    back = ak.pad(packed, indices, B, L)
    assert torch.equal(back, pad_loops(packed, e_idx, B, L))
    # round trip: real rows come back, padded rows are zero
    assert torch.equal(back, hidden * bool_mask[..., None])


def test_unpad_pad_more_trailing_dims_and_float64():
    B, L = 2, 5
    hidden = _randn(B, L, 3, 4, dtype=F64, seed=2)
    mask = _padding_mask("random", B, L)
    packed, indices, cu, m = ak.unpad(hidden, mask)
    assert packed.dtype == F64 and packed.shape == (int(mask.sum()), 3, 4)
    back = ak.pad(packed, indices, B, L)
    assert back.dtype == F64
    assert torch.equal(back, hidden * mask[..., None, None])


def test_unpad_pad_output_feeds_varlen_attention():
    """cu_seqlens / max_seqlen from unpad are valid varlen_attention arguments."""
    B, L, H, D = 3, 6, 2, 4
    mask = _padding_mask("all_pad_row", B, L)
    q = _randn(B, L, H, D, dtype=F64, seed=1)
    packed, indices, cu, m = ak.unpad(q, mask)
    out = ak.varlen_attention(packed, packed, packed, cu, m, backend=REF)
    lengths = mask.sum(1).tolist()
    assert_close64(out, varlen_formula(packed, packed, packed, lengths), F64)


def test_unpad_pad_gradients_flow():
    B, L = 3, 5
    mask = _padding_mask("random", B, L)
    hidden = _randn(B, L, 4, dtype=F64, seed=1).requires_grad_()
    packed, indices, _, _ = ak.unpad(hidden, mask)
    g = _randn(*packed.shape, dtype=F64, seed=2)
    packed.backward(g)
    assert torch.equal(hidden.grad, ak.pad(g, indices, B, L))      # scatter of the gradient
    assert torch.equal(hidden.grad[~mask], torch.zeros_like(hidden.grad[~mask]))

    p = packed.detach().clone().requires_grad_()
    out = ak.pad(p, indices, B, L)
    go = _randn(B, L, 4, dtype=F64, seed=3)
    out.backward(go)
    assert torch.equal(p.grad, go.reshape(B * L, 4)[indices])      # gather of the gradient


# ---------------------------------------------------------------------------------------------
# float64 everywhere and gradcheck
# ---------------------------------------------------------------------------------------------

def test_float64_works_everywhere():
    q = _randn(1, 2, 3, 4, dtype=F64)
    assert ak.attention(q, q, q, backend=REF).dtype == F64
    qp = _randn(3, 2, 4, dtype=F64)
    assert ak.varlen_attention(qp, qp, qp, _cu([1, 2]), 2, backend=REF).dtype == F64
    x, r, w, b = _ln_inputs((2, 8), F64)
    assert ak.add_layer_norm(x, r, w, b, backend=REF).dtype == F64
    assert ak.linear_gelu(x, w[None].expand(3, 8).contiguous(), b[:3], backend=REF).dtype == F64
    w1 = _randn(6, 8, dtype=F64)
    assert ak.gelu_ffn(x, w1, b[:6], w1.t().contiguous(), b, backend=REF).dtype == F64


def gradcheck(fn, inputs):
    """float64 gradcheck; fast mode (random projections of the Jacobian) keeps CI time small."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _leaf(*shape, seed, scale=1.0):
    return _randn(*shape, dtype=F64, seed=seed, scale=scale).requires_grad_()


@pytest.mark.parametrize("mask_kind", [None, "right", "all_pad_row"])
def test_gradcheck_attention(mask_kind):
    B, H, L, D = 2, 1, 3, 4
    q, k, v = (_leaf(B, H, L, D, seed=s) for s in (1, 2, 3))
    mask = make_mask(mask_kind, B, L, seed=1)
    fn = lambda q, k, v: ak.attention(q, k, v, key_padding_mask=mask, scale=0.6, backend=REF)
    assert gradcheck(fn, (q, k, v))


def test_gradcheck_varlen_attention_with_empty_sequence():
    lengths = [2, 0, 3]
    q, k, v = (_leaf(5, 1, 4, seed=s) for s in (1, 2, 3))
    fn = lambda q, k, v: ak.varlen_attention(q, k, v, _cu(lengths), 3, backend=REF)
    assert gradcheck(fn, (q, k, v))


def test_gradcheck_add_layer_norm():
    x, r = _leaf(2, 2, 5, seed=1), _leaf(2, 2, 5, seed=2)
    w, b = _leaf(5, seed=3), _leaf(5, seed=4)
    fn = lambda x, r, w, b: ak.add_layer_norm(x, r, w, b, 1e-5, backend=REF)
    assert gradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_linear_gelu_and_gelu_ffn(approximate):
    x, w1, b1 = _leaf(3, 4, seed=1), _leaf(5, 4, seed=2), _leaf(5, seed=3)
    w2, b2 = _leaf(4, 5, seed=4), _leaf(4, seed=5)
    lg = lambda x, w, b: ak.linear_gelu(x, w, b, approximate=approximate, backend=REF)
    assert gradcheck(lg, (x, w1, b1))
    ffn = lambda *a: ak.gelu_ffn(*a, approximate=approximate, backend=REF)
    assert gradcheck(ffn, (x, w1, b1, w2, b2))


def test_gradcheck_unpad_pad():
    mask = _padding_mask("random", 2, 4)
    hidden = _leaf(2, 4, 3, seed=1)
    assert gradcheck(lambda h: ak.unpad(h, mask)[0], (hidden,))
    _, indices, _, _ = ak.unpad(hidden.detach(), mask)
    packed = _leaf(int(mask.sum()), 3, seed=2)
    assert gradcheck(lambda p: ak.pad(p, indices, 2, 4), (packed,))


# ---------------------------------------------------------------------------------------------
# The error budget helper
# ---------------------------------------------------------------------------------------------

def _ln_triplet():
    """base (fp32 reference), gold (fp64 reference) for one add_layer_norm problem."""
    x, r, w, b = _ln_inputs((8, 64), torch.float32)
    base = ak.add_layer_norm(x, r, w, b, backend=REF)
    gold = ak.add_layer_norm(*(t.to(F64) for t in (x, r, w, b)), backend=REF)
    return (x, r, w, b), base, gold


def test_check_budget_passes_correct_fp32_results():
    args, base, gold = _ln_triplet()
    # the reference itself, the rounded gold, and an independent fp32 evaluation of the formula
    for cand in (base, gold.float(), layer_norm_formula(args[0].double() + args[1].double(),
                                                        *args[2:], 1e-12).float()):
        res = check_budget(cand, base, gold)
        assert isinstance(res, Budget)
        assert res.ok, str(res)
        assert res.error <= res.budget and not res.nonfinite
    assert res.budget > 0


def test_check_budget_fails_injected_error():
    _, base, gold = _ln_triplet()
    budget = check_budget(base, base, gold).budget
    cand = base.clone()
    cand[3, 7] += 10 * budget
    res = check_budget(cand, base, gold)
    assert not res.ok and not res.nonfinite
    assert res.error > res.budget and res.ratio > 1
    assert "FAIL" in str(res)
    # just inside the budget still passes
    cand = gold.clone()
    cand[3, 7] += 0.9 * budget
    assert check_budget(cand.float(), base, gold, torch.float32).ok


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_budget_fails_nonfinite_where_gold_is_finite(bad):
    _, base, gold = _ln_triplet()
    cand = base.clone()
    cand[0, 0] = bad
    res = check_budget(cand, base, gold)
    assert not res.ok and res.nonfinite


def test_check_budget_nonfinite_gold_must_be_matched():
    gold = torch.tensor([1.0, float("inf"), float("nan")], dtype=F64)
    base = gold.float()
    assert check_budget(base.clone(), base, gold).ok
    cand = base.clone()
    cand[1] = 3.0
    assert not check_budget(cand, base, gold).ok
    cand = base.clone()
    cand[1] = float("-inf")
    assert not check_budget(cand, base, gold).ok


def test_check_budget_floor_keeps_zero_budget_from_failing_exact_results():
    # An exact op: base == gold bit for bit, so 2 * |base - gold| is zero.
    gold = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -4.0]], dtype=F64)
    base = gold.float()
    res = check_budget(base, base, gold)
    assert res.ok and res.error == 0 and res.budget > 0
    # one ulp off (what a differently ordered but correct kernel may give) is inside the floor
    cand = base.clone()
    cand[1, 2] = torch.nextafter(cand[1, 2], torch.tensor(0.0))
    res = check_budget(cand, base, gold)
    assert res.error > 0 and res.ok, str(res)
    # an all-zero result: the floor is positive even then, and an exact zero passes
    zeros = torch.zeros(4, dtype=F64)
    res = check_budget(zeros.half(), zeros.half(), zeros)
    assert res.ok and res.budget > 0
    # but the floor is only a few ulps: 100 ulps off fails
    cand = base.clone()
    cand[1, 2] += 100 * torch.finfo(torch.float32).eps * 4
    assert not check_budget(cand, base, gold).ok


def test_check_budget_shape_mismatch_is_an_error():
    _, base, gold = _ln_triplet()
    with pytest.raises(ValueError, match="shape"):
        check_budget(base[:-1], base, gold)


def _attn_args(dtype=torch.float32):
    return [_randn(2, 2, 6, 8, dtype=dtype, seed=s).requires_grad_() for s in (1, 2, 3)]


def _ref_attention(q, k, v):
    return ak.attention(q, k, v, backend=REF)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compare_op_passes_the_reference_itself(dtype):
    res = compare_op(_ref_attention, _ref_attention, _attn_args(dtype))
    assert set(res) == {"out", "grad0", "grad1", "grad2"}
    assert all(r.ok for r in res.values()), {k: str(v) for k, v in res.items()}


def test_compare_op_flags_wrong_scale_on_output_and_gradients():
    D = 8
    wrong = lambda q, k, v: ak.attention(q, k, v, scale=0.5 * D ** -0.5, backend=REF)
    res = compare_op(wrong, _ref_attention, _attn_args())
    assert not res["out"].ok
    assert not res["grad0"].ok and not res["grad1"].ok and not res["grad2"].ok


class _WrongBackward(torch.autograd.Function):
    """Right forward (the reference), gradient of v off by 1 %."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            out = _ref_attention(q_, k_, v_)
        ctx.saved = (q_, k_, v_, out)
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        q_, k_, v_, out = ctx.saved
        with torch.enable_grad():
            dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), g)
        return dq, dk, dv * 1.01


def test_compare_op_flags_a_wrong_gradient_only():
    res = compare_op(_WrongBackward.apply, _ref_attention, _attn_args())
    assert res["out"].ok and res["grad0"].ok and res["grad1"].ok
    assert not res["grad2"].ok


def test_compare_op_forward_only():
    wrong = lambda q, k, v: ak.attention(q, k, v, scale=1.0, backend=REF)
    res = compare_op(wrong, _ref_attention, _attn_args(), backward=False)
    assert set(res) == {"out"} and not res["out"].ok
