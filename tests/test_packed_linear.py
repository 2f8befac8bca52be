"""The frozen-weight path (albert_kernels.freeze; albert_kernels/backends/cpp/frozen.py): weights
packed once for the cpp backend's small-M kernel (csrc/cpu/small_m.cpp), CPU fp32 inference.
Values against the unfrozen path (held to the fp32 budget against an fp64 gold), what freezing
promises when the parameters change, no packed memory unless asked for."""
import copy
import pickle

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends.cpp import frozen as packed
from albert_kernels.backends.cpp import isa
from albert_kernels.tools.budget import check_budget

VOCAB = 100
CONFIGS = {
    "tanh": dict(embedding_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                 num_hidden_layers=3),
    "erf_inner2_groups2": dict(embedding_size=16, hidden_size=32, num_attention_heads=2,
                               intermediate_size=48, num_hidden_layers=4, num_hidden_groups=2,
                               inner_group_num=2, hidden_act="gelu"),
    "base_shaped": dict(embedding_size=128, hidden_size=768, num_attention_heads=12,
                        intermediate_size=3072, num_hidden_layers=2),
}


def _model(cpu_backend, name="tanh", seed=0, freeze=True):
    """Weights drawn wider than transformers' N(0, 0.02) for the small configs, so that the
    GELU's argument spans its curve (with 0.02 it stays where tanh and erf GELU agree)."""
    torch.manual_seed(seed)
    init = 0.02 if name == "base_shaped" else 0.2
    model = ak.AlbertModel(ak.AlbertConfig(vocab_size=VOCAB, initializer_range=init,
                                           **CONFIGS[name]), backend=cpu_backend).eval()
    return ak.freeze(model) if freeze else model


def _batch(batch=2, seqlen=9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, 6:] = 0          # right padding
    if batch > 1:
        mask[1, :2] = 0      # left padding (a query-only first position)
    return ids, mask


@pytest.fixture(autouse=True)
def frozen_calls(monkeypatch):
    """Counts the frozen path's runs (its input mapping runs once per forward)."""
    calls = []
    original = packed.FrozenEncoder.mapping_in
    monkeypatch.setattr(packed.FrozenEncoder, "mapping_in",
                        lambda self, x: calls.append(x.shape[0]) or original(self, x))
    return calls


def _entry(model):
    return model.encoder.__dict__.get("_frozen")


def _unpacked(model, *args):
    """The unfrozen path: a copy of the model (copies are unfrozen)."""
    clone = copy.deepcopy(model)
    assert _entry(clone) is None
    with torch.no_grad():
        return clone(*args).last_hidden_state


def _packed(model, *args, calls):
    n = len(calls)
    with torch.no_grad():
        out = model(*args).last_hidden_state
    assert len(calls) == n + 1, "the frozen path did not run"
    return out


def _check(model, *args, calls):
    """The frozen path's output within the fp32 budget set by the unfrozen path against fp64."""
    got = _packed(model, *args, calls=calls)
    base = _unpacked(model, *args)
    gold_model = copy.deepcopy(model).double()
    with torch.no_grad():
        gold = gold_model(*args).last_hidden_state
    result = check_budget(got, base, gold)
    assert result.ok, str(result)
    return got


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_matches_unpacked_within_budget(name, cpu_backend, frozen_calls):
    model = _model(cpu_backend, name)
    ids, mask = _batch(batch=1 if name == "base_shaped" else 2)
    _check(model, ids, mask, calls=frozen_calls)
    _check(model, ids[:1], calls=frozen_calls)  # batch 1, no mask: no gather at all
    _check(model, ids[:1, :isa.SMALL_M_MIN_TOKENS], calls=frozen_calls)  # the fewest tokens it takes


def test_padded_layout_runs_packed(cpu_backend, frozen_calls):
    """unpad=False: the layers run on the [B, L] grid with a key padding mask; the frozen path
    reads the attention output whatever its strides (it once failed a .view there)."""
    model = _model(cpu_backend)
    model.unpad = False
    ids, mask = _batch()
    got = _check(model, ids, mask, calls=frozen_calls)
    assert got.shape == (*ids.shape, model.config.hidden_size)
    _check(model, ids[:1], torch.ones_like(mask[:1]), calls=frozen_calls)  # one row, no padding


def test_hidden_states_on_the_packed_path(cpu_backend, frozen_calls):
    model = _model(cpu_backend)
    ids, mask = _batch()
    with torch.no_grad():
        got = model(ids, mask, output_hidden_states=True)
        assert frozen_calls
        ref = copy.deepcopy(model)(ids, mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert (a - b).abs().max().item() <= 1e-5


def test_recorded_changes_raise_until_frozen_again(cpu_backend, frozen_calls):
    """An optimizer step, an in-place update, load_state_dict, a new parameter: the next
    frozen-path call raises; freeze() again follows the change."""
    model = _model(cpu_backend)
    ids, mask = _batch()
    before = _packed(model, ids, mask, calls=frozen_calls)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids, mask).last_hidden_state.square().sum().backward()  # training: never frozen
    opt.step()
    model.eval()
    with pytest.raises(RuntimeError, match="call freeze"):
        with torch.no_grad():
            model(ids, mask)
    ak.freeze(model)
    after = _check(model, ids, mask, calls=frozen_calls)
    assert (after - before).abs().max().item() > 1e-3, "the step changed nothing?"
    def in_place(m):
        with torch.no_grad():
            m.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.mul_(1.5)

    writes = [
        in_place,
        lambda m: m.load_state_dict(_model(cpu_backend, seed=1, freeze=False).state_dict()),
        lambda m: setattr(m.encoder.embedding_hidden_mapping_in, "weight", torch.nn.Parameter(
            m.encoder.embedding_hidden_mapping_in.weight.detach() * 2)),
        lambda m: setattr(m.encoder.albert_layer_groups[0].albert_layers[0], "ffn",
                          _scaled_copy(m.encoder.albert_layer_groups[0].albert_layers[0].ffn)),
    ]
    for write in writes:
        write(model)
        with pytest.raises(RuntimeError, match="call freeze"), torch.no_grad():
            model(ids, mask)
        ak.freeze(model)
        _check(model, ids, mask, calls=frozen_calls)


def _scaled_copy(linear):
    """Another module in its place (the weights doubled, so that a stale copy would show)."""
    new = copy.deepcopy(linear)
    with torch.no_grad():
        new.weight.mul_(2)
    return new


def test_to_dtype_runs_unfrozen(cpu_backend, frozen_calls):
    model = _model(cpu_backend)
    ids, mask = _batch()
    model.double()
    with torch.no_grad():
        model(ids, mask)
    assert not frozen_calls, "fp64 runs on the modules"
    with pytest.raises(ValueError, match="float32 CPU weights"):
        ak.freeze(model)
    model.float()
    ak.freeze(model)
    _check(model, ids, mask, calls=frozen_calls)


def test_no_packed_memory_unless_frozen_and_off_path_calls(cpu_backend, frozen_calls):
    model = _model(cpu_backend, freeze=False)
    ids, mask = _batch()
    with torch.no_grad():
        model(ids, mask)
    assert _entry(model) is None and not frozen_calls, "nothing is packed unless asked for"
    ak.freeze(model)
    model.train()
    with torch.no_grad():
        model(ids, mask)
    assert not frozen_calls, "training mode runs on the modules"
    model.eval()
    model(ids, mask)  # grad enabled, parameters require grad: an autograd graph is wanted
    assert not frozen_calls
    tier = isa.built_vector_isa()
    limit = isa.SMALL_M_MAX_TOKENS[tier]
    isa.SMALL_M_MAX_TOKENS[tier] = 18  # _batch(): 13 real tokens, 18 padded
    try:
        with torch.no_grad():
            model(torch.randint(1, VOCAB, (1, 19)))
        assert not frozen_calls, "more tokens than the ISA table allows: the library GEMM"
    finally:
        isa.SMALL_M_MAX_TOKENS[tier] = limit
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(ids, mask)
    assert not frozen_calls, "autocast runs on the modules"
    ak.unfreeze(model)
    assert _entry(model) is None


def test_frozen_parameters_run_packed_with_grad_enabled(cpu_backend, frozen_calls):
    model = _model(cpu_backend).requires_grad_(False)
    ids, mask = _batch()
    model(ids, mask)
    assert frozen_calls


def test_copies_and_pickles_are_unfrozen(cpu_backend, frozen_calls):
    model = _model(cpu_backend)
    ids, mask = _batch()
    ref = _packed(model, ids, mask, calls=frozen_calls)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _entry(clone) is None
        ak.freeze(clone)
        assert (_packed(clone, ids, mask, calls=frozen_calls) - ref).abs().max().item() <= 1e-6
    assert _entry(model) is not None


def test_patched_transformers_model(cpu_backend, frozen_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, attn_implementation="sdpa",
                                    classifier_dropout_prob=0.0, **CONFIGS["tanh"])
    hf = transformers.AlbertForSequenceClassification(cfg).eval()
    gold_model = copy.deepcopy(hf).double()
    ak.patch_hf(hf, backend=cpu_backend)
    base_model = copy.deepcopy(hf)
    ak.freeze(hf)
    ids, mask = _batch()
    with torch.no_grad():
        got = hf(ids, attention_mask=mask).logits
        assert frozen_calls
        base = base_model(ids, attention_mask=mask).logits
        gold = gold_model(ids, attention_mask=mask).logits
    result = check_budget(got, base, gold)
    assert result.ok, str(result)
    frozen_calls.clear()
    hf.train()
    hf(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert not frozen_calls
