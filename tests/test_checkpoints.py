"""Checkpoints: any ALBERT checkpoint into any of our heads as transformers loads it, the
tie_word_embeddings setting both ways, save/load round trips with transformers, and the errors.

Also regression tests for two past failures: a classifier from a pretraining checkpoint (KeyError
on the new classifier weights) and an untied MLM decoder (silently re-tied: logits off).
"""
import re
import warnings

import pytest
import torch

import albert_kernels as ak
from albert_kernels.model.weights import read_hf_directory

transformers = pytest.importorskip("transformers")

VOCAB = 61
CFG = dict(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_attention_heads=2,
           intermediate_size=40, num_hidden_layers=2, classifier_dropout_prob=0.0,
           initializer_range=0.2)
CLASSES = ["AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
           "AlbertForSequenceClassification", "AlbertForTokenClassification",
           "AlbertForQuestionAnswering", "AlbertForMultipleChoice"]


def _hf(name, seed=0, **config):
    torch.manual_seed(seed)
    return getattr(transformers, name)(
        transformers.AlbertConfig(attn_implementation="eager", **{**CFG, **config})).eval()


def _load(cls_name, src, **kwargs):
    """(our model, the UserWarnings from_hf/from_pretrained gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = getattr(ak, cls_name).from_hf(src, backend="reference", **kwargs)
    return model.eval(), [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                          and ".from_hf(" in str(w.message)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A transformers save_pretrained directory of every ALBERT class."""
    root = tmp_path_factory.mktemp("hf")
    for i, name in enumerate(CLASSES):
        _hf(name, seed=i).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("target", CLASSES)
def test_any_checkpoint_into_any_head_as_transformers_loads_it(saved, target):
    """Same missing, unused and mis-shaped keys as transformers' loading info, the loaded weights
    equal to the checkpoint's, the new ones initialised by transformers' rule, one warning
    listing them. A mis-shaped key (a multiple-choice classifier into a sequence classifier) is
    an error in both, unless ignore_mismatched_sizes=True."""
    hf_cls = getattr(transformers, target)
    for source in CLASSES:
        path, where, kw = saved / source, f"{source} -> {target}", {}
        try:
            hf, info = hf_cls.from_pretrained(path, output_loading_info=True)
        except RuntimeError:                       # transformers: a size mismatch
            with pytest.raises(ValueError, match=r"key 'classifier\.(weight|bias)' has shape"):
                _load(target, str(path))
            kw = dict(ignore_mismatched_sizes=True)
            hf, info = hf_cls.from_pretrained(path, output_loading_info=True, **kw)
        ours, warned = _load(target, str(path), **kw)
        report = getattr(ak, target)(ours.config, backend="reference").load_hf_state_dict(
            read_hf_directory(str(path))[1], **kw)
        assert set(report.missing_keys) == set(info["missing_keys"]), where
        assert set(report.unexpected_keys) == set(info["unexpected_keys"]), where
        mismatched = [k for k, _, _ in report.mismatched_keys]
        assert set(mismatched) == {k for k, _, _ in info["mismatched_keys"]}, where
        assert len(warned) == (1 if any(report) else 0), where
        for key in report.missing_keys + report.unexpected_keys + mismatched:
            assert key in warned[0], (where, key)
        theirs = hf.state_dict()
        for key, value in ours.to_hf_state_dict().items():
            if key not in report.missing_keys + mismatched:
                assert torch.equal(value, theirs[key]), (where, key)
            elif key.endswith("bias") or "LayerNorm" in key:       # zeros, or LayerNorm's ones
                assert torch.equal(value, theirs[key]), (where, key)
            else:                                                   # N(0, initializer_range)
                assert abs(value.std().item() / CFG["initializer_range"] - 1) < 0.35, (where, key)
                assert abs(value.mean().item()) < 0.1, (where, key)


def test_regression_classifier_from_a_pretraining_checkpoint(tmp_path):
    """AlbertForSequenceClassification.from_hf once raised KeyError (classifier.*) for a
    transformers AlbertForPreTraining / AlbertModel object, its directory, or our save_hf output."""
    pre = _hf("AlbertForPreTraining")
    pre.save_pretrained(tmp_path / "hf")
    ak.AlbertForPreTraining.from_hf(pre, backend="reference").save_hf(str(tmp_path / "ours"))
    ids = torch.randint(5, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    for src in (pre, pre.albert, str(tmp_path / "hf"), str(tmp_path / "ours")):
        model, warned = _load("AlbertForSequenceClassification", src, num_labels=3)
        assert len(warned) == 1 and "classifier.weight" in warned[0] and "classifier.bias" in warned[0]
        assert model.classifier.weight.shape == (3, 32) and torch.all(model.classifier.bias == 0)
        hf = transformers.AlbertForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=3)
        hf.classifier.load_state_dict(model.classifier.state_dict())
        with torch.no_grad():
            diff = (model(ids, mask).logits - hf.eval()(ids, attention_mask=mask).logits).abs().max()
        assert diff.item() <= 1e-5, src if isinstance(src, str) else type(src).__name__


@pytest.mark.parametrize("name", ["AlbertForPreTraining", "AlbertForMaskedLM"])
def test_regression_untied_decoder(tmp_path, name):
    """With tie_word_embeddings=False the decoder was once re-tied to the word embeddings
    and the checkpoint's own decoder dropped (MLM logits off by 2.5-7, no warning)."""
    hf = _hf(name, tie_word_embeddings=False)
    decoder = hf.predictions.decoder.weight
    embeddings = hf.albert.embeddings.word_embeddings.weight
    assert (decoder - embeddings).abs().max().item() > 0.5          # the test can fail
    ours, warned = _load(name, hf)
    assert not warned
    assert ours.predictions.decoder.weight is not ours.albert.embeddings.word_embeddings.weight
    assert torch.equal(ours.predictions.decoder.weight, decoder)
    ids = torch.randint(5, VOCAB, (2, 7))
    with torch.no_grad():
        logits = ours(ids).logits if name == "AlbertForMaskedLM" else ours(ids).prediction_logits
        expected = hf(ids).logits if name == "AlbertForMaskedLM" else hf(ids).prediction_logits
    assert (logits - expected).abs().max().item() <= 1e-5
    # Saved untied (the decoder under its own key), and transformers loads it untied.
    ours.save_pretrained(tmp_path)
    assert "predictions.decoder.weight" in read_hf_directory(str(tmp_path))[1]
    back = getattr(transformers, name).from_pretrained(tmp_path)
    assert back.config.tie_word_embeddings is False
    assert torch.equal(back.predictions.decoder.weight, decoder)
    assert back.predictions.decoder.weight.data_ptr() != back.albert.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize("tied", [True, False])
def test_tie_word_embeddings_in_training(tied):
    """Two SGD steps on ours and on transformers: the same weights after them; a tied decoder
    stays the embedding matrix, an untied one trains apart from it."""
    hf = _hf("AlbertForMaskedLM", tie_word_embeddings=tied).train()
    ours, _ = _load("AlbertForMaskedLM", hf)
    ours.train()
    ids = torch.randint(5, VOCAB, (2, 8))
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    for model in (ours, hf):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(2):
            model(ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    theirs = hf.state_dict()
    for key, value in ours.to_hf_state_dict().items():
        assert (value - theirs[key]).abs().max().item() <= 1e-5, key
    decoder, emb = ours.predictions.decoder.weight, ours.albert.embeddings.word_embeddings.weight
    assert (decoder is emb) == tied
    if not tied:
        assert (decoder - emb).abs().max().item() > 0.1


@pytest.mark.parametrize("name,tied", [(name, True) for name in CLASSES] +
                         [("AlbertForPreTraining", False), ("AlbertForMaskedLM", False)])
def test_save_load_round_trips_with_transformers(tmp_path, name, tied):
    hf = _hf(name, tie_word_embeddings=tied, num_labels=2)
    hf.save_pretrained(tmp_path / "hf")
    ours, warned = _load(name, str(tmp_path / "hf"))
    assert not warned
    assert set(ours.to_hf_state_dict()) == set(hf.state_dict())
    ours.save_pretrained(tmp_path / "ours")
    hf_keys = set(read_hf_directory(str(tmp_path / "hf"))[1])
    assert set(read_hf_directory(str(tmp_path / "ours"))[1]) == hf_keys   # tied weights once
    back, info = getattr(transformers, name).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert back.config.architectures == [name] and back.config.tie_word_embeddings is tied
    again, _ = _load(name, str(tmp_path / "ours"))
    for key, value in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
        assert torch.equal(again.to_hf_state_dict()[key], value), key


def test_prefix_both_ways():
    """A checkpoint with a head into a bare encoder, and a bare encoder into a head."""
    pre = _hf("AlbertForPreTraining")
    enc, warned = _load("AlbertModel", pre)
    assert len(warned) == 1 and "sop_classifier.classifier.weight" in warned[0]
    assert "newly initialised" not in warned[0]
    assert torch.equal(enc.pooler.weight, pre.albert.pooler.weight)
    tok, warned = _load("AlbertForTokenClassification", enc.to_hf_state_dict(), config=enc.config)
    assert re.search(r"skipped: pooler\.bias, pooler\.weight", warned[0])  # no pooler; as stored
    assert torch.equal(tok.albert.encoder.embedding_hidden_mapping_in.weight,
                       pre.albert.encoder.embedding_hidden_mapping_in.weight)


def test_num_labels_override_and_labels_kept(tmp_path):
    cls = _hf("AlbertForSequenceClassification", id2label={0: "neg", 1: "pos"},
              label2id={"neg": 0, "pos": 1})
    cls.save_pretrained(tmp_path / "two")
    same, _ = _load("AlbertForSequenceClassification", str(tmp_path / "two"))
    same.save_pretrained(tmp_path / "same")
    back = transformers.AlbertForSequenceClassification.from_pretrained(tmp_path / "same")
    assert back.config.id2label == {0: "neg", 1: "pos"}
    pre = _hf("AlbertForPreTraining")
    pre.save_pretrained(tmp_path / "pre")
    three, _ = _load("AlbertForSequenceClassification", str(tmp_path / "pre"), num_labels=3,
                     problem_type="single_label_classification")
    three.save_pretrained(tmp_path / "three")
    back = transformers.AlbertForSequenceClassification.from_pretrained(tmp_path / "three")
    assert back.config.num_labels == 3 and back.config.problem_type == "single_label_classification"


def test_errors_name_the_key_or_field(tmp_path):
    cls = _hf("AlbertForSequenceClassification")
    cls.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"'classifier.weight' has shape \[2, 32\] in the checkpoint"):
        ak.AlbertForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=3,
                                                           backend="reference")
    model, warned = _load("AlbertForSequenceClassification", str(tmp_path / "cls"), num_labels=3,
                          ignore_mismatched_sizes=True)
    assert "classifier.weight (checkpoint [2, 32], model [3, 32])" in warned[0]
    assert torch.all(model.classifier.bias == 0)
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=40)
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        ak.AlbertModel.from_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        ak.AlbertModel.from_hf(transformers.BertModel(bert))
    config = ak.AlbertConfig(**CFG)
    with pytest.raises(ValueError, match="none of the checkpoint's 1 keys"):
        ak.AlbertModel.from_hf({"bert.embeddings.weight": torch.zeros(1)}, config=config,
                               backend="reference")
    state = ak.AlbertModel(config, backend="reference").to_hf_state_dict()
    del state["pooler.weight"]
    with pytest.raises(KeyError, match="missing keys in the state_dict: pooler.weight"):
        ak.AlbertModel.from_hf(state, config=config, strict=True, backend="reference")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        ak.AlbertModel.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="'albert-base-v2' is not a local directory.* hub "
                       "id .* must be downloaded first"):
        ak.AlbertModel.from_hf("albert-base-v2")
    with pytest.raises(ValueError, match="needs config"):
        ak.AlbertModel.from_hf(state)
    with pytest.raises(ValueError, match="problem_type"):
        ak.AlbertConfig(problem_type="ranking")


def test_config_to_hf_round_trips():
    """AlbertConfig.to_hf gives transformers' config with every field (and keyword arguments on
    top); from_hf reads every field back unchanged (transformers' own keys land in `extra`)."""
    cfg = ak.AlbertConfig(vocab_size=321, embedding_size=24, hidden_size=48, num_attention_heads=4,
                          intermediate_size=96, num_hidden_layers=3, hidden_act="gelu",
                          num_labels=5, hidden_dropout_prob=0.2)
    hf = cfg.to_hf(attn_implementation="eager")
    assert type(hf).__name__ == "AlbertConfig" and hf._attn_implementation == "eager"
    assert (hf.vocab_size, hf.embedding_size, hf.hidden_act, hf.num_labels,
            hf.hidden_dropout_prob) == (321, 24, "gelu", 5, 0.2)
    back = ak.AlbertConfig.from_hf(hf)
    assert {k: v for k, v in vars(back).items() if k != "extra"} == \
        {k: v for k, v in vars(cfg).items() if k != "extra"}


def test_loading_returns_eval_mode_as_transformers(tmp_path):
    """from_hf / from_pretrained return the model in eval mode, as transformers' from_pretrained:
    with classifier dropout the first inference already equals transformers' eval-mode logits."""
    hf = _hf("AlbertForSequenceClassification", classifier_dropout_prob=0.5,
             hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    hf.save_pretrained(tmp_path / "cls")
    reloaded = transformers.AlbertForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert not reloaded.training
    ids = torch.randint(5, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
    for model in (ak.AlbertForSequenceClassification.from_hf(hf.train(), backend="reference"),
                  ak.AlbertForSequenceClassification.from_pretrained(tmp_path / "cls",
                                                                     backend="reference")):
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_loading_keeps_the_source_dtype(tmp_path, dtype):
    """A float64 or bfloat16 checkpoint gives a model of that dtype with its weights bit for bit
    (a model object, a state_dict, a saved directory); dtype= picks another one."""
    hf = _hf("AlbertForMaskedLM").to(dtype)
    hf.save_pretrained(tmp_path / "mlm")
    expected = hf.state_dict()
    sources = {"model": (hf, {}), "state_dict": (expected, {"config": ak.AlbertConfig(**CFG)}),
               "directory": (str(tmp_path / "mlm"), {})}
    for what, (src, kwargs) in sources.items():
        model, _ = _load("AlbertForMaskedLM", src, **kwargs)
        state = model.to_hf_state_dict()
        assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}, what
        for key, value in expected.items():
            if key in state:
                assert torch.equal(state[key], value), f"{what}: {key}"
    ids = torch.randint(5, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    model, _ = _load("AlbertForMaskedLM", hf)
    with torch.no_grad():
        got, want = model(ids).logits, hf(input_ids=ids).logits
    assert got.dtype == dtype
    if dtype == torch.float64:   # float64 end to end: agreement to float64 rounding
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    as32, _ = _load("AlbertForMaskedLM", hf, dtype=torch.float32)
    assert as32.predictions.dense.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        ak.AlbertForMaskedLM.from_hf(hf, dtype="float16")


def test_hub_id_says_to_download_it_first():
    """A hub id is not a directory: both entry points say it must be downloaded first."""
    for load in (ak.AlbertModel.from_hf, ak.AlbertModel.from_pretrained):
        with pytest.raises(FileNotFoundError, match="hub id .* must be downloaded first"):
            load("albert-base-v2")
