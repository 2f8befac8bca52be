"""The command line: info, verify (catches a broken backend), bench (documented JSON fields)."""
import json
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import registry
from albert_kernels.backends import reference as ref
from albert_kernels.cli import main
from albert_kernels.tools import bench, info, report, timing
from albert_kernels.tools.workloads import Workload


def _fake_backend(name: str, attention):
    module = types.ModuleType(f"fake_{name}")
    module.DTYPES, module.HEAD_DIMS = {torch.float32, torch.bfloat16, torch.float16}, None
    for op in ("varlen_attention", "add_layer_norm", "linear_gelu", "gelu_ffn"):
        setattr(module, op, getattr(ref, op))
    module.attention = attention
    spec = registry.BackendSpec(name=name, module=module.__name__,
                                probe=lambda d: None if d == "cpu" else "cpu only")
    spec._loaded = module
    return spec


@pytest.fixture
def fake_backends():
    wrong_scale = lambda q, k, v, m, scale: ref.attention(q, k, v, m, scale * 1.01)
    specs = [_fake_backend("fake_ok", ref.attention), _fake_backend("fake_broken", wrong_scale)]
    for s in specs:
        registry.register_backend(s)
    yield
    for s in specs:
        registry._BACKENDS.pop(s.name)


def _verify(backend):
    return main(["verify", "--backend", backend, "--quick", "--no-model", "--dtype", "float32",
                 "--device", "cpu"])


def test_verify_passes_a_correct_backend(fake_backends, capsys):
    assert _verify("fake_ok") == 0
    assert "0 failed" in capsys.readouterr().out


def test_verify_fails_a_broken_backend(fake_backends, capsys):
    assert _verify("fake_broken") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "attention" in out


def test_verify_unknown_backend_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--backend", "cdua", "--quick", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert ("unknown backend 'cdua', known: cpp, cuda, reference, triton"
            in capsys.readouterr().err)


def test_verify_known_but_unavailable_backend_says_why(capsys):
    assert main(["verify", "--backend", "cuda", "--quick", "--device", "cpu"]) == 1
    assert "backend 'cuda' is not available on cpu: the CUDA C++ kernels run on CUDA tensors" \
        in capsys.readouterr().err


def test_every_option_has_help_and_its_default(capsys):
    """`--help` of every subcommand: a description, and every option with a help text that gives
    its default (the formatter appends it, or the text says it)."""
    from albert_kernels.cli import parser
    sub = next(a for a in parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            text = p.formatter_class(name)._get_help_string(action)
            if action.default not in (None, False) and action.nargs != 0:
                assert "default" in text, f"{name} {action.option_strings}: {text}"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "(default: 8)" in out and "(default: realistic)" in out and "--results-dir" in out


def test_info_lists_backends():
    out = subprocess.run([sys.executable, "-m", "albert_kernels", "info"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert "torch" in out
    for name in ("reference", "cpp", "cuda", "triton"):
        assert name in out
    assert "cpu  reference available" in out


def test_bench_quick_json(tmp_path):
    path = tmp_path / "bench.json"
    rc = main(["bench", "--quick", "--quiet", "--json", str(path), "--device", "cpu"])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert {"cpu", "cores", "torch", "triton"} <= set(doc["machine"])
    assert doc["config"]["device"] == "cpu" and doc["config"]["dtype"] == "float32"
    assert doc["config"]["memory"] is False     # --quick: no fresh processes unless --memory
    groups = {r["group"].split(" ")[0] for r in doc["results"]}
    assert {"ALBERT-base", "add_layer_norm", "linear_gelu", "attention"} <= groups
    for r in doc["results"]:
        assert r["median_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["repeats"] >= 3 and r["throughput"] > 0
        assert r["peak_mem_mb"] is None and r["base_mem_mb"] is None
    names = {r["name"] for r in doc["results"]}
    assert "ours (reference)" in names and "copy (same bytes)" in names
    baselines = [r for r in doc["results"] if r["baseline"]]
    assert all(abs(r["speedup_vs_baseline"] - 1.0) < 1e-12 for r in baselines)
    assert doc["machine"]["cpu_isa"] == info.cpu_isa() and doc["noisy_spread"] == 0.2
    for r in doc["results"]:
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"]
        assert r["spread"] == pytest.approx((r["q3_s"] - r["q1_s"]) / r["median_s"])
        assert r["noisy"] == bool(r["flags"])
        if not r["baseline"]:
            assert r["speedup_low"] <= r["speedup_vs_baseline"] <= r["speedup_high"]


def _result(name, times, **kw):
    w = Workload("g", name, lambda: None, 1e6, "GB/s", **kw)
    return bench.Result.timed(w, times, 0.0)


def test_noisy_rows_and_rows_above_their_ceiling_are_flagged():
    steady = [1.0, 1.01, 0.99, 1.0, 1.02]
    rows = [_result("copy", [0.5 * t for t in steady], ceiling=True, ceiling_max=1.0),
            _result("eager", [2 * t for t in steady], baseline=True),
            _result("ours steady", [1.5 * t for t in steady]),
            _result("ours jittery", [1.0, 1.0, 3.0, 3.0, 2.0]),
            _result("ours above the ceiling", [0.1 * t for t in steady])]
    rat = bench.ratios(rows)
    flags = {r.workload.name: rat[id(r)]["flags"] for r in rows}
    assert flags["copy"] == flags["eager"] == flags["ours steady"] == []
    assert flags["ours jittery"] == ["spread 101% > 20%"]       # 100% + the baseline's 1%
    assert len(flags["ours above the ceiling"]) == 1
    assert "500% of its ceiling" in flags["ours above the ceiling"][0]
    jittery = rat[id(rows[3])]
    assert jittery["speedup_low"] == pytest.approx(2.0 / 3.0)   # baseline q1 / its q3
    table = bench.format_table(rows)
    assert table.count("noisy: rerun on a quiet machine") == 2
    assert "[vs base = against eager; of ceil = of copy]" in table
    assert timing.summary([x["noisy"] for x in rat.values()]).startswith(
        "3 of 5 timed rows trustworthy")


def test_bench_writes_json_and_plot_into_the_machine_folder(tmp_path, monkeypatch, capsys):
    """Without --json / --plot, both go to --results-dir/<device>_<machine>_<date>/ and their
    paths are the last lines; the plot names each group's baseline (its text is checked here and
    the picture looked at by hand)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=gen)
    ws = [Workload("op [256]", "copy (same bytes)", lambda: x.clone(), 2 * x.nbytes, "GB/s",
                   ceiling=True, ceiling_max=1.0),
          Workload("op [256]", "eager x * 2", lambda: x * 2, 2 * x.nbytes, "GB/s", baseline=True),
          Workload("op [256]", "torch.compile(ours (cpp))", lambda: x + x, 2 * x.nbytes, "GB/s")]
    monkeypatch.setattr(bench, "collect", lambda args: [lambda: ws])
    drawn = []
    real_plot = report.plot
    monkeypatch.setattr(report, "plot", lambda rows, m, path, title: (
        drawn.append([r["name"] for r in rows]), real_plot(rows, m, path, title)))
    assert main(["bench", "--ops", "--quiet", "--device", "cpu", "--min-time", "0.01",
                 "--results-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: CPU ") and "figures hold for this machine only" in lines[0]
    assert "timed rows trustworthy" in lines[-3]
    json_line, plot_line = lines[-2:]
    json_path = Path(json_line.removeprefix("results: "))
    png_path = Path(plot_line.removeprefix("plot:    "))
    folder = f"cpu_{info.machine_slug(info.machine())}_{time.strftime('%Y-%m-%d')}"
    assert json_path.parent == png_path.parent == tmp_path / folder
    assert json_path.name.startswith("ops-float32_") and png_path.suffix == ".png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(json_path.read_text())
    assert [r["name"] for r in doc["results"]] == [w.name for w in ws] == drawn[0]
    assert main(["bench", "--ops", "--quiet", "--device", "cpu", "--min-time", "0.01",
                 "--results-dir", str(tmp_path / "none"), "--no-save"]) == 0
    assert not (tmp_path / "none").exists()
    given = Namespace(no_save=False, json="a.json", plot=None, results_dir="r", device="cpu")
    assert report.output_paths(given, "ops", info.machine()) == ("a.json", None)  # that alone
