"""Benchmark workloads (docs/performance.md), shared by `albert-kernels bench` and the
pytest-benchmark suites.

A workload is a callable plus how much work one call does (bytes, FLOPs or real tokens), so that
time turns into throughput; workloads of one group are compared with the group's baseline.
Workloads that carry a `Rebuild` can be built again, alone, in a fresh process: that is how their
peak memory is measured on CPU (tools/memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..backends import available_backends
from .timing import GEMM_CEILING_MAX


@dataclass(frozen=True)
class Rebuild:
    """How a fresh process builds one workload and nothing else, from JSON values.

    `builder` names a function as "package.module:function"; `builder(**kwargs, only=[name])`
    returns [the workload called `name`], and `builder(**kwargs, only=[])` builds the inputs and
    imports the modules those workloads use, but no workload (the memory baseline).
    """
    builder: str
    kwargs: dict


@dataclass
class Workload:
    group: str                  # what is measured: "model forward", "add_layer_norm", ...
    name: str                   # who does it: "ours (cpp)", "transformers sdpa", ...
    fn: Callable[[], Any]
    work: float                 # per call: bytes moved, FLOPs, or real tokens
    unit: str                   # "GB/s", "GFLOP/s" or "tokens/s"
    baseline: bool = False      # the group's reference point for ratios
    ceiling: bool = False       # a hardware ceiling (copy bandwidth, GEMM), not a competitor
    # a ceiling row: the largest fraction of its throughput another row can honestly reach (1.0
    # for a copy of the same bytes; more for a GEMM timed from one library, which another
    # library's GEMM can beat); a row above it is flagged (tools/timing.py)
    ceiling_max: Optional[float] = None
    rebuild: Optional[Rebuild] = None   # to build it alone in a fresh process (its CPU memory)
    # forward model workloads (fn returns the model's output): the float64 reference their
    # last_hidden_state is measured against before timing (tools/accuracy.py OutputCheck)
    check: Optional[Any] = None


def realistic_lengths(batch: int, seqlen: int, padding: str, seed: int = 0) -> torch.Tensor:
    """Sequence lengths: all `seqlen` ("none"), or uniform in [25%, 100%] of it ("realistic")."""
    if padding == "none":
        return torch.full((batch,), seqlen, dtype=torch.long)
    if padding != "realistic":
        raise ValueError(f"padding must be 'none' or 'realistic', got {padding!r}")
    gen = torch.Generator().manual_seed(seed)
    low = max(1, seqlen // 4)
    return torch.randint(low, seqlen + 1, (batch,), generator=gen)


def padding_mask(lengths: torch.Tensor, seqlen: int, device) -> torch.Tensor:
    return (torch.arange(seqlen)[None, :] < lengths[:, None]).to(device)


def ours_backends(device: str) -> list[str]:
    """Our backends that count as "ours" on this device (Triton on CPU is the interpreter: no)."""
    names = [b for b in available_backends(device) if b != "reference"]
    if torch.device(device).type == "cpu":
        names = [b for b in names if b != "triton"]
    return names


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------
def copy_workload(nbytes: int, device, group: str) -> Workload:
    """A plain copy that moves `nbytes` (half read, half written): the bandwidth ceiling."""
    n = max(1, nbytes // 8)  # float32 elements per side
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return Workload(group, "copy (same bytes)", lambda: dst.copy_(src), 8.0 * n, "GB/s",
                    ceiling=True, ceiling_max=1.0)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------
def add_layer_norm_workloads(tokens: int, hidden: int, dtype, device) -> list[Workload]:
    g = f"add_layer_norm [{tokens}, {hidden}]"
    x, r = (torch.randn(tokens, hidden, device=device).to(dtype) for _ in range(2))
    w, b = torch.ones(hidden, device=device, dtype=dtype), torch.zeros(hidden, device=device, dtype=dtype)
    nbytes = 3 * x.numel() * x.element_size() + 2 * hidden * w.element_size()
    expr = lambda: F.layer_norm(x + r, (hidden,), w, b, 1e-12)
    out = [copy_workload(nbytes, device, g),
           Workload(g, "eager F.layer_norm(x + r)", expr, nbytes, "GB/s", baseline=True),
           Workload(g, "torch.compile(expression)", _compiled(expr), nbytes, "GB/s")]
    for be in ours_backends(device):
        out.append(Workload(g, f"ours ({be})",
                            lambda be=be: ops.add_layer_norm(x, r, w, b, 1e-12, backend=be),
                            nbytes, "GB/s"))
    return out


def linear_gelu_workloads(tokens: int, hidden: int, inner: int, dtype, device) -> list[Workload]:
    g = f"linear_gelu [{tokens}, {hidden}] -> {inner}"
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w = (torch.randn(inner, hidden, device=device) * hidden ** -0.5).to(dtype)
    b = torch.zeros(inner, device=device, dtype=dtype)
    flops = 2.0 * tokens * hidden * inner
    expr = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")
    out = [Workload(g, "GEMM alone (F.linear)", lambda: F.linear(x, w, b), flops, "GFLOP/s",
                    ceiling=True, ceiling_max=GEMM_CEILING_MAX),
           Workload(g, "eager gelu(linear(x))", expr, flops, "GFLOP/s", baseline=True),
           Workload(g, "torch.compile(expression)", _compiled(expr), flops, "GFLOP/s")]
    for be in ours_backends(device):
        out.append(Workload(g, f"ours ({be})",
                            lambda be=be: ops.linear_gelu(x, w, b, approximate="tanh", backend=be),
                            flops, "GFLOP/s"))
    return out


def attention_workloads(batch: int, heads: int, seqlen: int, head_dim: int, padding: str, dtype,
                        device) -> list[Workload]:
    lengths = realistic_lengths(batch, seqlen, padding)
    g = f"attention B{batch} H{heads} L{seqlen} D{head_dim} padding={padding}"
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device).to(dtype) for _ in range(3))
    mask = padding_mask(lengths, seqlen, device)
    flops = 4.0 * float((lengths.double() ** 2).sum()) * heads * head_dim   # real token pairs
    out = []
    if padding == "none":
        out.append(Workload(g, "SDPA", lambda: F.scaled_dot_product_attention(q, k, v), flops,
                            "GFLOP/s", baseline=True))
        for be in ours_backends(device):
            out.append(Workload(g, f"ours ({be})", lambda be=be: ops.attention(q, k, v, backend=be),
                                flops, "GFLOP/s"))
        return out
    sdpa_mask = mask[:, None, None, :]
    out.append(Workload(g, "SDPA with mask", lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask), flops, "GFLOP/s", baseline=True))
    packed = [ops.unpad(t.transpose(1, 2), mask)[0] for t in (q, k, v)]  # [T, H, D]
    _, _, cu, max_len = ops.unpad(q.transpose(1, 2), mask)
    for be in ours_backends(device):
        out.append(Workload(g, f"ours varlen ({be})", lambda be=be: ops.varlen_attention(
            *packed, cu, max_len, backend=be), flops, "GFLOP/s"))
        out.append(Workload(g, f"ours padded+mask ({be})", lambda be=be: ops.attention(
            q, k, v, key_padding_mask=mask, backend=be), flops, "GFLOP/s"))
    return out
