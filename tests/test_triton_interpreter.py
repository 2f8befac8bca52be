"""Multi-block paths of the Triton kernels under the interpreter (CPU, no GPU).

The quick cases of tools/cases.py fit in one block per program (L <= 16, a single GEMM tile), so
they never run the online-softmax rescaling across key blocks, the skip of leading padding blocks
(left padding), dK/dV loops over several query blocks, multi-tile GEMMs with a K loop, or the
grouped tile order. These medium cases from the shared list do, at a few seconds each. On a GPU
test_ops.py runs every case, these included, so this file is for the interpreter only.
"""
import math

import pytest
import torch

from albert_kernels.backends import unavailable_reason
from albert_kernels.tools.cases import CASES, DTYPES, run_case

MULTI_BLOCK = [
    ("attention", "B2 H3 L113 D64 mask=right"),
    ("attention", "B2 H2 L128 D128 mask=left"),
    ("varlen_attention", "lengths=[113, 40, 1] H2 D64"),
    ("varlen_attention", "lengths=[77, 33] H2 D128"),
    ("add_layer_norm", "[17, 1000]"),
    ("linear_gelu", "[64, 256] -> 1000 none"),
]
SELECTED = [c for c in CASES if (c.op, c.name) in MULTI_BLOCK]


def test_the_selected_cases_exist():
    assert len(SELECTED) == len(MULTI_BLOCK), "a case named here is gone from tools/cases.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU test_ops.py runs every case")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", SELECTED, ids=[f"{c.op}:{c.name}" for c in SELECTED])
def test_multi_block_case_under_interpreter(case, dtype):
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(reason)
    results = run_case(case, "triton", DTYPES[dtype], "cpu")
    failed = {k: str(v) for k, v in results.items() if not v.ok}
    assert not failed, f"{case.op} {case.name} {dtype}: {failed}"


# ------------------------------------------------------------------------------------------------
# Attention dropout and separate query / key sequences, at the backend level (the contract's
# ``attention(q, k, v, key_padding_mask, scale, dropout_p)`` and ``varlen_attention(q, k, v,
# cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p)``). The mask a call
# drew is replayed from the same generator state with backends/dropout.py (draw_seed_offset +
# keep_mask), and an independent PyTorch attention computes with it: in float64 (gold) and in
# the candidate's dtype (base), for the error budget. Shapes span several key and query blocks.
# These run on a GPU too (the candidate on CUDA, the mask replayed from the CUDA generator).

from albert_kernels.backends import dropout  # noqa: E402
from albert_kernels.tools.budget import check_budget  # noqa: E402
from attention_helpers import dense_padded, dense_varlen  # noqa: E402  (the float64 dense attention)

FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rng_state():
    return torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()


def _set_rng_state(state):
    (torch.cuda.set_rng_state if DEVICE == "cuda" else torch.set_rng_state)(state)


@pytest.fixture(scope="module")
def triton_attention():
    reason = unavailable_reason("triton", DEVICE)
    if reason is not None:
        pytest.skip(reason)
    import importlib
    return importlib.import_module("albert_kernels.backends.triton.attention")


def _leaves(*tensors, dtype, device="cpu"):
    return [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in tensors]


def _check_fwd_bwd(run, ref, inputs, dtype, grad_out, what):
    """run(*leaves) with the candidate on DEVICE, ref(*leaves) on the CPU in float64 (gold) and in
    dtype (base)."""
    cand = _leaves(*inputs, dtype=dtype, device=DEVICE)
    gold = _leaves(*inputs, dtype=torch.float64)
    base = _leaves(*inputs, dtype=dtype)
    outs = [run(*cand), ref(*gold), ref(*base)]
    for o in outs:
        o.backward(grad_out.to(device=o.device, dtype=o.dtype))
    result = check_budget(outs[0], outs[2], outs[1], dtype)
    assert result.ok, f"{what} forward {dtype}: {result}"
    grad_scale = max(float(g.grad.abs().max()) for g in gold)
    for name, c, g, b in zip("qkv", cand, gold, base):
        result = check_budget(c.grad, b.grad, g.grad, dtype, scale=grad_scale)
        assert result.ok, f"{what} d{name} {dtype}: {result}"
    return outs[0], cand


def _replay_keep(state, p, *grid):
    """The keep mask (on the CPU) of the call made right after _set_rng_state(state)."""
    _set_rng_state(state)
    seed, offset = dropout.draw_seed_offset(torch.device(DEVICE), math.prod(grid))
    return dropout.keep_mask(seed, offset, p, *grid)


@pytest.mark.parametrize("dtype", list(FLOATS))
def test_attention_dropout_padded_matches_reference_given_its_mask(triton_attention, dtype):
    gen = torch.Generator().manual_seed(1)
    b, h, l, d, p = 2, 2, 40, 32, 0.3
    q, k, v = (torch.randn(b, h, l, d, generator=gen) for _ in range(3))
    grad_out = torch.randn(b, h, l, d, generator=gen)
    mask = torch.arange(l)[None, :] < torch.tensor([[l], [23]])
    run = lambda q, k, v: triton_attention.attention(q, k, v, mask.to(DEVICE), d ** -0.5, p)
    state = _rng_state()
    keep = _replay_keep(state, p, b, h, l, l)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03  # the keep rate
    _set_rng_state(state)  # the call draws the replayed (seed, offset)
    out, cand = _check_fwd_bwd(run, lambda q, k, v: dense_padded(q, k, v, mask, d ** -0.5, keep, p),
                               (q, k, v), FLOATS[dtype], grad_out, "padded")
    _set_rng_state(state)
    with torch.no_grad():
        assert torch.equal(run(*cand), out), "same generator state, different dropout"
        assert not torch.equal(run(*cand), out), "successive calls drew the same dropout"


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("dtype", list(FLOATS))
def test_varlen_separate_query_and_key_sequences(triton_attention, dtype, p):
    """Queries and keys of a sequence counted apart (cu_seqlens_q / cu_seqlens_k): more queries
    than keys (query-only tokens), a sequence with keys and no query, one with queries and no key
    (its rows and gradients are exactly 0), max_seqlen_q / _k above the longest (the dropout
    offsets use the given values), and key tokens after the last sequence holding NaN."""
    gen = torch.Generator().manual_seed(2)
    lq, lk, h, d = [5, 0, 37, 3, 2], [9, 4, 0, 40, 1], 2, 32
    cu_q = [0, *torch.tensor(lq).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(lk).cumsum(0).tolist()]
    max_q, max_k = max(lq) + 1, max(lk) + 2
    q = torch.randn(sum(lq), h, d, generator=gen)
    k, v = (torch.randn(sum(lk) + 3, h, d, generator=gen) for _ in range(2))
    k[sum(lk):], v[sum(lk):] = float("nan"), float("inf")  # belongs to no sequence
    grad_out = torch.randn(sum(lq), h, d, generator=gen)
    cu_q_t, cu_k_t = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k))
    run = lambda q, k, v: triton_attention.varlen_attention(q, k, v, cu_q_t, cu_k_t, max_q, max_k,
                                                             d ** -0.5, p)
    state = _rng_state()
    keep = _replay_keep(state, p, len(lq), h, max_q, max_k) if p > 0 else None
    _set_rng_state(state)
    real = sum(lk)  # the reference sees only the keys that belong to a sequence
    ref = lambda q, k, v: dense_varlen(q, k[:real], v[:real], cu_q, cu_k, d ** -0.5, keep, p)
    out, cand = _check_fwd_bwd(run, ref, (q, k, v), FLOATS[dtype], grad_out, f"varlen p={p}")
    no_key = slice(cu_q[2], cu_q[3])  # the sequence with 37 queries and no key
    assert out[no_key].abs().max() == 0 and cand[0].grad[no_key].abs().max() == 0
    assert cand[1].grad[cu_k[1]:cu_k[2]].abs().max() == 0  # keys no query sees


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_attention_nonfinite_padded_key_and_value_slots(triton_attention, dtype):
    """NaN / inf in masked key and value slots never reach a real row: output and gradients are
    within the budget of the reference and bit-identical to a run with zeros in those slots."""
    gen = torch.Generator().manual_seed(3)
    b, h, l, d = 2, 2, 40, 32
    q, k, v = (torch.randn(b, h, l, d, generator=gen) for _ in range(3))
    grad_out = torch.randn(b, h, l, d, generator=gen)
    mask = torch.arange(l)[None, :] < torch.tensor([[33], [7]])
    pad = ~mask[:, None, :, None].expand(b, h, l, d)
    run = lambda q, k, v: triton_attention.attention(q, k, v, mask.to(DEVICE), d ** -0.5, 0.0)
    ref = lambda q, k, v: dense_padded(q, k, v, mask, d ** -0.5, None, 0.0)
    results = []
    for k_pad, v_pad in ((float("nan"), float("-inf")), (0.0, 0.0)):
        kk, vv = k.masked_fill(pad, k_pad), v.masked_fill(pad, v_pad)
        out, cand = _check_fwd_bwd(run, ref, (q, kk, vv), FLOATS[dtype], grad_out, "nan slots")
        results.append([out, cand[0].grad] + [c.grad.masked_fill(pad, 0) for c in cand[1:]])
    for bad, clean in zip(*results):
        assert torch.equal(bad.cpu(), clean.cpu())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_attention_huge_scores_within_budget(triton_attention, dtype):
    """Scores far beyond exp's range (max |q.k| * scale ~ 7e3 in fp32, ~650 in fp16): forward and
    every gradient within the budget. (Before the row max and log2 of the row sum were saved
    apart, P was recomputed from the fp32 log-sum-exp, which rounds at the scores' magnitude, and
    only finiteness was asserted for the gradients.)"""
    gen = torch.Generator().manual_seed(4)
    b, h, l, d = 2, 2, 40, 32
    big = 30.0 if dtype == "float16" else 100.0
    q, k, v = (torch.randn(b, h, l, d, generator=gen) for _ in range(3))
    q, k = q * big / d ** 0.25, k * big / d ** 0.25
    mask = torch.arange(l)[None, :] < torch.tensor([[33], [7]])
    grad_out = torch.randn(b, h, l, d, generator=gen)
    run = lambda q, k, v: triton_attention.attention(q, k, v, mask.to(DEVICE), d ** -0.5, 0.0)
    ref = lambda q, k, v: dense_padded(q, k, v, mask, d ** -0.5, None, 0.0)
    _check_fwd_bwd(run, ref, (q, k, v), FLOATS[dtype], grad_out, "huge scores")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attention_forward_without_backward(triton_attention, dtype):
    """Without gradients the fp16/bf16 forward writes no o_lo (the output's rounding residual that
    the backward's delta reads): the output is bit for bit the one of a forward with gradients."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=gen).to(FLOATS[dtype]).to(DEVICE)
               for _ in range(3))
    mask = (torch.arange(40)[None, :] < torch.tensor([[33], [7]])).to(DEVICE)
    with torch.no_grad():
        plain = triton_attention.attention(q, k, v, mask, 32 ** -0.5, 0.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with_grad = triton_attention.attention(*leaves, mask, 32 ** -0.5, 0.0)
    assert torch.equal(plain, with_grad.detach())
