"""The ALBERT model against transformers (random weights, fp32), weights round trips, errors."""
import pytest
import torch

import albert_kernels as ak

transformers = pytest.importorskip("transformers")

# (name, transformers config kwargs): small stand-ins for the configs docs/correctness.md names.
CONFIGS = {
    "base_shaped": dict(embedding_size=128, hidden_size=768, num_attention_heads=12,
                        intermediate_size=3072, num_hidden_layers=2),
    "groups2": dict(embedding_size=32, hidden_size=64, num_attention_heads=4,
                    intermediate_size=128, num_hidden_layers=4, num_hidden_groups=2),
    "inner2": dict(embedding_size=32, hidden_size=64, num_attention_heads=2,
                   intermediate_size=96, num_hidden_layers=3, inner_group_num=2),
    "emb_eq_hidden": dict(embedding_size=64, hidden_size=64, num_attention_heads=4,
                          intermediate_size=128, num_hidden_layers=2),
    "head_dim128": dict(embedding_size=32, hidden_size=256, num_attention_heads=2,
                        intermediate_size=256, num_hidden_layers=2),
    "erf_gelu": dict(embedding_size=16, hidden_size=32, num_attention_heads=2,
                     intermediate_size=64, num_hidden_layers=2, hidden_act="gelu"),
}
VOCAB = 120


def _hf_config(impl="eager", **kw):
    return transformers.AlbertConfig(vocab_size=VOCAB, attn_implementation=impl, **kw)


def _batch(batch=4, seqlen=13, seed=0):
    """Right padding, left padding, a fully padded row and a full row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seqlen), generator=gen)
    types = torch.randint(0, 2, (batch, seqlen), generator=gen)
    mask = torch.ones(batch, seqlen, dtype=torch.long)
    mask[0, 7:] = 0          # right padding
    mask[1, :4] = 0          # left padding
    mask[2, :] = 0           # all padding
    return ids, types, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, impl, cpu_backend):
    torch.manual_seed(0)
    hf = transformers.AlbertModel(_hf_config(impl, **CONFIGS[name])).eval()
    ours = ak.AlbertModel.from_hf(hf, backend=cpu_backend).eval()
    ids, types, mask = _batch()
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool().clone()
    real[1, 0] = True  # a left-padded first position is computed as transformers computes it
    diff = (got.last_hidden_state - expected.last_hidden_state)[real].abs().max().item()
    assert diff <= 1e-4, f"{name}/{impl}: max |ours - transformers| on real tokens = {diff:.2e}"
    assert torch.all(got.last_hidden_state[~real] == 0), "other padded rows must be zeros"
    # Pooler: rows with a real token (right, left and no padding) read transformers' position 0.
    pooled = (got.pooler_output - expected.pooler_output)[[0, 1, 3]].abs().max().item()
    assert pooled <= 1e-4


def test_no_mask_matches_transformers(cpu_backend):
    torch.manual_seed(1)
    hf = transformers.AlbertModel(_hf_config("sdpa", **CONFIGS["groups2"])).eval()
    ours = ak.AlbertModel.from_hf(hf, backend=cpu_backend).eval()
    ids, _, _ = _batch()
    with torch.no_grad():
        diff = (ours(ids).last_hidden_state - hf(ids).last_hidden_state).abs().max().item()
    assert diff <= 1e-4


def test_padded_and_unpadded_paths_agree(cpu_backend):
    torch.manual_seed(2)
    cfg = ak.AlbertConfig(vocab_size=VOCAB, **CONFIGS["groups2"])
    packed = ak.AlbertModel(cfg, backend=cpu_backend).eval()
    padded = ak.AlbertModel(cfg, backend=cpu_backend, unpad=False).eval()
    padded.load_state_dict(packed.state_dict())
    ids, types, mask = _batch()
    with torch.no_grad():
        a = packed(ids, mask, types)
        b = padded(ids, mask, types)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-5


def test_pretraining_loss_and_grads_match_transformers(cpu_backend):
    torch.manual_seed(3)
    hf = transformers.AlbertForPreTraining(
        _hf_config("eager", classifier_dropout_prob=0.0, **CONFIGS["groups2"])).train()
    ours = ak.AlbertForPreTraining.from_hf(hf, backend=cpu_backend).train()
    ids, types, mask = _batch()
    # Right padding only: the pooler reads position 0, a padded (zero) row under left padding.
    mask[1] = 1
    mask[1, 9:] = 0
    mask[2, :3] = 1
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    labels[~mask.bool()] = -100
    sop = torch.tensor([0, 1, 1, 0])
    out_hf = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels,
                sentence_order_label=sop)
    out = ours(ids, mask, types, labels=labels, sentence_order_label=sop)
    assert abs(out.loss.item() - out_hf.loss.item()) <= 1e-5
    out_hf.loss.backward()
    out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = hf_grads[name].grad
        assert p.grad is not None, name
        diff = (p.grad - g_ref).abs().max().item()
        assert diff <= 1e-5 + 1e-4 * g_ref.abs().max().item(), f"grad of {name}: {diff:.2e}"


def test_sequence_classification_matches_transformers(cpu_backend):
    torch.manual_seed(4)
    hf = transformers.AlbertForSequenceClassification(
        _hf_config("sdpa", num_labels=3, **CONFIGS["inner2"])).eval()
    ours = ak.AlbertForSequenceClassification.from_hf(hf, backend=cpu_backend).eval()
    assert ours.num_labels == 3
    ids, types, _ = _batch()
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        a = hf(ids, token_type_ids=types, labels=labels)
        b = ours(ids, token_type_ids=types, labels=labels)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_directory_round_trip(tmp_path):
    torch.manual_seed(5)
    hf = transformers.AlbertForPreTraining(_hf_config("eager", **CONFIGS["emb_eq_hidden"]))
    hf.save_pretrained(tmp_path / "st")                                  # safetensors
    ours = ak.AlbertForPreTraining.from_hf(str(tmp_path / "st"))
    for key, tensor in hf.state_dict().items():
        assert torch.equal(ours.to_hf_state_dict()[key], tensor), key
    assert set(ours.to_hf_state_dict()) == set(hf.state_dict())
    # ours -> directory -> transformers
    ours.save_hf(str(tmp_path / "ours"))
    back = transformers.AlbertForPreTraining.from_pretrained(str(tmp_path / "ours"))
    for key, tensor in back.state_dict().items():
        assert torch.equal(ours.to_hf_state_dict()[key], tensor), key
    # A bare encoder from the pretraining directory keeps the encoder and drops the heads.
    enc = ak.AlbertModel.from_hf(str(tmp_path / "st"))
    assert torch.equal(enc.pooler.weight, hf.albert.pooler.weight)


def test_pytorch_model_bin(tmp_path):
    torch.manual_seed(6)
    hf = transformers.AlbertModel(_hf_config("eager", **CONFIGS["erf_gelu"]))
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = ak.AlbertModel.from_hf(str(tmp_path))
    assert ours.config.hidden_act == "gelu"
    for key, tensor in hf.state_dict().items():
        assert torch.equal(ours.to_hf_state_dict()[key], tensor), key


def test_state_dict_errors_name_the_key():
    cfg = ak.AlbertConfig(vocab_size=VOCAB, **CONFIGS["inner2"])
    state = ak.AlbertModel(cfg).to_hf_state_dict()
    state["embeddings.position_ids"] = torch.arange(512)[None]   # legacy key: ignored
    ak.AlbertModel.from_hf(state, config=cfg)
    missing = {k: v for k, v in state.items() if k != "pooler.weight"}
    with pytest.raises(KeyError, match="pooler.weight"):
        ak.AlbertModel.from_hf(missing, config=cfg, strict=True)  # default: warn, initialise
    with pytest.raises(KeyError, match="encoder.extra.weight"):
        ak.AlbertModel.from_hf({**state, "encoder.extra.weight": torch.zeros(1)}, config=cfg,
                               strict=True)
    bad = dict(state)
    bad["encoder.embedding_hidden_mapping_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="embedding_hidden_mapping_in.weight"):
        ak.AlbertModel.from_hf(bad, config=cfg)
    with pytest.raises(ValueError, match="config"):
        ak.AlbertModel.from_hf(state)


def test_config_matches_transformers_defaults_and_presets():
    ours, theirs = ak.AlbertConfig(), transformers.AlbertConfig()
    for field in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                  "num_hidden_groups", "num_attention_heads", "intermediate_size",
                  "inner_group_num", "hidden_act", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                  "initializer_range", "layer_norm_eps", "classifier_dropout_prob",
                  "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field
    base = ak.AlbertConfig.preset("base")
    assert (base.hidden_size, base.num_attention_heads, base.intermediate_size) == (768, 12, 3072)
    assert ak.AlbertConfig.preset("xlarge").head_dim == 128
    assert ak.AlbertConfig.preset("xxlarge").num_attention_heads == 64
    with pytest.raises(ValueError, match="preset"):
        ak.AlbertConfig.preset("huge")
    with pytest.raises(ValueError, match="hidden_act"):
        ak.AlbertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="num_attention_heads"):
        ak.AlbertConfig(hidden_size=100, num_attention_heads=12)


def test_model_input_errors():
    model = ak.AlbertModel(ak.AlbertConfig(vocab_size=VOCAB, max_position_embeddings=16,
                                           **CONFIGS["inner2"]))
    ids = torch.randint(1, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.full((2, 8), 2))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(1, VOCAB, (1, 17)))
    with pytest.raises(ak.BackendUnavailable, match="nope"):
        model.set_backend("nope")(ids)


def test_set_backend_keeps_weights():
    cfg = ak.AlbertConfig(vocab_size=VOCAB, **CONFIGS["inner2"])
    model = ak.AlbertForPreTraining(cfg, backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend(None)
    assert model.albert.backend is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.predictions.decoder.weight is model.albert.embeddings.word_embeddings.weight


def test_segments_from_position_ids_restart_only_after_a_real_token():
    """A 0 right after a real token of the same row starts a packed sequence; a 0 after a pad
    (left-padding ids) does not, and neither does a pad's own id."""
    from albert_kernels.model.layout import segments_from_position_ids
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool()
    clamped = (mask.long().cumsum(1) - 1).clamp(min=0)      # [0 0 0 0 1 2], ...
    ones = torch.where(mask, clamped, torch.ones_like(clamped))
    for ids in (clamped, ones):
        assert segments_from_position_ids(ids, mask) is None
    packed = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 0, 0]])
    expected = torch.tensor([[-1, -1, -1, 0, 0, 1], [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, -1, -1]])
    assert torch.equal(segments_from_position_ids(packed, mask), expected)


@pytest.mark.parametrize("pad_id", ["clamped", "one"])
def test_left_padding_position_ids_are_not_packing(pad_id, cpu_backend):
    """transformers' usual left-padding position ids (cumsum(mask) - 1, pads clamped to 0 or set
    to 1): our models give transformers' logits and hidden states (the left-padded first
    position the pooler reads included); a packed row still runs as separate sequences."""
    torch.manual_seed(0)
    hf = transformers.AlbertForSequenceClassification(_hf_config(
        embedding_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=48,
        num_hidden_layers=2, classifier_dropout_prob=0.0)).eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    if pad_id == "one":
        position_ids = position_ids.masked_fill(mask == 0, 1)
    for backend in ("reference", cpu_backend):
        ours = ak.AlbertForSequenceClassification.from_hf(hf, backend=backend).eval()
        with torch.no_grad():
            got = ours(ids, mask, position_ids=position_ids).logits
            expected = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            hidden = ours.albert(ids, mask, position_ids=position_ids).last_hidden_state
            hf_hidden = hf.albert(input_ids=ids, attention_mask=mask,
                                  position_ids=position_ids).last_hidden_state
            real = mask.bool()
            torch.testing.assert_close(hidden[real], hf_hidden[real], rtol=1e-5, atol=1e-5)
            packed_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
            packed = ours.albert(ids[:1], position_ids=packed_ids).last_hidden_state[0]
            alone = torch.cat([hf.albert(input_ids=ids[:1, :4]).last_hidden_state[0],
                               hf.albert(input_ids=ids[:1, 4:]).last_hidden_state[0]])
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
