"""The pretraining data: corpus, tokenizer, segment pairs and n-gram masking statistics."""
import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from albert_kernels.training import data as D  # noqa: E402

N_EXAMPLES = 400


@pytest.fixture(scope="module")
def tokenizer():
    return D.load_tokenizer()


@pytest.fixture(scope="module")
def data(tokenizer):
    return D.PretrainingData(tokenizer, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def examples(data):
    return [data.example(i) for i in range(N_EXAMPLES)]


def test_corpus_is_bundled_with_its_licence_note():
    files = D.corpus_files()
    assert len(files) >= 3
    size = sum(f.stat().st_size for f in files)
    assert 1_000_000 <= size <= 3_000_000, size
    readme = (D.CORPUS_DIR / "README.md").read_text()
    assert "public domain" in readme.lower()
    for f in files:
        assert f.name in readme, f"{f.name} is not described in corpus/README.md"
    docs = D.read_documents()
    assert len(docs) == len(files) and all(len(d) > 500 for d in docs)
    assert D.split_sentences("One two.  Three?\n\nFour\nfive!") == ["One two.", "Three?", "Four five!"]


def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.get_piece_size() == 8000
    for i, piece in enumerate(["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]):
        assert tokenizer.id_to_piece(i) == piece
        assert tokenizer.piece_to_id(piece) == i
    assert (D.PAD_ID, D.UNK_ID, D.CLS_ID, D.SEP_ID, D.MASK_ID) == (0, 1, 2, 3, 4)
    ids = tokenizer.encode("Alice was beginning to get very tired.")
    assert min(ids) >= D.NUM_SPECIAL                       # text never yields a special id
    assert tokenizer.decode(ids) == "alice was beginning to get very tired."   # lower-cased


def test_retrain_tokenizer_is_deterministic(tmp_path):
    small = [D.corpus_files()[0]]
    a = D.train_tokenizer(tmp_path / "a.model", vocab_size=400, files=small)
    b = D.train_tokenizer(tmp_path / "b.model", vocab_size=400, files=small)
    assert a.read_bytes() == b.read_bytes()
    sp = D.load_tokenizer(a)
    assert sp.get_piece_size() == 400 and sp.id_to_piece(4) == "[MASK]"
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(tmp_path / "c.model", vocab_size=3, files=small)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        D.load_tokenizer(tmp_path / "missing.model")


def test_example_layout(data, examples):
    for e in examples[:100]:
        ids, types = e.input_ids, e.token_type_ids
        assert len(ids) <= 128 and ids[0] == D.CLS_ID and ids[-1] == D.SEP_ID
        seps = np.flatnonzero(ids == D.SEP_ID)
        assert len(seps) == 2 and 1 < seps[0] < len(ids) - 2      # A and B are not empty
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
        original = np.where(e.labels != D.IGNORE_INDEX, e.labels, ids)
        assert (original >= D.NUM_SPECIAL).sum() == len(ids) - 3   # specials only at CLS/SEP
        assert (e.labels[ids < D.NUM_SPECIAL][ids[ids < D.NUM_SPECIAL] != D.MASK_ID]
                == D.IGNORE_INDEX).all()                          # CLS/SEP are never predicted


def _find(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Position of `needle` in `haystack` (int arrays), or -1."""
    h, n = haystack.astype(np.int32).tobytes(), needle.astype(np.int32).tobytes()
    start = h.find(n)
    while start >= 0 and start % 4:
        start = h.find(n, start + 1)
    return start // 4 if start >= 0 else -1


def test_sentence_order_label_and_balance(data, examples):
    labels = np.array([e.sentence_order_label for e in examples])
    assert 0.43 <= labels.mean() <= 0.57, labels.mean()
    # The label says whether the first segment comes after the second in its document.
    streams = [np.concatenate([s for c in data.chunks for s in c])]
    for e in examples[:60]:
        original = np.where(e.labels != D.IGNORE_INDEX, e.labels, e.input_ids)
        sep = int(np.flatnonzero(original == D.SEP_ID)[0])
        a, b = original[1:sep], original[sep + 1:-1]
        pa, pb = _find(streams[0], a), _find(streams[0], b)
        assert pa >= 0 and pb >= 0, "segments must be verbatim spans of the corpus"
        assert (pa > pb) == bool(e.sentence_order_label)


def test_masking_statistics(data, examples):
    masked = predictable = n_mask = n_same = n_random = 0
    spans = []
    for e in examples:
        chosen = e.labels != D.IGNORE_INDEX
        masked += int(chosen.sum())
        predictable += len(e.input_ids) - 3
        n_mask += int((e.input_ids[chosen] == D.MASK_ID).sum())
        n_same += int((e.input_ids[chosen] == e.labels[chosen]).sum())
        n_random += int(((e.input_ids[chosen] != D.MASK_ID)
                         & (e.input_ids[chosen] != e.labels[chosen])).sum())
        spans += e.span_lengths
        assert chosen.sum() >= 1
        assert sum(len_ for len_ in e.span_lengths) <= chosen.sum()   # spans are whole words
    share = masked / predictable
    assert 0.135 <= share <= 0.155, f"share of masked tokens {share:.3f}"
    assert abs(n_mask / masked - 0.8) <= 0.025, n_mask / masked
    assert abs(n_same / masked - 0.1) <= 0.02, n_same / masked
    assert abs(n_random / masked - 0.1) <= 0.02, n_random / masked
    # n-gram lengths: n is drawn with p(n) proportional to 1/n for n <= 3, i.e. (6, 3, 2) / 11.
    # As in the original algorithm, a span that overlaps an earlier one is skipped and one that
    # would pass the 15% budget backs off to a shorter n, which moves some mass from long spans to
    # short ones (here about 0.61 / 0.26 / 0.13); uniform n (1/3 each) or unigram-only masking
    # would be far outside these bounds.
    counts = np.bincount(spans, minlength=4)[1:]
    assert len(counts) == 3, "no span may be longer than 3 words"
    observed = counts / counts.sum()
    expected = np.array([6, 3, 2]) / 11
    assert np.abs(observed - expected).max() <= 0.08, (observed, expected)
    assert observed[0] > observed[1] > observed[2] >= 0.1, observed


def test_deterministic_per_seed_and_index(tokenizer, data):
    again = D.PretrainingData(tokenizer, seq_len=128, seed=0)
    other = D.PretrainingData(tokenizer, seq_len=128, seed=1)
    for i in (0, 7, len(data) + 3):                      # also in the second epoch
        a, b, c = data.example(i), again.example(i), other.example(i)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        assert not np.array_equal(a.input_ids, c.input_ids)
    # An epoch visits every chunk once.
    firsts = {int(data._perms[0][i]) for i in range(len(data))}
    assert firsts == set(range(len(data)))


def test_rank_shards_cover_the_global_batch(data):
    step, batch = 5, 8
    single = list(data.indices(step, batch))
    shards = [list(data.indices(step, batch, rank, 2)) for rank in range(2)]
    assert shards[0] + shards[1] == single and not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        data.indices(0, 7, 0, 2)


def test_batch_is_right_padded(data):
    b = data.batch(range(6))
    lengths = b["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
        assert (b["input_ids"][row, n:] == D.PAD_ID).all()
        assert (b["labels"][row, n:] == D.IGNORE_INDEX).all()
    assert b["input_ids"].shape[1] == int(lengths.max())
    assert b["sentence_order_label"].shape == (6,) and b["input_ids"].dtype == torch.long


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        D.PretrainingData(tokenizer, seq_len=4)
    with pytest.raises(ValueError, match="two segments"):
        D.PretrainingData(tokenizer, seq_len=64, documents=[["One sentence only."]])
