"""The command line: info, verify (catches a broken backend), bench (documented JSON fields)."""
import json
import subprocess
import sys
import types
from argparse import Namespace

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import registry
from albert_kernels.backends import reference as ref
from albert_kernels.cli import main


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
