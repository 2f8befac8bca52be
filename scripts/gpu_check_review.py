"""The GPU check's first checks: what a review of the Triton and CUDA sources without a GPU
(docs/correctness.md, "What only a GPU can confirm") says must be confirmed first.

review --jsonl FILE [--device cpu --backends cpp,reference]: one JSON line per check (check, case, backend, dtype, pass, error, budget;
the ops.jsonl format, so the summary lists failures), each held to the error budget of
albert_kernels/tools/budget.py against an independent float64 dense attention
(tests/attention_helpers.py), with PyTorch's dense attention in the dtype as the base:

    huge_scores   Triton (and CUDA) fp32 attention at scaled scores ~1e4 (q, k ~ 100 N(0, 1),
                  D = 32: nearly one-hot rows), padded with a key mask and varlen with separate
                  query / key lengths: the output and dq, dk, dv. The backward recomputes P from
                  the forward's row max, so the scores must round alike in both (an fma in the
                  backward put dv ~1e-3 off; compiled PTX says it no longer does, this runs it).
    dropout_mask  the keep mask each backend draws (cuda, triton, reference) from one generator
                  state, read off the output (q = k = 0 gives P = 1/L, v = identity rows, so out
                  = Z / (L (1 - p))), equal bit for bit to backends/dropout.py's replay, padded and
                  varlen, fp16 and fp32
    residual      fp16 / bf16 forward and backward (the rounding residual of the output feeds
                  delta) on the edge cases: one-hot rows, a sequence with a single real key, a
                  padded row with no real key, varlen with an empty sequence and more keys than
                  queries; cuda and triton

(--device cpu with CPU backends is a dry run of this script, for its test.)

sanitize-attention: the workload compute-sanitizer runs first (memcheck, racecheck, synccheck):
CUDA attention forward and backward, fp16 and bf16, head dims 32, 64, 128, dropout off and on,
padded with a row that has no real key and varlen with different query / key lengths including
an empty sequence; then the small cases of the other ops (gpu_check.py sanitize-cases).
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # attention_helpers: the float64 dense attention

from albert_kernels.backends import dropout, unavailable_reason  # noqa: E402
from albert_kernels.tools.budget import check_budget  # noqa: E402

DEVICE = "cuda"  # review --device cpu: a dry run of this script on CPU backends (tests)
GPU_BACKENDS = ("cuda", "triton")
FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _backend(name: str):
    """The backend module, or None when it cannot run on CUDA here (reason printed)."""
    reason = unavailable_reason(name, DEVICE)
    if reason is not None:
        print(f"{name}: not available ({reason})", flush=True)
        return None
    return importlib.import_module(f"albert_kernels.backends.{name}")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=DEVICE)


class Rows:
    """Appends result rows to the JSON-lines file as they come, and counts failures."""

    def __init__(self, path: str):
        self.path, self.failed, self.total = path, 0, 0

    def add(self, check: str, case: str, backend: str, dtype: str, ok: bool, error=None,
            budget=None, note: str = "") -> None:
        self.total += 1
        self.failed += not ok
        row = dict(check=check, case=case, backend=backend, dtype=dtype, **{"pass": bool(ok)},
                   error=error, budget=budget, worst=note)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = "" if error is None else f" error {error:.3e} budget {budget:.3e}"
        print(f"{'PASS' if ok else 'FAIL'} {check:13s} {case:44s} {backend:9s} {dtype:9s}{shown}"
              f" {note}", flush=True)


def _budgeted(rows: Rows, check: str, case: str, backend: str, dtype: str, run, ref, inputs,
              grad_out, seed=None) -> None:
    """run(*inputs in dtype) vs ref in float64 (gold) and in dtype (base): forward and each
    input's gradient, one row each. An exception is a failed row, not the end of the check."""
    t = FLOATS[dtype]
    try:
        cand, gold, base = ([x.detach().to(dt).requires_grad_() for x in inputs]
                            for dt in (t, torch.float64, t))
        if seed is not None:
            torch.manual_seed(seed)
        outs = [run(*cand), ref(*gold), ref(*base)]
        for o in outs:
            o.backward(grad_out.to(o.dtype))
        _sync()
    except Exception as e:  # noqa: BLE001 - reported as the row's failure
        rows.add(check, case, backend, dtype, False, note=f"{type(e).__name__}: {e}"[:300])
        return
    res = check_budget(outs[0], outs[2], outs[1], t)
    rows.add(check, case + " out", backend, dtype, res.ok, res.error, res.budget)
    scale = max(float(g.grad.abs().max()) for g in gold)
    for name, c, g, b in zip("qkv", cand, gold, base):
        res = check_budget(c.grad, b.grad, g.grad, t, scale=scale)
        rows.add(check, f"{case} d{name}", backend, dtype, res.ok, res.error, res.budget)


# ------------------------------------------------------------------------------------------------
def huge_scores(rows: Rows, backends: dict) -> None:
    from attention_helpers import dense_padded, dense_varlen
    gen = torch.Generator().manual_seed(26)
    B, H, L, D = 2, 2, 40, 32
    q, k = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 100 for _ in range(2))
    v, g = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    q, k, v, g = (t.to(DEVICE) for t in (q, k, v, g))
    mask = torch.arange(L, device=DEVICE)[None, :] < torch.tensor([[33], [7]], device=DEVICE)
    lq, lk = [17, 0, 40, 5], [23, 4, 40, 1]
    cu_q, cu_k = _cu(lq), _cu(lk)
    qv = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64).to(DEVICE) * 100
    kv = torch.randn(sum(lk), H, D, generator=gen, dtype=torch.float64).to(DEVICE) * 100
    vv = torch.randn(sum(lk), H, D, generator=gen, dtype=torch.float64).to(DEVICE)
    gv = torch.randn(qv.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    scale = D ** -0.5
    for name, mod in backends.items():
        if mod is None or name == "reference":
            continue
        _budgeted(rows, "huge_scores", "padded B2 H2 L40 D32 |s|~1e4", name, "float32",
                  lambda q, k, v: mod.attention(q, k, v, mask, scale),
                  lambda q, k, v: dense_padded(q, k, v, mask, scale), (q, k, v), g)
        _budgeted(rows, "huge_scores", f"varlen q{lq} k{lk} D32 |s|~1e4", name, "float32",
                  lambda q, k, v: mod.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                       scale),
                  lambda q, k, v: dense_varlen(q, k, v, cu_q, cu_k, scale), (qv, kv, vv), gv)


def _mask_from_output(out: torch.Tensor) -> torch.Tensor:
    return out != 0


def dropout_masks(rows: Rows, backends: dict) -> None:
    """q = k = 0: P = 1/L exactly (L = 32); v = identity rows (D = L): out[.., i, j] =
    Z[i, j] / (L (1 - p)), so the keep mask is out != 0."""
    L = D = 32
    B, H, p, seed = 2, 2, 0.3, 1234
    eye = torch.eye(L, device=DEVICE)
    for dtype in ("float16", "float32"):
        t = FLOATS[dtype]
        q = torch.zeros(B, H, L, D, dtype=t, device=DEVICE)
        v = eye.expand(B, H, L, D).to(t).contiguous()
        qp = torch.zeros(B * L, H, D, dtype=t, device=DEVICE)
        vp = eye.repeat(B, 1)[:, None, :].expand(B * L, H, D).to(t).contiguous()
        cu = _cu([L] * B)
        torch.manual_seed(seed)
        s, off = dropout.draw_seed_offset(torch.device(DEVICE), B * H * L * L)
        want = dropout.keep_mask(s, off, p, B, H, L, L, device=DEVICE)
        for layout in ("padded", "varlen"):
            for name, mod in backends.items():
                if mod is None:
                    continue
                try:
                    torch.manual_seed(seed)
                    if layout == "padded":
                        got = _mask_from_output(mod.attention(q, q, v, None, 1.0, p))
                    else:
                        out = mod.varlen_attention(qp, qp, vp, cu, cu, L, L, 1.0, p)
                        got = _mask_from_output(out.view(B, L, H, D).transpose(1, 2))
                    _sync()
                    differ = int((got != want).sum())
                    rows.add("dropout_mask", f"{layout} B{B} H{H} L{L} p{p}", name, dtype,
                             differ == 0, note=f"{differ} of {want.numel()} keep flags differ "
                             f"from backends/dropout.py's replay")
                except Exception as e:  # noqa: BLE001
                    rows.add("dropout_mask", f"{layout} B{B} H{H} L{L} p{p}", name, dtype, False,
                             note=f"{type(e).__name__}: {e}"[:300])


def residual_edges(rows: Rows, backends: dict) -> None:
    from attention_helpers import dense_padded, dense_varlen
    gen = torch.Generator().manual_seed(27)
    B, H, L, D = 3, 2, 24, 64
    scale = D ** -0.5

    def draw(*shape, mul=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mul).to(DEVICE)

    q, k = draw(B, H, L, D, mul=6.0), draw(B, H, L, D, mul=6.0)  # |s| ~ 36 * 8 / 8: one-hot-ish
    v, g = draw(B, H, L, D), draw(B, H, L, D)
    # sequence 0: every key real; 1: a single real key; 2: no real key (every row of it is 0)
    mask = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    mask[0] = True
    mask[1, 5] = True
    lq, lk = [9, 0, 24, 3, 1], [17, 6, 24, 0, 1]
    cu_q, cu_k = _cu(lq), _cu(lk)
    qv, kv = draw(sum(lq), H, D, mul=6.0), draw(sum(lk), H, D, mul=6.0)
    vv, gv = draw(sum(lk), H, D), draw(sum(lq), H, D)
    for name, mod in backends.items():
        if mod is None or name == "reference":
            continue
        for dtype in ("float16", "bfloat16"):
            _budgeted(rows, "residual", "padded: full / one real key / no real key", name, dtype,
                      lambda q, k, v: mod.attention(q, k, v, mask, scale),
                      lambda q, k, v: dense_padded(q, k, v, mask, scale), (q, k, v), g)
            _budgeted(rows, "residual", f"varlen q{lq} k{lk}", name, dtype,
                      lambda q, k, v: mod.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                           scale),
                      lambda q, k, v: dense_varlen(q, k, v, cu_q, cu_k, scale), (qv, kv, vv), gv)


def review(args) -> int:
    """The checks above, in that order; exit 1 when a row failed (or no GPU backend ran)."""
    global DEVICE
    DEVICE = getattr(args, "device", None) or "cuda"
    names = (getattr(args, "backends", None) or "cuda,triton,reference").split(",")
    Path(args.jsonl).touch()
    rows = Rows(args.jsonl)
    backends = {name: _backend(name) for name in names}
    start = time.perf_counter()
    for part in (huge_scores, dropout_masks, residual_edges):
        part(rows, backends)
        print(f"-- {part.__name__} done at {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{rows.total} rows, {rows.failed} failed")
    nothing_ran = all(backends.get(n) is None for n in names if n != "reference")
    return 1 if rows.failed or nothing_ran else 0


# ------------------------------------------------------------------------------------------------
def sanitize_attention(args) -> int:
    """The compute-sanitizer workload: CUDA attention over the review's shapes, forward and
    backward, then the other ops' small cases. Values are not checked here (the sanitizer
    slows everything); cuda_ops and review do that."""
    mod = _backend("cuda")
    if mod is None:
        return 1
    gen = torch.Generator().manual_seed(28)
    B, H, L = 3, 2, 40
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[1, 29:] = False   # right padding: a partial key block
    mask[2] = False        # no real key at all: zero rows
    lq, lk = [17, 0, 40, 5, 1], [23, 4, 9, 0, 1]  # an empty query run, an empty key run
    cu_q, cu_k = _cu(lq), _cu(lk)
    n = 0
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (32, 64, 128):
            for p in (0.0, 0.1):
                def leaf(*shape):
                    return torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_()
                q, k, v = (leaf(B, H, L, head_dim) for _ in range(3))
                out = mod.attention(q, k, v, mask, head_dim ** -0.5, p)
                out.backward(torch.randn_like(out))
                q = leaf(sum(lq), H, head_dim)
                k, v = leaf(sum(lk), H, head_dim), leaf(sum(lk), H, head_dim)
                out = mod.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                           head_dim ** -0.5, p)
                out.backward(torch.randn_like(out))
                torch.cuda.synchronize()
                n += 2
                print(f"attention {str(dtype)[6:]:8s} D{head_dim:<3d} p={p}: padded and varlen, "
                      f"forward and backward", flush=True)
    print(f"{n} attention calls run; now the other ops' small cases", flush=True)
    import gpu_check
    return gpu_check.sanitize_cases(args)
