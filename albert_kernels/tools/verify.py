"""`albert-kernels verify`: every op (forward and backward) x backend x dtype, the "edge" group
(every op on inputs at the edges of their range, tools/edge_cases.py), and the model, against the
reference under the error budget (docs/correctness.md). Exit status 1 on any failure."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..backends import available_backends, backend_names, unavailable_reason
from .budget import Budget, check_budget
from .cases import CASES, DTYPES, case_applies, run_case
from .edge_cases import EDGE_CASES, edge_case_applies, known_broken, run_edge_case


@dataclass
class Row:
    check: str        # op name, "model" or "model-vs-transformers"
    case: str
    backend: str
    dtype: str
    budget: Budget
    worst: str = ""   # which output or gradient set the worst error/budget ratio
    known: str = ""   # edge group: why this case is known to fail (tools/edge_cases.KNOWN_BROKEN)

    def as_dict(self) -> dict:
        b = self.budget
        return {"check": self.check, "case": self.case, "backend": self.backend,
                "dtype": self.dtype, "pass": b.ok, "error": b.error, "budget": b.budget,
                "ratio": b.ratio, "worst": self.worst, "known_broken": self.known}


def worst_of(results: dict[str, Budget]) -> tuple[str, Budget]:
    """The failing entry if any, else the one closest to its budget."""
    return max(results.items(), key=lambda kv: (not kv[1].ok, kv[1].ratio))


def verify_ops(backends: Iterable[str], dtypes: Iterable[str], device: str,
               quick: bool) -> Iterable[Row]:
    for backend in backends:
        for case in CASES:
            if (quick and not case.quick) or not case_applies(case, backend, device):
                continue
            for dtype in dtypes:
                try:
                    name, budget = worst_of(run_case(case, backend, DTYPES[dtype], device))
                except Exception as e:  # a crash is a failure, reported, not a traceback
                    name, budget = f"{type(e).__name__}: {e}"[:80], Budget(float("inf"), 0.0, False)
                yield Row(case.op, case.name, backend, dtype, budget, name)


def verify_edge(backends: Iterable[str], dtypes: Iterable[str], device: str) -> Iterable[Row]:
    """The "edge" group: every op on inputs at the edges of their range (tools/edge_cases.py)."""
    for backend in backends:
        for case in EDGE_CASES:
            for dtype in dtypes:
                if not edge_case_applies(case, dtype):
                    continue
                try:
                    name, budget = worst_of(run_edge_case(case, backend, DTYPES[dtype], device))
                except Exception as e:  # a crash is a failure, reported, not a traceback
                    name, budget = f"{type(e).__name__}: {e}"[:80], Budget(float("inf"), 0.0, False)
                yield Row(f"edge {case.op}", case.name, backend, dtype, budget, name,
                          known_broken(backend, case, dtype) or "")


def _tiny_model(dtype, device, backend: str, seed: int = 0):
    from ..model import AlbertConfig, AlbertForPreTraining
    torch.manual_seed(seed)
    cfg = AlbertConfig(vocab_size=97, embedding_size=32, hidden_size=128, num_attention_heads=2,
                       intermediate_size=256, num_hidden_layers=3, num_hidden_groups=1,
                       classifier_dropout_prob=0.0)
    model = AlbertForPreTraining(cfg, backend=backend)
    return model.to(device=device, dtype=dtype).train()


def _model_batch(device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 24), generator=gen)
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 17:] = 0
    mask[1, 5:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, -100)
    labels[mask == 0] = -100
    sop = torch.tensor([0, 1, 1])
    return [t.to(device) for t in (ids, mask, labels, sop)]


def _model_run(model, batch):
    ids, mask, labels, sop = batch
    out = model(ids, mask, labels=labels, sentence_order_label=sop)
    hidden = model.albert(ids, mask).last_hidden_state[mask.bool()]
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return [out.loss.reshape(1), hidden] + list(grads)


def verify_model(backends: Iterable[str], dtypes: Iterable[str], device: str) -> Iterable[Row]:
    """AlbertForPreTraining's loss, hidden states and every parameter gradient vs the reference."""
    batch = _model_batch(device)
    gold = _model_run(_tiny_model(torch.float64, device, "reference"), batch)
    names = ["loss", "hidden"] + [f"grad {n}" for n, _ in
                                   _tiny_model(torch.float32, "cpu", "reference").named_parameters()]
    for dtype in dtypes:
        base = _model_run(_tiny_model(DTYPES[dtype], device, "reference"), batch)
        for backend in backends:
            try:
                cand = _model_run(_tiny_model(DTYPES[dtype], device, backend), batch)
                scale = max(float(g.abs().max()) for g in gold[2:] if g.numel())
                results = {n: check_budget(c, b, g, DTYPES[dtype], scale if n.startswith("grad") else None)
                           for n, c, b, g in zip(names, cand, base, gold)}
                name, budget = worst_of(results)
            except Exception as e:
                name, budget = f"{type(e).__name__}: {e}"[:80], Budget(float("inf"), 0.0, False)
            yield Row("model", "pretraining loss, hidden, all grads", backend, dtype, budget, name)


def verify_against_transformers(backends: Iterable[str], device: str,
                                tolerance: float = 1e-4) -> Iterable[Row]:
    """fp32 last_hidden_state on real tokens vs transformers' AlbertModel: max |diff| <= 1e-4."""
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: skipping the comparison with it", file=sys.stderr)
        return
    from ..model import AlbertModel
    torch.manual_seed(0)
    hf_cfg = transformers.AlbertConfig(vocab_size=97, embedding_size=32, hidden_size=128,
                                       num_attention_heads=2, intermediate_size=256,
                                       num_hidden_layers=3, attn_implementation="sdpa")
    hf = transformers.AlbertModel(hf_cfg).eval().to(device)
    ids, mask, _, _ = _model_batch(device)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).last_hidden_state[mask.bool()]
        for backend in backends:
            try:
                ours = AlbertModel.from_hf(hf, backend=backend).eval().to(device)
                got = ours(ids, mask).last_hidden_state[mask.bool()]
                err = float((got - expected).abs().max())
                budget, note = Budget(err, tolerance, err <= tolerance), "hidden"
            except Exception as e:
                budget, note = Budget(float("inf"), tolerance, False), f"{type(e).__name__}: {e}"[:80]
            yield Row("model-vs-transformers", "AlbertModel fp32, padded batch", backend,
                      "float32", budget, note)


def format_row(row: Row) -> str:
    b = row.budget
    return (f"{row.check:22s} {row.case[:40]:40s} {row.backend:9s} {row.dtype:8s} "
            f"{'pass' if b.ok else ('KNOWN' if row.known else 'FAIL'):4s} {b.error:9.2e} "
            f"{b.budget:9.2e} {b.ratio:6.2f}  {row.worst}")


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or list(DTYPES)
    backends = [b for b in available_backends(device) if b != "reference"]
    if args.backend:
        known = sorted(backend_names())
        for name in args.backend:
            if name not in known:
                print(f"unknown backend {name!r}, known: {', '.join(known)}", file=sys.stderr)
                return 1
            if name == "reference":
                print("--backend reference: the reference is what every backend is verified "
                      f"against (verifiable on {device}: {', '.join(backends) or 'none'})",
                      file=sys.stderr)
                return 1
            if name not in backends:
                reason = unavailable_reason(name, torch.device(device).type) or "unknown"
                print(f"backend {name!r} is not available on {device}: {reason.splitlines()[0]} "
                      f"(available: {', '.join(backends) or 'none'}; see `albert-kernels info`)",
                      file=sys.stderr)
                return 1
        backends = args.backend
    if not backends:
        print(f"no backend besides the reference is available on {device}; see "
              "`albert-kernels info`", file=sys.stderr)
        return 1
    print(f"verify on {device}: backends {', '.join(backends)}; dtypes {', '.join(dtypes)}")
    print(f"{'check':22s} {'case':40s} {'backend':9s} {'dtype':8s} {'ok':4s} {'error':>9s} "
          f"{'budget':>9s} {'e/b':>6s}  worst")
    rows = []
    checks = [verify_ops(backends, dtypes, device, args.quick), verify_edge(backends, dtypes, device)]
    if not args.no_model:
        checks += [verify_model(backends, dtypes, device), verify_against_transformers(backends, device)]
    # --jsonl: one line per row, appended and flushed as it is produced, so that a run killed
    # part-way (the GPU check's time budget) keeps every row it finished
    jsonl = open(args.jsonl, "a", encoding="utf-8") if getattr(args, "jsonl", None) else None
    try:
        for check in checks:
            for row in check:
                rows.append(row)
                print(format_row(row), flush=True)
                if jsonl:
                    jsonl.write(json.dumps({"device": device, **row.as_dict()}) + "\n")
                    jsonl.flush()
    finally:
        if jsonl:
            jsonl.close()
    known = [r for r in rows if r.known and not r.budget.ok]
    failed = [r for r in rows if not r.budget.ok and not r.known]
    for r in known:
        print(f"known broken: {r.check} {r.case!r} {r.backend} {r.dtype}: {r.known}")
    for r in rows:
        if r.known and r.budget.ok:
            print(f"now passes (drop it from KNOWN_BROKEN in tools/edge_cases.py): {r.check} "
                  f"{r.case!r} {r.backend} {r.dtype}")
    print(f"{len(rows) - len(failed) - len(known)} passed, {len(failed)} failed"
          + (f", {len(known)} known broken (not counted as failures)" if known else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": device, "rows": [r.as_dict() for r in rows]}, f, indent=1)
    return 1 if failed else 0
