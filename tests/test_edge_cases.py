"""Numerical robustness: every op x backend x dtype, forward and backward, on inputs at
the edges of their valid range, held to the error budget against float64 (tools/budget.py).

- the named cases of albert_kernels/tools/edge_cases.py (also `albert-kernels verify`'s "edge"
  group), on every backend that runs here: reference (whose NaN/inf where float64 is finite
  fails the budget check too), cpp, and triton under the interpreter;
- property-based tests (hypothesis, small example counts) drawing the same distributions;
- the values of the issue as explicit regression tests: constant LayerNorm rows must give exactly
  the bias, the tanh-GELU gradient at 100, 300, 1000, 1e4 must be 1, NaN / inf in padded key and
  value slots must not reach a real row.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import albert_kernels as ak
from albert_kernels.backends import backend_names, unavailable_reason
from albert_kernels.tools.edge_cases import (DTYPES, EDGE_CASES, EdgeInputs, attention_inputs,
                                             compare_inputs, edge_case_applies, gelu_inputs,
                                             known_broken, layer_norm_inputs, run_edge_case,
                                             score_amplitude, varlen_inputs)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [(b, d) for b in backend_names() for d in DEVICES if not (b == "reference" and d != "cpu")]
IDS = [f"{b}-{d}" for b, d in BACKENDS]


def _skip_unless_runs(backend: str, device: str) -> None:
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)


def _assert_ok(results, what: str) -> None:
    failed = {k: str(v) for k, v in results.items() if not v.ok}
    assert not failed, f"{what}: {failed}"


# ---------------------------------------------------------------------------------------------
# Named edge cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", EDGE_CASES, ids=[f"{c.op}:{c.name}" for c in EDGE_CASES])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_edge_case_within_budget(backend, device, case, dtype, request):
    _skip_unless_runs(backend, device)
    if not edge_case_applies(case, dtype):
        pytest.skip(f"{case.name} does not apply to {dtype}")
    broken = known_broken(backend, case, dtype)
    if broken:  # strict: the test fails as soon as the kernel is fixed, to drop the entry
        request.applymarker(pytest.mark.xfail(strict=True, reason=broken))
    results = run_edge_case(case, backend, DTYPES[dtype], device)
    _assert_ok(results, f"{case.op} {case.name} {dtype} on {backend}/{device}")


# ---------------------------------------------------------------------------------------------
# Property-based: the same distributions, drawn
# ---------------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
dtype_st = st.sampled_from(list(DTYPES))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@SETTINGS
@given(dtype=dtype_st, rows=st.integers(1, 4), n=st.sampled_from([1, 7, 64, 100, 768]),
       offset=st.sampled_from([0.0, 1.0, -3.0, 100.0, 1e3, -1e4]),
       spread=st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 1e3]),
       residual=st.sampled_from(["zero", "random", "cancel", "same"]),
       affine=st.booleans(), sliced=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_layer_norm_drawn(backend, device, dtype, rows, n, offset, spread, residual, affine,
                          sliced, seed):
    _skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(seed)
    inputs = layer_norm_inputs(DTYPES[dtype], torch.device(device), gen, rows=rows, n=n,
                               offset=offset, spread=spread, residual=residual, affine=affine,
                               sliced=sliced)
    _assert_ok(compare_inputs("add_layer_norm", backend, inputs, seed=seed),
               f"add_layer_norm {dtype} offset {offset} spread {spread} {residual}")


_edge_values = st.sampled_from([0.0, 1e-30, -1e-20, 1e-5, 3.0, -7.5, 12.0, -25.0, 100.0, -300.0,
                                1e3, -1e4, 6e4, -6e4, 1e10, -1e20, 3e38, -3e38])
gelu_value_st = st.one_of(st.floats(-40.0, 40.0, allow_nan=False), _edge_values)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@SETTINGS
@given(dtype=dtype_st, op=st.sampled_from(["linear_gelu", "gelu_ffn"]),
       approximate=st.sampled_from(["tanh", "none"]),
       values=st.lists(gelu_value_st, min_size=1, max_size=12), transposed=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_gelu_drawn(backend, device, dtype, op, approximate, values, transposed, seed):
    _skip_unless_runs(backend, device)
    dt = DTYPES[dtype]
    limit = 1e4 if op == "gelu_ffn" else torch.finfo(dt).max
    values = [max(-limit, min(limit, v)) for v in values]
    gen = torch.Generator().manual_seed(seed)
    inputs = gelu_inputs(op, dt, torch.device(device), gen, values, approximate,
                         transposed_x=transposed and op == "linear_gelu")
    _assert_ok(compare_inputs(op, backend, inputs, seed=seed),
               f"{op} {approximate} {dtype} values {values}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@SETTINGS
@given(dtype=dtype_st, seqlen=st.integers(1, 12), batch=st.integers(1, 3),
       fill=st.sampled_from(["nan", "inf", "-inf", None]), huge=st.booleans(),
       transposed=st.booleans(), head_dim=st.sampled_from([32, 64]), data=st.data())
def test_attention_drawn(backend, device, dtype, seqlen, batch, fill, huge, transposed, head_dim,
                         data):
    _skip_unless_runs(backend, device)
    lengths = data.draw(st.lists(st.integers(0, seqlen), min_size=batch, max_size=batch))
    seed = data.draw(st.integers(0, 2 ** 16))
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    inputs = attention_inputs(dt, torch.device(device), gen, lengths=lengths, seqlen=seqlen,
                              head_dim=head_dim, fill=fill, transposed=transposed,
                              amplitude=score_amplitude(dt) if huge else 1.0)
    _assert_ok(compare_inputs("attention", backend, inputs, seed=seed),
               f"attention {dtype} lengths {lengths} fill {fill} huge {huge}")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
@SETTINGS
@given(dtype=dtype_st, lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       fill=st.sampled_from(["nan", "inf", "-inf"]), huge=st.booleans(), data=st.data())
def test_varlen_attention_drawn(backend, device, dtype, lengths, fill, huge, data):
    _skip_unless_runs(backend, device)
    poisoned = data.draw(st.one_of(st.none(), st.integers(0, len(lengths) - 1)))
    seed = data.draw(st.integers(0, 2 ** 16))
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    inputs = varlen_inputs(dt, torch.device(device), gen, lengths=lengths, poisoned=poisoned,
                           fill=fill, amplitude=score_amplitude(dt) if huge else 1.0)
    _assert_ok(compare_inputs("varlen_attention", backend, inputs, seed=seed),
               f"varlen_attention {dtype} lengths {lengths} poisoned {poisoned} {fill}")


# ---------------------------------------------------------------------------------------------
# The values, as explicit regressions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_constant_rows_give_exactly_the_bias(backend, device):
    """x + r constant per row (0.3, 2.2, 9.7, and 1000 with r = -0.5), eps = 1e-12, N = 768:
    before the fix cpp gave b + 0.0595, b + 0.43, b + 0.886 for the first three."""
    _skip_unless_runs(backend, device)
    n = 768
    x = torch.tensor([0.3, 2.2, 9.7, 1000.0])[:, None].expand(4, n).contiguous().to(device)
    r = torch.zeros_like(x)
    r[3] = -0.5
    for w, b in ((torch.ones(n), torch.zeros(n)), (torch.rand(n) + 0.5, torch.randn(n))):
        y = ak.add_layer_norm(x, r, w.to(device), b.to(device), 1e-12, backend=backend)
        assert torch.equal(y, b.to(device).expand_as(y)), \
            f"{backend}: max |y - b| = {(y - b.to(device)).abs().max().item():.3g}"


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_layer_norm_backward_of_constant_rows(backend, device):
    """The backward of a constant row is finite and xhat = 0: grad_weight gets exactly 0."""
    _skip_unless_runs(backend, device)
    x = torch.full((3, 768), 2.2, device=device, requires_grad=True)
    r = torch.zeros(3, 768, device=device, requires_grad=True)
    w = torch.ones(768, device=device, requires_grad=True)
    b = torch.zeros(768, device=device, requires_grad=True)
    y = ak.add_layer_norm(x, r, w, b, 1e-12, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert torch.isfinite(dx).all()
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gelu_gradient_is_one_for_large_inputs(backend, device, approximate):
    """d gelu / dz at z = 100, 300, 1000, 1e4: cpp's tanh form gave 1.0128, 1.34, 13.76, 12760."""
    _skip_unless_runs(backend, device)
    z = torch.tensor([100.0, 300.0, 1000.0, 1e4], device=device, requires_grad=True)
    x = torch.randn(1, 8, device=device)
    w = torch.zeros(4, 8, device=device)
    y = ak.linear_gelu(x, w, z, approximate=approximate, backend=backend)
    (dz,) = torch.autograd.grad(y.sum(), z)
    assert torch.equal(y.detach()[0], z.detach())
    assert (dz - 1).abs().max().item() <= 1e-6, dz.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gelu_at_the_dtype_maximum(backend, device, approximate, dtype):
    """gelu(+-max) = max, -0 and gelu' = 1, 0: cpp's tanh form gave an inf gradient at the
    maximum and gelu(-bf16 max) = -6112."""
    _skip_unless_runs(backend, device)
    top = torch.finfo(dtype).max
    z = torch.tensor([top, -top], dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(1, 8, dtype=dtype, device=device)
    y = ak.linear_gelu(x, torch.zeros(2, 8, dtype=dtype, device=device), z,
                       approximate=approximate, backend=backend)
    (dz,) = torch.autograd.grad(y.sum(), z)
    assert y.detach()[0].float().tolist() == [top, 0.0]
    assert dz.float().tolist() == [1.0, 0.0]


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_padded_slots_never_reach_real_rows(backend, device, fill):
    """NaN / inf in padded k and v slots: the same output and gradients as with zeros there (the
    reference backend returned NaN on real rows before the fix)."""
    _skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(0)
    poisoned = attention_inputs(torch.float32, torch.device(device), gen, lengths=[8, 3, 0],
                                fill=fill)
    clean = [t.detach().clone() for t in poisoned.args]
    mask = poisoned.kwargs["key_padding_mask"]
    for t in clean[1:]:
        t.masked_fill_(~mask[:, None, :, None], 0.0)
    grads = []
    for args in (poisoned.args, [t.requires_grad_() for t in clean]):
        out = ak.attention(*args, key_padding_mask=mask, backend=backend)
        grads.append([out] + list(torch.autograd.grad(out.sum(), args)))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_attention_backward_when_every_score_is_very_negative(backend, device, varlen):
    """Every real score of a row ~ -128 (lse < -89) and fewer keys than the kernel's key tile:
    cpp's backward gave NaN dq, dk there (exp(0 - lse) of a zero-padded key column overflowed and
    was multiplied by dP = 0); triton's softmax rounded s * scale * log2(e) at |s| log2(e) ~ 185
    before the max was subtracted (P ~5e-6 off: out 7.9e-6, dv 2.6e-5 against budgets of 1.2e-6
    and 3.1e-6), and cuda's did the same (by reading; its SIMT kernels run this on a GPU). fp32,
    against float64, under the budget."""
    _skip_unless_runs(backend, device)
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 5]
    if varlen:
        inputs = varlen_inputs(torch.float32, torch.device(device), gen, lengths=lengths,
                               head_dim=64)
        q, k, v = (t.detach() for t in inputs.args[:3])
        shape_k = k.shape
    else:
        inputs = attention_inputs(torch.float32, torch.device(device), gen, lengths=lengths,
                                  seqlen=6, head_dim=64, fill="nan")
        q, k, v = (t.detach() for t in inputs.args)
        shape_k = k.shape
    # q = -4, k = 4 + n / 16 (n uniform in -8 .. 8) in each of 64 components, scale 1/8: every
    # score is -128 - sum(n) / 32, exact in fp32 whatever the order of the sums (so no backend
    # is off by the rounding of q.k itself), about one unit apart within a row (a softmax that is
    # not one-hot), and lse < -89 = ln(FLT_MIN): what broke, not the magnitude itself.
    q = torch.full_like(q, -4.0)
    n = torch.randint(-8, 9, shape_k, generator=gen).to(torch.float32).to(device)
    k = torch.where(torch.isfinite(k), 4.0 + n / 16, k)  # padded slots keep their NaN
    args = [t.clone().requires_grad_() for t in (q, k, v)] + list(inputs.args[3:])
    _assert_ok(compare_inputs("varlen_attention" if varlen else "attention", backend,
                              EdgeInputs(args, inputs.kwargs, inputs.rows)),
               f"{backend} all scores ~ -128")
