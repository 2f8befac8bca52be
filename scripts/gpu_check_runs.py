"""The GPU check's model comparison and short benchmark (scripts/gpu_check.py model | bench).

model: our model on CUDA against transformers, fp16 and bf16, on a padded batch, for each GPU
backend (the forward also with CUDA graphs, enable_cuda_graphs), under the error budget of
albert_kernels/tools/budget.py:
    gold      transformers in float64 (eager attention)
    base      transformers in the dtype (sdpa attention)
    candidate ours in the dtype: AlbertModel.from_hf (inference, last_hidden_state on real
              tokens) and patch_hf on AlbertForPreTraining (training: loss and every parameter
              gradient, matched by name)
    pass <=> |candidate - gold| <= 2 |base - gold| + 4 eps(dtype) max|gold|   (per tensor)

bench: one JSON line per workload as it is timed (tools/timing.measure: CUDA events, median of
repeats after warm-up; no torch.compile): attention against F.scaled_dot_product_attention with
each of its backends forced (flash, efficient, cudnn; a backend that refuses the inputs gives a
row with its error), add+LayerNorm against a copy of the same bytes, linear_gelu against the GEMM
alone, and the model forward and training step against transformers sdpa. Groups are skipped
when the deadline is near.

latency (docs/performance.md "GPU latency"): one short request, ALBERT-base, batch 1,
L = 8, 32, 128, fp16 and fp32, random weights, no padding, under torch.inference_mode: ours
eager, ours with CUDA graphs (enable_cuda_graphs), transformers sdpa (the baseline) and, in a
second pass when the deadline leaves COMPILE_RESERVE_S, torch.compile(transformers,
mode="reduce-overhead", dynamic=True: one compilation per dtype) beside sdpa again. Every
contender's last_hidden_state is held to the error budget (tools/budget.py: transformers in
float64 is gold, transformers sdpa in the dtype is base) before it is timed; a row says "check".
Times are wall clock from a synchronised start to a synchronised end (what a caller waits),
contenders interleaved round by round; the first call (graph capture, compilation) is reported
apart.
"""
from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn.functional as F

from albert_kernels.tools.budget import Budget, check_budget

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LENGTHS = [64, 50, 17, 1]   # a padded batch: full, partial, short, a single token


def _append(path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ model
def _hf_models(transformers, dtype, device):
    """(gold fp64 eager, base in dtype sdpa) AlbertForPreTraining with the same weights."""
    cfg = dict(vocab_size=300, embedding_size=64, hidden_size=256, num_attention_heads=4,
               intermediate_size=1024, num_hidden_layers=4, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    torch.manual_seed(0)
    gold = transformers.AlbertForPreTraining(transformers.AlbertConfig(
        **cfg, attn_implementation="eager")).to(device).double()
    base = transformers.AlbertForPreTraining(transformers.AlbertConfig(
        **cfg, attn_implementation="sdpa")).to(device)
    base.load_state_dict(gold.state_dict())
    return gold, base.to(dtype)


def _batch(device):
    gen = torch.Generator().manual_seed(0)
    seq = max(LENGTHS)
    mask = (torch.arange(seq)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 300, (len(LENGTHS), seq), generator=gen) * mask
    labels = torch.where((torch.rand(ids.shape, generator=gen) < 0.3) & (mask == 1), ids, -100)
    sop = torch.tensor([0, 1, 1, 0])
    return [t.to(device) for t in (ids, mask, labels, sop)]


def _train_outputs(model, batch) -> dict:
    ids, mask, labels, sop = batch
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, sentence_order_label=sop)
    out.loss.backward()
    grads = {f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.reshape(1), **grads}


def _worst(results: dict) -> tuple:
    return max(results.items(), key=lambda kv: (not kv[1].ok, kv[1].ratio))


def _compare(cand: dict, base: dict, gold: dict, dtype, grad_scale: float) -> tuple:
    results = {k: check_budget(cand[k], base[k], gold[k], dtype,
                               grad_scale if k.startswith("grad") else None) for k in gold}
    missing = set(gold) - set(cand)
    if missing:
        raise ValueError(f"no gradient for {sorted(missing)[:3]}")
    return _worst(results)


def model_check(backend: str, dtype_name: str, transformers, device: str = "cuda") -> list[dict]:
    """Rows (one per check) of our model on `backend` vs transformers in `dtype_name`."""
    import albert_kernels as ak
    dtype = DTYPES[dtype_name]
    gold_m, base_m = _hf_models(transformers, dtype, device)
    batch = _batch(device)
    real = batch[1].bool()
    rows = []
    with torch.no_grad():  # inference: last_hidden_state on real tokens
        gold = gold_m.albert.eval()(batch[0], attention_mask=batch[1]).last_hidden_state[real]
        base = base_m.albert.eval()(batch[0], attention_mask=batch[1]).last_hidden_state[real]
        ours = ak.AlbertModel.from_hf(base_m.albert, backend=backend).to(device, dtype).eval()
        cand = ours(batch[0], batch[1]).last_hidden_state[real]
        rows.append(("forward last_hidden_state (real tokens)", "hidden",
                     check_budget(cand, base, gold, dtype)))
        # the same forward as CUDA graphs (backends/cuda_graphs.py): captured, then replayed; on
        # the CPU (the test of this comparison) the same bucketed inputs run eagerly
        if torch.device(device).type == "cuda":
            ours.enable_cuda_graphs(max_tokens=512)
        else:
            from albert_kernels.backends.cuda_graphs import CudaGraphRunner
            ours.cuda_graphs = CudaGraphRunner(max_tokens=512, capture=False)
        for _ in range(2):
            cand = ours(batch[0], batch[1]).last_hidden_state[real]
        rows.append(("forward with CUDA graphs (real tokens)", "hidden",
                     check_budget(cand, base, gold, dtype)))
    gold_out = _train_outputs(gold_m.train(), batch)
    base_out = _train_outputs(base_m.train(), batch)
    patched = ak.patch_hf(copy.deepcopy(base_m), backend=backend).train()
    cand_out = _train_outputs(patched, batch)
    scale = max(float(g.abs().max()) for k, g in gold_out.items() if k.startswith("grad"))
    name, budget = _compare(cand_out, base_out, gold_out, dtype, scale)
    rows.append(("training loss + every grad (patch_hf)", name, budget))
    return [{"check": "model-vs-transformers", "case": case, "backend": backend,
             "dtype": dtype_name, "pass": b.ok, "error": b.error, "budget": b.budget,
             "ratio": b.ratio, "worst": worst, "batch_lengths": LENGTHS}
            for case, worst, b in rows]


def run_model(args) -> int:
    import transformers
    failed = 0
    for backend in args.backend:
        for dtype_name in DTYPES:
            try:
                rows = model_check(backend, dtype_name, transformers)
            except Exception as e:  # reported as a failed row, then the next one
                rows = [{"check": "model-vs-transformers", "case": "model", "backend": backend,
                         "dtype": dtype_name, "pass": False, "error": None, "budget": None,
                         "worst": f"{type(e).__name__}: {e}"[:300]}]
            for row in rows:
                _append(args.jsonl, row)
                failed += not row["pass"]
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ bench
def _sdpa_workloads(q, k, v, mask, group, flops):
    """SDPA with each backend forced (no fallback to another)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from albert_kernels.tools.workloads import Workload
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = []
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient",
                     SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out.append(Workload(group, f"SDPA {name}" + (" + mask" if mask is not None else ""), fn,
                            flops, "GFLOP/s"))
    return out


def _groups(dtype, device="cuda", batch=32, seq=128, model=True):
    """Builders of the benchmark groups, in priority order (each returns a list of Workloads)."""
    from albert_kernels.tools import workloads as wl
    from albert_kernels.tools.model_workloads import model_workloads

    def attention(padding):
        def build():
            ws = wl.attention_workloads(batch, 12, seq, 64, padding, dtype, device)
            lengths = wl.realistic_lengths(batch, seq, padding)
            mask = None if padding == "none" else wl.padding_mask(lengths, seq, device)
            q, k, v = (torch.randn(batch, 12, seq, 64, device=device, dtype=dtype) for _ in range(3))
            flops = 4.0 * float((lengths.double() ** 2).sum()) * 12 * 64
            return ws + _sdpa_workloads(q, k, v, mask, ws[0].group, flops)
        return build

    ops = [attention("realistic"), attention("none"),
           lambda: wl.add_layer_norm_workloads(batch * seq, 768, dtype, device),
           lambda: wl.linear_gelu_workloads(batch * seq, 768, 3072, dtype, device)]
    models = [lambda mode=mode: model_workloads("base", batch, seq, "realistic", mode, dtype,
                                                device, compile_baseline=False)
              for mode in ("forward", "train")]
    return ops + (models if model else [])


def _bench_row(w, min_time_s: float, device: str = "cuda") -> dict:
    from albert_kernels.tools.timing import measure
    row = {"group": w.group, "name": w.name, "unit": w.unit, "work_per_call": w.work,
           "baseline": w.baseline, "ceiling": w.ceiling}
    cuda = torch.device(device).type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, first = measure(w.fn, device, min_time_s=min_time_s)
        times.sort()
        med = times[len(times) // 2]
        scale = 1e9 if w.unit in ("GB/s", "GFLOP/s") else 1.0
        row.update(median_ms=1e3 * med, min_ms=1e3 * times[0], max_ms=1e3 * times[-1],
                   repeats=len(times), first_call_s=first, throughput=w.work / med / scale,
                   peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    except Exception as e:  # e.g. an SDPA backend that refuses these inputs
        row["error"] = f"{type(e).__name__}: {e}"[:200]
    return row


def run_bench(jsonl, deadline: float, groups, device: str = "cuda", min_time_s: float = 0.2) -> int:
    """Time each group's workloads (no torch.compile), a JSON line per workload as timed."""
    for i, build in enumerate(groups):
        if time.time() > deadline - 15:
            _append(jsonl, {"skipped_groups_from": i, "reason": "deadline"})
            print(f"bench: deadline near, {len(groups) - i} groups skipped", flush=True)
            break
        for w in build():
            if w.name.startswith("torch.compile"):
                continue  # compiling is not for the first GPU call
            row = _bench_row(w, min_time_s, device)
            _append(jsonl, row)
            print(json.dumps(row), flush=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return 0


# ---------------------------------------------------------------------------------- latency
LATENCY_LENGTHS = (8, 32, 128)
LATENCY_DTYPES = ("float16", "float32")
LATENCY_BASELINE = "transformers sdpa"
COMPILE_RESERVE_S = 75   # torch.compile starts only with this much time left before the deadline
ALL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _interleaved(calls: dict, device, min_time_s: float, min_rounds: int = 5,
                 max_rounds: int = 200) -> dict:
    """Wall-clock seconds of each call, one call of each per round, synchronised around each."""
    times = {name: [] for name in calls}
    stop = time.perf_counter() + min_time_s * max(len(calls), 1)
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < stop and rounds < max_rounds):
        for name, fn in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def _latency_models(cfg, dtype, device):
    """(gold: transformers fp64, transformers sdpa in dtype, ours eager, ours with CUDA graphs or
    the reason it cannot run), all with the same random weights."""
    import transformers
    import albert_kernels as ak
    torch.manual_seed(0)
    hf = transformers.AlbertModel(cfg.to_hf(attn_implementation="sdpa")).eval().to(device)
    gold = copy.deepcopy(hf).double()
    hf = hf.to(dtype)
    ours = ak.AlbertModel.from_hf(hf).to(device, dtype).eval()
    graphs = ak.AlbertModel.from_hf(hf).to(device, dtype).eval()
    try:
        graphs.enable_cuda_graphs(max_tokens=max(LATENCY_LENGTHS))
    except RuntimeError as e:  # e.g. on the CPU (the test of this code path)
        graphs = f"{type(e).__name__}: {e}"[:200]
    return gold, hf, ours, graphs


def run_latency(jsonl, deadline: float, device: str = "cuda", dtypes=LATENCY_DTYPES,
                lengths=LATENCY_LENGTHS, cfg=None, compile_pass: bool = False,
                min_time_s: float = 0.2) -> list:
    """One JSON line per contender per (dtype, L), appended as each (dtype, L) is timed; the
    compile pass (``compile_pass``) times torch.compile(transformers) beside transformers sdpa.
    Stops (a line says so) when the deadline is near. Returns [] (run_bench's group protocol)."""
    import albert_kernels as ak
    cfg = cfg or ak.AlbertConfig.preset("base")
    for dtype_name in dtypes:
        dtype = ALL_DTYPES[dtype_name]
        if time.time() > deadline - (COMPILE_RESERVE_S if compile_pass else 15):
            _append(jsonl, {"latency_skipped_from": dtype_name, "compile_pass": compile_pass,
                            "reason": "deadline"})
            return []
        gold_m, hf, ours, graphs = _latency_models(cfg, dtype, device)
        contenders = {LATENCY_BASELINE: lambda ids: hf(input_ids=ids).last_hidden_state}
        if compile_pass:
            compiled = torch.compile(hf, mode="reduce-overhead", dynamic=True)

            def run_compiled(ids):  # outputs of CUDA-graph trees are overwritten by the next run
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(input_ids=ids).last_hidden_state.clone()
            contenders["torch.compile(transformers, reduce-overhead)"] = run_compiled
        else:
            contenders[f"ours eager ({ours.kernels.name})"] = \
                lambda ids: ours(ids).last_hidden_state
            contenders[f"ours + CUDA graphs ({ours.kernels.name})"] = graphs if isinstance(
                graphs, str) else (lambda ids: graphs(ids).last_hidden_state)
        gen = torch.Generator().manual_seed(0)
        for seqlen in lengths:
            if time.time() > deadline - 5:
                _append(jsonl, {"latency_skipped_from": f"{dtype_name} L={seqlen}",
                                "compile_pass": compile_pass, "reason": "deadline"})
                return []
            group = f"latency {dtype_name} B=1 L={seqlen}" + (" (compile)" if compile_pass else "")
            ids = torch.randint(5, cfg.vocab_size, (1, seqlen), generator=gen).to(device)
            calls, rows = {}, []
            with torch.inference_mode():
                gold = gold_m(input_ids=ids).last_hidden_state
                base = hf(input_ids=ids).last_hidden_state.clone()
                for name, fn in contenders.items():
                    row = {"group": group, "name": name, "unit": "req/s", "batch": 1,
                           "seqlen": seqlen, "dtype": dtype_name,
                           "baseline": name == LATENCY_BASELINE}
                    rows.append(row)
                    if isinstance(fn, str):
                        row["error"] = fn
                        continue
                    try:
                        _sync(device)
                        t0 = time.perf_counter()
                        out = fn(ids)
                        _sync(device)
                        row["first_call_s"] = time.perf_counter() - t0
                        b = check_budget(out, base, gold, dtype)
                        row.update(check="ok" if b.ok else "FAILED", max_error=b.error,
                                   error_budget=b.budget)
                        calls[name] = lambda fn=fn: fn(ids)
                    except Exception as e:  # reported as a row, then the next contender
                        row["error"] = f"{type(e).__name__}: {e}"[:200]
                times = _interleaved(calls, device, min_time_s) if calls else {}
            for row in rows:
                ts = sorted(times.get(row["name"], []))
                if ts:
                    med = ts[len(ts) // 2]
                    row.update(median_ms=1e3 * med, min_ms=1e3 * ts[0], max_ms=1e3 * ts[-1],
                               repeats=len(ts), throughput=1.0 / med)
                _append(jsonl, row)
                print(json.dumps(row), flush=True)
        del gold_m, hf, ours, graphs, contenders
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return []


def main(args) -> int:
    if not torch.cuda.is_available():
        print("no GPU", flush=True)
        return 3
    if args.cmd == "model":
        return run_model(args)
    ops_and_model = _groups(torch.bfloat16)       # ops (4), model forward, training step

    def latency(compile_pass: bool):
        def group():
            try:
                return run_latency(args.jsonl, args.deadline, compile_pass=compile_pass)
            except Exception as e:  # a row says so; the groups after it still run
                _append(args.jsonl, {"group": "latency", "name": "latency pass", "error":
                                     f"{type(e).__name__}: {e}"[:300], "compile_pass": compile_pass})
                return []
        return group
    groups = ops_and_model[:5] + [latency(False)] + ops_and_model[5:] + [latency(True)]
    return run_bench(args.jsonl, args.deadline, groups)


__all__ = ["main", "model_check", "Budget"]
