"""The encoder core composes with what users build on nn.Module (albert_kernels/model/core.py):
PEFT LoRA adapters, module hooks, weight writes of every kind, meta-device loading, accelerate
offloading, torch.jit.trace, and the opt-in frozen weights (albert_kernels.freeze). Values are
asserted against transformers' own model with the same weights, adapters, hooks and writes."""
import copy

import pytest
import torch

import albert_kernels as ak

transformers = pytest.importorskip("transformers")

VOCAB = 100
SIZES = dict(embedding_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=48,
             num_hidden_layers=3)
TOL = 2e-5


@pytest.fixture(params=["cpp", "reference"])
def backend(request, cpu_backend):
    """Both CPU backends (cpu_backend makes a cpp that cannot load a failure, as elsewhere)."""
    return request.param


def _hf_config(**overrides):
    """Weights wider than N(0, 0.02) so that every part of the layer moves the logits."""
    return transformers.AlbertConfig(vocab_size=VOCAB, classifier_dropout_prob=0.0,
                                     initializer_range=0.2, attn_implementation="eager",
                                     **{**SIZES, **overrides})


def _hf(seed=0, **overrides):
    torch.manual_seed(seed)
    return transformers.AlbertForSequenceClassification(_hf_config(**overrides)).eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0          # right padding
    mask[1, :2] = 0          # left padding
    return ids, mask


def _logits(model, grad=False):
    ids, mask = _batch()
    with torch.set_grad_enabled(grad):
        return model(ids, attention_mask=mask).logits


def _close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs difference {err} > {tol}"


def _pair(backend, seed=0, **overrides):
    """(transformers' model, the same weights patched)."""
    ref = _hf(seed, **overrides)
    return ref, ak.patch_hf(copy.deepcopy(ref), backend=backend)


# ------------------------------------------------------------------------------------ the rule
def test_is_plain():
    from albert_kernels.model.core import is_plain
    lin = torch.nn.Linear(4, 4)
    assert is_plain(lin) and is_plain(torch.nn.LayerNorm(4)) and is_plain(torch.nn.Embedding(3, 4))
    assert not is_plain(torch.nn.Linear(4, 4, bias=False))
    handle = lin.register_forward_hook(lambda *a: None)
    assert not is_plain(lin)
    handle.remove()
    handle = lin.register_forward_pre_hook(lambda *a: None)
    assert not is_plain(lin)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not is_plain(lin), "a global module hook fires on every module call"
    finally:
        handle.remove()
    assert is_plain(lin)
    lin.forward = lambda x: x
    assert not is_plain(lin)
    del lin.forward
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", torch.nn.Identity())
    assert not is_plain(lin)
    with torch.device("meta"):
        assert not is_plain(torch.nn.Linear(4, 4))

    class MyLinear(torch.nn.Linear):
        pass
    assert not is_plain(MyLinear(4, 4))


# --------------------------------------------------------------------------------------- LoRA
def _lora_config():
    peft = pytest.importorskip("peft")
    # init_lora_weights=False: B is random too, so an adapter changes the output from the start
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                           target_modules=["query", "value", "ffn", "ffn_output"])


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_lora_forward_and_gradients(order, backend):
    peft = pytest.importorskip("peft")
    base = _hf()
    ref = peft.get_peft_model(copy.deepcopy(base), _lora_config())
    if order == "patch_then_peft":
        ours = peft.get_peft_model(ak.patch_hf(copy.deepcopy(base), backend=backend),
                                   _lora_config())
    else:
        ours = ak.patch_hf(peft.get_peft_model(copy.deepcopy(base), _lora_config()),
                           backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert any(type(m).__name__ == "PatchedAlbertTransformer" for m in ours.modules())
    without = _logits(base)
    _close(_logits(ours), _logits(ref))
    assert (_logits(ref) - without).abs().max().item() > 1e-2, "the adapters change nothing?"

    ids, mask = _batch()
    labels = torch.tensor([0, 1])
    for model in (ref, ours):
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    got, want = _lora_grads(ours), _lora_grads(ref)
    assert set(got) == set(want) and len(want) == 8  # A and B of 4 adapters
    for name in want:
        assert got[name] is not None, f"{name}: no gradient"
        _close(got[name], want[name], 1e-4)
    for model in (ref, ours):
        model.eval()

    for model in (ref, ours):
        model.merge_adapter()
    _close(_logits(ours), _logits(ref))
    for model in (ref, ours):
        model.unmerge_adapter()
    _close(_logits(ours), _logits(ref))
    with ours.disable_adapter(), ref.disable_adapter():
        _close(_logits(ours), without)
    merged = ours.merge_and_unload()  # plain nn.Linear again, with the merged weights: fused
    _close(_logits(merged), _logits(ref))


def _count_merges(monkeypatch):
    from albert_kernels.model import core
    made = []
    init = core.Merged.__init__

    def counting(self, base, adapters):
        made.append(len(adapters))
        init(self, base, adapters)
    monkeypatch.setattr(core.Merged, "__init__", counting)
    return made


@pytest.mark.parametrize("adapters", ["one", "two active"])
def test_lora_merged_weights_without_autograd(adapters, backend, monkeypatch):
    """A plain LoRA wrapper in a call without autograd runs on its base weight with the
    adapters added (core.Merged: the fused FFN, F.linear for query/value), made once per
    forward for the shared layer and made anew after a weight write; with autograd the
    wrappers are called. Values against transformers + PEFT unpatched."""
    peft = pytest.importorskip("peft")
    base = _hf()
    ref = peft.get_peft_model(copy.deepcopy(base), _lora_config())
    if adapters == "two active":
        ref.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                                                 target_modules=["ffn", "value"]))
        ref.base_model.set_adapter(["default", "other"])
        ref.eval()
    ours = ak.patch_hf(copy.deepcopy(ref), backend=backend)
    made = _count_merges(monkeypatch)
    _close(_logits(ours), _logits(ref))
    # query, value, ffn, ffn_output: adapters merged into each
    per_forward = [1, 2, 2, 1] if adapters == "two active" else [1, 1, 1, 1]
    assert sorted(made) == sorted(per_forward), made  # 4 wrappers, once for 3 applications
    with torch.inference_mode():
        _close(_logits(ours), _logits(ref))
    assert len(made) == 8
    _close(_logits(ours, grad=True), _logits(ref, grad=True))
    assert len(made) == 8, "merged while autograd records"
    for model in (ref, ours):  # a write that torch does not record (.data)
        layer = model.base_model.model.albert.encoder.albert_layer_groups[0].albert_layers[0]
        layer.ffn.lora_B["default"].weight.data.mul_(-2.0)
        layer.attention.value.lora_A["default"].weight.data.add_(0.3)
    _close(_logits(ours), _logits(ref))
    assert len(made) == 12


def test_lora_adapters_decides_what_may_merge():
    """core.lora_adapters answers only for wrappers whose call is base + scaling * B A x: not
    with active dropout, DoRA, merged or disabled adapters, hooks, or a half-precision base;
    core.Merged is invalid once a tensor it was made from changes in place."""
    peft = pytest.importorskip("peft")
    from albert_kernels.model.core import Merged, lora_adapters

    def wrapper(**kw):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5))
        cfg = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["0"],
                              **kw)
        return peft.get_peft_model(net, cfg).base_model.model[0]

    lora = wrapper()
    adapters = lora_adapters(lora)
    assert len(adapters) == 1 and adapters[0][2] == 2.0
    x = torch.randn(3, 6)
    merged = Merged(lora.base_layer, adapters)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.linear(x, merged.weight, merged.bias),
                                   lora(x), rtol=1e-6, atol=1e-6)
        assert merged.valid(lora.base_layer, lora_adapters(lora))
        lora.lora_A["default"].weight.add_(1.0)
        assert not merged.valid(lora.base_layer, lora_adapters(lora))

    drop = wrapper(lora_dropout=0.1)
    assert lora_adapters(drop) is None  # training mode: the dropout draws
    drop.eval()
    assert lora_adapters(drop) is not None
    assert lora_adapters(wrapper(use_dora=True)) is None
    lora.merge()
    assert lora_adapters(lora) is None
    lora.unmerge()
    lora.enable_adapters(False)
    assert lora_adapters(lora) is None
    lora.enable_adapters(True)
    assert lora_adapters(lora) is not None
    handle = lora.lora_B["default"].register_forward_hook(lambda *a: None)
    assert lora_adapters(lora) is None
    handle.remove()
    lora.half()
    assert lora_adapters(lora) is None
    assert lora_adapters(torch.nn.Linear(3, 3)) is None


# -------------------------------------------------------------------------------------- hooks
HOOKED = ["albert.encoder.albert_layer_groups.0.albert_layers.0",
          "albert.encoder.albert_layer_groups.0.albert_layers.0.attention",
          "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query",
          "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn",
          "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn_output",
          "albert.encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm"]


@pytest.mark.parametrize("name", HOOKED)
@pytest.mark.parametrize("grad", [False, True])
def test_patched_hooks_fire_as_in_transformers(name, grad, backend):
    ref, ours = _pair(backend)
    counts = {}
    for tag, model in (("ref", ref), ("ours", ours)):
        counts[tag] = []
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, c=counts[tag]: c.append(args[0].shape))
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, c=counts[tag]: c.append("pre"))
        _logits(model, grad)
    assert len(counts["ref"]) == 2 * SIZES["num_hidden_layers"]
    assert counts["ours"] == counts["ref"]


@pytest.mark.parametrize("name", HOOKED[2:])
def test_patched_ablation_hook_edits_the_output(name, backend):
    ref, ours = _pair(backend)
    before = _logits(ref)
    for model in (ref, ours):
        model.get_submodule(name).register_forward_hook(lambda m, args, out: out * 0.5)
    want = _logits(ref)
    assert (want - before).abs().max().item() > 1e-3
    _close(_logits(ours), want)


def test_patched_global_hook(backend):
    ref, ours = _pair(backend)
    calls = {"ref": 0, "ours": 0}
    tag = ["ref"]

    def hook(module, args, out):
        calls[tag[0]] += 1
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        want = _logits(ref)
        tag[0] = "ours"
        got = _logits(ours)
    finally:
        handle.remove()
    _close(got, want)
    assert calls["ours"] == calls["ref"] > 0


def _own(backend, seed=0):
    ref = _hf(seed)
    ours = ak.AlbertForSequenceClassification.from_hf(ref, backend=backend).eval()
    return ref, ours


def test_own_model_hooks_and_edits(backend):
    """Our own modules: a hook on the shared layer fires once per application; hooks on the
    FFN products see their inputs and edit their outputs as on transformers' modules."""
    ref, ours = _own(backend)
    fired = []
    layer = ours.albert.encoder.albert_layer_groups[0].albert_layers[0]
    layer.register_forward_hook(lambda m, args, out: fired.append(out.shape))
    layer.attention.register_forward_hook(lambda m, args, out: fired.append("attention"))
    _close(_logits(ours), _logits(ref))
    assert len(fired) == 2 * SIZES["num_hidden_layers"]
    for path in ("ffn", "ffn_output", "attention.value"):
        for model in (ref, ours):
            model.albert.encoder.albert_layer_groups[0].albert_layers[0].get_submodule(
                path).register_forward_hook(lambda m, args, out: out * 0.7)
    want = _logits(ref)
    _close(_logits(ours), want)


# ----------------------------------------------------------------------------- weight writes
def _write(kind, model, new_state):
    """Change `model`'s weights to `new_state` in one of the ways users do."""
    params = dict(model.named_parameters())
    if kind == "data":
        for name, value in new_state.items():
            if name in params:
                params[name].data.copy_(value)
    elif kind == "copy_":
        with torch.no_grad():
            for name, value in new_state.items():
                if name in params:
                    params[name].copy_(value)
    elif kind == "load_state_dict":
        model.load_state_dict(new_state)
    elif kind == "inference_mode_load":
        with torch.inference_mode():
            model.load_state_dict(new_state)
    else:
        raise AssertionError(kind)


WRITES = ["data", "copy_", "load_state_dict", "inference_mode_load"]


def _run_both_first(ref, ours, kind):
    """First weights, then a write of the second to both models (for an inference-mode
    reload, the first weights are inference tensors as well: the version counter is absent)."""
    if kind == "inference_mode_load":
        with torch.inference_mode():
            for model in (ref, ours):
                model.load_state_dict(_hf(seed=2).state_dict())
    with torch.no_grad():
        return _logits(ours), _logits(ref)


@pytest.mark.parametrize("kind", WRITES)
@pytest.mark.parametrize("model_kind", ["patched", "own"])
def test_weight_writes_then_no_grad_forward(kind, model_kind, backend):
    ref, ours = _pair(backend) if model_kind == "patched" else _own(backend)
    _run_both_first(ref, ours, kind)
    new = _hf(seed=1).state_dict()
    for model in (ref, ours):
        _write(kind, model, new)
    with torch.inference_mode():
        _close(_logits(ours), _logits(ref))
    _close(_logits(ours), _logits(ref))


@pytest.mark.parametrize("model_kind", ["patched", "own"])
def test_optimizer_step_then_no_grad_forward(model_kind, backend):
    ref, ours = _pair(backend) if model_kind == "patched" else _own(backend)
    _close(_logits(ours), _logits(ref))
    ids, mask = _batch()
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        model.eval()
    _close(_logits(ours), _logits(ref), 1e-4)


# ---------------------------------------------------------------------------- frozen (opt-in)
def _frozen_layer_calls(monkeypatch):
    from albert_kernels.backends.cpp import frozen
    calls = []
    original = frozen.FrozenEncoder.layer
    monkeypatch.setattr(frozen.FrozenEncoder, "layer",
                        lambda self, *a: calls.append(1) or original(self, *a))
    return calls


@pytest.mark.parametrize("model_kind", ["patched", "own"])
def test_freeze_runs_frozen_and_follows_documented_rules(model_kind, cpu_backend, monkeypatch):
    ref, ours = _pair("cpp") if model_kind == "patched" else _own("cpp")
    calls = _frozen_layer_calls(monkeypatch)
    _logits(ours)
    assert not calls, "no packed weights unless asked for"
    ak.freeze(ours)
    _close(_logits(ours), _logits(ref))
    assert len(calls) == SIZES["num_hidden_layers"], "the frozen path did not run"
    calls.clear()
    _logits(ours, grad=True)
    assert not calls, "autograd calls run on the modules"

    # a write torch records: a clear error, and freezing again follows it
    new = _hf(seed=1).state_dict()
    for model in (ref, ours):
        _write("load_state_dict", model, new)
    with pytest.raises(RuntimeError, match="freeze"):
        _logits(ours)
    ak.freeze(ours)
    _close(_logits(ours), _logits(ref))

    # a .data write to the encoder is not recorded by torch: documented to keep answering with
    # the frozen weights ...
    frozen_answer = _logits(ours)
    newer = {k: v for k, v in _hf(seed=3).state_dict().items() if k.startswith("albert.encoder.")}
    for model in (ref, ours):
        _write("data", model, newer)
    _close(_logits(ours), frozen_answer)
    ak.freeze(ours)  # ... until frozen again
    _close(_logits(ours), _logits(ref))
    ak.unfreeze(ours)
    calls.clear()
    _close(_logits(ours), _logits(ref))
    assert not calls


def test_freeze_honours_hooks_added_later_and_refuses_adapters(cpu_backend):
    peft = pytest.importorskip("peft")
    ref, ours = _pair("cpp")
    ak.freeze(ours)
    for model in (ref, ours):
        model.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.register_forward_hook(
            lambda m, args, out: out * 0.5)
    _close(_logits(ours), _logits(ref))
    lora = peft.get_peft_model(_pair("cpp")[1], _lora_config())
    with pytest.raises(ValueError, match="not a plain module"):
        ak.freeze(lora)
    with pytest.raises(ak.BackendUnavailable, match="no frozen-weight path"):
        ak.freeze(_pair("reference")[1])


def test_freeze_copies_and_pickles_unfrozen(cpu_backend):
    import pickle
    ref, ours = _own("cpp")
    ak.freeze(ours)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert "_frozen" not in vars(clone.albert.encoder) or clone.albert.encoder._frozen is None
        _close(_logits(clone), _logits(ref))


# -------------------------------------------------------------------------- meta and offload
def test_own_model_built_on_meta_then_assigned(backend):
    ref, ours = _own(backend)
    with torch.device("meta"):
        empty = ak.AlbertForSequenceClassification(ours.config, backend=backend)
    empty.load_state_dict(ours.state_dict(), assign=True)
    _close(_logits(empty.eval()), _logits(ref))


def test_patched_model_loaded_with_accelerate(backend):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import set_module_tensor_to_device
    ref = _hf()
    with accelerate.init_empty_weights():
        model = transformers.AlbertForSequenceClassification(_hf_config()).eval()
    ak.patch_hf(model, backend=backend)
    for name, value in ref.state_dict().items():
        set_module_tensor_to_device(model, name, "cpu", value=value)
    _close(_logits(model), _logits(ref))


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_patched_model_offloaded(how, backend, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    ref, ours = _pair(backend)
    want = _logits(ref)
    if how == "cpu_offload":
        accelerate.cpu_offload(ours, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(ours, str(tmp_path), execution_device=torch.device("cpu"))
    _close(_logits(ours), want)


# ------------------------------------------------------------------------------- jit.trace
@pytest.mark.parametrize("padding", [False, True])
def test_jit_trace_of_a_patched_model(padding, backend):
    ref, ours = _pair(backend)
    ref.config.return_dict = ours.config.return_dict = False
    ids, mask = _batch()
    if not padding:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        traced = torch.jit.trace(ours, (ids, mask))
        _close(traced(ids, mask)[0], ref(ids, attention_mask=mask)[0])


def test_lora_merged_weights_never_outlive_a_call_on_bert(backend, monkeypatch):
    """A patched BERT keeps its layer parts between calls; the LoRA weights merged for one
    no-grad call must not be reused by the next: after a write torch does not record (.data)
    the next call answers with the new adapter weights, as transformers + PEFT unpatched."""
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["query", "value", "intermediate.dense", "output.dense"])
    ref = peft.get_peft_model(BertModel(cfg, add_pooling_layer=False), lora).eval()
    ours = ak.patch_hf(copy.deepcopy(ref), backend=backend)
    made = _count_merges(monkeypatch)
    ids = torch.randint(1, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0

    def out(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    _close(out(ours), out(ref))
    first = len(made)
    assert first > 0, "no LoRA weight was merged: the test would not see a stale one"
    for model in (ref, ours):
        layer = model.base_model.model.encoder.layer[1]
        layer.intermediate.dense.lora_B["default"].weight.data.mul_(-3.0)
        layer.attention.self.query.lora_A["default"].weight.data.add_(0.5)
    _close(out(ours), out(ref))
    assert len(made) == 2 * first, "the second call reused the first call's merged weights"
