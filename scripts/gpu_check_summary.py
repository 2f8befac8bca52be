"""summary.md of a GPU check run, from the JSON-lines files it left under $OUT (gpu_check.sh).

Imports nothing heavy (no torch), so it runs after any failure, and gpu_check.sh rewrites the
summary after every step: a run killed from outside keeps the summary of its finished steps.

    steps.jsonl   {"step", "status", "seconds", "budget", "note"} per step; {"step": "env", ...}
    review.jsonl  scripts/gpu_check_review.py rows (the same fields as ops.jsonl)
    ops.jsonl     albert-kernels verify --jsonl rows (check, case, backend, dtype, pass, error,
                  budget, ratio, worst)
    model.jsonl   the model vs transformers rows (same fields)
    bench.jsonl   one row per benchmark workload (group, name, median_ms, throughput, unit,
                  baseline, ceiling, error)
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _env_lines(env: dict | None) -> list[str]:
    if not env:
        return ["- environment: not probed"]
    if "python" not in env:  # stopped before Python was started
        return ["- GPU: none found"]
    gpu = env.get("gpu") or "NO GPU"
    extra = f" (sm {env.get('capability')}, {env.get('memory_gib')} GiB, {env.get('sms')} SMs)" \
        if env.get("gpu") else ""
    return [f"- GPU: {gpu}{extra}",
            f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
            f"triton {env.get('triton')}, transformers {env.get('transformers')}, "
            f"nvcc {env.get('nvcc')}, {env.get('cores')} cores"]


def _case_lines(rows: list[dict], title: str) -> list[str]:
    if not rows:
        return []
    out = [f"\n## {title}"]
    by = defaultdict(lambda: [0, 0])
    for r in rows:
        by[(r.get("backend"), r.get("dtype"))][0 if r.get("pass") else 1] += 1
    for (backend, dtype), (ok, bad) in sorted(by.items(), key=str):
        out.append(f"- {backend} {dtype}: {ok} passed, {bad} failed")
    failures = [r for r in rows if not r.get("pass")]
    for r in failures[:12]:
        err = r.get("error")
        fig = f"error {err:.2e} > budget {r.get('budget'):.2e}" \
            if isinstance(err, (int, float)) and isinstance(r.get("budget"), (int, float)) else ""
        out.append(f"  - FAIL {r.get('check')} [{r.get('case')}] {r.get('backend')} "
                   f"{r.get('dtype')}: {fig} {r.get('worst', '')}".rstrip())
    if len(failures) > 12:
        out.append(f"  - ... {len(failures) - 12} more failures in the JSON lines")
    return out


def _bench_lines(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if "group" in r]
    if not rows:
        return []
    out = ["\n## Benchmark (median; vs = baseline time / time; of ceiling = throughput share)"]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for group, rs in groups.items():
        out.append(f"- {group}")
        base = next((r for r in rs if r.get("baseline") and "median_ms" in r), None)
        ceil = next((r for r in rs if r.get("ceiling") and "throughput" in r), None)
        for r in rs:
            if "median_ms" not in r:
                out.append(f"  - {r['name']}: {r.get('error', 'not timed')}")
                continue
            vs = f" {base['median_ms'] / r['median_ms']:.2f}x" if base else ""
            of = f" {100 * r['throughput'] / ceil['throughput']:.0f}% of ceiling" if ceil else ""
            check = f" (check {r['check']})" if r.get("check", "ok") != "ok" else ""
            out.append(f"  - {r['name']}: {r['median_ms']:.3f} ms, {r['throughput']:.1f} "
                       f"{r['unit']}{vs}{of}{check}")
    return out


def render(out_dir: Path, final: bool) -> str:
    steps = read_jsonl(out_dir / "steps.jsonl")
    env = next((s for s in steps if s.get("step") == "env"), None)
    runs = [s for s in steps if "status" in s]
    lines = ["# albert_kernels GPU check" + ("" if final else " (in progress or cut short)")]
    lines += _env_lines(env)
    if env is not None and not env.get("gpu"):
        lines.append(f"\n**no GPU** ({env.get('reason', 'no CUDA device')}): the check stopped at "
                     "its first step (exit status 3) and ran nothing else.")
    lines.append("\n## Steps (status, seconds / budget)")
    for s in runs:
        note = f": {s['note']}" if s.get("note") else ""
        lines.append(f"- {s['status']:5s} {s['step']} ({s.get('seconds', '?')} s / "
                     f"{s.get('budget', '?')} s){note}")
    total = sum(s.get("seconds", 0) for s in runs)
    failed = [s["step"] for s in runs if s["status"] not in ("PASS", "INFO")]
    lines.append(f"- total {total} s; " + (f"not passed: {', '.join(failed)}" if failed
                                          else "every step passed"))
    lines += _case_lines(read_jsonl(out_dir / "review.jsonl"),
                         "Review checks, run first (scripts/gpu_check_review.py)")
    lines += _case_lines(read_jsonl(out_dir / "ops.jsonl"), "Op cases (verify --device cuda)")
    lines += _case_lines(read_jsonl(out_dir / "model.jsonl"), "Model vs transformers")
    lines += _bench_lines(read_jsonl(out_dir / "bench.jsonl"))
    return "\n".join(lines) + "\n"


def write(out_dir: Path, final: bool = False) -> int:
    text = render(out_dir, final)
    (out_dir / "summary.md").write_text(text, encoding="utf-8")
    return 0
