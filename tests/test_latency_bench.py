"""`albert-kernels bench --latency` (tools/latency.py) on a tiny ALBERT: the rows, the output check
against transformers on real tokens, and contenders that are absent, wrong or raising."""
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from albert_kernels.cli import main
from albert_kernels.model import AlbertConfig
from albert_kernels.tools import info, latency
from albert_kernels.tools.latency import Contender, run_latency

TINY = dict(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def by_name(rows):
    return {r.name: r for r in rows}


def test_rows_checked_and_timed_and_absent_runtime_skipped(monkeypatch):
    """Whatever optional runtime this environment lacks (onnx, onnxscript, onnxruntime,
    openvino: the `bench` extra), its row is skipped with the reason; openvino is made absent."""
    monkeypatch.setitem(sys.modules, "openvino", None)       # `import openvino` raises ImportError
    rows, floors = run_latency(AlbertConfig(**TINY), batches=(1,), lengths=(8,), min_time_s=0.02,
                               compile_baseline=False)
    assert floors["gemm_flop_s"] > 0 and floors["copy_bytes_s"] > 0
    rows = by_name(rows)
    assert {r.batch for r in rows.values()} == {1} and {r.seqlen for r in rows.values()} == {8}
    for name in ("transformers sdpa", "ours (cpp)", "ours (cpp, unfrozen)"):
        r = rows[name]
        assert r.check == "ok", r.check
        assert r.max_abs_diff is not None and r.max_abs_diff <= latency.TOLERANCE
        assert r.median_s > 0 and r.min_s <= r.median_s <= r.max_s
    assert rows["transformers sdpa"].max_abs_diff == 0.0
    assert rows["transformers sdpa"].speedup_vs_sdpa == 1.0
    ort = [r for n, r in rows.items() if n.startswith("onnxruntime")]
    if ort[0].check.startswith("skipped: torch.onnx.export failed"):   # no onnx / onnxscript here
        assert rows["openvino"].check == ort[0].check
    else:
        assert rows["openvino"].check.startswith("skipped: openvino not installed")
    assert rows["openvino"].median_s is None
    assert rows["torch.compile(transformers sdpa)"].check == "skipped: --no-compile"
    if not ort[0].check.startswith("skipped"):
        assert ort[0].check == "ok", ort[0].check
    floor = rows["floor: GEMM FLOPs at large-M rate"]
    cfg = AlbertConfig(**TINY)
    assert floor.median_s == pytest.approx(latency.encoder_flops(cfg, 8) / floors["gemm_flop_s"])
    assert latency.encoder_flops(cfg, 8) == 2 * 8 * (16 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 64))


def test_absent_runtimes_are_skipped_with_their_reason(monkeypatch, tmp_path):
    """With the ONNX export stubbed out (it needs onnx and onnxscript), an absent onnxruntime and
    openvino each give a skipped row naming the missing package, never an error."""
    for mod in ("onnxruntime", "openvino"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setattr(latency, "_onnx_export", lambda hf, cfg, path: "stub exporter")
    cfg = AlbertConfig(**TINY)
    cons = by_name(latency.contenders(cfg, latency._hf_model(cfg), False, True, str(tmp_path),
                                      lambda what: None))
    assert cons["onnxruntime"].skip.startswith("onnxruntime not installed")
    assert cons["openvino"].skip.startswith("openvino not installed")


def test_noisy_rows_are_flagged(monkeypatch):
    """A contender whose call times spread wide is flagged noisy, and so is one that runs faster
    than the floor allows; steady ones are not."""
    cfg = AlbertConfig(**TINY)
    calls = iter(range(10**6))
    fake_times = {"steady": lambda i: 1.0, "jittery": lambda i: (1.0, 3.0)[i % 2],
                  "too fast": lambda i: 1e-9}

    def interleaved(fns, min_time_s, min_repeats=3, max_repeats=50, names=None, say=None):
        times = [[fake_times.get(n, lambda i: 1.0)(next(calls)) for _ in range(6)] for n in names]
        return times, [0.0] * len(fns)

    monkeypatch.setattr(latency.timing, "interleaved", interleaved)
    cons = [Contender(n, lambda ids: torch.zeros(*ids.shape, cfg.hidden_size))
            for n in ("transformers sdpa", "steady", "jittery", "too fast")]
    rows = by_name(latency._shape_rows(cfg, cons, 1, 8, {"gemm_flop_s": 1e9, "copy_bytes_s": 1e9},
                                       0.01, lambda what: None))
    assert not rows["steady"].noisy and rows["steady"].spread == 0.0
    assert rows["jittery"].noisy and "spread" in rows["jittery"].flags[0]
    assert rows["too fast"].noisy and "of its ceiling" in rows["too fast"].flags[0]
    assert "noisy: rerun on a quiet machine" in latency.format_latency(list(rows.values()), {
        "gemm_flop_s": 1e9, "copy_bytes_s": 1e9})


def test_wrong_or_raising_contender_marks_its_row():
    cfg = AlbertConfig(**TINY)
    hf = latency._hf_model(cfg)
    right = Contender("transformers sdpa", lambda ids: hf(ids).last_hidden_state)
    wrong = Contender("off by 1e-2", lambda ids: hf(ids).last_hidden_state + 1e-2)
    def boom(ids):
        raise RuntimeError("no kernel")
    floors = {"gemm_flop_s": 1e9, "copy_bytes_s": 1e9}
    rows = by_name(latency._shape_rows(cfg, [right, wrong, Contender("raises", boom)], 2, 8,
                                       floors, 0.01, lambda what: None))
    assert rows["off by 1e-2"].check.startswith("FAILED")
    assert rows["off by 1e-2"].max_abs_diff == pytest.approx(1e-2, rel=1e-3)
    assert rows["off by 1e-2"].median_s is not None          # still timed, marked
    assert rows["raises"].check == "error: RuntimeError: no kernel"
    assert rows["raises"].median_s is None


def test_cli_latency_quick_writes_json_and_plot(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(latency.AlbertConfig, "preset", classmethod(lambda cls, name: cls(**TINY)))
    def no_export(hf, cfg, path):                             # keep the CLI check short
        raise RuntimeError("not exported in this test")
    monkeypatch.setattr(latency, "_onnx_export", no_export)
    assert main(["bench", "--latency", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
    json_path, png_path = (p for p in capsys.readouterr().out.splitlines()[-2:])
    assert json_path.startswith("results: ") and png_path.startswith("plot:    ")
    out = Path(json_path.split(None, 1)[1])
    assert out.parent.parent == tmp_path and out.name.startswith("latency-float32_")
    assert Path(png_path.split(None, 1)[1]).stat().st_size > 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_isa"] == info.cpu_isa()
    names = [r["name"] for r in doc["results"]]
    assert "ours (cpp)" in names and "transformers sdpa" in names
    assert all(r["check"] in ("ok", "floor") or r["check"].startswith("skipped")
               for r in doc["results"]), doc["results"]
    assert main(["bench", "--latency", "--device", "cuda"]) == 1
