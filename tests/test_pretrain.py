"""Pretraining on our kernels: gradients end to end, the sparse MLM head, LAMB, the training loop
(loss falls, exact resume after Ctrl-C, bf16) and 2-process DDP."""
import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from albert_kernels.training import optim, pretrain  # noqa: E402

# Three applications of one shared layer (head dim 32: every backend has it); the MLM decoder
# is tied to the word embeddings.
CFG = dict(vocab_size=97, embedding_size=16, hidden_size=64, num_attention_heads=2,
           intermediate_size=48, num_hidden_layers=3, classifier_dropout_prob=0.0)
SHARED = "albert.encoder.albert_layer_groups.0.albert_layers.0."
BACKENDS = [b for b in ak.available_backends("cpu") if b != "reference"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two OpenMP
    threads competing with other processes run the training steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(vocab=CFG["vocab_size"], seed=0):
    """Right padding only (the pooler reads position 0); ~25% of real tokens labelled."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [11, 8, 5]
    ids = torch.randint(5, vocab, (3, 11), generator=gen)
    mask = torch.zeros(3, 11, dtype=torch.long)
    types = torch.zeros(3, 11, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        types[row, n // 2:n] = 1
    ids = ids * mask
    chosen = (torch.rand(3, 11, generator=gen) < 0.25) & mask.bool()
    chosen[:, 1] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                sentence_order_label=torch.tensor([0, 1, 1]))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_every_grad_within_budget(backend, dtype):
    """gold: the reference backend in float64; base: reference in dtype; candidate: backend."""
    torch.manual_seed(0)
    gold_model = ak.AlbertForPreTraining(ak.AlbertConfig(**CFG), backend="reference").double()
    base_model = copy.deepcopy(gold_model).to(dtype)
    cand_model = copy.deepcopy(base_model).set_backend(backend)
    batch = _batch()
    gold, gold_grads = _loss_and_grads(gold_model, batch)
    base, base_grads = _loss_and_grads(base_model, batch)
    cand, cand_grads = _loss_and_grads(cand_model, batch)
    assert {"albert.embeddings.word_embeddings.weight", SHARED + "ffn.weight",
            SHARED + "attention.query.weight", "predictions.bias"} <= set(gold_grads)
    assert cand_model.predictions.decoder.weight is cand_model.albert.embeddings.word_embeddings.weight
    result = check_budget(cand.loss, base.loss, gold.loss, dtype)
    assert result.ok, f"{backend}/{dtype} loss: {result}"
    scale = max(g.abs().max().item() for g in gold_grads.values())
    failures = []
    for name, g in gold_grads.items():
        result = check_budget(cand_grads[name], base_grads[name], g, dtype, scale=scale)
        if not result.ok:
            failures.append(f"{name}: {result}")
    assert not failures, f"{backend}/{dtype} gradients:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_matches_transformers(backend):
    torch.manual_seed(1)
    hf_cfg = transformers.AlbertConfig(attn_implementation="eager", **CFG)
    hf = transformers.AlbertForPreTraining(hf_cfg).train()
    ours = ak.AlbertForPreTraining.from_hf(hf, backend=backend).train()
    batch = _batch()
    expected = hf(**batch)
    got = ours(**batch)
    selected = batch["labels"] != -100
    assert got.prediction_logits.shape == (int(selected.sum()), CFG["vocab_size"])
    logits_diff = (got.prediction_logits - expected.prediction_logits[selected]).abs().max().item()
    assert logits_diff <= 1e-4, logits_diff
    assert (got.sop_logits - expected.sop_logits).abs().max().item() <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5
    expected.loss.backward()
    got.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        diff = (p.grad - ref).abs().max().item()
        assert diff <= 1e-5 + 1e-4 * ref.abs().max().item(), f"grad of {name}: {diff:.2e}"


def test_sparse_head_equals_dense():
    torch.manual_seed(2)
    cfg = ak.AlbertConfig(**CFG)
    sparse = ak.AlbertForPreTraining(cfg)
    dense = ak.AlbertForPreTraining(cfg, sparse_mlm=False)
    dense.load_state_dict(sparse.state_dict())
    batch = _batch(seed=3)
    a, grads_a = _loss_and_grads(sparse, batch)
    b, grads_b = _loss_and_grads(dense, batch)
    selected = batch["labels"] != -100
    assert b.prediction_logits.shape == (3, 11, CFG["vocab_size"])
    assert torch.allclose(a.prediction_logits, b.prediction_logits[selected], atol=1e-6)
    assert abs(a.loss.item() - b.loss.item()) <= 1e-6 * b.loss.item()
    for name, g in grads_b.items():
        assert torch.allclose(grads_a[name], g, atol=1e-7, rtol=1e-5), name
    # Without labels the sparse model gives the dense logits, as transformers does.
    no_labels = {k: v for k, v in batch.items() if k not in ("labels", "sentence_order_label")}
    out = sparse(**no_labels)
    assert out.loss is None and out.prediction_logits.shape == (3, 11, CFG["vocab_size"])


def test_label_errors_name_the_argument():
    model = ak.AlbertForPreTraining(ak.AlbertConfig(**CFG))
    batch = _batch()
    with pytest.raises(ValueError, match="labels"):
        model(**{**batch, "labels": batch["labels"][:, :5]})
    with pytest.raises(ValueError, match="labels"):
        model(**{**batch, "labels": batch["labels"].float()})
    with pytest.raises(ValueError, match="sentence_order_label"):
        model(**{**batch, "sentence_order_label": torch.tensor([0, 1])})


def test_lamb_step_and_parameter_groups():
    torch.manual_seed(3)
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    grads = (torch.randn(4, 3), torch.randn(3))
    w0 = w.detach().clone()
    opt = optim.Lamb([dict(params=[w], weight_decay=0.1, adapt=True),
                      dict(params=[b], weight_decay=0.0, adapt=False)], lr=0.01, eps=1e-6)
    w.grad, b.grad = grads
    opt.step()
    # First step: m^ = g, v^ = g^2, so u = g / (|g| + eps) + wd * w.
    u = grads[0] / (grads[0].abs() + 1e-6) + 0.1 * w0
    assert torch.allclose(w.detach(), w0 - 0.01 * (w0.norm() / u.norm()) * u, atol=1e-7)
    assert torch.allclose(b.detach(), -0.01 * grads[1] / (grads[1].abs() + 1e-6), atol=1e-7)
    model = ak.AlbertForPreTraining(ak.AlbertConfig(**CFG))
    decay, no_decay = optim.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)]
               or "layer_norm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    factor = optim.warmup_linear_decay(2, 10)
    assert [round(factor(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5,
                                                         0.375, 0.25, 0.125]


def _args(out, *extra):
    p = argparse.ArgumentParser()
    pretrain.add_arguments(p)
    return p.parse_args(["--out", str(out), "--preset", "tiny", *map(str, extra)])


SMALL = ("--steps", 8, "--batch-size", 4, "--seq-len", 32, "--lr", 0.02, "--warmup-steps", 2,
         "--save-every", 0)


def test_pretraining_loss_falls(tmp_path):
    history = pretrain.run(_args(tmp_path, "--steps", 30, "--batch-size", 8, "--seq-len", 64,
                                 "--lr", 0.03, "--warmup-steps", 3, "--save-every", 0))
    losses = [m["loss"] for m in history]
    assert len(losses) == 30 and all(map(lambda x: x == x, losses))
    start, end = losses[0], sum(losses[-5:]) / 5
    assert start > 9.0                                   # ln(8000) + ln(2) at initialisation
    assert end < start - 1.0, f"loss fell from {start:.3f} to only {end:.3f}"
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in logged] == losses


def test_resume_after_ctrl_c_is_exact(tmp_path, monkeypatch):
    straight = pretrain.run(_args(tmp_path / "a", *SMALL))
    original = pretrain.Trainer.train_step
    calls = []

    def interrupted_step(self, batch):
        metrics = original(self, batch)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)          # Ctrl-C during step 3
        return metrics

    monkeypatch.setattr(pretrain.Trainer, "train_step", interrupted_step)
    first = pretrain.run(_args(tmp_path / "b", *SMALL))
    monkeypatch.setattr(pretrain.Trainer, "train_step", original)
    assert len(first) == 3, "Ctrl-C must stop after the current step"
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoint-0000003"
    second = pretrain.run(_args(tmp_path / "b", *SMALL, "--resume"))
    assert [m["step"] for m in second] == list(range(4, 9))
    assert [m["loss"] for m in first + second] == [m["loss"] for m in straight]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "checkpoint-0000008" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-0000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoint loads in our model and in transformers, with the same loss.
    ckpt = tmp_path / "b" / "checkpoint-0000008"
    ours = ak.AlbertForPreTraining.from_hf(str(ckpt))
    hf = transformers.AlbertForPreTraining.from_pretrained(str(ckpt))
    batch = _batch(vocab=ours.config.vocab_size)
    assert abs(ours(**batch).loss.item() - hf(**batch).loss.item()) <= 1e-5
    with pytest.raises(ValueError, match="--resume"):
        pretrain.run(_args(tmp_path / "b", *SMALL))          # would overwrite the run
    with pytest.raises(ValueError, match="--seq-len"):
        pretrain.run(_args(tmp_path / "b", *SMALL[:4], "--seq-len", 64, "--resume"))


def test_bfloat16_run(tmp_path):
    steps = ("--steps", 3, "--batch-size", 4, "--seq-len", 32, "--save-every", 0)
    fp32 = pretrain.run(_args(tmp_path / "f", *steps))
    bf16 = pretrain.run(_args(tmp_path / "h", *steps, "--dtype", "bfloat16"))
    assert all(abs(a["loss"] - b["loss"]) <= 0.05 for a, b in zip(fp32, bf16)), (fp32, bf16)
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "h" / "checkpoint-0000003" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path):
    """Two CPU processes (gloo) vs one. The device is named: BACKENDS are this host's CPU backends,
    and on a GPU machine the default device would be cuda (and rank 1 cuda:1, which a one-GPU
    machine lacks)."""
    args = ("--steps", 4, "--batch-size", 8, "--seq-len", 32, "--lr", 0.02, "--warmup-steps", 1,
            "--save-every", 0, "--device", "cpu",
            "--backend", "cpp" if "cpp" in BACKENDS else "reference")
    single = pretrain.run(_args(tmp_path / "one", *args))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "albert_kernels",
           "pretrain", "--preset", "tiny", "--out", str(tmp_path / "two"), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(two) == len(single) == 4
    for a, b in zip(single, two):
        assert a["tokens"] == b["tokens"]                 # the same global batch
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * a["loss"], (a, b)
        assert abs(a["mlm_acc"] - b["mlm_acc"]) <= 1e-6
