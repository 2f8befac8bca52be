#!/usr/bin/env python
"""The Python side of scripts/gpu_check.sh (docs/correctness.md, "The GPU check").

Each subcommand is one piece of the check, run by gpu_check.sh in its own process under its own
time budget; results go to JSON-lines files, one line per result, appended and flushed as soon as
it is known, so that a step killed at its budget keeps what it finished.

    probe --jsonl FILE            versions and the GPU; exit 3 when there is no usable CUDA GPU
    prebuilt --dir DIR [--install]  does the carried extension in DIR match this machine (torch,
                                  CUDA, Python, sources, CPU ISA)? --install puts it where the
                                  package loads it (albert_kernels/_C.so) and runs one CUDA op in
                                  a fresh process; exit 1 (and nothing installed) when it does not
    build-prebuilt --dir DIR [--arch 9.0]   build the extension with CUDA for `arch` (no GPU
                                  needed) into DIR with its manifest (scripts/build_gpu_ext.sh)
    sanitize-cases                small CUDA-backend cases, forward and backward, for
                                  compute-sanitizer (memcheck, racecheck)
    sanitize-attention            scripts/gpu_check_review.py: CUDA attention over the review's
                                  shapes first, then sanitize-cases (memcheck, racecheck, synccheck)
    review --jsonl FILE           scripts/gpu_check_review.py: the checks a review without a GPU
                                  says to run first (huge scores, dropout masks, residual edges)
    model --backend B ... --jsonl FILE    scripts/gpu_check_runs.py: the model vs transformers
    bench --jsonl FILE --deadline EPOCH   scripts/gpu_check_runs.py: the short benchmark
    summary --out DIR             the one-page summary.md from DIR's JSON lines (no torch import)

Exit status: 0 success, 1 failure, 2 usage, 3 no GPU (probe).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NO_GPU = 3
SO_NAME = "albert_kernels_ext.so"
INSTALLED = ROOT / "albert_kernels" / "_C.so"   # backends/extension/ops.py loads _C*.so first


def append_jsonl(path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------ probe
def probe(args) -> int:
    import torch
    row = {"step": "env", "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cores": os.cpu_count(), "gpu": None}
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        for name in ("triton", "transformers"):
            try:
                row[name] = __import__(name).__version__
            except ImportError:
                row[name] = None
        from albert_kernels.backends.extension.build import find_nvcc
        row["nvcc"] = find_nvcc()
    else:
        row["reason"] = "torch.cuda.is_available() is False"
    append_jsonl(args.jsonl, row)
    print(json.dumps(row))
    if row["gpu"] is None:
        print("no GPU: torch.cuda.is_available() is False (no CUDA device, driver or CUDA torch)",
              file=sys.stderr)
        return NO_GPU
    return 0


# ------------------------------------------------------------------------ prebuilt extension
def sources_hash() -> str:
    """Every file the extension is compiled from (csrc/**, names and bytes)."""
    from albert_kernels.backends.extension.build import csrc_dir
    h = hashlib.sha256()
    root = csrc_dir()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in
                    (".cpp", ".cu", ".h", ".cuh")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def machine_fingerprint() -> dict:
    import torch
    from albert_kernels.backends.extension import build
    isa = next(name for name, flags in build.ISA_FLAGS.items() if flags == build.isa_flags())
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": ".".join(map(str, sys.version_info[:2])), "machine": platform.machine(),
            "sources": sources_hash(), "isa": isa}


def mismatches(manifest: dict, here: dict) -> list[str]:
    """Why the prebuilt library cannot be used here (empty: it can). Its CPU kernels need the
    ISA they were built for; a host with more (AVX-512 for an AVX2 build) runs them too."""
    from albert_kernels.backends.extension import build
    why = [f"{k}: built for {manifest.get(k)!r}, here {here[k]!r}"
           for k in ("torch", "torch_cuda", "python", "machine", "sources")
           if manifest.get(k) != here[k]]
    needs = getattr(build, "_ISA_NEEDS", {}).get(manifest.get("isa"), set())
    missing = needs - build._cpu_flags()
    if missing:
        why.append(f"isa: built for {manifest.get('isa')}, this CPU lacks {sorted(missing)}")
    return why


def _smoke_test() -> subprocess.CompletedProcess:
    code = ("import torch, albert_kernels as ak\n"
            "from albert_kernels.backends import cuda\n"
            "x = torch.randn(4, 64, device='cuda')\n"
            "y = ak.add_layer_norm(x, x, torch.ones(64, device='cuda'), "
            "torch.zeros(64, device='cuda'), 1e-12, backend='cuda')\n"
            "torch.cuda.synchronize(); print('cuda op ran:', tuple(y.shape))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def prebuilt(args) -> int:
    manifest_path = Path(args.dir) / "manifest.json"
    if not manifest_path.is_file() or not (Path(args.dir) / SO_NAME).is_file():
        print(f"prebuilt: no {SO_NAME} + manifest.json in {args.dir}", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    why = mismatches(manifest, machine_fingerprint())
    if why:
        print("prebuilt: does not match this machine:\n  " + "\n  ".join(why), file=sys.stderr)
        return 1
    print(f"prebuilt: {args.dir} matches (built {manifest.get('built')}, sources "
          f"{manifest['sources']}, {manifest.get('arch')})")
    if not args.install:
        return 0
    shutil.copy2(Path(args.dir) / SO_NAME, INSTALLED)
    proc = _smoke_test()
    print(proc.stdout + proc.stderr[-3000:])
    if proc.returncode != 0:  # e.g. other system libraries there: build on the machine instead
        INSTALLED.unlink(missing_ok=True)
        print("prebuilt: installed library failed its CUDA smoke test; removed", file=sys.stderr)
        return 1
    return 0


def build_prebuilt(args) -> int:
    """Build with CUDA for args.arch in a private build dir, then copy the library + manifest."""
    os.environ["ALBERT_KERNELS_BUILD_DIR"] = args.cache  # outside DIR: DIR is carried
    from albert_kernels.backends.extension.build import build
    start = time.time()
    before = machine_fingerprint()
    path = build(with_cuda=True, cuda_arch=args.arch, verbose=False)
    if machine_fingerprint() != before:  # someone edited csrc/ while it compiled
        print("build-prebuilt: csrc/ changed during the build; run it again", file=sys.stderr)
        return 1
    out = Path(args.dir)
    shutil.copy2(path, out / SO_NAME)
    manifest = {**before, "arch": args.arch, "built": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(time.time() - start),
        "size_mb": round((out / SO_NAME).stat().st_size / 2**20, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))
    return 0


# ----------------------------------------------------------------------- sanitizer workload
def sanitize_cases(args) -> int:
    """Small cases through every CUDA kernel family, forward and backward, fp16 and fp32: the
    shapes hit the edges (a partial tile, padding, an all-padding row, an empty sequence)."""
    import torch
    from albert_kernels.tools.cases import CASES, run_case
    per_op: dict = {}
    for c in CASES:  # the first two quick cases of each op (edges: partial tiles, padding)
        if c.quick and len(per_op.setdefault(c.op, [])) < 2:
            per_op[c.op].append(c)
    picked = [c for cases in per_op.values() for c in cases]
    failed = 0
    for case in picked:
        for dtype in (torch.float16, torch.float32):
            res = run_case(case, "cuda", dtype, "cuda")
            bad = [k for k, b in res.items() if not b.ok]
            failed += bool(bad)
            print(f"{case.op:18s} {case.name:40s} {str(dtype)[6:]:8s} "
                  f"{'ok' if not bad else 'OVER BUDGET: ' + ', '.join(bad)}", flush=True)
    torch.cuda.synchronize()
    print(f"{len(picked) * 2} cases run, {failed} over budget")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--jsonl", required=True)
    p = sub.add_parser("prebuilt")
    p.add_argument("--dir", required=True)
    p.add_argument("--install", action="store_true")
    p = sub.add_parser("build-prebuilt")
    p.add_argument("--dir", required=True)
    p.add_argument("--arch", default="9.0")
    p.add_argument("--cache", required=True, help="the build directory (not carried)")
    sub.add_parser("sanitize-cases")
    sub.add_parser("sanitize-attention")
    p = sub.add_parser("review")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--device", default="cuda", help="cpu: a dry run on CPU backends")
    p.add_argument("--backends", default="cuda,triton,reference")
    p = sub.add_parser("summary")
    p.add_argument("--out", required=True)
    p.add_argument("--final", action="store_true")
    p = sub.add_parser("model")
    p.add_argument("--backend", action="append", required=True)
    p.add_argument("--jsonl", required=True)
    p = sub.add_parser("bench")
    p.add_argument("--jsonl", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds to stop by")
    args = ap.parse_args(argv)
    if args.cmd in ("model", "bench"):
        import gpu_check_runs
        return gpu_check_runs.main(args)
    if args.cmd in ("review", "sanitize-attention"):
        import gpu_check_review
        return {"review": gpu_check_review.review,
                "sanitize-attention": gpu_check_review.sanitize_attention}[args.cmd](args)
    if args.cmd == "summary":
        import gpu_check_summary
        return gpu_check_summary.write(Path(args.out), final=args.final)
    return {"probe": probe, "prebuilt": prebuilt, "build-prebuilt": build_prebuilt,
            "sanitize-cases": sanitize_cases}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
