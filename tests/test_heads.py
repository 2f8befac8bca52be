"""The task heads against transformers' own ALBERT heads, with the same weights (from_hf).

For every head: outputs, loss and every parameter's gradient of our model (fp32, padding-free)
are held to the error budget (albert_kernels/tools/budget.py) with transformers in float64 as
gold and transformers in float32 as base, on right- and left-padded batches. Outputs are compared
at real positions (transformers computes values at padded positions from pad tokens' hidden
states; ours are defined in albert_kernels/model/heads.py and checked here too).
"""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")

VOCAB = 97
CFG = dict(vocab_size=VOCAB, embedding_size=16, hidden_size=64, num_attention_heads=2,
           intermediate_size=48, num_hidden_layers=2, classifier_dropout_prob=0.0)


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    """The reference backend, and the library's own CPU kernels (conftest's cpu_backend)."""
    return "reference" if request.param == "reference" else request.getfixturevalue("cpu_backend")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _models(hf_name: str, backend: str, **config):
    """(ours fp32, transformers fp32, transformers fp64), same weights, training mode."""
    torch.manual_seed(0)
    hf_cfg = transformers.AlbertConfig(attn_implementation="eager", **{**CFG, **config})
    hf32 = getattr(transformers, hf_name)(hf_cfg).train()
    hf64 = copy.deepcopy(hf32).double()
    ours = getattr(ak, hf_name).from_hf(hf32, backend=backend).train()
    return ours, hf32, hf64


def _mask(batch=3, seqlen=12):
    """Row 0 full, row 1 right-padded (7 real), row 2 left-padded (4 pads)."""
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    return mask


def _ids(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, shape, generator=gen), torch.randint(0, 2, shape, generator=gen)


def _check(name, ours, hf32, hf64, scale=None):
    result = check_budget(ours, hf32, hf64, torch.float32, scale=scale)
    assert result.ok, f"{name}: {result}"


def _check_grads(ours, hf32, hf64, loss, loss32, loss64):
    """Every parameter gradient of `loss` (ours) against transformers' (loss32, loss64)."""
    for model, value in ((ours, loss), (hf32, loss32), (hf64, loss64)):
        model.zero_grad(set_to_none=True)
        value.backward()
    p32, p64 = dict(hf32.named_parameters()), dict(hf64.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(grads) == set(p32), set(grads) ^ set(p32)
    scale = max(p.grad.abs().max().item() for p in p64.values() if p.grad is not None)
    for name, grad in grads.items():
        if p64[name].grad is None:       # a weight the forward does not use (untied MLM bias)
            assert grad is None, name
            continue
        _check(f"grad of {name}", grad, p32[name].grad, p64[name].grad, scale)


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm(backend, tied):
    ours, hf32, hf64 = _models("AlbertForMaskedLM", backend, tie_word_embeddings=tied)
    assert (ours.predictions.decoder.weight is ours.albert.embeddings.word_embeddings.weight) == tied
    mask = _mask()
    ids, types = _ids(mask.shape)
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3,
                         ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    labels[:, 5] = ids[:, 5]                   # at least one label per row; all real tokens
    kw = dict(attention_mask=mask, token_type_ids=types, labels=labels)
    got, e32, e64 = ours(ids, **kw), hf32(ids, **kw), hf64(ids, **kw)
    selected = labels != -100
    assert got.logits.shape == (int(selected.sum()), VOCAB)     # sparse: labelled positions only
    _check("logits", got.logits, e32.logits[selected], e64.logits[selected])
    _check("loss", got.loss, e32.loss, e64.loss)
    _check_grads(ours, hf32, hf64, got.loss, e32.loss, e64.loss)
    with torch.no_grad():                       # without labels: the [B, L, V] grid
        dense, ref32, ref64 = (m(ids, attention_mask=mask, token_type_ids=types).logits
                               for m in (ours, hf32, hf64))
    real = mask.bool()
    assert dense.shape == (3, 12, VOCAB)
    _check("dense logits", dense[real], ref32[real], ref64[real])


def test_token_classification(backend):
    ours, hf32, hf64 = _models("AlbertForTokenClassification", backend, num_labels=5)
    assert ours.num_labels == 5
    mask = _mask()
    ids, types = _ids(mask.shape)
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(2))
    labels[mask == 0] = -100                   # as DataCollatorForTokenClassification pads them
    labels[0, 3] = -100
    kw = dict(attention_mask=mask, token_type_ids=types, labels=labels)
    got, e32, e64 = ours(ids, **kw), hf32(ids, **kw), hf64(ids, **kw)
    real = mask.bool()
    assert got.logits.shape == (3, 12, 5)
    _check("logits", got.logits[real], e32.logits[real], e64.logits[real])
    # Right padding: the encoder's zero rows through the classifier = its bias.
    assert torch.equal(got.logits[1, 7:], ours.classifier.bias.expand(5, 5))
    _check("loss", got.loss, e32.loss, e64.loss)
    _check_grads(ours, hf32, hf64, got.loss, e32.loss, e64.loss)


def _masked_qa_loss(out, mask, start, end):
    """transformers' QA loss over real positions only: its logits at padding set to the lowest
    value (what our head does), clamping and ignore index as in transformers."""
    low = torch.finfo(out.start_logits.dtype).min
    s = out.start_logits.masked_fill(mask == 0, low)
    e = out.end_logits.masked_fill(mask == 0, low)
    ignored = s.shape[1]
    ce = torch.nn.CrossEntropyLoss(ignore_index=ignored)
    return (ce(s, start.clamp(0, ignored)) + ce(e, end.clamp(0, ignored))) / 2


def test_question_answering(backend):
    ours, hf32, hf64 = _models("AlbertForQuestionAnswering", backend)
    mask = _mask()
    ids, types = _ids(mask.shape)
    start = torch.tensor([2, 40, 6])           # 40 > L: clamped to L and ignored, as transformers
    end = torch.tensor([[5], [6], [9]])        # [B, 1] is squeezed, as transformers does
    kw = dict(attention_mask=mask, token_type_ids=types)
    got = ours(ids, **kw, start_positions=start, end_positions=end)
    e32, e64 = hf32(ids, **kw), hf64(ids, **kw)
    real = mask.bool()
    for field in ("start_logits", "end_logits"):
        _check(field, getattr(got, field)[real], getattr(e32, field)[real], getattr(e64, field)[real])
        assert torch.all(getattr(got, field)[~real] == torch.finfo(torch.float32).min)
    loss32, loss64 = (_masked_qa_loss(e, mask, start, end.squeeze(-1)) for e in (e32, e64))
    _check("loss", got.loss, loss32, loss64)
    _check_grads(ours, hf32, hf64, got.loss, loss32, loss64)
    # Without padding the loss is transformers' own, clamping included.
    full = torch.ones_like(mask)
    with torch.no_grad():
        a = ours(ids, attention_mask=full, start_positions=start, end_positions=end).loss
        b = hf64(ids, attention_mask=full, start_positions=start, end_positions=end).loss
    assert abs(a.item() - b.item()) <= 1e-5


def test_multiple_choice(backend):
    ours, hf32, hf64 = _models("AlbertForMultipleChoice", backend)
    batch, choices, seqlen = 2, 3, 10
    ids, types = _ids((batch, choices, seqlen), seed=3)
    mask = torch.ones(batch, choices, seqlen, dtype=torch.long)
    mask[0, 1, 6:] = 0                          # right padding: the pooler reads a real token
    mask[1, 2, 3:] = 0
    labels = torch.tensor([1, 2])
    kw = dict(attention_mask=mask, token_type_ids=types, labels=labels)
    got, e32, e64 = ours(ids, **kw), hf32(ids, **kw), hf64(ids, **kw)
    assert got.logits.shape == (batch, choices)
    _check("logits", got.logits, e32.logits, e64.logits)
    _check("loss", got.loss, e32.loss, e64.loss)
    _check_grads(ours, hf32, hf64, got.loss, e32.loss, e64.loss)


def test_outputs_index_like_transformers():
    """Fields by name, and by position over the fields that are set (loss first when given)."""
    model = ak.AlbertForQuestionAnswering(ak.AlbertConfig(**CFG), backend="reference").eval()
    ids, _ = _ids((2, 6))
    out = model(ids)
    assert out.loss is None and out[0] is out.start_logits and out[1] is out.end_logits
    out = model(ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3]))
    assert out[0] is out.loss and out.to_tuple()[1] is out.start_logits


def test_label_errors_name_the_argument():
    cfg = ak.AlbertConfig(**CFG)
    ids, _ = _ids((2, 6))
    with pytest.raises(ValueError, match="labels"):
        ak.AlbertForMaskedLM(cfg, backend="reference")(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="labels"):
        ak.AlbertForTokenClassification(cfg, backend="reference")(ids, labels=ids.float())
    qa = ak.AlbertForQuestionAnswering(cfg, backend="reference")
    with pytest.raises(ValueError, match="start_positions"):
        qa(ids, start_positions=torch.tensor([0.5, 1.0]), end_positions=torch.tensor([1, 2]))
    mc = ak.AlbertForMultipleChoice(cfg, backend="reference")
    with pytest.raises(ValueError, match=r"input_ids must be \[B, num_choices, L\]"):
        mc(ids)
    with pytest.raises(ValueError, match="attention_mask"):
        mc(ids[:, None], attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="num_labels == 2"):
        ak.AlbertForQuestionAnswering(ak.AlbertConfig(**CFG, num_labels=3))


_COMPILE_HEADS_FIRST = r"""
import json, sys
import torch
import albert_kernels as ak
cfg = ak.AlbertConfig(vocab_size=97, embedding_size=16, hidden_size=64, num_attention_heads=2,
                      intermediate_size=48, num_hidden_layers=2)
ids = torch.randint(5, 97, (2, 3, 9)); mask = torch.ones(2, 3, 9, dtype=torch.long)
mask[0, 1, 6:] = 0
flat_ids, flat_mask = ids[:, 0], mask[:, 1]
runs = {"AlbertForSequenceClassification": (flat_ids, flat_mask, "logits"),
        "AlbertForMaskedLM": (flat_ids, flat_mask, "logits"),
        "AlbertForTokenClassification": (flat_ids, flat_mask, "logits"),
        "AlbertForQuestionAnswering": (flat_ids, flat_mask, "start_logits"),
        "AlbertForMultipleChoice": (ids, mask, "logits")}
out = {}
with torch.no_grad():
    for name, (x, m, field) in runs.items():   # compiled first, before any eager call
        model = getattr(ak, name)(cfg, backend=sys.argv[1]).eval()
        compiled = getattr(torch.compile(model, fullgraph=True)(x, m), field)
        eager = getattr(model(x, m), field)
        real = m.bool() if compiled.dim() > 1 and compiled.shape[:2] == m.shape else None
        if real is not None:
            compiled, eager = compiled[real], eager[real]
        out[name] = (compiled - eager).abs().max().item()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_every_head_compiles_before_any_eager_call_in_a_fresh_process():
    """torch.compile(fullgraph=True) on freshly built heads (inference), in a process that never
    ran them eagerly (the encoder and pretraining heads: tests/test_dispatch.py)."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_HEADS_FIRST, "reference"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    diffs = json.loads(line[len("RESULT "):])
    assert len(diffs) == 5 and all(d <= 1e-5 for d in diffs.values()), diffs
