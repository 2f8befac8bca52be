"""Drop-in parity of patched transformers models and of ak.AlbertModel with transformers' ALBERT:
hidden states, attention probabilities, masks (2D, 4D padding, packed rows, unsupported 4D),
left padding (what the pooler, the classifier, multiple choice and SOP read).

Every comparison holds the candidate (patched model, in dtype) to the error budget set by
transformers' own model in that dtype (base) against transformers in float64 (gold)."""
import copy
import warnings

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 60, 9, 3
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["own", "reference"])
def backend(request, cpu_backend):
    return cpu_backend if request.param == "own" else "reference"


def _config(impl="eager", **kw):
    base = dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                max_position_embeddings=16, attn_implementation=impl)
    base.update(kw)
    return transformers.AlbertConfig(**base)


def _trio(cls_name, dtype, backend, impl="eager", **kw):
    """(patched in dtype, transformers in dtype, transformers in float64), same weights."""
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(_config(impl, **kw)).eval()
    gold = copy.deepcopy(hf).double()
    base = copy.deepcopy(hf).to(dtype)
    ours = ak.patch_hf(copy.deepcopy(hf).to(dtype), backend=backend)
    return ours, base, gold


def _batch(padding):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    lengths = [SEQ, 5, 7]
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, n:] = 0
        elif padding == "left":
            mask[b, :SEQ - n] = 0
    return ids, mask


def _real(mask, padding):
    """Positions whose values must equal transformers': real tokens, plus position 0 (what the
    pooler reads) when it is left padding."""
    keep = mask.bool().clone()
    if padding == "left":
        keep[:, 0] = True
    return keep


def _check(cand, base, gold, what):
    result = check_budget(cand, base, gold)
    assert result.ok, f"{what}: {result}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_hidden_states_match_transformers(padding, dtype, backend):
    ours, base, gold = _trio("AlbertModel", dtype, backend, num_hidden_groups=1, inner_group_num=2)
    ids, mask = _batch(padding)
    outs = [m(ids, attention_mask=mask, output_hidden_states=True) for m in (ours, base, gold)]
    assert len(outs[0].hidden_states) == len(outs[1].hidden_states) == 3 * 2 + 1
    keep = _real(mask, padding)
    for i, (c, b, g) in enumerate(zip(*(o.hidden_states for o in outs))):
        assert c.shape == b.shape
        _check(c[keep], b[keep], g[keep], f"hidden_states[{i}]")
    _check(outs[0].pooler_output, outs[1].pooler_output, outs[2].pooler_output, "pooler_output")


def test_hidden_states_argument_wins_over_config(backend):
    ours, base, _ = _trio("AlbertModel", torch.float32, backend, output_hidden_states=True)
    ids, mask = _batch("right")
    assert len(ours(ids, attention_mask=mask).hidden_states) == 4
    for model in (ours, base):
        out = model(ids, attention_mask=mask, output_hidden_states=False)
        assert out.hidden_states is None


def test_hidden_states_selection_like_transformers(backend):
    ours, base, _ = _trio("AlbertModel", torch.float32, backend)
    ids, mask = _batch("right")
    for selection in ([0, -1], 1):
        try:
            expected = base(ids, attention_mask=mask, output_hidden_states=selection).hidden_states
        except (TypeError, ValueError):
            pytest.skip("the installed transformers selects no hidden states by index")
        got = ours(ids, attention_mask=mask, output_hidden_states=selection).hidden_states
        assert [h is None for h in got] == [h is None for h in expected]
        keep = mask.bool()
        for g, e in zip(got, expected):
            if e is not None:
                torch.testing.assert_close(g[keep], e[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_attention_probabilities_match_transformers(padding, dtype, backend):
    ours, base, gold = _trio("AlbertModel", dtype, backend)
    ids, mask = _batch(padding)
    with pytest.warns(UserWarning, match="not fused"):
        got = ours(ids, attention_mask=mask, output_attentions=True)
    outs = [got] + [m(ids, attention_mask=mask, output_attentions=True) for m in (base, gold)]
    assert len(got.attentions) == 3
    rows = _real(mask, padding)                                            # real query rows
    for i, (c, b, g) in enumerate(zip(*(o.attentions for o in outs))):
        assert c.shape == b.shape == (BATCH, 4, SEQ, SEQ)
        pick = lambda t: t.transpose(1, 2)[rows]
        _check(pick(c), pick(b), pick(g), f"attentions[{i}]")
    keep = mask.bool()
    _check(got.last_hidden_state[keep], outs[1].last_hidden_state[keep],
           outs[2].last_hidden_state[keep], "last_hidden_state with output_attentions")


@pytest.mark.parametrize("cls_name", ["AlbertForSequenceClassification", "AlbertForPreTraining",
                                      "AlbertForMultipleChoice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_left_padding_heads_match_transformers(cls_name, dtype, backend):
    ours, base, gold = _trio(cls_name, dtype, backend)
    ids, mask = _batch("left")
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if cls_name == "AlbertForMultipleChoice":
        kwargs = {k: v[None] for k, v in kwargs.items()}                   # 1 example, 3 choices
    outs = [m(**kwargs) for m in (ours, base, gold)]
    field = "sop_logits" if cls_name == "AlbertForPreTraining" else "logits"
    _check(*(getattr(o, field) for o in outs), field)
    if cls_name == "AlbertForSequenceClassification":  # two left-padded rows differ, as in hf
        assert not torch.equal(outs[0].logits[1], outs[0].logits[2])


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_4d_padding_mask_same_as_2d(kind, backend):
    ours, _, _ = _trio("AlbertModel", torch.float32, backend)
    ids, mask = _batch("right")
    allowed = mask.bool()[:, None, None, :].expand(BATCH, 1, SEQ, SEQ)
    four_d = allowed if kind == "bool" else \
        torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = ours(ids, attention_mask=mask).last_hidden_state
    got = ours(ids, attention_mask=four_d).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-6)


def _packed_expected(base, ids, lengths):
    """transformers run on each sequence alone: its last hidden states, concatenated."""
    outs, start = [], 0
    for n in lengths:
        outs.append(base(ids[:, start:start + n]).last_hidden_state[0])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("given_by", ["position_ids", "block_mask"])
def test_packed_rows_run_as_separate_sequences(given_by, backend):
    ours, base, _ = _trio("AlbertModel", torch.float32, backend)
    lengths = [4, 2, 3]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    if given_by == "position_ids":   # as DataCollatorWithFlattening produces: no attention mask
        # transformers' ALBERT splits rows by position_ids only under flash attention (with
        # eager, this model's, it attends across the row: the patch does as it does)
        torch.testing.assert_close(ours(ids, position_ids=position_ids).last_hidden_state,
                                   base(ids, position_ids=position_ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
        ours.config._attn_implementation = "flash_attention_2"  # read by the patched encoder
        out = ours(ids, position_ids=position_ids)
    else:
        seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
        block = (seg[:, None] == seg[None, :])[None, None]
        out = ours(ids, attention_mask=block, position_ids=position_ids)
    expected = _packed_expected(base, ids, lengths)
    torch.testing.assert_close(out.last_hidden_state[0], expected, rtol=1e-4, atol=1e-5)


def test_unsupported_4d_mask_raises(backend):
    ours, _, _ = _trio("AlbertModel", torch.float32, backend)
    ids, _ = _batch("none")
    causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))[None, None].expand(BATCH, 1, SEQ, SEQ)
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=causal)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_our_model_hidden_states_and_pooler_match_transformers(padding, backend):
    torch.manual_seed(0)
    hf = transformers.AlbertModel(_config()).eval()
    ours = ak.AlbertModel.from_hf(hf, backend=backend).eval()
    ids, mask = _batch(padding)
    got = ours(ids, mask, output_hidden_states=True)
    expected = hf(ids, attention_mask=mask, output_hidden_states=True)
    keep = _real(mask, padding)
    assert len(got.hidden_states) == len(expected.hidden_states)
    for g, e in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(g[keep], e[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = ours(ids, mask, output_attentions=True).attentions
    exp = hf(ids, attention_mask=mask, output_attentions=True).attentions
    rows = _real(mask, padding)
    for g, e in zip(att, exp):
        torch.testing.assert_close(g.transpose(1, 2)[rows], e.transpose(1, 2)[rows],
                                   rtol=1e-4, atol=1e-5)
