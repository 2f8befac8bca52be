"""transformers' Trainer fine-tunes a patched classifier on CPU with bf16=True (autocast) for 20
steps, and its losses are the unpatched run's within the error budget: base = the unpatched bf16
run, gold = the unpatched float32 run (no autocast)."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the test extra installs it)")

VOCAB, SEQ, STEPS = 60, 12, 20


class _Dataset(torch.utils.data.Dataset):
    """Right- and left-padded sentences with 3 classes."""

    def __init__(self, n=40):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=gen)
        pos = torch.arange(SEQ)
        right = (pos[None] < lengths[:, None]).long()
        left = (pos[None] >= SEQ - lengths[:, None]).long()
        self.mask = torch.where((torch.arange(n) % 2 == 0)[:, None], right, left)
        self.labels = self.ids[:, 1] % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _losses(model, bf16, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=5e-4, logging_steps=1, bf16=bf16, use_cpu=True, report_to=[],
        save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset())
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == STEPS
    return torch.tensor(losses, dtype=torch.float64)


def test_trainer_bf16_patched_matches_unpatched(tmp_path, cpu_backend):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=40, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                                    max_position_embeddings=SEQ, num_labels=3)
    hf = transformers.AlbertForSequenceClassification(cfg)
    patched = ak.patch_hf(copy.deepcopy(hf), backend=cpu_backend)
    candidate = _losses(patched, True, tmp_path / "patched")
    base = _losses(copy.deepcopy(hf), True, tmp_path / "bf16")
    gold = _losses(copy.deepcopy(hf), False, tmp_path / "fp32")
    assert candidate[-1] < candidate[0], "the patched classifier learns"
    result = check_budget(candidate, base, gold, dtype=torch.bfloat16)
    assert result.ok, f"losses: {result}\npatched {candidate.tolist()}\nunpatched {base.tolist()}"
