"""ak.patch_hf on the BERT family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT): the same
outputs and gradients as unpatched transformers (held to the error budget against a float64
copy), hidden states, the attention-probability fallback, packed rows, autocast, dropout, LoRA,
hooks, and the decoder refusal."""
import copy
import warnings

import pytest
import torch

import albert_kernels as ak
from family_batches import padded_batch
from albert_kernels.model.hf_family import PatchedFamilyEncoderMixin
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 100, 11
BERT_CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM",
                "BertForSequenceClassification", "BertForTokenClassification",
                "BertForQuestionAnswering", "BertForMultipleChoice",
                "BertForNextSentencePrediction"]


def _config(family, impl="sdpa", **kw):
    common = dict(vocab_size=VOCAB, attn_implementation=impl, pad_token_id=1)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                             seq_classif_dropout=0.0, **common, **kw)
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
           "xlm_roberta": transformers.XLMRobertaConfig,
           "electra": transformers.ElectraConfig}[family]
    extra = {"embedding_size": 32} if family == "electra" else {}
    return cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               classifier_dropout=0.0, max_position_embeddings=64, **extra, **common, **kw)


def _model(cls_name, family="bert", impl="sdpa", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(_config(family, impl, **kw)).to(dtype)


def _inputs(cls_name, padding="right"):
    ids, mask = padded_batch(VOCAB, SEQ, padding)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if cls_name.endswith("MultipleChoice"):
        inputs = {k: v[None] for k, v in inputs.items()}
    return inputs, mask


def _first(out, mask):
    """The model's first output, restricted to real tokens where it is per token."""
    first = out[0]
    if first.dim() >= 2 and tuple(first.shape[:2]) == tuple(mask.shape):
        first = first[mask.bool()]
    return first


def _compare(cls_name, family, backend, padding="right", impl="sdpa", grads=True, **kw):
    model = _model(cls_name, family, impl, **kw).train()
    # dropout off, the model's modules in train mode otherwise (their code paths)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    gold_model = copy.deepcopy(model).double()
    inputs, mask = _inputs(cls_name, padding)
    before = _first(model(**inputs), mask)
    gold = _first(gold_model(**inputs), mask)
    upstream = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    if grads:
        grads_before = torch.autograd.grad(before, params, upstream, allow_unused=True)
        gold_grads = torch.autograd.grad(gold, list(gold_model.parameters()), upstream.double(),
                                         allow_unused=True)
    assert ak.patch_hf(model, backend=backend) is model
    assert any(isinstance(m, PatchedFamilyEncoderMixin) for m in model.modules())
    assert all(a is b for a, b in zip(params, model.parameters())), "same tensors"
    after = _first(model(**inputs), mask)
    result = check_budget(after, before, gold)
    assert result.ok, f"outputs: {result}"
    if not grads:
        return
    grads_after = torch.autograd.grad(after, params, upstream, allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    scale = max(g.abs().max().item() for g in gold_grads if g is not None)
    for name, a, b, g in zip(names, grads_after, grads_before, gold_grads):
        assert (a is None) == (b is None) == (g is None), name
        if a is not None:
            result = check_budget(a, b, g, scale=scale)
            assert result.ok, f"grad of {name}: {result}"


@pytest.mark.parametrize("cls_name", BERT_CLASSES)
def test_bert_classes_outputs_and_grads(cls_name, cpu_backend):
    _compare(cls_name, "bert", cpu_backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_bert_paddings_and_backends(padding, backend, cpu_backend):
    if backend == "cpp":
        backend = cpu_backend
    _compare("BertForSequenceClassification", "bert", backend, padding)
    _compare("BertModel", "bert", backend, padding, impl="eager", grads=False)


@pytest.mark.parametrize("family,cls_name", [
    ("roberta", "RobertaForMaskedLM"), ("roberta", "RobertaForSequenceClassification"),
    ("xlm_roberta", "XLMRobertaModel"), ("xlm_roberta", "XLMRobertaForTokenClassification"),
    ("electra", "ElectraForPreTraining"), ("electra", "ElectraForSequenceClassification"),
    ("distilbert", "DistilBertModel"), ("distilbert", "DistilBertForSequenceClassification"),
    ("distilbert", "DistilBertForMultipleChoice")])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_family_outputs_and_grads(family, cls_name, padding, cpu_backend):
    _compare(cls_name, family, cpu_backend, padding)


@pytest.mark.parametrize("act", ["gelu_new", "relu", "gelu_pytorch_tanh"])
def test_other_activations(act, cpu_backend):
    """An activation that is not exactly F.gelu(x[, 'tanh']) is called as transformers' module."""
    _compare("BertModel", "bert", cpu_backend, hidden_act=act)


def test_packed_rows_match_separate_sequences(cpu_backend):
    """position_ids restarting at 0 inside a row: each sequence attends only to itself, as if
    run alone."""
    model = _model("BertModel").eval()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(2, VOCAB, (1, 6), generator=gen), torch.randint(2, VOCAB, (1, 5),
                                                                        generator=gen)
    alone = [model(input_ids=x).last_hidden_state[0] for x in (a, b)]
    ak.patch_hf(model, backend=cpu_backend)
    ids = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None]
    packed = model(input_ids=ids, position_ids=pos).last_hidden_state[0]
    torch.testing.assert_close(packed[:6], alone[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed[6:], alone[1], atol=2e-5, rtol=1e-4)


def test_bf16_autocast(cpu_backend):
    model = _model("BertForSequenceClassification").eval()
    inputs, mask = _inputs("BertForSequenceClassification")
    gold = copy.deepcopy(model).double()(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(**inputs).logits
        ak.patch_hf(model, backend=cpu_backend)
        after = model(**inputs).logits
    assert after.dtype == before.dtype
    result = check_budget(after.float(), before.float(), gold, dtype=torch.bfloat16)
    assert result.ok, str(result)


def test_dropout_in_training(cpu_backend):
    """Train mode with dropout: another random stream than transformers', so only finite
    outputs, their shape and gradients for every parameter; eval matches exactly as above."""
    model = _model("BertForSequenceClassification", attention_probs_dropout_prob=0.3,
                   hidden_dropout_prob=0.2)
    ak.patch_hf(model, backend=cpu_backend).train()
    inputs, _ = _inputs("BertForSequenceClassification")
    out = model(**inputs).logits
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    out.sum().backward()
    for name, p in model.named_parameters():
        if "pooler" in name or "classifier" in name or "encoder" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    first = model(**inputs).logits
    assert not torch.equal(first, model(**inputs).logits), "dropout is random in training"
    model.eval()
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family,cls_name", [("bert", "BertModel"),
                                             ("distilbert", "DistilBertModel")])
def test_hidden_states_and_attentions(family, cls_name, cpu_backend):
    model = _model(cls_name, family, "eager").eval()
    inputs, mask = _inputs(cls_name)
    ref = model(**inputs, output_hidden_states=True, output_attentions=True)
    ak.patch_hf(model, backend=cpu_backend)
    out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    real = mask.bool()
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="output_attentions"):
        out = model(**inputs, output_attentions=True)
    assert len(out.attentions) == len(ref.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        assert a.shape == b.shape
        # rows of real queries: the probabilities transformers computes
        torch.testing.assert_close(a[real[:, None, :, None].expand_as(a)],
                                   b[real[:, None, :, None].expand_as(b)], atol=2e-5, rtol=1e-4)


def test_decoder_is_refused():
    decoder = transformers.BertLMHeadModel(_config("bert", is_decoder=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="decoder"):
            ak.patch_hf(decoder)
    assert len(caught) == 1 and "BertLMHeadModel" in str(caught[0].message)
    assert not any(isinstance(m, PatchedFamilyEncoderMixin) for m in decoder.modules())
    both = torch.nn.ModuleDict({"encoder": _model("BertModel"), "decoder": decoder})
    with pytest.warns(UserWarning, match="left unpatched.*decoder"):
        ak.patch_hf(both)
    assert isinstance(both["encoder"].encoder, PatchedFamilyEncoderMixin)
    assert not isinstance(decoder.bert.encoder, PatchedFamilyEncoderMixin)


def test_decoder_use_after_patching_runs_transformers(cpu_backend):
    """A patched encoder whose config is switched to a decoder's afterwards (or called with
    encoder_hidden_states) runs transformers' own code for the call, never the core."""
    model = _model("BertModel").eval()
    ak.patch_hf(model, backend=cpu_backend)
    calls = []
    original = type(model.encoder)._core_steps
    type(model.encoder)._core_steps = lambda self: calls.append(1) or original(self)
    try:
        ids = _inputs("BertModel", "none")[0]["input_ids"]
        model(input_ids=ids)
        assert calls == [1]
        model.config.is_decoder = True
        causal = model(input_ids=ids).last_hidden_state
        assert calls == [1], "a decoder's call must not reach the core"
    finally:
        type(model.encoder)._core_steps = original
    unpatched = _model("BertModel").eval()
    unpatched.config.is_decoder = True
    torch.testing.assert_close(causal, unpatched(input_ids=ids).last_hidden_state)


def test_hooks_run_transformers_forward(cpu_backend):
    model = _model("BertModel").eval()
    inputs, mask = _inputs("BertModel")
    ref = model(**inputs).last_hidden_state
    ak.patch_hf(model, backend=cpu_backend)
    seen = []
    handle = model.encoder.layer[1].register_forward_hook(
        lambda mod, args, out: seen.append(args[0].shape))
    out = model(**inputs).last_hidden_state
    handle.remove()
    assert seen == [(3, SEQ, 64)], "the hook saw transformers' [B, L, hidden] tensors"
    torch.testing.assert_close(out, ref)


def test_not_a_family_model():
    with pytest.raises(TypeError, match="BERT"):
        ak.patch_hf(torch.nn.Linear(3, 3))


def test_lora_via_peft(cpu_backend):
    peft = pytest.importorskip("peft")
    model = _model("BertForSequenceClassification").eval()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value",
                                                                           "dense"],
                                                      init_lora_weights=False))
    inputs, _ = _inputs("BertForSequenceClassification")
    gold_model = copy.deepcopy(lora).double()
    before = lora(**inputs).logits
    gold = gold_model(**inputs).logits
    ak.patch_hf(lora, backend=cpu_backend)
    after = lora(**inputs).logits
    result = check_budget(after, before, gold)
    assert result.ok, str(result)
    after.sum().backward()
    trained = [n for n, p in lora.named_parameters() if p.requires_grad and "lora_" in n]
    assert trained and all(dict(lora.named_parameters())[n].grad is not None for n in trained)


def test_pickle_and_deepcopy(cpu_backend):
    import pickle
    model = ak.patch_hf(_model("BertModel").eval(), backend=cpu_backend)
    inputs, mask = _inputs("BertModel")
    ref = model(**inputs).last_hidden_state
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone.encoder, PatchedFamilyEncoderMixin)
        torch.testing.assert_close(clone(**inputs).last_hidden_state, ref)


def test_torch_compile_fullgraph(cpu_backend):
    """While compiling, the encoder runs the padded layout (static shapes): one graph, the same
    numbers on real tokens."""
    model = _model("BertModel").eval()
    inputs, mask = _inputs("BertModel")
    ref = model(**inputs).last_hidden_state
    compiled = torch.compile(ak.patch_hf(model, backend=cpu_backend), fullgraph=True)
    out = compiled(**inputs).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)


def test_relative_position_embeddings_not_patched():
    model = _model("BertModel", position_embedding_type="relative_key")
    with pytest.warns(UserWarning, match="position_embedding_type"), \
            pytest.raises(ValueError, match="nothing to patch"):
        ak.patch_hf(model)
    assert not isinstance(model.encoder, PatchedFamilyEncoderMixin)


def test_gradient_checkpointing_runs_transformers(cpu_backend):
    """With gradient checkpointing on in training, transformers' layers run (checkpointed):
    the same gradients as unpatched."""
    model = _model("BertModel", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.gradient_checkpointing_enable()
    model.train()
    inputs, mask = _inputs("BertModel")
    ref = model(**inputs).last_hidden_state
    grads_ref = torch.autograd.grad(ref.sum(), list(model.parameters()), allow_unused=True)
    ak.patch_hf(model, backend=cpu_backend)
    calls = []
    layer = model.encoder.layer[0]
    # counted on the class: a hook on the module would itself make the call run transformers'
    original = type(layer).forward
    type(layer).forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        out = model(**inputs).last_hidden_state
    finally:
        type(layer).forward = original
    assert calls, "transformers' layers ran"
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family,cls_name", [("bert", "BertModel"),
                                             ("distilbert", "DistilBertModel")])
def test_hidden_dropout_where_transformers_has_it(family, cls_name, cpu_backend):
    """Without padding the packed tokens are the grid's positions in order, so the layers' own
    dropout modules, called in transformers' order on the same number of elements, draw the same
    masks from the same seed: train-mode outputs match unpatched exactly where they are placed
    (after the attention output product and after the FFN; attention dropout, which runs in the
    kernel with its own generator, is off here)."""
    key = "dropout" if family == "distilbert" else "hidden_dropout_prob"
    att = "attention_dropout" if family == "distilbert" else "attention_probs_dropout_prob"
    model = _model(cls_name, family, **{key: 0.3, att: 0.0}).train()
    ids = _inputs(cls_name, "none")[0]["input_ids"]
    torch.manual_seed(5)
    ref = model(input_ids=ids).last_hidden_state
    ak.patch_hf(model, backend=cpu_backend)
    torch.manual_seed(5)
    out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.manual_seed(6)
    assert not torch.allclose(model(input_ids=ids).last_hidden_state, ref, atol=1e-3)


def test_meta_built_then_assigned(cpu_backend):
    """Built on the meta device, patched, then given real weights: runs where they are."""
    source = _model("BertModel").eval()
    with torch.device("meta"):
        model = transformers.BertModel(_config("bert"))
    ak.patch_hf(model, backend=cpu_backend)
    model.load_state_dict(source.state_dict(), assign=True)
    model.embeddings.position_ids = source.embeddings.position_ids
    model.embeddings.token_type_ids = source.embeddings.token_type_ids
    model.eval()
    inputs, mask = _inputs("BertModel")
    real = mask.bool()
    torch.testing.assert_close(model(**inputs).last_hidden_state[real],
                               source(**inputs).last_hidden_state[real], atol=2e-5, rtol=1e-4)


def test_accelerate_offload(cpu_backend):
    accelerate = pytest.importorskip("accelerate")
    model = _model("BertModel").eval()
    inputs, mask = _inputs("BertModel")
    ref = model(**inputs).last_hidden_state
    ak.patch_hf(model, backend=cpu_backend)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    real = mask.bool()
    torch.testing.assert_close(model(**inputs).last_hidden_state[real], ref[real],
                               atol=2e-5, rtol=1e-4)


def test_no_stale_weights(cpu_backend):
    """Every call reads the parameters as they are then."""
    model = ak.patch_hf(_model("BertModel").eval(), backend=cpu_backend)
    inputs, mask = _inputs("BertModel")
    before = model(**inputs).last_hidden_state
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.mul_(1.5)
    after = model(**inputs).last_hidden_state
    fresh = _model("BertModel").eval()
    with torch.no_grad():
        fresh.encoder.layer[1].output.dense.weight.mul_(1.5)
    real = mask.bool()
    assert not torch.allclose(before[real], after[real], atol=1e-3)
    torch.testing.assert_close(after[real], fresh(**inputs).last_hidden_state[real],
                               atol=2e-5, rtol=1e-4)
