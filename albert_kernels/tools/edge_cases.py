"""Edge cases: every op on inputs at the edges of their valid range, held to the error budget.

The regular cases (tools/cases.py) draw well-behaved random inputs. These draw the ones that break
kernels in production (docs/correctness.md): constant and near-constant LayerNorm rows, large
common offsets, x + residual above the fp16 range, GELU far out in both tails and at the fp16 /
bf16 maxima, tiny magnitudes, NaN / inf in padded key and value slots (padded and varlen
attention), huge q.k scores, fully masked rows, non-contiguous layouts.

Every builder below is parameterised, so that the property-based tests (tests/test_edge_cases.py)
draw from the same distributions that the named cases of ``EDGE_CASES`` pin down; ``albert-kernels
verify`` reports the named cases as its "edge" group. ``run_edge_case`` compares a backend with
the reference, forward and backward, under the budget of tools/budget.py against float64 (the
reference upcast), on the rows of the output a case says are meaningful (a varlen sequence whose
keys are poisoned with NaN is NaN in float64 too; the other sequences must not notice it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .. import ops
from ..dtypes import DTYPES
from .budget import Budget, check_budget, forward_and_grads, upcast

FILLS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@dataclass(frozen=True)
class EdgeInputs:
    """Arguments of one op call. `rows`: compare only these indices along dim 0 of the output
    and of every gradient with the output's dim-0 length (None: compare everything).
    `grad_scale` multiplies the random upstream gradient: where the true gradient is huge
    (rstd = 1e6 for a constant LayerNorm row) it keeps it inside fp16's range, so that an inf
    there means a wrong kernel, not a gradient that fp16 cannot hold."""
    args: list
    kwargs: dict = field(default_factory=dict)
    rows: Optional[torch.Tensor] = None
    grad_scale: float = 1.0


@dataclass(frozen=True)
class EdgeCase:
    op: str          # a public op of albert_kernels.ops
    name: str
    make: Callable   # (dtype, device, generator) -> EdgeInputs
    dtypes: tuple = tuple(DTYPES)


def _leaf(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.to(dtype).to(device).requires_grad_()


# ---------------------------------------------------------------------------------------------
# add_layer_norm
# ---------------------------------------------------------------------------------------------

def layer_norm_inputs(dtype, device, gen, *, rows: int = 4, n: int = 768, offset: float = 0.0,
                      spread: float = 1.0, residual: str = "random", affine: bool = True,
                      sliced: bool = False) -> EdgeInputs:
    """x = offset + spread * N(0, 1) per element ([rows, n], eps 1e-12); residual: "zero",
    "random" (spread * N(0, 1)), "cancel" (-x + spread * N(0, 1): the sum is small, its parts
    huge) or "same" (x again: the sum doubles, above the fp16 range for an offset near 65504).
    affine=False: weight 1, bias 0 (a constant row must then give exactly 0). sliced: rows of a
    wider tensor (strided rows). Where a row's x + residual is (nearly) constant, rstd is up to
    1/sqrt(eps) = 1e6: in fp16 the upstream gradient is then scaled by 2^-10 (see EdgeInputs)."""
    width = n + 8 if sliced else n
    noise = lambda: torch.randn(rows, width, generator=gen, dtype=torch.float64)
    x64 = offset + spread * noise()
    r64 = {"zero": torch.zeros_like(x64), "random": spread * noise(),
           "cancel": -x64 + spread * noise(), "same": x64}[residual]
    x, r = (t.to(dtype)[:, :n].to(device) for t in (x64, r64))
    x.requires_grad_()
    r.requires_grad_()
    if affine:
        w = 1 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        b = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        w, b = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    s64 = x.detach().double() + r.detach().double()
    rstd_max = float((s64.var(dim=-1, unbiased=False) + 1e-12).rsqrt().max()) if rows else 1.0
    grad_scale = 2.0 ** -10 if dtype == torch.float16 and rstd_max > 1e3 else 1.0
    return EdgeInputs([x, r, _leaf(w, dtype, device), _leaf(b, dtype, device), 1e-12],
                      grad_scale=grad_scale)


def _ln(name, **kw) -> EdgeCase:
    return EdgeCase("add_layer_norm", name, lambda dt, dev, gen: layer_norm_inputs(dt, dev, gen, **kw))


def _constant_rows(dtype, device, gen) -> EdgeInputs:
    """Rows of 0.3, 2.2, 9.7 and 1000 (x; residual 0), w = 1, b = 0, N = 768, eps = 1e-12."""
    x = torch.tensor([0.3, 2.2, 9.7, 1000.0], dtype=torch.float64)[:, None].expand(4, 768)
    inp = layer_norm_inputs(dtype, device, gen, rows=4, residual="zero", affine=False, spread=0.0)
    inp.args[0] = _leaf(x.contiguous(), dtype, device)
    return inp


def _near_constant_rows(dtype, device, gen, offset: float = 1000.0) -> EdgeInputs:
    """offset + k ulps(offset) of the dtype, k uniform in [-8, 8]: a near-constant row that
    the dtype can hold, with a large common offset."""
    ulp = offset * torch.finfo(dtype).eps
    k = torch.randint(-8, 9, (4, 768), generator=gen).to(torch.float64)
    inp = layer_norm_inputs(dtype, device, gen, rows=4, residual="zero")
    inp.args[0] = _leaf(offset + k * ulp, dtype, device)
    return inp


def _layer_norm_cases() -> list[EdgeCase]:
    return [
        EdgeCase("add_layer_norm", "constant rows 0.3 2.2 9.7 1000, w=1 b=0", _constant_rows),
        EdgeCase("add_layer_norm", "near-constant rows, offset 1000", _near_constant_rows),
        EdgeCase("add_layer_norm", "near-constant rows, offset 30000",
                 lambda dt, dev, gen: _near_constant_rows(dt, dev, gen, 3e4)),
        _ln("offset 1e4, spread 1", offset=1e4),
        _ln("offset 100, spread 1e-3, sliced rows", offset=100.0, spread=1e-3, sliced=True),
        _ln("x + residual above 65504 (fp16 sum)", offset=3.5e4, spread=5e3, residual="same",
            n=96),
        _ln("x + residual cancelling at 3e4", offset=3e4, spread=1.0, residual="cancel", n=96),
        _ln("tiny 1e-20 (eps dominates)", spread=1e-20, n=100),
        _ln("fp16 subnormals 1e-6", spread=1e-6, n=100),
        EdgeCase("add_layer_norm", "huge spread (1e15; fp16 1e4)", lambda dt, dev, gen:
                 layer_norm_inputs(dt, dev, gen, spread=1e4 if dt == torch.float16 else 1e15,
                                   n=100)),
    ]


# ---------------------------------------------------------------------------------------------
# linear_gelu, gelu_ffn
# ---------------------------------------------------------------------------------------------

def gelu_inputs(op: str, dtype, device, gen, values: Sequence[float], approximate: str = "tanh",
                tokens: int = 3, transposed_x: bool = False) -> EdgeInputs:
    """Pre-activations exactly `values`: weight (w1) = 0 and bias (b1) = values, so the GEMM adds
    exact zeros; x [tokens, 8] random (transposed_x: a transposed view). gelu_ffn's w2 [8, N]
    scales the activations down to O(1) so its second GEMM stays inside the dtype."""
    vals = torch.tensor(list(values), dtype=torch.float64)
    n, k = vals.numel(), 8
    if transposed_x:
        x = torch.randn(k, tokens, generator=gen, dtype=torch.float64).to(dtype).to(device).t()
        x.requires_grad_()
    else:
        x = _leaf(torch.randn(tokens, k, generator=gen, dtype=torch.float64), dtype, device)
    args = [x, _leaf(torch.zeros(n, k, dtype=torch.float64), dtype, device),
            _leaf(vals, dtype, device)]
    if op == "gelu_ffn":
        top = float(vals.abs().max()) if n else 1.0
        w2 = torch.randn(k, n, generator=gen, dtype=torch.float64) / (n * max(1.0, top))
        args += [_leaf(w2, dtype, device), _leaf(0.1 * torch.randn(k, generator=gen), dtype, device)]
    return EdgeInputs(args, {"approximate": approximate})


def gelu_values(kind: str, dtype) -> list[float]:
    """Named sets of pre-activations, within what `dtype` can hold."""
    top = torch.finfo(dtype).max
    huge = [1e4, 1e6, 1e10, 1e20, 1e30] if dtype != torch.float16 else [1e3, 1e4, 3e4, 6e4]
    sets = {
        "issue": [100.0, 300.0, 1000.0, 1e4],
        "left tail": [-3.0 - 0.5 * i for i in range(35)],
        "right tail": [3.0 + 0.5 * i for i in range(35)],
        "huge": huge + [-v for v in huge],
        "dtype max": [top, -top, 0.99 * top, -0.99 * top, 1.0, -1.0],
        "tiny": [1e-30, -1e-30, 1e-20, -1e-20, 1e-10, -1e-10, 1e-5, -1e-5, 0.0]
        if dtype != torch.float16 else [6e-8, -6e-8, 1e-6, -1e-6, 1e-4, -1e-4, 0.0],
        "around 0": [0.0, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0],
    }
    return sets[kind]


def _gelu_case(op, kind, approximate, transposed_x=False, limit: Optional[float] = None):
    def make(dtype, device, gen):
        vals = gelu_values(kind, dtype)
        if limit is not None:
            vals = [v for v in vals if abs(v) <= limit]
        return gelu_inputs(op, dtype, device, gen, vals, approximate, transposed_x=transposed_x)
    name = f"{kind} {approximate}" + (" x transposed" if transposed_x else "")
    return EdgeCase(op, name, make)


def _empty_dim(op: str):
    """gelu_ffn with an empty intermediate dim (I = 0: out = b2, grad_b2 = sum of dy), or
    linear_gelu without input features (K = 0: pre = bias)."""
    def make(dtype, device, gen):
        rnd = lambda *shape: _leaf(torch.randn(*shape, generator=gen, dtype=torch.float64),
                                   dtype, device)
        if op == "gelu_ffn":
            return EdgeInputs([rnd(3, 8), rnd(0, 8), rnd(0), rnd(8, 0), rnd(8)], {"approximate": "tanh"})
        return EdgeInputs([rnd(3, 0), rnd(4, 0), rnd(4)], {"approximate": "none"})
    return EdgeCase(op, "empty intermediate (I = 0)" if op == "gelu_ffn" else "no input features (K = 0)", make)


def _gelu_cases() -> list[EdgeCase]:
    out = [_empty_dim("gelu_ffn"), _empty_dim("linear_gelu")]
    for approximate in ("tanh", "none"):
        out += [_gelu_case("linear_gelu", kind, approximate)
                for kind in ("issue", "left tail", "right tail", "huge", "dtype max", "tiny")]
        out.append(_gelu_case("linear_gelu", "around 0", approximate, transposed_x=True))
        out += [_gelu_case("gelu_ffn", kind, approximate, limit=1e4)
                for kind in ("issue", "left tail", "huge")]
    return out


# ---------------------------------------------------------------------------------------------
# attention, varlen_attention
# ---------------------------------------------------------------------------------------------

def _qkv(gen, shape, amplitude: float, dtype, device, transposed: bool):
    """q, k, v of `shape` ([B, H, L, D] or [T, H, D]); q and k times `amplitude`. transposed:
    [B, L, H, D] storage viewed as [B, H, L, D]."""
    out = []
    for i in range(3):
        if transposed:
            b, h, l, d = shape
            t = torch.randn(b, l, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)
        else:
            t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out.append(t * (amplitude if i < 2 else 1.0))
    return out


def attention_inputs(dtype, device, gen, *, lengths: Sequence[int], heads: int = 2,
                     seqlen: int = 12, head_dim: int = 32, fill: Optional[str] = "nan",
                     amplitude: float = 1.0, transposed: bool = False) -> EdgeInputs:
    """Padded attention [B, H, L, D], B = len(lengths): keys j >= lengths[b] are padding (a
    length 0 makes every query of that row fully masked) and their k and v slots hold `fill`
    ("nan", "inf", "-inf" or None = random values)."""
    batch = len(lengths)
    q, k, v = _qkv(gen, (batch, heads, seqlen, head_dim), amplitude, dtype, device, transposed)
    mask = torch.arange(seqlen)[None, :] < torch.tensor(list(lengths))[:, None]
    if fill is not None:
        pad = ~mask[:, None, :, None]
        k, v = k.masked_fill(pad, FILLS[fill]), v.masked_fill(pad, FILLS[fill])
    args = [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)]
    return EdgeInputs(args, {"key_padding_mask": mask.to(device)})


def varlen_inputs(dtype, device, gen, *, lengths: Sequence[int], poisoned: Optional[int] = None,
                  fill: str = "nan", heads: int = 2, head_dim: int = 32,
                  amplitude: float = 1.0) -> EdgeInputs:
    """Packed q, k, v [T, H, D] of sequences `lengths`; sequence `poisoned` (if any) has `fill` in
    its k and v, so its own rows are NaN in float64 too and only the other rows are compared."""
    total = sum(lengths)
    q, k, v = _qkv(gen, (total, heads, head_dim), amplitude, dtype, device, False)
    bounds = [0] + torch.tensor(list(lengths)).cumsum(0).tolist()
    rows = None
    if poisoned is not None:
        lo, hi = bounds[poisoned], bounds[poisoned + 1]
        k[lo:hi], v[lo:hi] = FILLS[fill], FILLS[fill]
        rows = torch.tensor([i for i in range(total) if not lo <= i < hi], dtype=torch.long)
    args = [t.to(dtype).to(device).requires_grad_() for t in (q, k, v)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return EdgeInputs(args + [cu, max(lengths)], {}, rows)


def score_amplitude(dtype, head_dim: int = 32) -> float:
    """q, k amplitude whose scaled scores reach ~1e3-1e4 while q.k itself stays inside the fp16
    range (65504)."""
    return 25.0 if dtype == torch.float16 else 100.0


def _attention_cases() -> list[EdgeCase]:
    A = lambda name, **kw: EdgeCase("attention", name, lambda dt, dev, gen: attention_inputs(
        dt, dev, gen, **{k: (v(dt) if callable(v) else v) for k, v in kw.items()}))
    V = lambda name, **kw: EdgeCase("varlen_attention", name, lambda dt, dev, gen: varlen_inputs(
        dt, dev, gen, **{k: (v(dt) if callable(v) else v) for k, v in kw.items()}))
    return [
        A("NaN in padded k, v slots", lengths=[12, 5, 1]),
        A("inf in padded k, v slots", lengths=[7, 3], fill="inf"),
        A("-inf in padded k, v slots, transposed", lengths=[9, 4], fill="-inf", transposed=True),
        A("fully masked row, NaN in its slots", lengths=[0, 6], fill="nan"),
        A("huge q.k scores", lengths=[12, 8], fill=None, amplitude=score_amplitude),
        A("huge q.k scores, NaN padding", lengths=[10, 3], amplitude=score_amplitude),
        V("NaN in another sequence's k, v", lengths=[5, 7, 3], poisoned=1),
        V("inf in another sequence's k, v", lengths=[6, 4], poisoned=0, fill="inf"),
        V("huge q.k scores", lengths=[9, 5], amplitude=score_amplitude),
    ]


EDGE_CASES: list[EdgeCase] = _layer_norm_cases() + _gelu_cases() + _attention_cases()

# Attention kernels that are not right on an edge case yet: (backend, op, case name) -> (dtypes,
# what goes wrong). tests/test_edge_cases.py makes each a strict xfail (it fails once the kernel is
# fixed, to drop the entry); `albert-kernels verify` reports each as "known" and does not fail on it.
# Empty now: triton's one-hot rows (dq, dk ~4e-5 where float64 gives ~0: delta = rowsum(dO * O)
# summed dP's products in another order; fp16 also 2x PyTorch's error from O's rounding) were
# fixed on 2026-12-01 (delta from dP's own dot plus the output's rounding residual; see
# docs/correctness.md).
KNOWN_BROKEN: dict = {}


def known_broken(backend: str, case: "EdgeCase", dtype: str) -> Optional[str]:
    """Why `case` is known to fail on `backend` in `dtype` (see KNOWN_BROKEN), or None."""
    entry = KNOWN_BROKEN.get((backend, case.op, case.name))
    return entry[1] if entry and dtype in entry[0] else None


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------

def _select(t: torch.Tensor, rows: Optional[torch.Tensor], n_out: int) -> torch.Tensor:
    if rows is None or t.dim() == 0 or t.shape[0] != n_out:
        return t
    return t.index_select(0, rows.to(t.device))


def compare_inputs(op: str, backend: str, inputs: EdgeInputs, *, backward: bool = True,
                   seed: int = 0) -> dict[str, Budget]:
    """`op` on `backend` vs the reference (in the dtype: base; upcast to float64: gold), forward
    and backward with a random upstream gradient: {"out": Budget, "grad0": ...}."""
    fn = getattr(ops, op)
    candidate = lambda *a: fn(*a, backend=backend, **inputs.kwargs)
    reference = lambda *a: fn(*a, backend="reference", **inputs.kwargs)
    args = inputs.args
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    fresh = lambda xs: [a.detach().requires_grad_(a.requires_grad)
                        if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in xs]
    gold_args = upcast(args)
    grad_out = None
    if backward:
        with torch.no_grad():
            shape = reference(*gold_args).shape
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(shape, generator=gen, dtype=torch.float64) * inputs.grad_scale
        grad_out = grad_out.to(args[0].device)
    runs = [forward_and_grads(f, a, grad_out) for f, a in
            ((candidate, fresh(args)), (reference, fresh(args)), (reference, gold_args))]
    n_out = runs[2][0].shape[0] if runs[2][0].dim() else 0
    names = ["out"] + [f"grad{i}" for i in range(len(runs[2][1]))]
    results = {}
    for i, name in enumerate(names):
        c, b, g = (_select(r[0] if i == 0 else r[1][i - 1], inputs.rows, n_out) for r in runs)
        results[name] = check_budget(c, b, g, dtype)
    return results


def run_edge_case(case: EdgeCase, backend: str, dtype: torch.dtype, device="cpu", *,
                  seed: int = 0, backward: bool = True) -> dict[str, Budget]:
    """The case's op on `backend` vs the reference under the budget, forward and backward."""
    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(dtype, torch.device(device), gen)
    return compare_inputs(case.op, backend, inputs, backward=backward, seed=seed)


def edge_case_applies(case: EdgeCase, dtype_name: str) -> bool:
    return dtype_name in case.dtypes
