"""Every `bench` contender's numbers beside its time: the error of its last_hidden_state against a
float64 run of transformers on the same weights and inputs.

    gold      transformers (eager attention) in float64: a float64 copy of the float32 model whose
              weights every contender carries (rounded to its own dtype), on the same ids
    max_abs   max |last_hidden_state - gold| over the real tokens (padding excluded)
    min_cos   the smallest cosine similarity, token by token over the real tokens, between a
              contender's hidden vector and gold's
    budget    docs/correctness.md's error budget (tools/budget.py) of the run's dtype:
              2 * max |base - gold| + 4 * eps(dtype) * max |gold|, base = transformers sdpa in
              that dtype (the run's baseline, so the baseline is within it by construction);
              a contender with max_abs above it is flagged "over budget"

A contender that runs in another precision than the run's dtype (a runtime's own bf16 or int8)
is held to the run's budget all the same: a faster contender with worse numbers shows it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .budget import FLOOR_ULPS, check_budget

OVER_BUDGET = "over budget"


@dataclass(frozen=True)
class Error:
    """One contender's last_hidden_state against gold, over the real tokens."""
    max_abs: float
    min_cos: float
    budget: Optional[float] = None     # None: no budget (no baseline output to set it)
    over_budget: bool = False
    nonfinite: bool = False            # NaN/inf where gold is finite (then over budget too)


def gold_model(hf_fp32: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of the float32 transformers model `hf_fp32`, with eager attention (the
    plainest formula), in eval mode. The copy shares nothing with `hf_fp32`."""
    gold = copy.deepcopy(hf_fp32).to(torch.float64).eval()
    if hasattr(gold, "set_attn_implementation"):          # transformers >= 4.56
        gold.set_attn_implementation("eager")
    else:
        gold.config._attn_implementation = "eager"       # noqa: SLF001 (transformers' switch)
    return gold


def gold_output(gold: torch.nn.Module, ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gold's last_hidden_state [B, L, H], float64, for ids [B, L] (and the padding mask)."""
    with torch.inference_mode():
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return gold(ids, **kwargs).last_hidden_state


def _real(t: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, L, H] -> [real tokens, H] in float64 (all tokens without a mask)."""
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if attention_mask is None:
        return t.reshape(-1, t.shape[-1])
    return t[attention_mask.detach().cpu().bool()]


def last_hidden_state(out) -> torch.Tensor:
    """The last_hidden_state of a model's output (transformers', ours) or the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def measure(candidate: torch.Tensor, gold: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None,
            base: Optional[torch.Tensor] = None,
            dtype: Optional[torch.dtype] = None) -> Error:
    """The error of `candidate` [B, L, H] against `gold` (same shape) on the tokens where
    `attention_mask` [B, L] is 1 (all without a mask); with `base` (transformers sdpa's output in
    the run's dtype, same shape) and `dtype`, the budget and whether `candidate` is over it.
    ValueError naming the argument whose shape differs from gold's."""
    for name, t in (("candidate", candidate), ("base", base)):
        if t is not None and t.shape != gold.shape:
            raise ValueError(f"{name}: shape {list(t.shape)} != gold's {list(gold.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(gold.shape[:2]):
        raise ValueError(f"attention_mask: shape {list(attention_mask.shape)}, expected "
                         f"{list(gold.shape[:2])}")
    c, g = _real(candidate, attention_mask), _real(gold, attention_mask)
    if c.numel() == 0:
        return Error(0.0, 1.0)
    finite = torch.isfinite(c).all(dim=-1)
    diff = (c - g).abs()
    max_abs = float(diff.max()) if bool(finite.all()) else float("inf")
    cos = torch.nn.functional.cosine_similarity(c, g, dim=-1, eps=1e-30)
    min_cos = float(cos.min()) if bool(finite.all()) else float("nan")
    if base is None:
        return Error(max_abs, min_cos, nonfinite=not bool(finite.all()))
    b = check_budget(c, _real(base, attention_mask), g, dtype or candidate.dtype)
    return Error(max_abs, min_cos, b.budget, not b.ok, b.nonfinite)


def budget_text(dtype: torch.dtype, budget: Optional[float]) -> str:
    """The line naming the budget the error columns are held to."""
    name = str(dtype).replace("torch.", "")
    value = "not set (no transformers sdpa output)" if budget is None else f"{budget:.2e}"
    return (f"error vs float64 transformers (eager, the float32 weights) on the real tokens; "
            f"{name} budget (docs/correctness.md) = 2 x max|transformers sdpa {name} - float64| "
            f"+ {FLOOR_ULPS:g} eps({name}) max|float64| = {value}")


def flag_text(e: Optional[Error]) -> str:
    """The table's mark for an error: "" within budget, else why not."""
    if e is None or not e.over_budget:
        return ""
    return OVER_BUDGET + (" (NaN/inf)" if e.nonfinite else f" ({e.max_abs:.1e} > {e.budget:.1e})")


class OutputCheck:
    """What the forward model workloads of one group are measured against: the float64 gold
    last_hidden_state (built by `make_gold` on first use, then kept), the padding mask whose
    ones are the real tokens, and the dtype whose budget applies (the parameters', or
    autocast's)."""

    def __init__(self, make_gold: Callable[[], torch.Tensor], attention_mask: torch.Tensor,
                 precision: torch.dtype):
        self._make_gold, self._gold = make_gold, None
        self.attention_mask, self.precision = attention_mask, precision

    def gold(self) -> torch.Tensor:
        if self._gold is None:
            self._gold = self._make_gold()
        return self._gold


def workload_errors(workloads: Sequence, say: Callable[[str], None] = lambda what: None
                    ) -> dict[int, tuple[Error, float]]:
    """Call every workload of one group that carries a `check` (tools/workloads.py) once, and
    measure its last_hidden_state against the check's gold, with the budget set by the group's
    baseline (transformers sdpa). Returns {id(workload): (Error, seconds that call took)}: it
    is each workload's first call, so its time includes compilation; {} when none has a check."""
    checked = [w for w in workloads if getattr(w, "check", None) is not None]
    if not checked:
        return {}
    check = checked[0].check
    say("errors: float64 transformers on the same weights and inputs")
    gold = check.gold()
    sync = torch.cuda.synchronize if gold.device.type == "cuda" else (lambda: None)
    outs, first = {}, {}
    for w in checked:
        say(f"errors: {w.name}")
        sync()
        t0 = time.perf_counter()
        out = last_hidden_state(w.fn())
        sync()
        first[id(w)] = time.perf_counter() - t0
        outs[id(w)] = out.detach()
    base = next((outs[id(w)] for w in checked if w.baseline), None)
    return {id(w): (measure(outs[id(w)], gold, check.attention_mask, base, check.precision),
                    first[id(w)]) for w in checked}
