"""Fine-tuning end to end, as examples/finetune_classifier.py does it, small: an
``albert-kernels pretrain`` checkpoint -> AlbertForSequenceClassification.from_pretrained ->
a few dozen AdamW steps on passages labelled with the bundled book they come from -> the loss
falls, the held-out accuracy is above chance (25%) -> save_pretrained -> transformers'
AlbertForSequenceClassification gives the same logits."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_classifier.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_from_a_pretraining_checkpoint(tmp_path, cpu_backend):
    figures = _example().main([
        "--out", str(tmp_path), "--backend", cpu_backend, "--pretrain-steps", "4",
        "--batch-size", "16", "--steps", "40", "--lr", "3e-3", "--train-per-book", "48",
        "--test-per-book", "32"])
    assert figures["last_loss"] < figures["first_loss"] - 0.1, figures
    assert figures["test_accuracy"] >= 0.3, figures       # chance: 0.25 on 128 passages
    assert figures["transformers_max_abs_diff"] <= 1e-4, figures
    assert (Path(figures["saved"]) / "model.safetensors").is_file()
