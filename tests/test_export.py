"""torch.export of our models: every output class is a pytree node, so each model exports, the
exported program saves and loads, and the reloaded program gives the eager model's values, which
are transformers' (same weights) at real positions.
"""
import io

import pytest
import torch
import torch.utils._pytree as pytree

import albert_kernels as ak
from albert_kernels.model.models import AlbertOutput

transformers = pytest.importorskip("transformers")

VOCAB = 97
CFG = dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_attention_heads=2,
           intermediate_size=48, num_hidden_layers=2, classifier_dropout_prob=0.0,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CLASSES = ["AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
           "AlbertForSequenceClassification", "AlbertForTokenClassification",
           "AlbertForQuestionAnswering", "AlbertForMultipleChoice"]


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    return "reference" if request.param == "reference" else request.getfixturevalue("cpu_backend")


def _inputs(name):
    """input_ids and a mask with one full row and one right-padded row ([B, C, L] for multiple
    choice)."""
    shape = (2, 3, 8) if name == "AlbertForMultipleChoice" else (2, 8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, ..., 5:] = 0
    return ids, mask


def _at_real(t, mask):
    """The values of an output at real positions (per-position outputs) or all of it."""
    if t.dim() >= mask.dim() and tuple(t.shape[:mask.dim()]) == tuple(mask.shape):
        return t[mask.bool()]
    return t


@pytest.mark.parametrize("name", CLASSES)
def test_export_save_load_matches_eager_and_transformers(name, backend):
    torch.manual_seed(0)
    hf = getattr(transformers, name)(
        transformers.AlbertConfig(attn_implementation="eager", **CFG)).eval()
    ours = getattr(ak, name).from_hf(hf, backend=backend).eval()
    ids, mask = _inputs(name)
    program = torch.export.export(ours, (ids, mask))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    reloaded = torch.export.load(buffer).module()

    with torch.no_grad():
        got = reloaded(ids, mask)
        eager = ours(ids, mask)
        expected = hf(input_ids=ids, attention_mask=mask)
    assert type(got) is type(eager)
    leaves_got, spec_got = pytree.tree_flatten(got)
    leaves_eager, spec_eager = pytree.tree_flatten(eager)
    assert spec_got == spec_eager
    for a, b in zip(leaves_got, leaves_eager):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    compared = 0
    for field in type(got).__dataclass_fields__:
        value = getattr(got, field)
        if value is None or field == "loss":
            continue
        reference = getattr(expected, field)
        torch.testing.assert_close(_at_real(value, mask), _at_real(reference, mask),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}.{field}: {m}")
        compared += 1
    assert compared >= 1


def test_output_pytree_roundtrip():
    """Flatten/unflatten keeps every field, None included, and names them by attribute."""
    out = AlbertOutput(torch.ones(1, 2, 3), None, (torch.zeros(1),), None)
    leaves, spec = pytree.tree_flatten(out)
    assert [leaf is None for leaf in leaves] == [False, True, False, True]
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(out) and back.pooler_output is None and back.attentions is None
    assert torch.equal(back.last_hidden_state, out.last_hidden_state)
    paths = [pytree.keystr(path) for path, leaf in pytree.tree_flatten_with_path(out)[0]
             if leaf is not None]
    assert paths == [".last_hidden_state", ".hidden_states[0]"]
