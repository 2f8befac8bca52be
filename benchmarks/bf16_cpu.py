"""bf16 inference on the CPU: ours against the bf16 GEMM floor, transformers sdpa in bf16 and
OpenVINO at its default precision (bf16 on AMX), interleaved in one process.

ALBERT-base (random weights, seed 0), inference forward, per shape (default: batch 1 at
L = 8 / 32 / 128 without padding, and batch 8 at L = 128 with realistic padding, lengths uniform in
[L/4, L] as `albert-kernels bench`). Contenders, each timed round-robin with the others
(``tools.timing.interleaved``):

- ours, bf16 parameters (``model.to(torch.bfloat16)``), attention on AMX tiles where the CPU has
  them, and the same model with ``ALBERT_KERNELS_CPU_BF16_ATTENTION=fp32`` (the fp32-arithmetic
  attention kernel): the AMX kernel's gain inside the model;
- ours, fp32 parameters under ``torch.autocast("cpu", torch.bfloat16)``, with the per-forward
  cast cache (``backends/autocast.py``) and without it (``cast_cache`` replaced by a no-op): the
  cache's gain;
- transformers sdpa in bf16 (same weights);
- OpenVINO: the transformers model (fp32) exported to ONNX with input_ids and attention_mask,
  ``openvino.convert_model`` + ``compile_model(..., "CPU")`` at its default precision hint;
- the bf16 GEMM floor: the encoder's matrix products alone on the real tokens
  (``tools.model_workloads.gemm_floor``).

Rounds call every contender once, in an order shuffled per round (seeded): each contender holds
its own weights, so the one called right after another finds the caches holding the other's
(at batch 1 the first model after the GEMM floor ran ~5 ms slower than the same model called
second); a fixed order would hand that cost to the same contender every round.

Every contender's output is compared with transformers in fp32 on the real tokens (max abs
error printed beside its time). Run (1 thread, as the docs' bf16 figures):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bf16_cpu.py --threads 1 --min-time 1

``--shapes 1x8 1x32 1x128 8x128r`` (B x L, r: realistic padding), ``--no-openvino``,
``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import warnings

import torch

import albert_kernels as ak
from albert_kernels.backends import autocast as autocast_policy
from albert_kernels.backends.cpp import isa
from albert_kernels.model import AlbertConfig
from albert_kernels.tools.model_workloads import gemm_floor
from albert_kernels.tools.timing import quartiles, timed_call
from albert_kernels.tools.workloads import padding_mask, realistic_lengths


def _parse_shape(text: str):
    realistic = text.endswith("r")
    b, l = text.rstrip("r").split("x")
    return int(b), int(l), "realistic" if realistic else "none"


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _no_cast_cache():
    saved = autocast_policy.cast_cache
    autocast_policy.cast_cache = contextlib.nullcontext
    try:
        yield
    finally:
        autocast_policy.cast_cache = saved


class _WithMask(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        return self.hf(input_ids, attention_mask=attention_mask).last_hidden_state


def _openvino(hf_fp32, cfg, tmp):
    """OpenVINO's compiled model of the fp32 transformers model (default precision), or the
    reason it is missing."""
    try:
        import openvino as ov
    except ImportError as e:
        return None, f"openvino not installed ({e})"
    path = os.path.join(tmp, "albert.onnx")
    ids = torch.randint(5, cfg.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    args = dict(input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_WithMask(hf_fp32), (ids, mask), path, dynamo=False,
                              opset_version=17, dynamic_axes={
                                  "input_ids": {0: "batch", 1: "seq"},
                                  "attention_mask": {0: "batch", 1: "seq"},
                                  "last_hidden_state": {0: "batch", 1: "seq"}}, **args)
    except Exception as e:  # noqa: BLE001 (the legacy exporter gone: the dynamo one)
        print(f"torchscript ONNX export failed ({type(e).__name__}); dynamo exporter")
        batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
        torch.onnx.export(_WithMask(hf_fp32), (ids, mask), path, dynamo=True, **args,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                          "attention_mask": {0: batch, 1: seq}})
    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(path), "CPU")
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    out = compiled.output(0)
    return (lambda ids, mask: torch.from_numpy(
        compiled({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[out].copy()),
        str(precision))


def shuffled_rounds(fns: dict, min_time_s: float, min_rounds: int = 5, max_rounds: int = 200,
                    seed: int = 0) -> dict:
    """Call times (s) of each callable, one call each per round in a shuffled order, after one
    warm-up call each, until every one has `min_rounds` calls and `min_time_s` in total."""
    import random
    rng = random.Random(seed)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(max_rounds):
        if r >= min_rounds and all(sum(t) >= min_time_s for t in times.values()):
            break
        rng.shuffle(names)
        for name in names:
            times[name].append(timed_call(fns[name]))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1x8", "1x32", "1x128", "8x128r"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--no-openvino", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    cfg = AlbertConfig.preset("base")
    torch.manual_seed(0)
    hf32 = transformers.AlbertModel(cfg.to_hf(attn_implementation="sdpa")).eval()
    hf16 = transformers.AlbertModel(cfg.to_hf(attn_implementation="sdpa")).eval()
    hf16.load_state_dict(hf32.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    ours16 = ak.AlbertModel.from_hf(hf32, backend="cpp").eval().to(torch.bfloat16)
    ours32 = ak.AlbertModel.from_hf(hf32, backend="cpp").eval()
    print(f"CPU: {platform.processor() or platform.machine()}, isa {isa.cpu_isa().names}, "
          f"bf16 attention kernel: {isa.bf16_attention_kernel()}, threads {args.threads}, "
          f"torch {torch.__version__}")
    tmp = tempfile.mkdtemp(prefix="ak_bf16_")
    ov_run, ov_note = (None, "--no-openvino") if args.no_openvino else _openvino(hf32, cfg, tmp)
    print(f"openvino: {ov_note}")
    rows = []
    for shape in args.shapes:
        B, L, padding = _parse_shape(shape)
        lengths = realistic_lengths(B, L, padding)
        mask = padding_mask(lengths, L, "cpu").long()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(5, cfg.vocab_size, (B, L), generator=gen) * mask
        real = mask.bool()
        tokens = int(lengths.sum())
        with torch.inference_mode():
            gold = hf32(ids, attention_mask=mask).last_hidden_state[real].double()

        def ours_bf16():
            with torch.inference_mode():
                return ours16(ids, mask).last_hidden_state

        def ours_bf16_fp32_attention():
            with _env(isa.BF16_ATTENTION_ENV, "fp32"):
                return ours_bf16()

        def ours_autocast():
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
                return ours32(ids, mask).last_hidden_state

        def ours_autocast_no_cache():
            with _no_cast_cache():
                return ours_autocast()

        def sdpa_bf16():
            with torch.inference_mode():
                return hf16(ids, attention_mask=mask).last_hidden_state

        floor = gemm_floor(cfg, tokens, "forward", torch.bfloat16, "cpu", shape).fn
        contenders = {"ours bf16 (AMX attention)": ours_bf16,
                      "ours bf16 (fp32 attention)": ours_bf16_fp32_attention,
                      "ours autocast (cast cache)": ours_autocast,
                      "ours autocast (no cache)": ours_autocast_no_cache,
                      "transformers sdpa bf16": sdpa_bf16}
        if ov_run is not None:
            contenders["openvino (default precision)"] = lambda: ov_run(ids, mask)
        errors = {}
        for name, fn in contenders.items():
            out = fn()
            errors[name] = (out[real].double() - gold).abs().max().item()
        contenders["bf16 GEMM floor"] = floor
        names = list(contenders)
        by_name = shuffled_rounds(contenders, args.min_time)
        times = [by_name[n] for n in names]
        med = {n: quartiles(t)[1] for n, t in zip(names, times)}
        spreads = {n: (quartiles(t)[2] - quartiles(t)[0]) / quartiles(t)[1]
                   for n, t in zip(names, times)}
        print(f"\nB {B} L {L} padding {padding} ({tokens} real tokens)")
        print(f"{'contender':32s} {'median ms':>10s} {'spread':>7s} {'x floor':>8s} "
              f"{'sdpa / it':>9s} {'max err vs fp32':>16s}")
        for n in names:
            print(f"{n:32s} {med[n] * 1e3:10.2f} {spreads[n]:7.2f} "
                  f"{med[n] / med['bf16 GEMM floor']:8.2f} "
                  f"{med['transformers sdpa bf16'] / med[n]:9.2f} "
                  f"{errors.get(n, float('nan')):16.3e}")
            rows.append(dict(batch=B, seqlen=L, padding=padding, tokens=tokens, contender=n,
                             median_s=med[n], spread=spreads[n], n_calls=len(times[names.index(n)]),
                             max_abs_error_vs_fp32=errors.get(n)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=platform.processor(), isa=isa.cpu_isa().names,
                           threads=args.threads, openvino=ov_note, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
