"""transformers' Trainer on patched BERT-family models (BERT, RoBERTa, DistilBERT, ELECTRA):
with dropout 0 a few SGD steps of sequence classification (and masked LM for BERT) give the
unpatched run's losses and final weights within the float32 error budget (base = the unpatched
float32 run, gold = the unpatched float64 run, same seed and data order); with dropout > 0 the
patched run trains without error and its loss goes down."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="Trainer needs accelerate (the test extra installs it)")

VOCAB, SEQ = 60, 12


class _Dataset(torch.utils.data.Dataset):
    """Right- and left-padded sentences; 3 classes (read from the second token), or masked-LM
    labels (every third real token predicted, -100 elsewhere)."""

    def __init__(self, n=32, mlm=False):
        gen = torch.Generator().manual_seed(3)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=gen)
        pos = torch.arange(SEQ)
        right = (pos[None] < lengths[:, None]).long()
        left = (pos[None] >= SEQ - lengths[:, None]).long()
        self.mask = torch.where((torch.arange(n) % 2 == 0)[:, None], right, left)
        self.ids = self.ids.masked_fill(self.mask == 0, 1)
        if mlm:
            self.labels = self.ids.masked_fill((self.mask == 0) | (pos[None] % 3 != 1), -100)
        else:
            self.labels = torch.where(self.mask[:, 1] == 1, self.ids[:, 1], self.ids[:, -1]) % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _config(family, dropout):
    common = dict(vocab_size=VOCAB, pad_token_id=1, attn_implementation="sdpa")
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                             dropout=dropout, attention_dropout=dropout,
                                             seq_classif_dropout=dropout,
                                             max_position_embeddings=SEQ + 4, num_labels=3,
                                             **common)
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
           "electra": transformers.ElectraConfig}[family]
    extra = {"embedding_size": 16} if family == "electra" else {}
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
               classifier_dropout=dropout, max_position_embeddings=SEQ + 4, num_labels=3,
               **extra, **common)


CLASSES = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra", "distilbert": "DistilBert"}


def _train(model, tmp_path, steps, mlm=False, lr=0.2):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
        use_cpu=True, report_to=[], save_strategy="no", seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset(mlm=mlm))
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == steps
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("family,task", [("bert", "SequenceClassification"),
                                         ("bert", "MaskedLM"),
                                         ("roberta", "SequenceClassification"),
                                         ("distilbert", "SequenceClassification"),
                                         ("electra", "SequenceClassification")])
def test_trainer_patched_matches_unpatched(family, task, tmp_path, cpu_backend):
    """SGD (Adam would turn a gradient that is zero analytically, a key bias, into a full-size
    step whose sign is rounding noise), dropout 0, 6 steps."""
    torch.manual_seed(0)
    hf = getattr(transformers, f"{CLASSES[family]}For{task}")(_config(family, 0.0))
    mlm = task == "MaskedLM"
    patched = ak.patch_hf(copy.deepcopy(hf), backend=cpu_backend)
    unpatched, gold_model = copy.deepcopy(hf), copy.deepcopy(hf).double()
    candidate = _train(patched, tmp_path / "patched", 6, mlm)
    base = _train(unpatched, tmp_path / "fp32", 6, mlm)
    gold = _train(gold_model, tmp_path / "fp64", 6, mlm)
    result = check_budget(candidate, base, gold)
    assert result.ok, f"losses: {result}\npatched {candidate.tolist()}\nunpatched {base.tolist()}"
    assert (gold[-1] - gold[0]).abs() > 1e-3, "the run changed nothing?"
    pick = lambda m: torch.cat([p.detach().double().flatten() for p in m.parameters()])
    w0 = pick(hf)
    moved = pick(gold_model) - w0
    result = check_budget(pick(patched) - w0, pick(unpatched) - w0, moved,
                          scale=moved.abs().max().item())
    assert result.ok, f"final weights: {result}"


@pytest.mark.parametrize("family", list(CLASSES))
def test_trainer_with_dropout_trains(family, tmp_path, cpu_backend):
    torch.manual_seed(0)
    hf = getattr(transformers, f"{CLASSES[family]}ForSequenceClassification")(
        _config(family, 0.1))
    model = ak.patch_hf(hf, backend=cpu_backend)
    losses = _train(model, tmp_path, 24)
    assert torch.isfinite(losses).all()
    assert losses[-6:].mean() < losses[:6].mean(), f"the loss does not go down: {losses.tolist()}"
