"""`albert-kernels pretrain`: MLM + sentence-order-prediction pretraining of ALBERT on our kernels.

    albert-kernels pretrain --preset tiny --steps 2000 --out runs/tiny
    torchrun --nproc_per_node=2 -m albert_kernels pretrain --preset tiny --out runs/tiny2

- Data: the bundled corpus and tokenizer (training/data.py); ``--batch-size`` is the global batch
  (sequences per optimizer step over all processes), each process reads its own shard of it.
- Model: ``AlbertForPreTraining`` with the sparse MLM head; the loss is the MLM cross-entropy
  averaged over every masked token of the global batch plus the SOP cross-entropy averaged over
  its sequences, so one process and N processes with the same global batch follow the same curve.
- Optimizer: LAMB (the ALBERT paper's), linear warm-up then linear decay; no weight decay and no
  layer-wise adaptation for LayerNorm weights and biases.
- ``--dtype bfloat16``: mixed precision by casting, not autocast (our fused ops take one dtype for
  all their inputs, which autocast does not give them): forward and backward run on a bfloat16
  copy of the model, the optimizer updates float32 master weights, which are copied back to the
  copy after every step. Checkpoints hold the float32 weights.
- Checkpoints (``--out/checkpoint-NNNNNNN/``): config.json + model.safetensors (``save_hf``:
  loadable by ``AlbertForPreTraining.from_hf`` and transformers' ``from_pretrained``),
  spiece.model, trainer_state.pt (optimizer, scheduler, step, run settings) and rng-rankR.pt.
  ``--resume`` continues from the latest one (or a given directory) exactly: the data at a step is
  a function of (seed, step), the rest is in the checkpoint.
- Ctrl-C finishes the current step, saves a checkpoint and exits with status 0.
- Every step is appended to ``--out/log.jsonl`` (loss, accuracies, lr, tokens/s).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..dtypes import DTYPES as ALL_DTYPES
from ..model import AlbertConfig, AlbertForPreTraining
from ..model.weights import read_hf_directory
from .data import IGNORE_INDEX, TOKENIZER_PATH, PretrainingData, load_tokenizer
from .optim import Lamb, parameter_groups, warmup_linear_decay

# The model sizes `pretrain --preset` offers: "tiny", a CPU-sized ALBERT for smoke runs and tests
# (these fields; this command only), and "base", ALBERT v2 base (model/config.py PRESETS, the v2
# sizes that `bench --preset` takes). Both without the SOP head's dropout, like the original
# pretraining code (so runs are deterministic).
PRETRAIN_SIZES = {
    "tiny": dict(embedding_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512),
    "base": dict(),
}
# Default peak learning rates: the paper's 0.00176 (for its batch of 4096) for base; a larger one
# for tiny, whose small batches and short runs on a CPU need it to learn within minutes.
DEFAULT_LR = {"tiny": 1e-2, "base": 1.76e-3}
# the dtypes --dtype takes
DTYPES = {name: ALL_DTYPES[name] for name in ("float32", "bfloat16")}
# Settings that must match the checkpoint's for --resume to continue the same run.
RUN_KEYS = ("preset", "seq_len", "batch_size", "seed")


def model_config(preset: str, vocab_size: int) -> AlbertConfig:
    if preset not in PRETRAIN_SIZES:
        raise ValueError(f"--preset must be one of {sorted(PRETRAIN_SIZES)}, got {preset!r}")
    if preset == "tiny":
        return AlbertConfig(vocab_size=vocab_size, classifier_dropout_prob=0.0,
                            **PRETRAIN_SIZES["tiny"])
    return AlbertConfig.preset(preset, vocab_size=vocab_size, classifier_dropout_prob=0.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRETRAIN_SIZES),
                   help="model size to pretrain: tiny (hidden 128, 2 layers, this command only) or "
                        "base (ALBERT v2 base); vocab = the tokenizer's")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in the whole run")
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch: sequences per step over all processes")
    p.add_argument("--seq-len", type=int, default=128, help="max tokens per sequence")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of LAMB (default: 0.01 for tiny, 0.00176 for base)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of linear learning-rate warm-up (default: 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="LAMB weight decay (none on LayerNorm weights and biases)")
    from ..cli import backend_name
    p.add_argument("--backend", default=None, type=backend_name,
                   help="kernel backend (default: the best available on --device)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="bfloat16: bf16 compute copy, float32 master weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--out", required=True, help="directory for checkpoints and log.jsonl")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out, or from this directory")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (0: only at the end and on Ctrl-C)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights' initialisation and of the data order and masking")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between progress lines when tqdm is not installed")


def check_arguments(args) -> None:
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.preset, DEFAULT_LR["base"])
    for name in ("steps", "batch_size", "seq_len"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps <= args.steps:
        raise ValueError(f"--warmup-steps must be in [0, --steps={args.steps}], got {args.warmup_steps}")
    if args.save_every < 0 or args.log_every < 1:
        raise ValueError("--save-every must be >= 0 and --log-every >= 1")


# --- processes ------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def setup(cls, device: Optional[str]) -> "Dist":
        """torchrun's environment (WORLD_SIZE > 1): init the process group (gloo on CPU, nccl on
        CUDA) and pick this rank's device."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class StopRequest:
    """Ctrl-C (SIGINT) sets a flag: the loop finishes its step, saves and exits. Further SIGINTs
    (torchrun forwards the signal to its workers) are ignored while it does."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if not self.requested:
            print("\nCtrl-C: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """The model (float32 master), its compute copy (bf16 or itself, wrapped in DDP when W > 1),
    LAMB and the schedule."""

    def __init__(self, args, config: AlbertConfig, dist_: Dist, state: Optional[dict] = None):
        self.args, self.dist = args, dist_
        torch.manual_seed(args.seed)
        self.model = AlbertForPreTraining(config, backend=args.backend)
        if state is not None:
            self.model.load_hf_state_dict(state, strict=True)  # resume: every weight or an error
        self.model.to(dist_.device).train()
        dtype = DTYPES[args.dtype]
        self.compute = self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)
        self.wrapped = self.compute
        if dist_.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            ids = [dist_.device.index] if dist_.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.compute, device_ids=ids)
        self.optimizer = Lamb(parameter_groups(self.model, args.weight_decay), lr=args.lr)
        warmup = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_linear_decay(warmup, args.steps))

    def train_step(self, batch: dict) -> dict:
        """Forward, backward and update on this rank's shard; returns the global metrics."""
        batch = {k: v.to(self.dist.device) for k, v in batch.items()}
        labels, sop = batch["labels"], batch["sentence_order_label"]
        masked = labels != IGNORE_INDEX
        n_masked, n_seq = self.dist.sum([float(masked.sum()), float(len(sop))])
        out = self.wrapped(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           labels=labels)                    # sparse MLM logits [M, V], no loss
        targets = labels[masked]
        logits, sop_logits = out.prediction_logits.float(), out.sop_logits.float()
        mlm_sum = F.cross_entropy(logits, targets, reduction="sum")
        sop_sum = F.cross_entropy(sop_logits, sop, reduction="sum")
        # Global means; DDP averages gradients over ranks, hence the factor world.
        loss = (mlm_sum / max(n_masked, 1.0) + sop_sum / n_seq) * self.dist.world
        loss.backward()
        self._update()
        local = [mlm_sum.item(), float((logits.argmax(-1) == targets).sum()), sop_sum.item(),
                 float((sop_logits.argmax(-1) == sop).sum()), float(batch["attention_mask"].sum())]
        mlm_sum, mlm_correct, sop_sum, sop_correct, tokens = self.dist.sum(local)
        return dict(loss=mlm_sum / max(n_masked, 1.0) + sop_sum / n_seq,
                    mlm_loss=mlm_sum / max(n_masked, 1.0), sop_loss=sop_sum / n_seq,
                    mlm_acc=mlm_correct / max(n_masked, 1.0), sop_acc=sop_correct / n_seq,
                    tokens=tokens, lr=self.scheduler.get_last_lr()[0])

    def _update(self) -> None:
        if self.compute is not self.model:       # bf16: gradients to the fp32 master weights
            for master, p in zip(self.model.parameters(), self.compute.parameters()):
                master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.compute is not self.model:
            with torch.no_grad():
                for master, p in zip(self.model.parameters(), self.compute.parameters()):
                    p.copy_(master)
                    p.grad = None


# --- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(out: Path, step: int, trainer: Trainer) -> Path:
    path = out / f"checkpoint-{step:07d}"
    d, args = trainer.dist, trainer.args
    if d.rank == 0:
        trainer.model.save_hf(str(path))
        shutil.copyfile(TOKENIZER_PATH, path / "spiece.model")
        state = {"step": step, "optimizer": trainer.optimizer.state_dict(),
                 "scheduler": trainer.scheduler.state_dict(),
                 "run": {k: getattr(args, k) for k in RUN_KEYS},
                 "data": {"next_example": step * args.batch_size, "seed": args.seed}}
        torch.save(state, path / "trainer_state.pt")
    d.barrier()
    rng = {"torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    torch.save(rng, path / f"rng-rank{d.rank}.pt")
    d.barrier()
    if d.rank == 0:
        tmp = out / "latest.tmp"
        tmp.write_text(path.name + "\n")
        tmp.replace(out / "latest")
    return path


def find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
    elif (out / "latest").is_file():
        path = out / (out / "latest").read_text().strip()
    else:
        raise FileNotFoundError(f"--resume: no checkpoint in --out {out} (no 'latest' file)")
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no trainer_state.pt)")
    return path


def load_checkpoint(path: Path, args, dist_: Dist):
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    for key, value in state["run"].items():
        if getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: {flag} is {getattr(args, key)!r} but the checkpoint {path} "
                             f"was trained with {value!r}; pass the same value to continue the run")
    config, weights = read_hf_directory(str(path))
    rng_file = path / f"rng-rank{dist_.rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state, config, weights, rng


# --- the loop -------------------------------------------------------------------------------------

class Progress:
    """tqdm when installed, else a plain line every --log-every steps; rank 0 only."""

    def __init__(self, start: int, total: int, every: int, enabled: bool):
        self.every, self.enabled, self.bar = every, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, desc="pretrain", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        text = (f"loss {m['loss']:.4f} mlm_acc {m['mlm_acc']:.3f} sop_acc {m['sop_acc']:.3f} "
                f"{m['tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0:
            print(f"step {step}: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> list[dict]:
    """Train; returns the metrics of the steps run (every rank gets the global metrics)."""
    check_arguments(args)
    d = Dist.setup(args.device)
    out = Path(args.out)
    if not args.resume and ((out / "latest").exists() or (out / "log.jsonl").exists()):
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it, or "
                         "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer()
    config = model_config(args.preset, tokenizer.get_piece_size())
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len ({args.seq_len}) must be <= max_position_embeddings "
                         f"({config.max_position_embeddings})")
    data = PretrainingData(tokenizer, args.seq_len, seed=args.seed)
    state = weights = rng = None
    start = 0
    if args.resume:
        path = find_checkpoint(out, args.resume)
        state, config, weights, rng = load_checkpoint(path, args, d)
        start = state["step"]
    trainer = Trainer(args, config, d, weights)
    if state is not None:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and d.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], d.device)
    history: list[dict] = []
    progress = Progress(start, args.steps, args.log_every, d.rank == 0)
    log = open(out / "log.jsonl", "a", encoding="utf-8") if d.rank == 0 else None
    step = start
    try:
        with StopRequest() as stop:
            while step < args.steps:
                t0 = time.perf_counter()
                batch = data.batch(data.indices(step, args.batch_size, d.rank, d.world))
                metrics = trainer.train_step(batch)
                step += 1
                metrics.update(step=step, tokens_per_s=metrics["tokens"] / (time.perf_counter() - t0))
                history.append(metrics)
                progress.update(step, metrics)
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                stopping = d.sum([float(stop.requested)])[0] > 0   # every rank stops together
                if stopping or step == args.steps or (args.save_every and step % args.save_every == 0):
                    path = save_checkpoint(out, step, trainer)
                if stopping:
                    if d.rank == 0:
                        print(f"\nstopped at step {step}; checkpoint {path}; continue with --resume",
                              file=sys.stderr)
                    break
    finally:
        progress.close()
        if log is not None:
            log.close()
    return history


def main(args) -> int:
    try:
        history = run(args)
    except (ValueError, FileNotFoundError) as e:     # bad arguments or checkpoint: no traceback
        print(f"albert-kernels pretrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if history and int(os.environ.get("RANK", "0")) == 0:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f} (mlm {last['mlm_loss']:.4f}, "
              f"sop {last['sop_loss']:.4f}), mlm_acc {last['mlm_acc']:.3f}, "
              f"sop_acc {last['sop_acc']:.3f}; checkpoints in {args.out}")
    return 0
