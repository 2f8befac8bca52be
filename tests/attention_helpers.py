"""Shared by tests/test_attention_dropout.py and tests/test_varlen_qk.py: the backends to test,
an independent dense attention (written here, not the reference backend's code) that the
candidates are held to in float64 (gold) and in their own dtype (base), and the replay of the
dropout mask a call drew (backends/dropout.py: draw_seed_offset from the same generator state,
then keep_mask)."""
from __future__ import annotations

import importlib
import math
from typing import Optional

import pytest
import torch

from albert_kernels.backends import dropout, unavailable_reason
from albert_kernels.tools.budget import check_budget

BACKENDS = ["reference", "cpp", "triton"]  # every backend that runs on this machine's CPU
FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def backend_module(name: str):
    """The backend module (contract-level attention / varlen_attention), or skip."""
    reason = unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return importlib.import_module(f"albert_kernels.backends.{name}")


def dense_sequence(q, k, v, scale, keep=None, p=0.0):
    """One sequence: q [Lq, H, D], k, v [Lk, H, D]; keep bool [H, Lq, Lk] or None.

    Plain dense softmax; no keys gives zero rows (and, by construction, zero gradients)."""
    if k.shape[0] == 0:
        return q * 0.0
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, dim=-1)
    if keep is not None:
        probs = torch.where(keep, probs / (1.0 - p), torch.zeros_like(probs))
    return torch.einsum("hqk,khd->qhd", probs, v)


def dense_varlen(q, k, v, cu_q, cu_k, scale, keep=None, p=0.0):
    """Packed q [Tq, H, D], k, v [Tk, H, D]; keep bool [B, H, max_q, max_k] or None."""
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    outs = []
    for s in range(len(cu_q) - 1):
        a, b, c, d = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        ks = None if keep is None else keep[s, :, :b - a, :d - c]
        outs.append(dense_sequence(q[a:b], k[c:d], v[c:d], scale, ks, p))
    return torch.cat(outs) if outs else q * 0.0


def dense_padded(q, k, v, mask, scale, keep=None, p=0.0):
    """q, k, v [B, H, L, D]; mask bool [B, L] (True = real key) or None; keep [B, H, L, L]."""
    rows = []
    for b in range(q.shape[0]):
        real = mask[b] if mask is not None else torch.ones(q.shape[2], dtype=torch.bool)
        qs, ks, vs = (t[b].transpose(0, 1) for t in (q, k, v))
        kb = None if keep is None else keep[b][:, :, real]
        rows.append(dense_sequence(qs, ks[real], vs[real], scale, kb, p).transpose(0, 1))
    return torch.stack(rows)


def replay_keep(seed: int, p: float, n_seqs: int, heads: int, max_q: int, max_k: int):
    """The keep mask of the CPU call made right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    s, offset = dropout.draw_seed_offset(torch.device("cpu"), n_seqs * heads * max_q * max_k)
    return dropout.keep_mask(s, offset, p, n_seqs, heads, max_q, max_k)


def leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def check_fwd_bwd(run, ref, inputs, dtype, grad_out, what: str, seed: Optional[int] = None):
    """run(*leaves in dtype) against ref in float64 (gold) and in dtype (base): forward and the
    gradients of every input, each within the error budget. `seed` is set before the candidate
    call (the mask it draws is the one `ref` was given). Returns (output, candidate leaves)."""
    cand, gold, base = (leaves(inputs, dt) for dt in (dtype, torch.float64, dtype))
    if seed is not None:
        torch.manual_seed(seed)
    outs = [run(*cand), ref(*gold), ref(*base)]
    for o in outs:
        o.backward(grad_out.to(o.dtype))
    result = check_budget(outs[0], outs[2], outs[1], dtype)
    assert result.ok, f"{what} forward {dtype}: {result}"
    grad_scale = max(float(g.grad.abs().max()) for g in gold)
    for i, (c, g, b) in enumerate(zip(cand, gold, base)):
        result = check_budget(c.grad, b.grad, g.grad, dtype, scale=grad_scale)
        assert result.ok, f"{what} grad of input {i} {dtype}: {result}"
    return outs[0], cand


def binomial_bounds(n: int, p_keep: float, sigmas: float = 6.0):
    """A [lo, hi] that a Binomial(n, p_keep) count leaves with probability < 1e-8."""
    sd = math.sqrt(n * p_keep * (1 - p_keep))
    return n * p_keep - sigmas * sd, n * p_keep + sigmas * sd
