"""Derivatives beyond the first and torch.func transforms through every backend's ops
(backends/higher_order.py): gradgradcheck in float64 on cpp and reference, torch.func.grad / vjp
against the reference, the triton ops (interpreter) against the reference in float32, and a
gradient penalty through AlbertModel equal on cpp and reference. Without the reference fallback
the cpp and triton double backwards were silently zero and torch.func raised.
"""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import albert_kernels as ak
from albert_kernels.backends import reference as R

F64 = torch.float64


def _randn(*shape, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()


def _cases(dtype=F64):
    """{op: (a function of a backend module, its differentiable inputs)}; head dim 8 and
    lengths that the Triton interpreter accepts."""
    r = lambda *shape, seed: _randn(*shape, dtype=dtype, seed=seed)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    return {
        "add_layer_norm": (lambda m: lambda x, res, w, b: m.add_layer_norm(x, res, w, b, 1e-5),
                           (r(3, 8, seed=1), r(3, 8, seed=2), r(8, seed=3), r(8, seed=4))),
        "linear_gelu": (lambda m: lambda x, w, b: m.linear_gelu(x, w, b, "tanh"),
                        (r(3, 8, seed=1), r(16, 8, seed=2), r(16, seed=3))),
        "gelu_ffn": (lambda m: lambda x, w1, b1, w2, b2: m.gelu_ffn(x, w1, b1, w2, b2, "none"),
                     (r(3, 8, seed=1), r(16, 8, seed=2), r(16, seed=3), r(8, 16, seed=4),
                      r(8, seed=5))),
        "attention": (lambda m: lambda q, k, v: m.attention(q, k, v, mask, 0.5),
                      (r(2, 2, 4, 8, seed=1), r(2, 2, 4, 8, seed=2), r(2, 2, 4, 8, seed=3))),
        "varlen_attention": (lambda m: lambda q, k, v: m.varlen_attention(q, k, v, cu, cu, 3, 3,
                                                                          0.5),
                             (r(5, 2, 8, seed=1), r(5, 2, 8, seed=2), r(5, 2, 8, seed=3))),
    }


OPS = list(_cases())


def _module(backend, request):
    if backend == "reference":
        return R
    request.getfixturevalue("cpu_backend")
    from albert_kernels.backends.extension import ops
    return ops


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("op", OPS)
def test_gradgradcheck(op, backend, request):
    make, args = _cases()[op]
    fn = make(_module(backend, request))
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_and_vjp(op, backend, request):
    make, args = _cases()[op]
    fn, ref = make(_module(backend, request)), make(R)
    args = [a.detach() for a in args]
    argnums = tuple(range(len(args)))
    loss = lambda f: (lambda *a: f(*a).pow(2).sum())
    got = torch.func.grad(loss(fn), argnums=argnums)(*args)
    expected = torch.func.grad(loss(ref), argnums=argnums)(*args)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    out, vjp = torch.func.vjp(fn, *args)
    cotangent = torch.ones_like(out)
    for g, e in zip(vjp(cotangent), torch.func.vjp(ref, *args)[1](cotangent)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _penalty_grads(fn, args):
    """d/d args of |d(sum fn(args)^2)/d args|^2: the gradients of a gradient penalty."""
    first = torch.autograd.grad(fn(*args).pow(2).sum(), args, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return torch.autograd.grad(penalty, args)


@pytest.mark.parametrize("op", OPS)
def test_triton_double_backward_matches_reference(op):
    """The triton ops (the interpreter without a GPU) in float32: the gradient penalty's
    gradients equal the reference's, not zeros; torch.func.grad runs."""
    triton_backend = pytest.importorskip("albert_kernels.backends.triton")
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and no Triton interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    make, args = _cases(torch.float32)[op]
    args = [a.detach().to(device).requires_grad_() for a in args]
    got = _penalty_grads(make(triton_backend), args)
    expected = _penalty_grads(make(R), args)
    for g, e in zip(got, expected):
        assert float(e.abs().max()) > 0
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)
    plain = [a.detach() for a in args]
    loss = lambda f: (lambda *a: f(*a).pow(2).sum())
    got = torch.func.grad(loss(make(triton_backend)))(*plain)
    torch.testing.assert_close(got, torch.func.grad(loss(make(R)))(*plain), rtol=1e-5,
                               atol=1e-5)


def test_gradient_penalty_through_albert_model(cpu_backend):
    """A gradient penalty (the parameters' gradient norm) through AlbertModel in float64: every
    parameter gets the reference backend's gradient on cpp, none is None or zero where the
    reference's is not."""
    cfg = ak.AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_attention_heads=2,
                          intermediate_size=24, num_hidden_layers=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    # a random projection of the outputs (the sum of squares of a LayerNorm output is nearly
    # constant, which would make the test ill-conditioned)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    pooled_weights = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    grads = {}
    for backend in ("reference", cpu_backend):
        torch.manual_seed(0)
        model = ak.AlbertModel(cfg, backend=backend).double().train()
        params = [p for p in model.parameters()]
        out = model(ids, mask)
        loss = (out.last_hidden_state * weights).sum() + (out.pooler_output * pooled_weights).sum()
        first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        penalty = sum(g.pow(2).sum() for g in first if g is not None)
        penalty.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    ref, got = grads["reference"], grads[cpu_backend]
    assert ref.keys() == got.keys()
    nonzero = 0
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)
        nonzero += bool(ref[name].abs().max() > 0)
    assert nonzero >= len(ref) - 2
