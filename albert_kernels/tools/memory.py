"""Peak memory of a benchmark workload on CPU (docs/performance.md), measured in fresh processes.

`workload_peak_mib(w)` starts `python -m albert_kernels.tools.memory`, which builds `w` alone from
`w.rebuild` (tools/workloads.py: `Rebuild`), calls it a few times and reports the peak resident
set of the process. `baseline_peak_mib(w)` does the same with a process that imports the same
modules and builds the same inputs but no workload and runs nothing: peak - baseline is the
workload's own memory (weights, gradients, activations, workspace).

What is read: the resident high-water mark of the process, VmHWM in /proc/self/status (KiB), not
`getrusage(RUSAGE_SELF).ru_maxrss`. At exec, Linux folds the high-water mark of the image being
replaced into ru_maxrss, so a child of a bench process that holds several GiB reports those GiB
before it imports anything; VmHWM starts over at exec. Linux only.

A workload process builds the workload, frees what building left behind (ours copies its weights
from a transformers model that is then dropped), and resets the high-water mark to the current
resident set (`5` written to /proc/self/clear_refs) before the first call: the peak counts what the
workload keeps (imports, inputs, weights) and what its calls allocate, not the transient of building
it. The first call allocates (gradients, caches, torch.compile's compilation); later calls show the
steady state; the peak is the largest of all.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
from typing import Optional

from .workloads import Workload

STATUS, CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def supported() -> bool:
    """Whether this system exposes the figures read here (Linux /proc)."""
    return os.path.exists(STATUS) and os.path.exists(CLEAR_REFS)


def peak_rss_mib() -> float:
    """This process's peak resident set since exec or the last reset, in MiB."""
    with open(STATUS, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM line in {STATUS}: cannot read the peak resident set")


def _reset_peak_rss() -> None:
    """Give memory freed so far back to the system, then make the peak the current resident set."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)   # glibc; others return memory anyway
    if trim is not None:
        trim(0)
    with open(CLEAR_REFS, "w", encoding="ascii") as f:
        f.write("5")


def _run(spec: dict) -> float:
    """In the fresh process: build the workloads `spec["only"]` names, call each `spec["calls"]`
    times, return the peak resident MiB (no workload named: the baseline, imports + inputs)."""
    module, _, function = spec["builder"].partition(":")
    builder = getattr(importlib.import_module(module), function)
    workloads = builder(**spec["kwargs"], only=spec["only"])
    if [w.name for w in workloads] != spec["only"]:
        raise RuntimeError(f"{spec['builder']}(only={spec['only']}) built "
                           f"{[w.name for w in workloads]}")
    if workloads:
        _reset_peak_rss()
    for w in workloads:
        for _ in range(spec["calls"]):
            w.fn()
    return peak_rss_mib()


def _measure(w: Workload, only: list[str], calls: int, timeout_s: Optional[float]) -> float:
    if w.rebuild is None:
        raise ValueError(f"workload {w.name!r} has no rebuild recipe (Workload.rebuild): only "
                         "workloads that can be built alone in a fresh process can be measured")
    if not supported():
        raise RuntimeError(f"CPU peak memory needs Linux's {STATUS} and {CLEAR_REFS}; "
                           f"not found on {sys.platform}")
    spec = {"builder": w.rebuild.builder, "kwargs": w.rebuild.kwargs, "only": only, "calls": calls}
    # The child imports what this process can (as multiprocessing's spawn does): same sys.path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    what = f"{w.group} :: {w.name}" if only else f"{w.group} :: baseline (inputs only)"
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {what} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"])


def workload_peak_mib(w: Workload, calls: int = 2, timeout_s: Optional[float] = None) -> float:
    """Peak resident MiB of a fresh process that builds `w` alone and calls it `calls` times."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    return _measure(w, [w.name], calls, timeout_s)


def baseline_peak_mib(w: Workload, timeout_s: Optional[float] = None) -> float:
    """Peak resident MiB of a fresh process that imports what `w` needs and builds its inputs
    (the same for every workload of its group), but no workload, and runs nothing."""
    return _measure(w, [], 0, timeout_s)


if __name__ == "__main__":
    print(json.dumps({"peak_rss_mib": _run(json.loads(sys.argv[1]))}))
