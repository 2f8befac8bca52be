"""ALBERT pretraining data: the bundled corpus, its SentencePiece tokenizer, and MLM + SOP examples.

An example (Lan et al., 2019, section 4.1 and the original ``create_pretraining_data.py``):

- two segments A and B of consecutive sentences (or sentence pieces) of one document,
  ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``;
  with probability 0.5 the two are swapped and ``sentence_order_label`` is 1 (0 = original order,
  transformers' convention); with probability ``short_seq_prob`` the pair is cut to a random
  shorter length, as in the original;
- n-gram masking: spans of n whole words, n <= 3 drawn with p(n) proportional to 1/n, until 15%
  of the segment tokens are chosen (capped by ``max_predictions``); spans never overlap and never
  cross ``[SEP]``; each chosen token becomes ``[MASK]`` (80%), a random token (10%) or stays (10%).
  ``labels`` holds the original id at chosen positions and -100 elsewhere.

Every example is a pure function of (seed, global example index): the data seen at a training
step does not depend on the number of processes, and resuming needs only the step number.
Rank r of W at step s, with a global batch of G sequences, reads the examples
``s*G + r*G/W ... s*G + (r+1)*G/W - 1`` (its own shard of the step's batch).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TOKENIZER_PATH = CORPUS_DIR / "spiece.model"
SPECIAL_PIECES = ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
NUM_SPECIAL = len(SPECIAL_PIECES)
IGNORE_INDEX = -100


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:
        raise ImportError("the pretraining data needs sentencepiece: pip install "
                          "'albert-kernels[train]' (or pip install sentencepiece)") from e
    return sentencepiece


# --- corpus -------------------------------------------------------------------------------------

def corpus_files(directory: Path = CORPUS_DIR) -> list[Path]:
    """The bundled public-domain texts (see corpus/README.md), one document each."""
    files = sorted(Path(directory).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in the corpus directory {directory}")
    return files


_SENTENCE_END = re.compile(r"(?<=[.!?])['\"]?\s+")


def split_sentences(text: str) -> list[str]:
    """Paragraphs (blank-line separated) -> sentences: whitespace joined, split after . ! ?"""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            sentences += [s for s in _SENTENCE_END.split(paragraph) if s.strip()]
    return sentences


def read_documents(files: Optional[Sequence[Path]] = None) -> list[list[str]]:
    """Each file is one document: a list of sentences."""
    return [split_sentences(Path(f).read_text(encoding="utf-8")) for f in (files or corpus_files())]


# --- tokenizer ----------------------------------------------------------------------------------

def train_tokenizer(output: Path = TOKENIZER_PATH, vocab_size: int = 8000,
                    files: Optional[Sequence[Path]] = None) -> Path:
    """Train ALBERT's kind of tokenizer on the corpus: a SentencePiece unigram model, lower-cased
    (NFKC + case folding, as ALBERT v2's), with ``<pad>``=0, ``<unk>``=1, ``[CLS]``=2, ``[SEP]``=3,
    ``[MASK]``=4. Single-threaded, unshuffled: the same corpus gives the same model. Returns the
    path of the written ``.model`` file."""
    spm = _sentencepiece()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= NUM_SPECIAL:
        raise ValueError(f"vocab_size must be an int > {NUM_SPECIAL}, got {vocab_size!r}")
    sentences = [s for doc in read_documents(files) for s in doc]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=proto, model_type="unigram",
        vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
        pad_piece="<pad>", unk_piece="<unk>", control_symbols=list(SPECIAL_PIECES[2:]),
        normalization_rule_name="nmt_nfkc_cf", character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, max_sentence_length=1 << 20, minloglevel=2)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(proto.getvalue())
    return output


def load_tokenizer(path: Path = TOKENIZER_PATH):
    """The SentencePieceProcessor saved at `path`, checked for ALBERT's special ids."""
    spm = _sentencepiece()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer model at {path}; train one with "
                                "albert_kernels.training.data.train_tokenizer()")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for i, piece in enumerate(SPECIAL_PIECES):
        if sp.id_to_piece(i) != piece:
            raise ValueError(f"tokenizer {path}: id {i} is {sp.id_to_piece(i)!r}, ALBERT expects {piece!r}")
    return sp


# --- examples -----------------------------------------------------------------------------------

@dataclass
class Example:
    input_ids: np.ndarray            # int64 [n]
    token_type_ids: np.ndarray       # int64 [n]
    labels: np.ndarray               # int64 [n], -100 where nothing is predicted
    sentence_order_label: int        # 0 = A then B (original order), 1 = swapped
    span_lengths: list[int]          # n (in words) of each masked span, for statistics


class PretrainingData:
    """MLM + SOP examples of at most `seq_len` tokens from tokenized documents.

    The documents are tokenized once and cut into chunks of consecutive segments (sentences, long
    ones split) of about ``seq_len - 3`` tokens; an epoch is a seeded permutation of the chunks.
    """

    def __init__(self, tokenizer, seq_len: int = 128, seed: int = 0,
                 documents: Optional[list[list[str]]] = None, mask_prob: float = 0.15,
                 max_ngram: int = 3, max_predictions: Optional[int] = None,
                 short_seq_prob: float = 0.1):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 8:
            raise ValueError(f"seq_len must be an int >= 8, got {seq_len!r}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob!r}")
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1:
            raise ValueError(f"max_ngram must be a positive int, got {max_ngram!r}")
        self.seq_len, self.seed = seq_len, int(seed)
        self.mask_prob, self.short_seq_prob = mask_prob, short_seq_prob
        self.max_num_tokens = seq_len - 3
        self.max_predictions = max_predictions or int(np.ceil(mask_prob * self.max_num_tokens))
        self.vocab_size = tokenizer.get_piece_size()
        self.ngram_p = np.array([1.0 / n for n in range(1, max_ngram + 1)])
        self.ngram_p /= self.ngram_p.sum()
        pieces = [tokenizer.id_to_piece(i) for i in range(self.vocab_size)]
        # A piece that starts a word: "▁..." (SentencePiece's word boundary) or a special piece.
        self.word_start = np.array([p.startswith("\u2581") or i < NUM_SPECIAL
                                    for i, p in enumerate(pieces)])
        documents = read_documents() if documents is None else documents
        self.chunks = self._chunk([[np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode(doc)]
                                   for doc in documents])
        if not self.chunks:
            raise ValueError("the documents give no example: each needs at least two segments")
        self._perms: dict[int, np.ndarray] = {}

    def _chunk(self, docs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Consecutive segments per chunk until ~max_num_tokens; sentences longer than half of
        that are split, so that every chunk has at least two segments."""
        half = max(1, self.max_num_tokens // 2)
        chunks = []
        for doc in docs:
            segments = [s[i:i + half] for s in doc if len(s) for i in range(0, len(s), half)]
            current, length = [], 0
            for seg in segments:
                current.append(seg)
                length += len(seg)
                if length >= self.max_num_tokens:
                    if len(current) >= 2:
                        chunks.append(current)
                    current, length = [], 0
            if len(current) >= 2:
                chunks.append(current)
        return chunks

    def __len__(self) -> int:
        """Examples per epoch."""
        return len(self.chunks)

    def _chunk_of(self, index: int) -> list[np.ndarray]:
        epoch, i = divmod(index, len(self.chunks))
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.chunks))
        return self.chunks[self._perms[epoch][i]]

    def example(self, index: int) -> Example:
        """The example at global index `index` (deterministic in (seed, index))."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, 1, index])
        segments = self._chunk_of(index)
        target = self.max_num_tokens
        if rng.random() < self.short_seq_prob:
            target = int(rng.integers(2, self.max_num_tokens + 1))
        take, total = [], 0
        for seg in segments:
            if total >= target and len(take) >= 2:
                break
            take.append(seg)
            total += len(seg)
        a_end = int(rng.integers(1, len(take)))
        a, b = list(np.concatenate(take[:a_end])), list(np.concatenate(take[a_end:]))
        while len(a) + len(b) > target:         # truncate the longer one, at a random end
            longer = a if len(a) > len(b) else b
            longer.pop(0 if rng.random() < 0.5 else -1)
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b = b, a
        ids = np.array([CLS_ID, *a, SEP_ID, *b, SEP_ID], dtype=np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        types[len(a) + 2:] = 1
        input_ids, labels, spans = self._mask(ids, rng)
        return Example(input_ids, types, labels, int(swapped), spans)

    def _mask(self, ids: np.ndarray, rng: np.random.Generator):
        """n-gram masking of whole words (see the module docstring)."""
        special = ids < NUM_SPECIAL
        # Word ids: a new word at every word-start piece; specials are words of their own.
        word = np.cumsum(self.word_start[ids] | special | np.roll(special, 1)) - 1
        starts = np.flatnonzero(np.diff(word, prepend=-1))
        bounds = np.append(starts, len(ids))
        is_cand = ~special[starts]                 # words that may be masked
        num_to_predict = min(self.max_predictions,
                             max(1, int(round(self.mask_prob * int((~special).sum())))))
        chosen = np.zeros(len(ids), dtype=bool)
        count, spans = 0, []
        for w in rng.permutation(np.flatnonzero(is_cand)):
            if count >= num_to_predict:
                break
            n = int(rng.choice(len(self.ngram_p), p=self.ngram_p)) + 1
            while n > 1 and (w + n > len(starts) or not is_cand[w:w + n].all()):
                n -= 1                              # the span stays inside its segment
            while n > 0 and count + bounds[w + n] - bounds[w] > num_to_predict:
                n -= 1                              # back off to fit the budget (as the original)
            if n == 0 or chosen[bounds[w]:bounds[w + n]].any():
                continue
            chosen[bounds[w]:bounds[w + n]] = True
            count += int(bounds[w + n] - bounds[w])
            spans.append(n)
        positions = np.flatnonzero(chosen)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[positions] = ids[positions]
        out = ids.copy()
        r = rng.random(len(positions))
        random_ids = rng.integers(NUM_SPECIAL, self.vocab_size, len(positions))
        out[positions[r < 0.8]] = MASK_ID
        replace = (r >= 0.8) & (r < 0.9)
        out[positions[replace]] = random_ids[replace]   # r >= 0.9: unchanged
        return out, labels, spans

    def indices(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> range:
        """The global example indices rank `rank` reads at `step`."""
        if global_batch % world_size:
            raise ValueError(f"the global batch size ({global_batch}) must be a multiple of the "
                             f"number of processes ({world_size})")
        local = global_batch // world_size
        first = step * global_batch + rank * local
        return range(first, first + local)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Collate examples, right-padded to the longest: input_ids, attention_mask,
        token_type_ids, labels [B, L] int64 and sentence_order_label [B]."""
        examples = [self.example(i) for i in indices]
        length = max(len(e.input_ids) for e in examples)
        out = {k: torch.full((len(examples), length), fill, dtype=torch.long)
               for k, fill in (("input_ids", PAD_ID), ("attention_mask", 0),
                               ("token_type_ids", 0), ("labels", IGNORE_INDEX))}
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            out["input_ids"][row, :n] = torch.from_numpy(e.input_ids)
            out["attention_mask"][row, :n] = 1
            out["token_type_ids"][row, :n] = torch.from_numpy(e.token_type_ids)
            out["labels"][row, :n] = torch.from_numpy(e.labels)
        out["sentence_order_label"] = torch.tensor([e.sentence_order_label for e in examples])
        return out
