"""Fine-tune a sequence classifier from an ``albert-kernels pretrain`` checkpoint, end to end.

    python examples/finetune_classifier.py --out runs/finetune

1. Pretrain a tiny ALBERT on the bundled corpus (``albert-kernels pretrain --preset tiny``), or
   start from an existing checkpoint directory with ``--checkpoint DIR``.
2. Build a small labelled set from the same corpus: passages of 16-62 tokens, labelled with the
   book they come from (4 books, so chance is 25%); training passages come from the first 80% of
   each book, test passages from the last 20% (no passage shares text with a training one).
3. ``ak.AlbertForSequenceClassification.from_pretrained(checkpoint, num_labels=4)``: the encoder
   loads, the new classifier is initialised as transformers initialises it, and one warning
   lists it and the pretraining heads that are not used.
4. Fine-tune with AdamW (padded batches: the encoder runs on real tokens only), then measure the
   test accuracy, save with ``save_pretrained`` and reload the directory with transformers'
   ``AlbertForSequenceClassification``: its logits are ours.

``main()`` returns the figures it prints (the test in tests/test_finetune.py runs it small).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

import albert_kernels as ak
from albert_kernels.cli import main as cli_main
from albert_kernels.training.data import (CLS_ID, PAD_ID, SEP_ID, TOKENIZER_PATH, corpus_files,
                                          load_tokenizer)


@functools.lru_cache(maxsize=1)
def tokenized_books() -> tuple:
    """Each bundled book as one list of token ids (the pretraining tokenizer)."""
    tokenizer = load_tokenizer()
    return tuple(tokenizer.encode(" ".join(path.read_text(encoding="utf-8").split()))
                 for path in corpus_files())


def book_passages(seq_len: int, per_book: int, part: str, seed: int):
    """(input_ids [N, seq_len], attention_mask [N, seq_len], labels [N]): `per_book` passages
    of 16..seq_len-2 tokens from each book, ``[CLS] passage [SEP]`` right-padded; part "train"
    draws from the first 80% of each book's tokens, "test" from the last 20%."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for label, ids in enumerate(tokenized_books()):
        cut = int(0.8 * len(ids))
        lo, hi = (0, cut) if part == "train" else (cut, len(ids))
        for _ in range(per_book):
            n = int(torch.randint(16, seq_len - 1, (1,), generator=gen))
            start = int(torch.randint(lo, hi - n, (1,), generator=gen))
            rows.append([CLS_ID, *ids[start:start + n], SEP_ID])
            labels.append(label)
    input_ids = torch.full((len(rows), seq_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return input_ids, mask, torch.tensor(labels)


def pretrain(out: Path, steps: int, batch_size: int, backend: Optional[str]) -> Path:
    """``albert-kernels pretrain --preset tiny`` for `steps` steps; returns the checkpoint."""
    argv = ["pretrain", "--preset", "tiny", "--steps", str(steps), "--batch-size", str(batch_size),
            "--seq-len", "64", "--lr", "0.02", "--warmup-steps", str(max(1, steps // 10)),
            "--save-every", "0", "--device", "cpu", "--out", str(out)]
    if backend:
        argv += ["--backend", backend]
    if cli_main(argv) != 0:
        raise RuntimeError(f"albert-kernels {' '.join(argv)} failed")
    return out / (out / "latest").read_text().strip()


@torch.no_grad()
def accuracy(model, input_ids, mask, labels) -> float:
    model.eval()
    logits = model(input_ids, attention_mask=mask).logits
    return float((logits.argmax(-1) == labels).float().mean())


def finetune(model, data, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """AdamW, linear warm-up over the first 10% of the steps then linear decay, on random
    batches of the training passages; returns the loss of every step."""
    input_ids, mask, labels = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup + 1)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randperm(len(labels), generator=gen)[:batch_size]
        loss = model(input_ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the pretraining run and classifier")
    p.add_argument("--checkpoint", default=None,
                   help="start from this pretraining checkpoint instead of pretraining one")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=16, help="for pretraining and fine-tuning")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--train-per-book", type=int, default=64)
    p.add_argument("--test-per-book", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--backend", default=None, help="kernel backend (default: best available)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    checkpoint = Path(args.checkpoint) if args.checkpoint else \
        pretrain(out / "pretrain", args.pretrain_steps, args.batch_size, args.backend)
    train = book_passages(args.seq_len, args.train_per_book, "train", args.seed)
    test = book_passages(args.seq_len, args.test_per_book, "test", args.seed + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ak.AlbertForSequenceClassification.from_pretrained(
            checkpoint, num_labels=4, backend=args.backend)
    for w in caught:
        print(f"from_pretrained: {w.message}")
    before = accuracy(model, *test)
    losses = finetune(model, train, args.steps, args.batch_size, args.lr, args.seed)
    after = accuracy(model, *test)
    saved = out / "classifier"
    model.save_pretrained(saved)
    shutil.copyfile(TOKENIZER_PATH, saved / "spiece.model")
    figures = dict(first_loss=losses[0], last_loss=sum(losses[-5:]) / len(losses[-5:]),
                   test_accuracy_before=before, test_accuracy=after, chance=0.25,
                   transformers_max_abs_diff=compare_with_transformers(model, saved, test),
                   seconds=time.perf_counter() - t0, checkpoint=str(checkpoint), saved=str(saved))
    print(f"fine-tuning loss {figures['first_loss']:.3f} -> {figures['last_loss']:.3f} (mean of "
          f"the last 5 of {args.steps} steps); test accuracy {before:.1%} -> {after:.1%} "
          f"(chance 25%, {len(test[2])} passages)")
    print(f"saved to {saved}; transformers' AlbertForSequenceClassification gives the same "
          f"logits: max |diff| {figures['transformers_max_abs_diff']:.1e}; "
          f"{figures['seconds']:.0f} s in all")
    return figures


def compare_with_transformers(model, directory: Path, test) -> float:
    """Max |our logits - transformers' logits| over the test passages, transformers loading the
    directory ``save_pretrained`` wrote."""
    import transformers
    theirs = transformers.AlbertForSequenceClassification.from_pretrained(directory).eval()
    input_ids, mask, _ = test
    model.eval()
    with torch.no_grad():
        ours = model(input_ids, attention_mask=mask).logits
        ref = theirs(input_ids, attention_mask=mask).logits
    return float((ours - ref).abs().max())


if __name__ == "__main__":
    main(sys.argv[1:])
