"""Timing for `albert-kernels bench` and `bench --latency`: repeated calls, round-robin rounds, and
the statistics that say whether a figure can be trusted.

Each timed row carries its spread, the interquartile range of its call times over their median
(IQR / median). A ratio of two rows (a speed-up against the group's baseline, a fraction of the
group's ceiling) is as uncertain as both rows together, so its spread is taken as the sum of the
two rows' spreads. A row is flagged (:func:`flags`) when

- the spread of its ratio exceeds ``NOISY_SPREAD`` (0.2: the middle half of the calls of one row
  or of its baseline span more than 20% of the median between them): the ratio could move by
  that much on a rerun, so it says nothing a reader should keep; or
- it runs faster than its ceiling allows: above 100% of a bandwidth ceiling (a copy of the same
  bytes), or above ``GEMM_CEILING_MAX`` (1.5x) of a GEMM ceiling timed from another library
  (ours beating MKL's ``F.linear`` by 1.1-1.4x on ALBERT's shapes is real; by more, the ceiling
  was timed in a slow phase of the machine).

Both flags mean the same thing to the reader: "noisy: rerun on a quiet machine".
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch

MIN_REPEATS, MAX_REPEATS = 3, 50
NOISY_SPREAD = 0.2
GEMM_CEILING_MAX = 1.5
NOISY = "noisy: rerun on a quiet machine"


def timed_call(fn: Callable) -> float:
    """Wall time of one call of `fn`, in seconds."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def wants_more(times: list[float], min_time_s: float, min_repeats: int, max_repeats: int) -> bool:
    """Whether a workload needs more timed calls: `min_repeats`, then up to `min_time_s` of
    timing, never more than `max_repeats`."""
    return len(times) < min_repeats or (sum(times) < min_time_s and len(times) < max_repeats)


def measure(fn: Callable, device: str, min_time_s: float = 1.0, min_repeats: int = MIN_REPEATS,
            max_repeats: int = MAX_REPEATS, warmup: int = 1) -> tuple[list[float], float]:
    """Times of repeated calls after warm-up (the first call is timed on its own: it includes
    compilation and caches). CUDA: events around each call."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    sync()
    times = []
    while wants_more(times, min_time_s, min_repeats, max_repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed_call(fn))
    return times, first


def interleaved(fns: Sequence[Callable], min_time_s: float, min_repeats: int = MIN_REPEATS,
                max_repeats: int = MAX_REPEATS, names: Optional[Sequence[str]] = None,
                say: Callable[[str], None] = lambda what: None
                ) -> tuple[list[list[float]], list[float]]:
    """CPU: time callables round-robin, one call of each per round, so that a slow phase of a
    shared machine falls on every one alike and their ratios stay fair. Each one's first call is
    timed on its own, then one warm-up call; rounds go on until every one has `min_repeats`
    calls and `min_time_s` of timed calls (or `max_repeats`). Returns (times per callable, first
    call per callable), in seconds."""
    first = []
    for i, fn in enumerate(fns):
        say(f"first call + warm-up: {names[i] if names else i}")
        first.append(timed_call(fn))
        fn()
    times: list[list[float]] = [[] for _ in fns]
    wanted = lambda ts: wants_more(ts, min_time_s, min_repeats, max_repeats)
    rounds = 0
    while any(wanted(ts) for ts in times):
        rounds += 1
        for fn, ts in zip(fns, times):
            if wanted(ts):
                ts.append(timed_call(fn))
        say(f"round {rounds} done")
    return times, first


def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of `times` (inclusive method: with 3 calls the
    quartiles lie halfway between the middle call and the outer ones)."""
    if not times:
        raise ValueError("quartiles of no times")
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3


def spread(q1: Optional[float], median: Optional[float], q3: Optional[float]) -> Optional[float]:
    """The interquartile range over the median (None when not timed)."""
    if q1 is None or q3 is None or not median:
        return None
    return (q3 - q1) / median


def ratio_spread(*spreads: Optional[float]) -> Optional[float]:
    """The spread of a ratio of timed rows: the sum of theirs (None if any is unknown)."""
    if any(s is None for s in spreads):
        return None
    return sum(spreads)


def flags(ratio_spread_: Optional[float], fraction_of_ceiling: Optional[float] = None,
          ceiling_max: Optional[float] = None) -> list[str]:
    """Why a row's figures cannot be trusted (empty: they can). ratio_spread_: the spread of its
    ratio against the baseline (or of the row itself, for the baseline); fraction_of_ceiling:
    its throughput over its ceiling's; ceiling_max: the most that fraction can honestly be."""
    out = []
    if ratio_spread_ is not None and ratio_spread_ > NOISY_SPREAD:
        out.append(f"spread {100 * ratio_spread_:.0f}% > {100 * NOISY_SPREAD:.0f}%")
    if (fraction_of_ceiling is not None and ceiling_max is not None
            and fraction_of_ceiling > ceiling_max):
        out.append(f"{100 * fraction_of_ceiling:.0f}% of its ceiling, above the possible "
                   f"{100 * ceiling_max:.0f}%: the ceiling was timed in a slow phase")
    return out


def summary(flagged: Sequence[bool]) -> str:
    """The closing line: how many timed rows are trustworthy."""
    n, bad = len(flagged), sum(flagged)
    if not n:
        return "no timed rows"
    if not bad:
        return f"all {n} timed rows trustworthy (every ratio's spread <= {100 * NOISY_SPREAD:.0f}%)"
    return (f"{n - bad} of {n} timed rows trustworthy; {bad} flagged ({NOISY}: a ratio's spread "
            f"above {100 * NOISY_SPREAD:.0f}% or a figure above its ceiling)")
