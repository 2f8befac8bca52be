#!/usr/bin/env python
"""Compile every CUDA source (csrc/cuda/*.cu) for sm_80 and sm_90 and check the kernels' resources.

No GPU needed: each .cu file is compiled (nvcc -c, one invocation per file with a -gencode per
arch, the same flags and include paths as the extension build) with -Xptxas -v. The script prints,
per kernel and arch, the registers, stack frame, spill stores / loads and static shared memory that
ptxas reports, and exits non-zero if a file fails to compile or a kernel spills registers, unless
the kernel is listed in ALLOWED_SPILLS with the reason. (Dynamic shared memory is sized on the host;
attention.cu checks its sizes against the per-block limits with static_asserts.)

    python scripts/check_cuda_build.py [--arch "8.0;9.0"] [--jobs 2] [--log-dir DIR] [FILE.cu ...]
    python scripts/check_cuda_build.py --from-log BUILD_LOG [--arch 9.0]   (table of an existing
        build's -Xptxas -v output, e.g. the extension's build.log; same pass/fail rule)
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# kernel name substring -> why its spills are accepted. Empty: no kernel may spill.
ALLOWED_SPILLS: dict[str, str] = {
    # ptxas (nvcc 13.0), 2026-11-30: 20 B spill stores/loads on sm_90 without dropout and 8 B on
    # sm_80 with dropout, since the kernel took separate query/key ranges and the dropout flag. The
    # fp32 SIMT path only (fp16/bf16 use the tensor-core kernels); three restructurings did not
    # remove it. A few bytes to L1 on a path that is not the fast one: accepted, to be revisited
    # with a GPU at hand (measure before and after).
    "attn_bwd_dkdv_simt_kernel<64,": "fp32 SIMT dK/dV at head dim 64: 8-20 B, see the comment above",
    # ptxas (nvcc 13.0), 2026-11-30, sm_80 only: 8 B stores / 16 B loads at 64 registers since the
    # row shift of the exact LayerNorm statistics; VEC = 1 serves rows whose length is odd (not
    # ALBERT's hidden sizes). Accepted until it can be measured on a GPU.
    "add_ln_fwd_warp_kernel<float, 1>": "fp32 one-element-vector LayerNorm forward on sm_80: 8/16 B",
}


@dataclass
class KernelInfo:
    source: str
    name: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def torch_std(compiler: str = "nvcc") -> str:
    """The -std= flag torch's JIT build (cpp_extension.load, what build.py uses) gives `compiler`
    ("nvcc" or "cxx") with this torch: c++17 for torch 2.11, c++20 for 2.14. Read from the ninja
    file torch writes for a dummy CUDA source (its real code path), else from that function's
    source, else -std=c++17. (A docstring elsewhere in cpp_extension mentions c++20 whatever the
    version: grepping the module picks the wrong one.)"""
    from torch.utils import cpp_extension
    prefixes = ("cuda_cflags", "cuda_post_cflags") if compiler == "nvcc" else ("cflags", "post_cflags")
    write = getattr(cpp_extension, "_write_ninja_file_to_build_library", None)
    if write is None:
        return "-std=c++17"
    gencode = ["-gencode", "arch=compute_90,code=sm_90"]  # else torch asks the (absent) GPU
    values = dict(name="probe", sources=["probe.cpp", "probe.cu"], extra_cflags=[],
                  extra_cuda_cflags=gencode, extra_sycl_cflags=[], extra_ldflags=[],
                  extra_include_paths=[], with_cuda=True, with_sycl=False, is_standalone=False)
    params = inspect.signature(write).parameters
    with tempfile.TemporaryDirectory() as tmp:
        ninja = Path(tmp, "build.ninja")
        try:
            write(path=str(ninja), **{k: v for k, v in values.items() if k in params})
            lines = [ln for ln in ninja.read_text().splitlines() if ln.split(" =")[0] in prefixes]
            found = re.findall(r"-std=c\+\+\d+", "\n".join(lines))
            if found:
                return found[-1]
        except Exception:  # a private API: fall back to reading its source
            pass
    found = re.findall(r"-std=c\+\+\d+", inspect.getsource(write))
    return found[-1] if found else "-std=c++17"


def compile_flags(arch: str) -> list[str]:
    """The extension build's nvcc flags (albert_kernels/backends/extension/build.py) plus what torch's
    cpp_extension adds for a CUDA source, minus linking."""
    import torch
    from torch.utils import cpp_extension

    from albert_kernels.backends.extension import build

    flags = list(build.nvcc_flags(arch))
    if not any(f.startswith("-std=") for f in flags):  # the standard torch's cpp_extension picks
        flags.append(torch_std("nvcc"))
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              f"-DTORCH_EXTENSION_NAME={build.EXT_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "--compiler-options", "-fPIC"]
    includes = [str(build.csrc_dir() / "cpu")] + build.cuda_include_paths()
    includes += cpp_extension.include_paths(device_type="cuda")
    return flags + [f"-I{p}" for p in includes]


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = out.splitlines()
    if len(pretty) != len(names):
        return {n: n for n in names}
    short = {}
    for raw, full in zip(names, pretty):
        full = re.sub(r"albert_kernels::cuda::(\(anonymous namespace\)::)?", "", full)
        full = full.split("(")[0]  # drop the parameter list
        short[raw] = full.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return short


def parse_ptxas(source: str, text: str) -> list[KernelInfo]:
    kernels: list[KernelInfo] = []
    current: KernelInfo | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = KernelInfo(source, m.group(1), m.group(2))
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current.smem = int(sm.group(1)) if sm else 0
    names = demangle([k.name for k in kernels])
    for k in kernels:
        k.name = names[k.name]
    return kernels


def compile_one(nvcc: str, src: Path, flags: list[str], out_dir: Path, log_dir: Path | None):
    obj = out_dir / (src.stem + ".o")
    cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{src.stem}.ptxas.log").write_text(" ".join(cmd) + "\n\n" + text)
    return src, proc.returncode, text, time.time() - start


def print_table(kernels: list[KernelInfo]) -> None:
    header = f"{'source':<20} {'kernel':<62} {'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} {'smem':>6}"
    print(header)
    print("-" * len(header))
    for k in sorted(kernels, key=lambda k: (k.source, k.name, k.arch)):
        flag = "  <- SPILLS" if k.spills else ("  <- local memory" if k.stack else "")
        print(f"{k.source:<20} {k.name[:62]:<62} {k.arch:<6} {k.registers:>4} {k.stack:>5} "
              f"{k.spill_stores:>8} {k.spill_loads:>8} {k.smem:>6}{flag}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="CUDA sources (default: csrc/cuda/*.cu)")
    ap.add_argument("--arch", default="8.0;9.0", help='target archs, e.g. "8.0;9.0"')
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")),
                    help="parallel nvcc processes (default: $MAX_JOBS or 2)")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep each file's nvcc output here")
    ap.add_argument("--from-log", type=Path, default=None,
                    help="compile nothing: report the ptxas output in this log instead")
    args = ap.parse_args(argv)
    if args.from_log is not None:
        kernels = parse_ptxas("extension", args.from_log.read_text(errors="replace"))
        return report(kernels, args.arch, failed=[])

    from albert_kernels.backends.extension.build import find_nvcc
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_build: nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH)",
              file=sys.stderr)
        return 2
    # torch guesses CUDA_HOME at import (from a wrapper nvcc on PATH it may guess /usr/local):
    # the same toolkit as the nvcc used here, as build.py does
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc).parent.parent))
    import torch
    if not torch.version.cuda:
        print("check_cuda_build: this torch is not a CUDA build", file=sys.stderr)
        return 2
    from albert_kernels.backends.extension import build
    files = [Path(f).resolve() for f in args.files] or sorted((build.csrc_dir() / "cuda").glob("*.cu"))
    if not files:
        print("check_cuda_build: no .cu sources found", file=sys.stderr)
        return 2
    flags = compile_flags(args.arch)
    print(f"nvcc: {nvcc}; torch {torch.__version__} (CUDA {torch.version.cuda}); arch {args.arch}; "
          f"{len(files)} files, {args.jobs} jobs", flush=True)

    failed: list[str] = []
    kernels: list[KernelInfo] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, args.jobs)) as pool:
        # Longest first (attention.cu), so that the others compile beside it.
        files.sort(key=lambda f: -f.stat().st_size)
        futures = [pool.submit(compile_one, nvcc, f, flags, Path(tmp), args.log_dir) for f in files]
        for fut in futures:
            src, rc, text, seconds = fut.result()
            print(f"  {src.name}: {'ok' if rc == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
            if rc != 0:
                failed.append(src.name)
                errors = [ln for ln in text.splitlines() if "error" in ln.lower()][:20]
                print("\n".join(errors or text.splitlines()[-20:]), file=sys.stderr)
            kernels += parse_ptxas(src.name, text)

    print()
    return report(kernels, args.arch, failed)


def report(kernels: list[KernelInfo], arch: str, failed: list[str]) -> int:
    """Prints the table; 1 if a source failed, a kernel spills (not allowed), or an arch is missing."""
    print_table(kernels)
    archs = sorted({k.arch for k in kernels})
    print(f"\n{len(kernels)} kernel builds ({len({k.name for k in kernels})} kernels x {archs})")
    bad = [k for k in kernels if k.spills and not any(a in k.name for a in ALLOWED_SPILLS)]
    allowed = [k for k in kernels if k.spills and k not in bad]
    for k in allowed:
        reason = next(r for a, r in ALLOWED_SPILLS.items() if a in k.name)
        print(f"allowed spill: {k.name} ({k.arch}): {reason}")
    expected = {f"sm_{a.strip().replace('.', '')}" for a in arch.split(";") if a.strip()}
    missing = expected - set(archs)
    if failed:
        print(f"FAIL: {', '.join(failed)} did not compile")
    if bad:
        print(f"FAIL: {len(bad)} kernel builds spill registers: "
              + ", ".join(sorted({f'{k.name} ({k.arch})' for k in bad})))
    if not failed and missing:
        print(f"FAIL: no kernels were compiled for {sorted(missing)}")
    if failed or bad or (missing and not failed) or not kernels:
        return 1
    print("OK: every CUDA source compiles for " + ", ".join(sorted(expected)) + " without spills"
          + (f" (except {len(allowed)} accepted in ALLOWED_SPILLS)" if allowed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
