"""scripts/gpu_check.sh, the one-call GPU check (docs/correctness.md, "The GPU check"), as far as
a machine without a GPU can check it: it stops at once with a "no GPU" summary and exit status 3,
its step budgets fit the 9-minute call, the summary is built from the JSON lines a run leaves
(also a run cut short), the carried prebuilt extension is refused when it does not match, and
the model comparison it runs on the GPU passes here on the CPU backends (it would not produce
false failures there).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))

HAS_GPU_NODE = any(Path("/dev").glob("nvidia[0-9]*"))


@pytest.mark.skipif(HAS_GPU_NODE, reason="this machine has an NVIDIA device: the no-GPU stop "
                    "cannot be observed here")
def test_stops_at_once_without_a_gpu_with_a_no_gpu_summary_and_exit_3(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s to notice there is no GPU"
    summary = (out / "summary.md").read_text()
    assert "no GPU" in summary and "exit status 3" in summary, summary
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "status" in s] == ["gpu"], steps  # nothing else ran
    assert next(s for s in steps if "status" in s)["status"] == "STOP"
    assert (out / "ops.jsonl").read_text() == ""
    assert (out / "logs.tar.gz").is_file()


def test_usage_error_without_out():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "set OUT" in proc.stderr


def test_plan_budgets_fit_nine_minutes_with_the_machine_start():
    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = re.findall(r"^\s+(\w+)\s+(\d+) s$", proc.stdout, re.MULTILINE)
    names = [n for n, _ in steps]
    # the review's checks and the sanitizer on attention come first, right after the build
    assert names[:4] == ["gpu", "build", "review", "sanitizer"] and names[-1] == "summary", names
    total = sum(int(s) for _, s in steps)
    allowance = int(re.search(r"allowance (\d+) s", proc.stdout).group(1))
    assert allowance >= 60 and total + allowance <= 540, proc.stdout


def test_summary_from_json_lines_lists_failures_and_ratios(tmp_path):
    """A run cut short after some steps: the summary names the failed case with its error and
    budget, counts per backend and dtype, and the benchmark ratio against the baseline."""
    import gpu_check_summary
    lines = {
        "steps.jsonl": [{"step": "env", "python": "3.12.3", "torch": "2.11.0+cu130",
                         "gpu": "NVIDIA H200", "capability": "9.0"},
                        {"step": "gpu", "status": "PASS", "seconds": 4, "budget": 20},
                        {"step": "cuda_ops", "status": "FAIL", "seconds": 30, "budget": 45}],
        "ops.jsonl": [{"check": "attention", "case": "B2 H2 L16 D64", "backend": "cuda",
                       "dtype": "float16", "pass": True, "error": 1e-4, "budget": 1e-3},
                      {"check": "attention", "case": "B1 H2 L512 D64", "backend": "cuda",
                       "dtype": "float16", "pass": False, "error": 5e-2, "budget": 1e-3,
                       "worst": "grad0"}],
        "bench.jsonl": [{"group": "g", "name": "SDPA", "unit": "GFLOP/s", "baseline": True,
                         "median_ms": 2.0, "throughput": 10.0},
                        {"group": "g", "name": "ours (cuda)", "unit": "GFLOP/s",
                         "median_ms": 1.0, "throughput": 20.0},
                        {"group": "g", "name": "SDPA flash + mask", "error": "RuntimeError: no"}],
    }
    for name, rows in lines.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
    text = gpu_check_summary.render(tmp_path, final=False)
    assert "NVIDIA H200" in text and "cut short" in text
    assert "cuda float16: 1 passed, 1 failed" in text
    assert "FAIL attention [B1 H2 L512 D64] cuda float16: error 5.00e-02 > budget 1.00e-03 grad0" \
        in text
    assert "ours (cuda): 1.000 ms, 20.0 GFLOP/s 2.00x" in text
    assert "SDPA flash + mask: RuntimeError: no" in text
    assert "not passed: cuda_ops" in text


def test_review_rows_come_first_in_the_summary(tmp_path):
    import gpu_check_summary
    (tmp_path / "steps.jsonl").write_text(json.dumps(
        {"step": "review", "status": "FAIL", "seconds": 50, "budget": 90}) + "\n")
    (tmp_path / "review.jsonl").write_text(json.dumps(
        {"check": "huge_scores", "case": "padded B2 H2 L40 D32 |s|~1e4 dv", "backend": "triton",
         "dtype": "float32", "pass": False, "error": 1.2e-3, "budget": 3e-6}) + "\n")
    (tmp_path / "ops.jsonl").write_text(json.dumps(
        {"check": "attention", "case": "B2", "backend": "cuda", "dtype": "float16",
         "pass": True, "error": 1e-4, "budget": 1e-3}) + "\n")
    text = gpu_check_summary.render(tmp_path, final=True)
    assert text.index("Review checks") < text.index("Op cases")
    assert ("FAIL huge_scores [padded B2 H2 L40 D32 |s|~1e4 dv] triton float32: error 1.20e-03 "
            "> budget 3.00e-06") in text


@pytest.mark.skipif(HAS_GPU_NODE, reason="this machine has an NVIDIA device")
def test_review_without_a_gpu_fails_and_says_why(tmp_path):
    """Without a GPU backend the review cannot pass: exit 1, no rows, the reasons printed."""
    out = tmp_path / "review.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "review",
                           "--jsonl", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cuda: not available" in proc.stdout and "triton: not available" in proc.stdout
    assert out.read_text() == ""


def test_review_dry_run_on_cpu_backends_passes(tmp_path):
    """The review's checks, run on the CPU backends (reference, cpp): every row passes, so on the
    GPU a failed row is the GPU backend's, not the script's."""
    out = tmp_path / "review.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "review",
                           "--jsonl", str(out), "--device", "cpu", "--backends", "cpp,reference"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    checks = {(r["check"], r["backend"]) for r in rows}
    assert {("huge_scores", "cpp"), ("residual", "cpp"), ("dropout_mask", "cpp"),
            ("dropout_mask", "reference")} <= checks, checks
    assert all(r["pass"] for r in rows)


def test_prebuilt_extension_is_refused_when_it_does_not_match(tmp_path):
    import gpu_check
    here = gpu_check.machine_fingerprint()
    assert gpu_check.mismatches(dict(here), here) == []
    other = {**here, "torch": "2.11.0+cu130", "sources": "0" * 16, "python": "3.12"}
    why = gpu_check.mismatches(other, here)
    assert any(w.startswith("sources:") for w in why), why
    if here["torch"] != "2.11.0+cu130":
        assert any(w.startswith("torch:") for w in why), why
    # no library in the folder: refused, nothing installed
    (tmp_path / "manifest.json").write_text(json.dumps(here))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "prebuilt",
                           "--dir", str(tmp_path), "--install"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "no albert_kernels_ext.so" in proc.stderr
    assert not gpu_check.INSTALLED.exists()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_model_comparison_passes_on_a_cpu_backend(dtype):
    """The GPU check's model-vs-transformers rows, run here on the reference backend: the
    comparison itself (parameter matching, budgets) must not fail a correct model (the CUDA-graph
    row runs its bucketed inputs eagerly here)."""
    transformers = pytest.importorskip("transformers")
    import gpu_check_runs
    rows = gpu_check_runs.model_check("reference", dtype, transformers, device="cpu")
    assert [r["case"] for r in rows] == ["forward last_hidden_state (real tokens)",
                                         "forward with CUDA graphs (real tokens)",
                                         "training loss + every grad (patch_hf)"]
    for row in rows:
        assert row["pass"], row
        assert 0 < row["budget"] < 1, row


@pytest.mark.slow
def test_bench_rows_on_the_cpu(tmp_path):
    """The GPU check's benchmark code path, run here on tiny CPU inputs (float32, the attention
    and add+LayerNorm groups): one well-formed JSON line per workload, SDPA backends that refuse
    the inputs reported with their error, torch.compile left out, the deadline honoured."""
    import gpu_check_runs
    import torch
    groups = gpu_check_runs._groups(torch.float32, "cpu", batch=2, seq=16, model=False)
    out = tmp_path / "bench.jsonl"
    assert gpu_check_runs.run_bench(out, time.time() + 600, [groups[0], groups[2]], "cpu",
                                    min_time_s=0.0) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = {r["name"] for r in rows}
    assert {"SDPA with mask", "SDPA flash + mask", "SDPA efficient + mask",
            "SDPA cudnn + mask", "copy (same bytes)", "eager F.layer_norm(x + r)"} <= names
    assert not any(n.startswith("torch.compile") for n in names)
    for r in rows:
        assert ("median_ms" in r and r["median_ms"] > 0 and r["throughput"] > 0) or r["error"], r
    assert any("median_ms" in r for r in rows if r["name"] == "SDPA with mask")
    late = tmp_path / "late.jsonl"
    gpu_check_runs.run_bench(late, time.time(), groups, "cpu")
    assert json.loads(late.read_text())["reason"] == "deadline"


@pytest.mark.slow
def test_latency_rows_on_the_cpu(tmp_path):
    """The GPU check's latency rows, run here on a tiny model on the CPU: one row per
    contender and length, each checked against transformers before it is timed, transformers
    sdpa the baseline, the CUDA-graph contender an error row on the CPU (it needs a GPU), the
    deadline honoured (the compile pass needs COMPILE_RESERVE_S and is skipped without it)."""
    pytest.importorskip("transformers")
    import gpu_check_runs
    import albert_kernels as ak
    cfg = ak.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=64,
                          num_attention_heads=4, intermediate_size=128, num_hidden_layers=2)
    out = tmp_path / "bench.jsonl"
    assert gpu_check_runs.run_latency(out, time.time() + 600, "cpu", ("float32",), (8, 20),
                                      cfg, min_time_s=0.0) == []
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seqlen"], r["name"].split(" (")[0]) for r in rows] == [
        (n, name) for n in (8, 20)
        for name in ("transformers sdpa", "ours eager", "ours + CUDA graphs")]
    for r in rows:
        if r["name"].startswith("ours + CUDA graphs"):
            assert "CUDA device" in r["error"] and "median_ms" not in r
        else:
            assert r["check"] == "ok" and r["max_error"] <= r["error_budget"], r
            assert r["median_ms"] > 0 and r["repeats"] >= 5 and r["first_call_s"] > 0
        assert r["baseline"] == (r["name"] == "transformers sdpa")
    import gpu_check_summary
    text = "\n".join(gpu_check_summary._bench_lines(rows))
    assert "latency float32 B=1 L=8" in text and "req/s" in text
    late = tmp_path / "late.jsonl"
    gpu_check_runs.run_latency(late, time.time() + gpu_check_runs.COMPILE_RESERVE_S - 1, "cpu",
                               ("float32",), (8,), cfg, compile_pass=True)
    assert json.loads(late.read_text())["reason"] == "deadline"


FAKE_PYTHON = r'''#!/usr/bin/env bash
# Stands in for python on a GPU machine whose CUDA build fails: logs each call, answers the probe.
echo "$* | CSRC=${ALBERT_KERNELS_CSRC:-} TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-}" >>"$CALLS"
case "$*" in
  *"gpu_check.py probe"*) echo '{"step": "env", "python": "3.12", "gpu": "FAKE H200"}' >>"$4"; exit 0 ;;
  *"gpu_check.py summary"*) exec "$REAL_PYTHON" "$@" ;;
  *"gpu_check.py prebuilt"*) echo "prebuilt: no albert_kernels_ext.so" >&2; exit 1 ;;
  *"albert_kernels build"*) echo "error: attention.cu: expected ';'" >&2; exit 1 ;;
  *"albert_kernels verify"*)
    while [ $# -gt 0 ]; do [ "$1" = --jsonl ] && out=$2; shift; done
    echo '{"check": "attention", "case": "c", "backend": "triton", "dtype": "float16", "pass": true, "error": 0.0, "budget": 1.0}' >>"$out"
    exit 0 ;;
esac
exit 0
'''


def test_flow_after_a_failed_cuda_build_runs_only_the_triton_steps(tmp_path):
    """The script's step logic, with a stand-in python (GPU present, CUDA build failing): the
    CUDA steps are skipped, every later process gets no sources to rebuild from, the Triton
    steps still run with autotuning cached, the summary and JSON lines say so, exit 1."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "GPU_CHECK_ALWAYS_PROBE": "1",
           "CALLS": str(calls), "REAL_PYTHON": sys.executable, "GPU_CHECK_BUDGET": "300"}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    status = {s["step"]: s["status"] for s in steps if "status" in s}
    assert status == {"gpu": "PASS", "prebuilt": "INFO", "build": "FAIL", "cuda_steps": "SKIP",
                      "review": "PASS", "triton_aot": "PASS", "triton_ops": "PASS",
                      "model": "PASS", "bench": "PASS"}, status
    log = calls.read_text().splitlines()
    after_build = log[next(i for i, c in enumerate(log) if "albert_kernels build" in c) + 1:]
    assert after_build
    assert all("no-csrc-after-failed-build" in c for c in after_build
               if "summary" not in c), after_build
    assert not any("--backend cuda" in c for c in log), log
    assert all("TRITON_CACHE_AUTOTUNING=1" in c for c in log)
    assert (out / "ops.jsonl").read_text().count('"triton"') == 1
    summary = (out / "summary.md").read_text()
    assert "FAKE H200" in summary and "not passed: build, cuda_steps" in summary, summary
