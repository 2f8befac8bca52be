"""ak.patch_hf: a transformers ALBERT model runs on our kernels with the same outputs and
gradients, the same parameters, and clear errors for what it does not support."""
import copy
import warnings

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


def _states_and_grads(model, ids, mask, attentions, upstream):
    """Run with hidden states (and attention probabilities) asked for, ``.retain_grad()`` on every
    one returned, backward from the outputs heads read (last hidden state on real positions, the
    pooler); (states, their grads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # output_attentions: "not fused"
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    output_attentions=attentions)
    states = list(out.hidden_states) + list(out.attentions if attentions else ())
    for t in states:
        t.retain_grad()
    w_hidden, w_pooled = (u.to(out.last_hidden_state.dtype) for u in upstream)
    loss = (out.last_hidden_state * w_hidden * mask[..., None]).sum() + \
        (out.pooler_output * w_pooled).sum()
    loss.backward()
    return states, [t.grad for t in states]


@pytest.mark.parametrize("attentions", [False, True], ids=["hidden-states", "with-attentions"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["patched", "ours", "ours-padded"])
def test_returned_states_are_on_the_gradient_path(kind, padding, attentions, cpu_backend):
    """Every hidden state and attention probability returned is an ancestor of the outputs:
    ``.retain_grad()`` on it gets a gradient, equal (within the error budget, fp64 transformers as
    gold) to what transformers' model gives its own, on real query positions (and position 0 under
    left padding). Covers the packed path (padding-free), the padded grid that forms the attention
    matrices (with-attentions), and our model on the padded grid (ours-padded: unpad=False)."""
    torch.manual_seed(0)
    hf = _model("AlbertModel", "eager", num_hidden_groups=1).eval()
    gold = copy.deepcopy(hf).double()
    if kind == "patched":
        ours = ak.patch_hf(copy.deepcopy(hf), backend=cpu_backend)
    else:
        ours = ak.AlbertModel.from_hf(hf, backend=cpu_backend).eval()
        ours.unpad = kind == "ours"
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    for b, n in enumerate([SEQ, 6, 9]):
        if padding == "right":
            mask[b, n:] = 0
        elif padding == "left":
            mask[b, :SEQ - n] = 0
    upstream = (torch.randn(3, SEQ, 64, generator=gen, dtype=torch.float64),
                torch.randn(3, 64, generator=gen, dtype=torch.float64))
    runs = [_states_and_grads(m, ids, mask, attentions, upstream) for m in (ours, hf, gold)]
    (c_states, c_grads), (b_states, b_grads), (g_states, g_grads) = runs
    assert len(c_states) == len(b_states) == 4 + (3 if attentions else 0)
    rows = mask.bool().clone()
    rows[:, 0] = True  # a left-padded first position is what the pooler reads
    scale = max(float(g.abs().max()) for g in g_grads)
    for i, (c, b, g, state) in enumerate(zip(c_grads, b_grads, g_grads, c_states)):
        assert c is not None, f"returned state {i} got no gradient: it is not on the path"
        assert b is not None and g is not None
        pick = (lambda t: t[rows]) if state.dim() == 3 else (lambda t: t.transpose(1, 2)[rows])
        for got, base, want, what in ((c_states[i], b_states[i], g_states[i], "value"),
                                      (c, b, g, "grad")):
            result = check_budget(pick(got), pick(base), pick(want),
                                  scale=scale if what == "grad" else None)
            assert result.ok, f"state {i} {what}: {result}"


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


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_restarting_position_ids_are_not_packing_for_patched_albert(impl):
    """transformers' ALBERT (eager, sdpa) attends across a row whatever its position_ids; the
    patched model must too: position ids restarting at 0, or all zeros, give transformers'
    output (reading them as packed rows would differ by ~0.1)."""
    from transformers import AlbertConfig as HFConfig, AlbertModel as HFModel
    torch.manual_seed(0)
    cfg = HFConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=4,
                   intermediate_size=48, num_hidden_layers=2, max_position_embeddings=32,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   initializer_range=0.2, attn_implementation=impl)
    ref = HFModel(cfg).eval()
    ours = ak.patch_hf(copy.deepcopy(ref), backend="cpp")
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for pos in (torch.zeros(2, 8, dtype=torch.long), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)):
        with torch.no_grad():
            want = ref(input_ids=ids, position_ids=pos).last_hidden_state
            got = ours(input_ids=ids, position_ids=pos).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
