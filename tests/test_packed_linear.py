"""The small-M inference path (albert_kernels/model/packed.py): weights packed once for the cpp
backend's small-M kernel (csrc/cpu/small_m.cpp), CPU fp32 inference on few tokens. Values against today's path (held to the fp32 budget against an fp64
gold), invalidation when the parameters change, no packed memory when the path is unused."""
import copy
import pickle

import pytest
import torch

import albert_kernels as ak
from albert_kernels.model import packed
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


def _model(cpu_backend, name="tanh", seed=0):
    """Weights drawn wider than transformers' N(0, 0.02) for the small configs, so that the
    GELU's argument spans its curve (with 0.02 it stays where tanh and erf GELU agree)."""
    torch.manual_seed(seed)
    init = 0.02 if name == "base_shaped" else 0.2
    return ak.AlbertModel(ak.AlbertConfig(vocab_size=VOCAB, initializer_range=init,
                                          **CONFIGS[name]), backend=cpu_backend).eval()


def _batch(batch=2, seqlen=9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, 6:] = 0          # right padding
    if batch > 1:
        mask[1, :2] = 0      # left padding (a query-only first position)
    return ids, mask


def _entry(model):
    return model.encoder._pack_cache.entry


def _unpacked(model, *args):
    """Today's path: the same model with the packed path out of reach (no tokens qualify)."""
    limit = packed.MAX_TOKENS
    packed.MAX_TOKENS = 0
    try:
        with torch.no_grad():
            return model(*args).last_hidden_state
    finally:
        packed.MAX_TOKENS = limit


def _packed(model, *args):
    with torch.no_grad():
        out = model(*args).last_hidden_state
    assert _entry(model) is not None, "the packed path did not run"
    return out


def _check(model, *args):
    """The packed path's output within the fp32 budget set by today's path against fp64."""
    got = _packed(model, *args)
    base = _unpacked(model, *args)
    gold_model = copy.deepcopy(model).double()
    with torch.no_grad():
        gold = gold_model(*args).last_hidden_state
    assert _entry(gold_model) is None  # fp64 never packs
    result = check_budget(got, base, gold)
    assert result.ok, str(result)
    return got


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_matches_unpacked_within_budget(name, cpu_backend):
    model = _model(cpu_backend, name)
    ids, mask = _batch(batch=1 if name == "base_shaped" else 2)
    _check(model, ids, mask)
    _check(model, ids[:1])  # batch 1, no mask: no gather at all
    _check(model, ids[:1, :packed.MIN_TOKENS])  # the fewest tokens the path takes



def test_padded_layout_runs_packed(cpu_backend):
    """unpad=False: the layers run on the [B, L] grid with a key padding mask; the packed path
    reads the attention output whatever its strides (it once failed a .view there)."""
    model = _model(cpu_backend)
    model.unpad = False
    ids, mask = _batch()
    got = _check(model, ids, mask)
    assert got.shape == (*ids.shape, model.config.hidden_size)
    _check(model, ids[:1], torch.ones_like(mask[:1]))  # one row, no padding

def test_hidden_states_and_attentions_on_the_packed_path(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    with torch.no_grad():
        got = model(ids, mask, output_hidden_states=True)
        assert _entry(model) is not None
        limit, packed.MAX_TOKENS = packed.MAX_TOKENS, 0
        try:
            ref = model(ids, mask, output_hidden_states=True)
        finally:
            packed.MAX_TOKENS = limit
    assert len(got.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert (a - b).abs().max().item() <= 1e-5


def test_invalidated_by_an_optimizer_step(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    before = _packed(model, ids, mask)
    first = _entry(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(ids, mask).last_hidden_state.square().sum().backward()
    assert _entry(model) is None, "training must drop the packed copy"
    opt.step()
    model.eval()
    after = _check(model, ids, mask)
    assert _entry(model) is not first
    assert (after - before).abs().max().item() > 1e-3, "the step changed nothing?"


def test_invalidated_by_an_in_place_update_without_training(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    _packed(model, ids, mask)
    first = _entry(model)
    with torch.no_grad():
        model.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.mul_(1.5)
    _check(model, ids, mask)
    assert _entry(model) is not first


def test_invalidated_by_load_state_dict(cpu_backend):
    model, other = _model(cpu_backend, seed=0), _model(cpu_backend, seed=1)
    ids, mask = _batch()
    _packed(model, ids, mask)
    model.load_state_dict(other.state_dict())
    got = _check(model, ids, mask)
    assert (got - _unpacked(other, ids, mask)).abs().max().item() <= 1e-5


def test_invalidated_by_to_dtype(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    _packed(model, ids, mask)
    model.double()
    with torch.no_grad():
        model(ids, mask)
    assert _entry(model) is None, "fp64 runs unpacked and drops the fp32 copy"
    model.float()
    _check(model, ids, mask)


def test_no_packed_memory_when_unused(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    assert _entry(model) is None, "built lazily"
    model.train()
    with torch.no_grad():
        model(ids, mask)
    assert _entry(model) is None, "training mode never packs"
    model.eval()
    model(ids, mask)  # grad enabled, parameters require grad: an autograd graph is wanted
    assert _entry(model) is None
    limit, packed.MAX_TOKENS = packed.MAX_TOKENS, 18  # _batch(): 13 real tokens, 18 padded
    try:
        long_ids = torch.randint(1, VOCAB, (1, packed.MAX_TOKENS + 1))
        with torch.no_grad():
            model(long_ids)
        assert _entry(model) is None, "more tokens than MAX_TOKENS: unpacked"
        _packed(model, ids, mask)
        with torch.no_grad():
            model(long_ids)
        assert _entry(model) is None, "a call off the path drops the copy"
    finally:
        packed.MAX_TOKENS = limit
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(ids, mask)
    assert _entry(model) is None, "autocast runs unpacked"


def test_frozen_parameters_run_packed_with_grad_enabled(cpu_backend):
    model = _model(cpu_backend).requires_grad_(False)
    ids, mask = _batch()
    model(ids, mask)
    assert _entry(model) is not None


def test_copies_and_pickles_drop_the_packed_copy(cpu_backend):
    model = _model(cpu_backend)
    ids, mask = _batch()
    ref = _packed(model, ids, mask)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _entry(clone) is None
        assert (_packed(clone, ids, mask) - ref).abs().max().item() <= 1e-6
    assert _entry(model) is not None


def test_patched_transformers_model(cpu_backend):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, attn_implementation="sdpa",
                                    classifier_dropout_prob=0.0, **CONFIGS["tanh"])
    hf = transformers.AlbertForSequenceClassification(cfg).eval()
    gold_model = copy.deepcopy(hf).double()
    ak.patch_hf(hf, backend=cpu_backend)
    encoder = hf.albert.encoder
    ids, mask = _batch()
    with torch.no_grad():
        got = hf(ids, attention_mask=mask).logits
        assert encoder._pack_cache.entry is not None
        limit, packed.MAX_TOKENS = packed.MAX_TOKENS, 0
        try:
            base = hf(ids, attention_mask=mask).logits
        finally:
            packed.MAX_TOKENS = limit
        gold = gold_model(ids, attention_mask=mask).logits
    result = check_budget(got, base, gold)
    assert result.ok, str(result)
    hf.train()
    hf(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert encoder._pack_cache.entry is None
