"""ak.patch_hf: a transformers ALBERT model runs on our kernels with the same outputs and
gradients, the same parameters, and clear errors for what it does not support."""
import pytest
import torch

import albert_kernels as ak
from albert_kernels.model.hf_patch import PatchedAlbertTransformer
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 11
CLASSES = ["AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
           "AlbertForSequenceClassification", "AlbertForTokenClassification",
           "AlbertForQuestionAnswering", "AlbertForMultipleChoice"]


def _model(cls_name, impl="sdpa", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=64,
                                    num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=128, classifier_dropout_prob=0.0,
                                    attn_implementation=impl, **kw)
    return getattr(transformers, cls_name)(cfg).to(dtype)


def _inputs(cls_name):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 9:] = 0
    if cls_name == "AlbertForMultipleChoice":
        return {"input_ids": ids[None], "attention_mask": mask[None]}, mask
    return {"input_ids": ids, "attention_mask": mask}, mask


def _outputs(model, inputs, mask):
    """The model's first output, restricted to real tokens where it is per token."""
    out = model(**inputs)
    first = out[0]
    if first.dim() >= 2 and tuple(first.shape[:2]) == tuple(mask.shape):
        first = first[mask.bool()]
    return first


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_same_outputs_and_grads(cls_name, impl, cpu_backend):
    model = _model(cls_name, impl).train()
    inputs, mask = _inputs(cls_name)
    gold_model = _model(cls_name, impl, torch.float64).train()   # the error budget's gold
    before = _outputs(model, inputs, mask)
    gold = _outputs(gold_model, inputs, mask)
    upstream = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    grads_before = torch.autograd.grad(before, list(model.parameters()), upstream, allow_unused=True)
    gold_grads = torch.autograd.grad(gold, list(gold_model.parameters()), upstream.double(),
                                     allow_unused=True)
    params_before = list(model.parameters())
    assert ak.patch_hf(model, backend=cpu_backend) is model
    assert any(isinstance(m, PatchedAlbertTransformer) for m in model.modules())
    assert all(a is b for a, b in zip(params_before, model.parameters())), "same tensors"
    after = _outputs(model, inputs, mask)
    result = check_budget(after, before, gold)
    assert result.ok, f"outputs: {result}"
    grads_after = torch.autograd.grad(after, list(model.parameters()), upstream, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    scale = max(g.abs().max().item() for g in gold_grads if g is not None)
    for name, a, b, g in zip(names, grads_after, grads_before, gold_grads):
        assert (a is None) == (b is None) == (g is None), name
        if a is None:  # a parameter this output does not use (the pooler of AlbertModel)
            continue
        result = check_budget(a, b, g, scale=scale)
        assert result.ok, f"grad of {name}: {result}"


def test_optimizer_built_before_patching_still_trains():
    model = _model("AlbertForSequenceClassification").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ak.patch_hf(model)
    inputs, _ = _inputs("AlbertForSequenceClassification")
    labels = torch.tensor([0, 1, 1])
    q = model.albert.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight
    before = q.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(before, q.detach()), "the optimizer must update the shared weights"
    assert losses[-1] < losses[0]


def test_save_and_load_round_trip(tmp_path):
    model = ak.patch_hf(_model("AlbertForMaskedLM").eval())
    model.save_pretrained(tmp_path)
    loaded = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
    inputs, mask = _inputs("AlbertForMaskedLM")
    with torch.no_grad():
        expected = _outputs(model, inputs, mask)
        unpatched = _outputs(loaded, inputs, mask)
        patched = _outputs(ak.patch_hf(loaded), inputs, mask)
    assert torch.equal(patched, expected)
    assert (unpatched - expected).abs().max().item() <= 1e-5
    assert set(loaded.state_dict()) == set(_model("AlbertForMaskedLM").state_dict())


def test_train_eval_and_backend_switch():
    model = ak.patch_hf(_model("AlbertModel", hidden_dropout_prob=0.5), backend="reference")
    enc = model.encoder
    inputs, mask = _inputs("AlbertModel")
    model.eval()
    assert not enc.training
    with torch.no_grad():
        a = _outputs(model, inputs, mask)
        b = _outputs(model, inputs, mask)
    assert torch.equal(a, b), "eval mode is deterministic"
    model.train()
    assert enc.training
    with torch.no_grad():
        c = _outputs(model, inputs, mask)
    assert not torch.equal(a, c), "hidden dropout is active in training"
    ak.patch_hf(model, backend=None)
    assert model.encoder is enc and enc.backend is None


def test_unsupported_features_raise():
    """(output_attentions, output_hidden_states and attention dropout now work: see
    tests/test_hf_parity.py and tests/test_readme_parity.py.)"""
    model = ak.patch_hf(_model("AlbertModel").eval())
    inputs, _ = _inputs("AlbertModel")
    with pytest.raises(ValueError, match="head_mask"):
        model(**inputs, head_mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="transformers ALBERT"):
        ak.patch_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ak.BackendUnavailable):
        ak.patch_hf(_model("AlbertModel"), backend="nope")


def test_fill_mask_pipeline_same_predictions(tmp_path, cpu_backend):
    """A transformers pipeline on a model saved to a local directory, with the SentencePiece
    tokenizer trained offline on the bundled corpus, predicts the same after patching."""
    pytest.importorskip("sentencepiece")
    from albert_kernels.training.data import TOKENIZER_PATH
    tokenizer = transformers.AlbertTokenizer(vocab_file=str(TOKENIZER_PATH), do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=len(tokenizer), embedding_size=32, hidden_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, pad_token_id=tokenizer.pad_token_id)
    transformers.AlbertForMaskedLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = transformers.AlbertForMaskedLM.from_pretrained(tmp_path).eval()
    fill = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    texts = [f"alice was beginning to get very {tokenizer.mask_token} of sitting by her sister.",
             f"the {tokenizer.mask_token} said nothing."]
    before = fill(texts, top_k=5)
    ak.patch_hf(model, backend=cpu_backend)
    after = fill(texts, top_k=5)
    for b, a in zip(before, after):
        assert [x["token"] for x in b] == [x["token"] for x in a]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(b, a)) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in ak.available_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("kind", ["ours", "patched"])
def test_torch_compile_fullgraph(kind, backend):
    """torch.compile(fullgraph=True) traces our model and a patched transformers model in one
    graph (the padded layout: static shapes) and gives the same outputs as eager."""
    torch._dynamo.reset()
    hf = _model("AlbertModel").eval()
    model = ak.AlbertModel.from_hf(hf, backend=backend).eval() if kind == "ours" \
        else ak.patch_hf(hf, backend=backend)
    inputs, mask = _inputs("AlbertModel")
    call = (lambda m: m(inputs["input_ids"], inputs["attention_mask"])) if kind == "ours" \
        else (lambda m: m(**inputs))
    with torch.no_grad():
        eager = call(model)[0][mask.bool()]
        compiled = call(torch.compile(model, fullgraph=True))[0][mask.bool()]
    assert (compiled - eager).abs().max().item() <= 1e-5
