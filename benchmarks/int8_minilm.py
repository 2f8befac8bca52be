"""int8 inference on the real all-MiniLM-L6-v2: quality and speed of ``ak.quantize_dynamic``
against fp32 (patched and transformers' sdpa), ONNX Runtime's dynamic int8 and OpenVINO with int8
weights (nncf), 1 thread by default.

Quality: every contender embeds the 306 sentences of tests/data/sentences.txt +
tools/st_bench.SENTENCES (mean pooling over real tokens, L2-normalised, as the model's
sentence-transformers modules do) at batch 32; min and mean cosine to unpatched fp32 transformers.
Speed: the model and the pooling on pre-tokenised inputs (tokenisation is the same for all and
left out), batch 1 (the sentences in turn, the same one for every contender in a round) and the
ragged batch 32 of st_bench.SENTENCES; interleaved rounds, one call per contender per round,
median and the spread (interquartile range / median).

    PYTHONPATH=$PWD python benchmarks/int8_minilm.py --threads 1 --rounds 30
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _sentences():
    from albert_kernels.tools.st_bench import SENTENCES
    own = [s.strip() for s in (ROOT / "tests" / "data" / "sentences.txt").read_text().splitlines()
           if s.strip()]
    return own + list(SENTENCES), list(SENTENCES)


def _pool(hidden, mask):
    m = mask[..., None].to(hidden.dtype)
    e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


def _torch_contender(model):
    def run(enc):
        with torch.inference_mode():
            out = model(**enc).last_hidden_state
        return _pool(out, enc["attention_mask"])
    return run


class _Wrapped(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state


def _ort_contenders(hf, tmp: Path, threads: int):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    fp32 = tmp / "minilm.onnx"
    ids = torch.ones(2, 8, dtype=torch.long)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(_Wrapped(copy.deepcopy(hf)), (ids, ids, torch.zeros_like(ids)), str(fp32),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamo=False, opset_version=17,
                          dynamic_axes={n: {0: "b", 1: "l"} for n in
                                        ("input_ids", "attention_mask", "token_type_ids",
                                         "last_hidden_state")})
    int8 = tmp / "minilm_int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    int8_pc = tmp / "minilm_int8_per_channel.onnx"
    quantize_dynamic(str(fp32), str(int8_pc), weight_type=QuantType.QInt8, per_channel=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    out = {}
    for name, path in (("onnxruntime int8 (dynamic)", int8),
                       ("onnxruntime int8 (dynamic, per-channel)", int8_pc)):
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(enc, sess=sess):
            feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
            h = torch.from_numpy(sess.run(None, feeds)[0])
            return _pool(h, enc["attention_mask"])
        out[name] = run
    return out, fp32


def _openvino_contender(onnx_fp32: Path, threads: int):
    import nncf
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(onnx_fp32))
    with contextlib.redirect_stdout(io.StringIO()):
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    out = {}
    for label, hint in (("openvino int8 weights (default precision)", None),
                        ("openvino int8 weights (f32)", "f32")):
        cfg = {"INFERENCE_NUM_THREADS": threads}
        if hint:
            cfg["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(model, "CPU", cfg)

        def run(enc, compiled=compiled):
            feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
            h = torch.from_numpy(np.asarray(compiled(feeds)[0]))
            return _pool(h, enc["attention_mask"])
        out[label] = run
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime and OpenVINO")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    import albert_kernels as ak
    from minilm import extract_minilm
    from transformers import AutoModel, AutoTokenizer

    tmp = Path(tempfile.mkdtemp())
    path = extract_minilm(tmp / "model")
    tok = AutoTokenizer.from_pretrained(str(path))
    base = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    patched = copy.deepcopy(base)
    ak.patch_hf(patched)
    contenders = {
        "transformers sdpa (fp32)": _torch_contender(base),
        "ours (fp32)": _torch_contender(patched),
        "ours int8 (default: all but FFN-out)": _torch_contender(ak.quantize_dynamic(patched)),
        "ours int8 (all six products)": _torch_contender(
            ak.quantize_dynamic(patched, products="all")),
        "ours int8 (q, k, attn-out)": _torch_contender(
            ak.quantize_dynamic(patched, products=("query", "key", "dense"))),
        "ours int8 (all six, no outlier channels)": _torch_contender(
            ak.quantize_dynamic(patched, products="all", outlier_channels=0)),
    }
    if not args.no_onnx:
        try:
            ort_c, onnx_fp32 = _ort_contenders(base, tmp, args.threads)
            contenders.update(ort_c)
            try:
                contenders.update(_openvino_contender(onnx_fp32, args.threads))
            except Exception as e:  # noqa: BLE001 - reported, the rest still runs
                print(f"openvino skipped: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            print(f"onnxruntime skipped: {type(e).__name__}: {e}")

    quality, batch32 = _sentences()
    enc = lambda s: tok(s, padding=True, truncation=True, max_length=256, return_tensors="pt")
    chunks = [enc(quality[i:i + 32]) for i in range(0, len(quality), 32)]
    ref = torch.cat([contenders["transformers sdpa (fp32)"](c) for c in chunks])
    print(f"CPU: {_cpu_name()}; threads {args.threads}; shared machine: read ratios, not times")
    print(f"{'contender':44s} {'min cos':>9s} {'mean cos':>9s} {'B1 ms':>8s} {'(iqr)':>7s} "
          f"{'B32 ms':>8s} {'(iqr)':>7s} {'B1 x':>6s} {'B32 x':>6s}")
    cos = {}
    for name, fn in contenders.items():
        e = torch.cat([fn(c) for c in chunks])
        c = (e * ref).sum(-1)
        cos[name] = (c.min().item(), c.mean().item())
    b1 = [enc([s]) for s in batch32]
    b32 = enc(batch32)
    times = {n: ([], []) for n in contenders}
    for r in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn(b1[r % len(b1)])
            t1 = time.perf_counter()
            fn(b32)
            t2 = time.perf_counter()
            if r > 0:  # round 0 warms up
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    base_t = [np.median(times["transformers sdpa (fp32)"][i]) for i in (0, 1)]
    for name in contenders:
        row = [np.array(times[name][i]) * 1e3 for i in (0, 1)]
        med = [np.median(x) for x in row]
        iqr = [(np.percentile(x, 75) - np.percentile(x, 25)) / np.median(x) for x in row]
        print(f"{name:44s} {cos[name][0]:9.5f} {cos[name][1]:9.6f} {med[0]:8.2f} {iqr[0]:6.0%} "
              f"{med[1]:8.1f} {iqr[1]:6.0%} {base_t[0] * 1e3 / med[0]:6.2f} "
              f"{base_t[1] * 1e3 / med[1]:6.2f}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
