"""albert_kernels.freeze on the BERT family after patch_hf (BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
DistilBERT): the frozen path runs every layer on its own packed weights (one extension call per
layer, counted) and gives transformers' outputs within the fp32 budget (against a float64 copy),
under right, left and no padding, at batch 1 and ragged; what freezing promises when weights
change; hooks added later; activations the frozen kernel lacks; sentence-transformers' encode
with the real all-MiniLM-L6-v2."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends.cpp import frozen as packed
from albert_kernels.tools.budget import check_budget
from minilm import SENTENCES, minilm_path  # noqa: F401  (the fixture)
from family_batches import padded_batch

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, LAYERS = 100, 11, 3
FAMILIES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm_roberta": "XLMRobertaModel",
            "electra": "ElectraModel", "distilbert": "DistilBertModel"}


def _config(family, **kw):
    """Weights drawn wider than transformers' N(0, 0.02), so that the GELU's argument spans its
    curve and each layer changes the hidden states visibly."""
    common = dict(vocab_size=VOCAB, attn_implementation="sdpa", pad_token_id=1,
                  initializer_range=0.2)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=64, n_layers=LAYERS, n_heads=4, hidden_dim=128,
                                             **common, **kw)
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
           "xlm_roberta": transformers.XLMRobertaConfig,
           "electra": transformers.ElectraConfig}[family]
    extra = {"embedding_size": 32} if family == "electra" else {}
    return cls(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=64, **extra, **common, **kw)


def _model(family="bert", cls_name=None, seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(transformers, cls_name or FAMILIES[family])(_config(family, **kw)).eval()


def _inputs(padding="right", batch=3):
    ids, mask = padded_batch(VOCAB, SEQ, padding, batch)
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


@pytest.fixture
def layer_calls(monkeypatch):
    """Counts the frozen path's layer runs."""
    calls = []
    original = packed.FrozenEncoder.layer
    monkeypatch.setattr(packed.FrozenEncoder, "layer",
                        lambda self, key, h, plan: calls.append(key) or original(self, key, h, plan))
    return calls


def _out(model, inputs, mask):
    with torch.no_grad():
        return model(**inputs).last_hidden_state[mask]


def _encoder(model):
    return next(m for m in model.modules() if "_frozen" in m.__dict__)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("padding,batch", [("right", 3), ("left", 3), ("none", 3), ("none", 1),
                                           ("right", 1)])
def test_frozen_matches_transformers(family, padding, batch, cpu_backend, layer_calls):
    if cpu_backend != "cpp":
        pytest.skip("the frozen path is the cpp backend's")
    model = _model(family)
    gold_model = copy.deepcopy(model).double()
    inputs, mask = _inputs(padding, batch)
    base = _out(model, inputs, mask)
    gold = _out(gold_model, inputs, mask)
    ak.patch_hf(model, backend=cpu_backend)
    unfrozen = _out(model, inputs, mask)
    assert not layer_calls
    assert ak.freeze(model) is model
    frozen = _out(model, inputs, mask)
    # every layer ran on the frozen path, each on its own packed weights
    encoder = _encoder(model)
    keys = [id(layer) for layer in encoder.layer]
    assert layer_calls == keys and len(set(keys)) == LAYERS
    assert set(encoder._frozen.run.layers) == set(keys)
    for name, got in (("frozen", frozen), ("unfrozen", unfrozen)):
        result = check_budget(got, base, gold)
        assert result.ok, f"{name}: {result}"


def test_recorded_writes_raise_and_freeze_again_follows(cpu_backend, layer_calls):
    """In-place updates, an optimizer step, load_state_dict, a new parameter or module in the
    LAST layer: the next frozen call raises; freeze() again computes with the new weights
    (transformers with the same weights is the reference, so a stale packed layer would show)."""
    model = _model("bert")
    ak.patch_hf(model, backend=cpu_backend)
    ak.freeze(model)
    inputs, mask = _inputs()
    last = lambda m: m.encoder.layer[-1]

    def in_place(m):
        with torch.no_grad():
            last(m).output.dense.weight.mul_(1.5)

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.train()
        m(**inputs).last_hidden_state.square().sum().backward()
        opt.step()
        m.eval()

    def new_module(m):
        new = copy.deepcopy(last(m).intermediate.dense)
        with torch.no_grad():
            new.weight.mul_(2)
        last(m).intermediate.dense = new

    writes = [in_place, step,
              lambda m: m.load_state_dict(_model("bert", seed=1).state_dict()),
              lambda m: setattr(last(m).attention.self.query, "weight", torch.nn.Parameter(
                  last(m).attention.self.query.weight.detach() * 2)),
              new_module]
    before = _out(model, inputs, mask)
    for write in writes:
        write(model)
        with pytest.raises(RuntimeError, match="call freeze"):
            _out(model, inputs, mask)
        ak.freeze(model)
        layer_calls.clear()
        got = _out(model, inputs, mask)
        assert len(layer_calls) == LAYERS
        reference = copy.deepcopy(model)
        ak.unfreeze(reference)
        want = _out(reference, inputs, mask)
        assert (got - want).abs().max().item() < 1e-4, write
        assert (got - before).abs().max().item() > 1e-3, "the write changed nothing?"
        before = got


def test_data_writes_are_the_callers_until_frozen_again(cpu_backend, layer_calls):
    """A write through .data is not recorded by torch: documented to keep the old packed
    weights; freeze() again picks it up, and unfreeze() runs on the modules."""
    model = _model("distilbert")
    gold_model = copy.deepcopy(model)
    ak.patch_hf(model, backend=cpu_backend)
    ak.freeze(model)
    inputs, mask = _inputs()
    old = _out(model, inputs, mask)
    for m in (model, gold_model):
        m.transformer.layer[-1].ffn.lin2.weight.data.mul_(3.0)
    new = _out(gold_model, inputs, mask)
    assert (new - old).abs().max().item() > 1e-2
    assert (_out(model, inputs, mask) - old).abs().max().item() == 0, "documented: old weights"
    ak.freeze(model)
    assert (_out(model, inputs, mask) - new).abs().max().item() < 1e-4
    ak.unfreeze(model)
    layer_calls.clear()
    assert "_frozen" not in model.transformer.__dict__
    assert (_out(model, inputs, mask) - new).abs().max().item() < 1e-4
    assert not layer_calls


def test_hook_added_after_freezing_is_honoured(cpu_backend, layer_calls):
    model = _model("roberta")
    gold_model = copy.deepcopy(model)
    ak.patch_hf(model, backend=cpu_backend)
    ak.freeze(model)
    inputs, mask = _inputs()
    ablate = lambda module, args, out: out * 0.5
    handles = [m.encoder.layer[1].output.dense.register_forward_hook(ablate)
               for m in (model, gold_model)]
    got = _out(model, inputs, mask)
    assert not layer_calls, "a hooked call runs on the modules"
    assert (got - _out(gold_model, inputs, mask)).abs().max().item() < 1e-4
    for h in handles:
        h.remove()
    assert (_out(model, inputs, mask) - _out(gold_model, inputs, mask)).abs().max().item() < 1e-4
    assert len(layer_calls) == LAYERS
    with pytest.raises(ValueError, match="has hooks"):
        model.encoder.layer[0].register_forward_pre_hook(lambda module, args: None)
        ak.freeze(model)


def test_off_path_calls_and_training_run_unfrozen(cpu_backend, layer_calls):
    model = _model("electra", "ElectraForSequenceClassification")
    ak.patch_hf(model, backend=cpu_backend)
    ak.freeze(model)
    inputs, _ = _inputs()
    model(**inputs)   # grad enabled, parameters require grad
    model.train()
    with torch.no_grad():
        model(**inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model.eval()(**inputs)
    assert not layer_calls
    with torch.no_grad():
        model(**inputs)
    assert len(layer_calls) == LAYERS


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_activation_the_kernel_lacks_is_refused(act, cpu_backend):
    model = ak.patch_hf(_model("bert", hidden_act=act), backend=cpu_backend)
    with pytest.raises(ValueError, match="not GELU as F.gelu"):
        ak.freeze(model)


def test_tanh_gelu_and_heads(cpu_backend, layer_calls):
    model = _model("bert", "BertForSequenceClassification", hidden_act="gelu_pytorch_tanh",
                   classifier_dropout=0.0)
    want = copy.deepcopy(model)
    inputs, _ = _inputs("left")
    ak.freeze(ak.patch_hf(model, backend=cpu_backend))
    with torch.no_grad():
        diff = (model(**inputs).logits - want(**inputs).logits).abs().max().item()
    assert diff < 1e-4 and len(layer_calls) == LAYERS


def test_refusals(cpu_backend):
    with pytest.raises(TypeError, match="after patch_hf"):
        ak.freeze(_model("bert"))
    peft = pytest.importorskip("peft")
    model = ak.patch_hf(_model("bert"), backend=cpu_backend)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                       init_lora_weights=False))
    with pytest.raises(ValueError, match="not a plain module"):
        ak.freeze(lora)
    merged = lora.merge_and_unload()
    inputs, mask = _inputs()
    want = _out(merged, inputs, mask)
    ak.freeze(merged)
    assert (_out(merged, inputs, mask) - want).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="float32"):
        ak.freeze(ak.patch_hf(_model("bert").double(), backend=cpu_backend))


def test_sentence_transformers_minilm(minilm_path, cpu_backend, layer_calls):  # noqa: F811
    """The real all-MiniLM-L6-v2: encode single sentences and a ragged batch of 32 with the
    frozen patched model against unpatched transformers (float32), held to the fp32 budget
    against float64; min cosine and max abs error printed."""
    from sentence_transformers import SentenceTransformer
    base = SentenceTransformer(str(minilm_path), device="cpu")
    gold = copy.deepcopy(base).double()
    ours = ak.freeze(ak.patch_hf(copy.deepcopy(base), backend=cpu_backend))
    enc = lambda m, s, b: m.encode(s, batch_size=b, convert_to_tensor=True,
                                   normalize_embeddings=False)
    for sentences, batch_size in (([SENTENCES[0], SENTENCES[6], SENTENCES[24]], 1),
                                  (SENTENCES, 32)):
        layer_calls.clear()
        got, want, g = (enc(m, sentences, batch_size) for m in (ours, base, gold))
        assert len(layer_calls) == 6 * -(-len(sentences) // batch_size), "every layer frozen"
        result = check_budget(got, want, g)
        cos = torch.nn.functional.cosine_similarity(got.double(), g, dim=-1).min().item()
        print(f"batch {batch_size}: max abs {(got - want).abs().max().item():.2e} vs unpatched, "
              f"min cosine vs fp64 {cos:.9f}, {result}")
        assert result.ok, result
        assert cos > 1 - 1e-6


def test_kept_layer_parts_follow_changes(cpu_backend):
    """The patched forward keeps its layer parts between calls while nothing they depend on
    changed: a module or parameter replaced, a hook added, a dropout's p or the mode changed
    after a first call are all seen by the next call (unfrozen, against transformers with the
    same change)."""
    model = _model("bert")
    gold_model = copy.deepcopy(model)
    ak.patch_hf(model, backend=cpu_backend)
    inputs, mask = _inputs()
    close = lambda: (_out(model, inputs, mask) - _out(gold_model, inputs, mask)).abs().max() < 1e-4
    assert close()

    def replace_module(m):
        new = copy.deepcopy(m.encoder.layer[1].output.dense)
        with torch.no_grad():
            new.weight.mul_(2)
        m.encoder.layer[1].output.dense = new

    def replace_parameter(m):
        query = m.encoder.layer[0].attention.self.query
        query.weight = torch.nn.Parameter(query.weight.detach() * 0.5)

    for change in (replace_module, replace_parameter):
        before = _out(model, inputs, mask)
        change(model)
        change(gold_model)
        assert close(), change
        assert (_out(model, inputs, mask) - before).abs().max() > 1e-3, change
    handles = [m.encoder.layer[0].intermediate.register_forward_hook(lambda mod, a, out: out * 0)
               for m in (model, gold_model)]
    assert close()
    for h in handles:
        h.remove()
    assert close()
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        no_dropout = model(**inputs).last_hidden_state[mask]
    assert (no_dropout - _out(gold_model, inputs, mask)).abs().max() < 1e-4
    model.encoder.layer[0].attention.self.dropout.p = 0.5
    with torch.no_grad():
        dropped = model(**inputs).last_hidden_state[mask]
    assert (dropped - no_dropout).abs().max() > 1e-3, "the new attention dropout p was not used"


def _edit_scaling(model, value):
    for layer in model.encoder.layer:
        layer.attention.self.scaling = value


def _edit_eps(model, value):
    for layer in model.encoder.layer:
        layer.output.LayerNorm.eps = value


@pytest.mark.parametrize("edit", [_edit_scaling, _edit_eps], ids=["scaling", "eps"])
def test_setting_edits_after_a_call_reach_the_patched_model(edit):
    """The patched forward keeps its layer parts between calls; a plain attribute the parts are
    built from (attention scale, LayerNorm eps) edited after a call is read by the next call,
    as transformers reads it: the outputs move with transformers' (the edit changes them)."""
    ref = _model("bert")
    ours = ak.patch_hf(copy.deepcopy(ref), backend="cpp")
    inputs, real = _inputs()
    with torch.no_grad():
        before = ours(**inputs).last_hidden_state[real]
        for model in (ref, ours):
            edit(model, 0.05)
        want, got = ref(**inputs).last_hidden_state[real], ours(**inputs).last_hidden_state[real]
    assert (want - before).abs().max() > 1e-3, "the edit does not change transformers' output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_setting_edits_after_freeze_raise(family):
    """The frozen copy bakes in each layer's eps, head count and softmax scale: an edit to one
    after freeze raises (never the old setting's numbers); freeze again follows it."""
    ref = _model(family)
    ours = ak.freeze(ak.patch_hf(copy.deepcopy(ref), backend="cpp"))
    inputs, real = _inputs()
    for model in (ref, ours):
        layers = model.transformer.layer if family == "distilbert" else model.encoder.layer
        norm = layers[1].output_layer_norm if family == "distilbert" else layers[1].output.LayerNorm
        norm.eps = 0.1
    with torch.no_grad(), pytest.raises(RuntimeError, match="freeze"):
        ours(**inputs)
    ak.freeze(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).last_hidden_state[real],
                                   ref(**inputs).last_hidden_state[real], atol=1e-5, rtol=0)
