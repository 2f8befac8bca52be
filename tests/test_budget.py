"""The error budget helper (albert_kernels/tools/budget.py, docs/correctness.md) against results
whose verdict is known: correct results pass, injected errors, non-finite values and wrong
gradients fail."""
import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import Budget, check_budget, compare_op
from formulas import F64, REF, layer_norm_formula, ln_inputs, randn


def _ln_triplet():
    """base (fp32 reference), gold (fp64 reference) for one add_layer_norm problem."""
    x, r, w, b = ln_inputs((8, 64), torch.float32)
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
    return [randn(2, 2, 6, 8, dtype=dtype, seed=s).requires_grad_() for s in (1, 2, 3)]


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
