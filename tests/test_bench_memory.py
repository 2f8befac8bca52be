"""CPU peak memory of the bench workloads, each in a fresh process (tools/memory.py), and how
`albert-kernels bench --memory` / `--memory-only` report it."""
import json
from typing import Sequence

import pytest
import torch

from albert_kernels.cli import main
from albert_kernels.model import AlbertConfig, AlbertModel
from albert_kernels.tools import bench, memory
from albert_kernels.tools.model_workloads import model_workloads
from albert_kernels.tools.workloads import Rebuild, Workload

pytestmark = pytest.mark.skipif(not memory.supported(), reason="CPU peak memory reads Linux /proc")


def tensor_workloads(mib: int, only: Sequence[str]) -> list[Workload]:
    """A workload that fills a `mib` MiB float32 tensor each call (built in the child by name)."""
    name = f"fill {mib} MiB"
    fill = lambda: float(torch.ones(mib * 2**18).sum())    # 2**18 float32 per MiB
    w = Workload("tensor", name, fill, 1.0, "tokens/s",
                 rebuild=Rebuild(f"{__name__}:tensor_workloads", {"mib": mib}))
    return [w] if name in only else []


def test_peak_memory_sees_a_200_mib_tensor():
    small, large = (memory.workload_peak_mib(tensor_workloads(m, [f"fill {m} MiB"])[0],
                                             timeout_s=120) for m in (0, 200))
    assert small > 0
    assert large - small > 150, (small, large)


def test_model_workload_peak_counts_its_weights():
    w, = model_workloads("base", 1, 16, "none", "forward", torch.float32, "cpu",
                         compile_baseline=False, only=["ours (reference)"])
    model = AlbertModel(AlbertConfig.preset("base"))
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak, base = memory.workload_peak_mib(w, timeout_s=300), memory.baseline_peak_mib(w, 300)
    assert base > 0
    assert peak - base > weights_mib, (peak, base, weights_mib)


def test_workload_without_rebuild_is_an_error():
    w = Workload("g", "no recipe", lambda: None, 1.0, "tokens/s")
    with pytest.raises(ValueError, match="no recipe"):
        memory.workload_peak_mib(w)


@pytest.fixture
def fake_memory(monkeypatch):
    """Memory figures without child processes (the tests above run the real ones): each workload's
    peak is 1000 MiB plus 10 per letter of its name, the baseline process 500 MiB."""
    calls = []

    def peak(w):
        calls.append(w.name)
        return 1000.0 + 10 * len(w.name)

    monkeypatch.setattr(memory, "workload_peak_mib", peak)
    monkeypatch.setattr(memory, "baseline_peak_mib", lambda w: 500.0)
    return calls


def _bench(tmp_path, *flags):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--model", "--quick", "--quiet", "--device", "cpu", "--json", str(path),
               *flags])
    return rc, (json.loads(path.read_text()) if rc == 0 else None)


def test_bench_memory_fills_every_model_row(tmp_path, capsys, fake_memory):
    rc, doc = _bench(tmp_path, "--memory")
    assert rc == 0 and doc["config"]["memory"] is True
    rows = {r["name"]: r for r in doc["results"]}
    assert sorted(fake_memory) == sorted(rows)
    sdpa = rows["transformers sdpa"]
    for name, r in rows.items():
        assert r["median_s"] > 0
        assert r["peak_mem_mb"] == 1000 + 10 * len(name) and r["base_mem_mb"] == 500
        assert r["mem_vs_baseline"] == pytest.approx(r["peak_mem_mb"] / sdpa["peak_mem_mb"])
        assert r["own_mem_vs_baseline"] == pytest.approx(
            (r["peak_mem_mb"] - 500) / (sdpa["peak_mem_mb"] - 500))
    out = capsys.readouterr().out
    assert "peak MiB" in out and "own MiB" in out and "alone peaks at 500 MiB" in out


def test_bench_memory_only_skips_the_timing(tmp_path, monkeypatch, fake_memory):
    def no_timing(*args):
        raise AssertionError("--memory-only timed a workload")

    monkeypatch.setattr(bench, "run_workload", no_timing)
    rc, doc = _bench(tmp_path, "--memory-only")
    assert rc == 0 and doc["config"]["memory_only"] is True
    assert {r["group"].split(" ")[0] for r in doc["results"]} == {"ALBERT-base"}
    for r in doc["results"]:
        assert r["median_s"] is None and r["speedup_vs_baseline"] is None
        assert r["peak_mem_mb"] > r["base_mem_mb"] == 500


@pytest.mark.parametrize("flags, message", [
    (["--memory-only", "--no-memory"], "contradict"),
    (["--memory-only", "--ops"], "--memory-only measures the model workloads"),
    (["--ops", "--memory"], "--memory on CPU measures the model workloads"),
    (["--memory-only", "--plot", "x.png"], "--plot draws time ratios"),
])
def test_bench_memory_conflicts_are_errors(flags, message, capsys):
    assert main(["bench", "--device", "cpu", "--quick", *flags]) == 1
    assert message in capsys.readouterr().err
