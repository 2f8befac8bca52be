"""`albert-kernels bench --model --dropout P --autocast DTYPE`: the options reach every contender
(transformers' models and ours), are recorded in the JSON config and the group name, and bad values
are argparse errors."""
import json

import pytest
import torch

from albert_kernels.cli import main
from albert_kernels.model.config import PRESETS
from albert_kernels.tools.model_workloads import GEMM_FLOOR, model_workloads

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    """A "tiny" size beside ALBERT v2's presets (vocabulary and embedding size as base), so that
    each contender's step takes milliseconds: these tests check where the options go, not speed."""
    monkeypatch.setitem(PRESETS, "tiny", dict(hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128))


def _contenders(cpu_backend, mode, **options):
    """transformers sdpa and ours on one small batch (the tiny preset, B2 L32 as --quick: 7 of
    its 49 real tokens carry MLM labels)."""
    return model_workloads("tiny", 2, 32, "realistic", mode, torch.float32, "cpu",
                           compile_baseline=False,
                           only=["transformers sdpa", f"ours ({cpu_backend})"], **options)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dropout_is_on_in_training_for_every_contender(dropout, cpu_backend):
    """Two training steps draw different dropout masks: the MLM logits (no other dropout on their
    path; the SOP head's classifier dropout is not) differ between calls exactly when --dropout
    is set, for transformers and ours alike."""
    workloads = _contenders(cpu_backend, "train", dropout=dropout)
    for w in workloads:
        assert (f"dropout={dropout:g}" in w.group) == (dropout > 0)
        first, second = (w.fn().prediction_logits.detach() for _ in range(2))
        assert torch.equal(first, second) == (dropout == 0), w.name


def test_dropout_is_off_in_forward_mode(cpu_backend):
    for w in _contenders(cpu_backend, "forward", dropout=0.5):
        first, second = (w.fn().last_hidden_state for _ in range(2))
        assert torch.equal(first, second), f"{w.name}: forward mode is inference, no dropout"


@pytest.mark.parametrize("mode, autocast", [("forward", None), ("forward", "bfloat16"),
                                           ("forward", "float16"), ("train", "bfloat16")])
def test_autocast_is_active_for_every_contender(autocast, mode, cpu_backend):
    """Under --autocast the contenders' linear layers run in that dtype (the pooler's output in
    forward mode, the MLM logits in training), with float32 parameters; the GEMM floor's
    products are in that dtype too."""
    expected = getattr(torch, autocast) if autocast else torch.float32
    workloads = _contenders(cpu_backend, mode, autocast=autocast)
    for w in workloads:
        assert (f"autocast={autocast}" in w.group) == (autocast is not None)
        out = w.fn()
        got = out.pooler_output if mode == "forward" else out.prediction_logits
        assert got.dtype == expected, w.name
        assert torch.isfinite(got.float()).all(), w.name
    floor, = model_workloads("tiny", 2, 32, "realistic", mode, torch.float32, "cpu",
                             compile_baseline=False, only=[GEMM_FLOOR], autocast=autocast)
    seen = []
    with _LinearDtypes(seen):
        floor.fn()
    assert seen and set(seen) == {expected}


class _LinearDtypes(torch.overrides.TorchFunctionMode):
    """Records the input dtype of every F.linear call."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1"])
def test_model_workloads_rejects_bad_dropout(bad):
    with pytest.raises(ValueError, match="dropout"):
        model_workloads("base", 1, 16, "none", "train", torch.float32, "cpu", only=[], dropout=bad)


def test_model_workloads_rejects_bad_autocast():
    with pytest.raises(ValueError, match="autocast"):
        model_workloads("base", 1, 16, "none", "train", torch.float32, "cpu", only=[],
                        autocast="float64")


def test_bench_records_dropout_and_autocast(tmp_path):
    """The command line end to end (forward mode; the tests above hold both modes to the
    flags)."""
    path = tmp_path / "bench.json"
    rc = main(["bench", "--model", "--preset", "tiny", "--dropout", "0.1", "--autocast", "bfloat16",
               "--quick", "--quiet", "--no-memory", "--device", "cpu", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert doc["config"]["dropout"] == 0.1 and doc["config"]["autocast"] == "bfloat16"
    assert doc["config"]["dtype"] == "float32"
    names = {r["name"] for r in doc["results"]}
    assert {"transformers sdpa", "ours (reference)", GEMM_FLOOR} <= names
    for r in doc["results"]:
        assert "forward" in r["group"] and "dropout=0.1 autocast=bfloat16" in r["group"]
        assert r["median_s"] > 0
        assert r["speedup_vs_baseline"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--dropout", "1"], "expected a probability in [0, 1)"),
    (["--dropout", "-0.5"], "expected a probability in [0, 1)"),
    (["--dropout", "half"], "expected a probability in [0, 1)"),
    (["--autocast", "float64"], "invalid choice"),
])
def test_bad_values_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "--device", "cpu", "--quick", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ops", "--dropout", "0.1"], "add --model"),
    (["--ops", "--model", "--autocast", "bfloat16"], "drop --ops"),
    (["--autocast", "bfloat16", "--dtype", "bfloat16"], "--dtype must be float32"),
    (["--latency", "--dropout", "0.1"], "--latency"),
])
def test_conflicting_options_are_errors(flags, message, capsys):
    assert main(["bench", "--device", "cpu", "--quick", *flags]) == 1
    assert message in capsys.readouterr().err
