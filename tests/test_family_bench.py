"""`albert-kernels bench --family` (tools/family.py, tools/runtimes.py): the quick run end to end
on tiny BERT/RoBERTa configs and the real all-MiniLM-L6-v2, errors on every row, absent runtimes
as skipped rows with their reason, and the quality check catching a wrong contender."""
import json
import sys

import pytest
import torch

pytest.importorskip("transformers")

from minilm import minilm_path  # noqa: F401  (fixture)

from albert_kernels.cli import main
from albert_kernels.tools import family, runtimes
from albert_kernels.tools.family import Contender, check_and_time


def test_quick_run_end_to_end(tmp_path, minilm_path, capsys, monkeypatch):  # noqa: F811
    """`bench --family --quick` on the tiny BERT (RoBERTa left out to keep the test short) and
    the real all-MiniLM-L6-v2."""
    run_family = family.run_family
    monkeypatch.setattr(family, "run_family", lambda *a, **k: run_family(
        *a, **{**k, "encoders": ("BERT-base",), "minilm_dir": str(minilm_path)}))
    out = tmp_path / "family.json"
    assert main(["bench", "--family", "--quick", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu"] and "cpu_isa" in doc["machine"]
    groups = {}
    for r in doc["results"]:
        groups.setdefault(r["group"], {})[r["name"]] = r
    assert [g.split(" ")[0] for g in groups] == ["BERT-base", "all-MiniLM-L6-v2",
                                                 "all-MiniLM-L6-v2"]
    for group, rows in groups.items():
        base = rows[family.BASELINE]
        assert base["max_abs"] == 0.0 and base["min_cosine"] == pytest.approx(1.0)
        assert base["speedup_vs_baseline"] == 1.0 and base["median_s"] > 0
        ours = next(r for n, r in rows.items() if n.startswith("ours (patch_hf"))
        for r in (ours, rows[family.ATTN]):
            assert r["check"] == "ok" and r["within_fp32_budget"], (group, r)
            assert r["max_abs"] <= 1e-4 and r["min_cosine"] > 0.99999
            assert r["median_s"] > 0 and r["speedup_vs_baseline"] > 0
        assert rows[family.COMPILED]["check"] == "skipped: --no-compile"
        for r in rows.values():
            # every row is checked (its errors beside its time) or says why not
            assert (r["max_abs"] is not None) == (r["median_s"] is not None), r
            assert r["check"] == "ok" or r["check"].startswith(
                ("outside the fp32 budget", "skipped: ", "error: ")), r
        runtime_rows = [r for n, r in rows.items() if n.startswith(("onnxruntime", "openvino"))]
        assert len(runtime_rows) == len(runtimes.NAMES)
        if group.startswith("all-MiniLM"):
            assert all(r["check"].startswith("skipped: --quick") for r in runtime_rows)
            assert "checked on 32 sentences" in ours["note"]
    bert = groups[next(g for g in groups if g.startswith("BERT-base"))]
    fp32 = next(r for n, r in bert.items() if n.startswith("onnxruntime fp32"))
    if not fp32["check"].startswith("skipped"):      # the `bench` extra is installed
        assert fp32["check"] == "ok" and fp32["max_abs"] <= 1e-4
        f32 = bert["openvino f32"]
        assert f32["check"] == "ok" and "INFERENCE_PRECISION_HINT f32" in f32["note"]
        assert "INFERENCE_PRECISION_HINT" in bert["openvino (default precision)"]["note"]
        int8 = bert["onnxruntime int8 (quantize_dynamic)"]
        assert int8["max_abs"] is not None and int8["max_abs"] > 0   # int8: not bit-exact
    text = capsys.readouterr().out
    assert "max abs" in text and "min cos" in text and "family benchmark:" in text


def test_missing_runtimes_give_skipped_rows_with_the_reason(monkeypatch, tmp_path):
    """Each absent package (onnxruntime, openvino, nncf) skips its rows, naming the package;
    the export itself stubbed (it needs onnx and onnxscript)."""
    for mod in ("onnxruntime", "openvino", "nncf"):
        monkeypatch.setitem(sys.modules, mod, None)       # `import mod` raises ImportError
    monkeypatch.setattr(runtimes, "export_onnx", lambda *a, **k: "stub exporter")
    config = family.encoder_config("BERT-base", tiny=True)
    model = __import__("transformers").AutoModel.from_config(config).eval()
    inputs = family.encoder_inputs(config, 2, 8)
    got = {r.name: r for r in runtimes.runtime_contenders(model, inputs, str(tmp_path), [inputs])}
    assert list(got) == list(runtimes.NAMES)
    for name, r in got.items():
        assert r.run is None
        package = "onnxruntime" if name.startswith("onnxruntime") else "openvino"
        assert r.skip.startswith(f"{package} not installed"), (name, r.skip)
    # openvino present but nncf absent: only the int8 row names nncf
    monkeypatch.delitem(sys.modules, "openvino")
    pytest.importorskip("openvino")
    r = runtimes.openvino_int8(str(tmp_path / "absent.onnx"), [inputs])
    assert r.run is None and r.skip.startswith("nncf not installed")


def test_missing_runtimes_in_the_family_rows(monkeypatch):
    """Through run_family: the skipped runtimes are rows with their reason, untimed."""
    monkeypatch.setattr(runtimes, "runtime_contenders", lambda *a, **k: [
        runtimes.Runtime(n, skip=f"{n.split()[0]} not installed (test)") for n in runtimes.NAMES])
    rows = family.run_family(2, 8, min_time_s=0.01, compile_baseline=False,
                             encoders=("BERT-base",), minilm=(), tiny=True)
    by = {r.name: r for r in rows}
    for n in runtimes.NAMES:
        assert by[n].check.startswith("skipped: ") and "not installed (test)" in by[n].check
        assert by[n].median_s is None and by[n].max_abs is None
    assert by[family.BASELINE].median_s > 0


def test_quality_check_catches_a_wrong_contender():
    """A contender off by 1e-2 on one real token is outside the fp32 budget (and still timed,
    marked); a difference on padded positions does not count; a raising one is marked, untimed."""
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    wrong = ref.clone()
    wrong[1, 2, 3] += 1e-2
    padded_only = ref.clone()
    padded_only[0, 4] += 5.0                       # a padded position: ignored

    def boom():
        raise RuntimeError("kernel exploded")
    cons = [Contender("base", lambda: ref), Contender("right", lambda: padded_only),
            Contender("wrong", lambda: wrong), Contender("raises", boom),
            Contender("absent", skip="not installed")]
    rows = {r.name: r for r in check_and_time("g", "tokens/s", 8.0, cons, mask, 0.001,
                                              lambda what: None)}
    assert rows["right"].check == "ok" and rows["right"].max_abs == 0.0
    assert not rows["wrong"].within_fp32_budget
    assert rows["wrong"].check.startswith("outside the fp32 budget")
    assert rows["wrong"].max_abs == pytest.approx(1e-2, rel=1e-4)
    assert rows["wrong"].median_s is not None             # marked, not hidden
    assert rows["raises"].check.startswith("error: RuntimeError: kernel exploded")
    assert rows["raises"].median_s is None
    assert rows["absent"].check == "skipped: not installed"
    assert "outside the fp32 budget" in family.format_family(list(rows.values()))


def test_minilm_runtime_swap_is_checked(minilm_path):  # noqa: F811
    """The runtimes' path inside sentence-transformers encode: a runtime that computes what
    transformers computes matches the unpatched embeddings; one that is slightly wrong (0.05
    added to one feature of last_hidden_state) fails the fp32 budget."""
    from sentence_transformers import SentenceTransformer
    base = SentenceTransformer(str(minilm_path), device="cpu").eval()
    hf = base[0].auto_model
    names = ["input_ids", "attention_mask", "token_type_ids"]
    exact = runtimes.Runtime("exact", lambda x: hf(**x).last_hidden_state)
    shift = 0.05 * (torch.arange(hf.config.hidden_size) == 7)
    shifted = runtimes.Runtime("shifted", lambda x: hf(**x).last_hidden_state + shift)
    sentences = family.quality_sentences(40)
    ref = family._st_encode(base, sentences, 8)
    cons = [Contender("base", lambda: ref)]
    for r in (exact, shifted):
        st = family._runtime_st(str(minilm_path), r, names)
        cons.append(Contender(r.name, lambda st=st: family._st_encode(st, sentences, 8)))
    rows = {r.name: r for r in check_and_time("g", "sentences/s", 40.0, cons, None, 0.001,
                                              lambda what: None)}
    assert rows["exact"].check == "ok" and rows["exact"].max_abs <= 1e-5
    assert rows["shifted"].check.startswith("outside the fp32 budget")
    assert rows["shifted"].max_abs > 10 * family.FP32_MAX_ABS


def test_quality_and_calibration_sentences():
    """Real sentences from the bundled corpus, the workload's 32 first; the calibration set
    shares none with the quality set."""
    from albert_kernels.tools.st_bench import SENTENCES
    quality = family.quality_sentences(256)
    calibration = family.calibration_sentences(64)
    assert len(quality) == 256 and quality[:32] == SENTENCES
    assert len(set(quality)) > 240 and len(calibration) == 64
    assert not set(quality) & set(calibration)
    assert all(5 <= len(s.split()) <= 60 for s in quality[32:])


def test_export_is_right_at_other_shapes(tmp_path):
    """The ONNX file runs at batch sizes, lengths and paddings other than the export example's
    (the tracer's export bakes the attention-mask arithmetic in; the dynamo export must not)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import transformers
    config = family.encoder_config("BERT-base", tiny=True)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    path = str(tmp_path / "tiny.onnx")
    runtimes.export_onnx(model, family.encoder_inputs(config, 2, 8), path)
    fp32, _ = runtimes.onnxruntime_fp32(path, config, str(tmp_path), lambda what: None)
    for batch, seqlen in ((3, 13), (1, 5), (5, 40)):
        inputs = family.encoder_inputs(config, batch, seqlen, seed=batch)
        with torch.no_grad():
            want = model(**inputs).last_hidden_state
        max_abs, cosine = family.errors(fp32.run(inputs), want, inputs["attention_mask"])
        assert max_abs <= 1e-4 and cosine > 0.99999, (batch, seqlen, max_abs)
