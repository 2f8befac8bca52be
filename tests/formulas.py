"""Independent float64 formulas and input helpers shared by the reference-backend, padding and
error-budget tests (tests/test_reference.py, tests/test_padding.py, tests/test_budget.py).

The formulas deliberately avoid the PyTorch functions the reference uses (softmax, matmul,
F.layer_norm, F.gelu, F.linear, index_select/index_put): they are the textbook definitions,
computed in float64, so that a bug shared by the reference and PyTorch's own op would still show.
"""
import math

import torch

REF = "reference"
F64 = torch.float64
LOW = [torch.float16, torch.bfloat16]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=generator(seed), dtype=F64) * scale).to(dtype)


def machine_eps(dtype):
    return torch.finfo(dtype).eps


def ln_inputs(shape, dtype, seed=0):
    n = shape[-1]
    x = randn(*shape, dtype=dtype, seed=seed)
    r = randn(*shape, dtype=dtype, seed=seed + 1)
    w = (1 + 0.1 * randn(n, seed=seed + 2, dtype=F64)).to(dtype)
    b = randn(n, dtype=dtype, seed=seed + 3, scale=0.1)
    return x, r, w, b


def gradcheck(fn, inputs):
    """float64 gradcheck; fast mode (random projections of the Jacobian) keeps CI time small."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def leaf(*shape, seed, scale=1.0):
    return randn(*shape, dtype=F64, seed=seed, scale=scale).requires_grad_()


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
    g = generator(seed)
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
