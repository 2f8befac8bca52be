"""Run transformers' own model tests (ALBERT or a BERT-family model) against unpatched and
``ak.patch_hf``-patched models.

transformers' test files are the yardstick of ``patch_hf``'s "no other change": the ALBERT model
tests (``tests/models/albert/test_modeling_albert.py`` with ``tests/test_modeling_common.py``)
check a model's numbers (eager vs sdpa across dtypes and padding sides, batching equivalence,
hidden states, attentions, training). This project copies none of that code: point this script at
a checkout of transformers' ``tests`` for the installed version (the sdist of transformers 5.24.0
has ``tests/test_*common.py``; ``tests/models/albert/`` comes from the repository)::

    python scripts/run_hf_albert_tests.py /path/to/transformers-root [--model bert]
        [--backend cpp] [-k EXPR]

``--model`` (albert, bert, roberta, xlm_roberta, electra, distilbert; default albert) picks
``tests/models/<model>/test_modeling_<model>.py``. Each mode runs pytest in a child process. In
"patched" mode a pytest plugin written by this script wraps the family's
``<Family>PreTrainedModel.post_init`` so that every transformers model of it is patched with ``ak.patch_hf(model, backend=...)`` right after it is built (``from_pretrained``
included: the weights then load into the patched modules, which own the same parameters). The
report gives pass/fail/skip counts per mode and the tests that pass unpatched but fail patched,
each with its first error line. ``--json FILE`` writes the per-test outcomes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {"albert": "AlbertPreTrainedModel", "bert": "BertPreTrainedModel",
          "roberta": "RobertaPreTrainedModel", "xlm_roberta": "XLMRobertaPreTrainedModel",
          "electra": "ElectraPreTrainedModel", "distilbert": "DistilBertPreTrainedModel"}


def test_file(model: str) -> str:
    return f"tests/models/{model}/test_modeling_{model}.py"

PLUGIN = '''
import json, os
import pytest

_OUT = os.environ["AK_HF_OUTCOMES"]
_outcomes = {}

if os.environ.get("AK_HF_PATCH"):
    import importlib
    import warnings
    import albert_kernels as ak

    _model = os.environ["AK_HF_MODEL"]
    _hf = importlib.import_module(f"transformers.models.{_model}.modeling_{_model}")
    _base = getattr(_hf, os.environ["AK_HF_BASE"])
    _backend = os.environ["AK_HF_PATCH"]
    _original_post_init = _base.post_init

    def _post_init_then_patch(self, *args, **kwargs):
        _original_post_init(self, *args, **kwargs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ak.patch_hf(self, backend=_backend)
        except ValueError as e:  # a decoder: left unpatched, runs transformers' code
            if "nothing to patch" not in str(e):
                raise

    _base.post_init = _post_init_then_patch


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if report.nodeid in _outcomes and _outcomes[report.nodeid]["outcome"] != "passed":
            return  # keep the first failure (setup/call) of a test
        message = ""
        if report.outcome == "failed":
            message = str(getattr(report.longrepr, "reprcrash", None) and
                          report.longrepr.reprcrash.message or report.longrepr)[:300]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])[:200]
        _outcomes[report.nodeid] = {"outcome": report.outcome, "message": message}


def pytest_sessionfinish(session):
    with open(_OUT, "w") as f:
        json.dump(_outcomes, f, indent=1)
'''


def run_mode(root: Path, model: str, backend: str | None, keyword: str | None,
             timeout: float) -> dict:
    """pytest on the model's test file in a child process; {nodeid: {outcome, message}}."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ak_hf_plugin.py").write_text(PLUGIN)
        out = Path(tmp) / "outcomes.json"
        env = dict(os.environ, AK_HF_OUTCOMES=str(out), AK_HF_MODEL=model,
                   AK_HF_BASE=MODELS[model],
                   PYTHONPATH=os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")]))
        env.pop("AK_HF_PATCH", None)
        if backend is not None:
            env["AK_HF_PATCH"] = backend
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "ak_hf_plugin", "-p", "no:cacheprovider",
               "--rootdir", str(root), str(root / test_file(model))]
        if keyword:
            cmd += ["-k", keyword]
        subprocess.run(cmd, cwd=root, env=env, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not out.exists():
            raise RuntimeError(f"pytest wrote no outcomes (command: {' '.join(cmd)})")
        return json.loads(out.read_text())


def counts(outcomes: dict) -> dict:
    result = {"passed": 0, "failed": 0, "skipped": 0}
    for o in outcomes.values():
        result[o["outcome"]] = result.get(o["outcome"], 0) + 1
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory holding transformers' tests/ folder")
    parser.add_argument("--model", default="albert", choices=sorted(MODELS),
                        help="whose tests/models/<model>/test_modeling_<model>.py (albert)")
    parser.add_argument("--backend", default="cpp", help="backend for the patched run (cpp)")
    parser.add_argument("--modes", default="unpatched,patched",
                        help="comma-separated: unpatched, patched (default both)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per mode")
    parser.add_argument("--json", type=Path, default=None, help="write per-test outcomes here")
    args = parser.parse_args(argv)
    if not (args.root / test_file(args.model)).is_file():
        parser.error(f"{args.root / test_file(args.model)} not found: root must hold "
                     "transformers' tests/")
    results = {}
    for mode in args.modes.split(","):
        if mode not in ("unpatched", "patched"):
            parser.error(f"--modes: unknown mode {mode!r} (unpatched, patched)")
        results[mode] = run_mode(args.root, args.model,
                                 args.backend if mode == "patched" else None,
                                 args.keyword, args.timeout)
        print(f"{mode:10s} {counts(results[mode])}", flush=True)
    if {"unpatched", "patched"} <= set(results):
        regressions = sorted(t for t, o in results["unpatched"].items() if o["outcome"] == "passed"
                             and results["patched"].get(t, {}).get("outcome") == "failed")
        print(f"pass unpatched, fail patched ({args.backend}): {len(regressions)}")
        for t in regressions:
            first = results["patched"][t]["message"].splitlines()[:1] or [""]
            print(f"  {t.split('::')[-1]}: {first[0][:160]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
