"""Ahead-of-time compilation of every Triton kernel of this backend for sm_80 and sm_90.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the
whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) on the CPU. This catches what the
interpreter forgives: dot shapes and layouts, register allocation and spills, and shared memory
over the chip's limit.

Which kernels, in which variants: the backend's own launch code is run forward and backward on
representative ALBERT workloads (every dtype, every head dim, each op and GELU flavour, attention
with and without dropout, varlen with separate query and key sequences) with the
kernels' ``run`` replaced by a recorder, so nothing executes; each recorded launch is then turned
into the signature, constexprs and specialisation attributes that triton's runtime binder would
produce for it on that target, and compiled once per autotune config that ``_prune_configs`` may keep
on the target (``gelu_ffn.usable_configs``). Sizes are aligned (multiples of 16), as in ALBERT; other sizes
compile to the same tiles with narrower loads.

    python -m albert_kernels.backends.triton.aot [--arch 80 90] [--jobs N]

prints one row per compiled kernel (kernel, config, dtype, arch, shared bytes, registers, spill
bytes, compile seconds) and exits 1 if any kernel fails to compile, needs more shared memory than
the chip has, or spills more than SPILL_TOLERANCE bytes per thread.
It must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels in-process).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

# Max shared memory per block (opt-in), bytes: 227 KiB on H100/H200, 163 KiB on A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
# Spill bytes per thread tolerated: ptxas sometimes parks a 64-bit value or two on the stack even
# far below the register limit; anything more means a tile too large for the register file.
SPILL_TOLERANCE = 16
MODULES = ["attention", "add_layer_norm", "gelu_ffn"]
_PACKAGE = "albert_kernels.backends.triton"


@dataclass(frozen=True)
class Job:
    """One kernel to compile: where it lives, and what the runtime would hand triton.compile."""
    module: str
    name: str             # attribute of the module (a JITFunction or an Autotuner around one)
    arch: int
    signature: tuple      # ((arg name, type), ...)
    constexprs: tuple     # ((path, value), ...)
    attrs: tuple          # ((path, attribute list), ...)
    options: tuple        # ((option, value), ...)
    label: str            # constexprs and launch options, for the table
    dtype: str
    launch: tuple         # ((name, value), ...): the constexprs and options the launch passed
    tuned: tuple          # ((name, value), ...): the autotune config's part of it (or ())


@dataclass
class Result:
    job: Job
    shared: Optional[int] = None
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.shared is not None
                and self.shared <= SHARED_LIMIT[self.job.arch] and self.spill_bytes <= SPILL_TOLERANCE)


# ------------------------------------------------------------------------------------------------
# Recording the launches

def _kernels():
    from triton.runtime.jit import KernelInterface
    for mod_name in MODULES:
        mod = importlib.import_module(f"{_PACKAGE}.{mod_name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(obj, KernelInterface):
                yield mod_name, name, obj


@contextlib.contextmanager
def _recording():
    launches = []
    patched = []
    for mod_name, name, kernel in _kernels():
        def run(*args, _where=(mod_name, name, kernel), grid=None, warmup=False, **kwargs):
            launches.append((*_where, args, kwargs))
        kernel.run = run
        patched.append(kernel)
    try:
        yield launches
    finally:
        for kernel in patched:
            del kernel.run


def _run_workloads() -> list:
    """Forward and backward of every op on CPU tensors, kernels recorded instead of run."""
    # importlib: the package's attributes `attention` etc. are the op functions, not the modules
    attn, ln, ffn = (importlib.import_module(f"{_PACKAGE}.{m}") for m in MODULES)
    gen = torch.Generator().manual_seed(0)

    def t(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    def fwd_bwd(fn, *args):
        out = fn(*args)
        out.backward(torch.ones_like(out))

    with _recording() as launches:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in sorted(_head_dims()):
                b, h, l = 2, 4, 128
                q, k, v = (t(b, l, h, head_dim, dtype=dtype).transpose(1, 2) for _ in range(3))
                mask = torch.arange(l)[None, :] < torch.tensor([[l], [l // 2]])
                for dropout_p in (0.0, 0.1):  # dropout is a separate (constexpr) variant
                    fwd_bwd(attn.attention, q, k, v, mask, head_dim ** -0.5, dropout_p)
                fwd_bwd(attn.attention, q, k, v, None, head_dim ** -0.5)
                q = t(160, h, head_dim, dtype=dtype)
                k, v = (t(176, h, head_dim, dtype=dtype) for _ in range(2))
                cu_q = torch.tensor([0, 128, 160], dtype=torch.int32)
                cu_k = torch.tensor([0, 128, 176], dtype=torch.int32)  # more keys than queries
                for dropout_p in (0.0, 0.1):
                    fwd_bwd(attn.varlen_attention, q, k, v, cu_q, cu_k, 128, 128,
                            head_dim ** -0.5, dropout_p)
            for hidden in (768, 2048, 4096):
                fwd_bwd(ln.add_layer_norm, t(64, hidden, dtype=dtype), t(64, hidden, dtype=dtype),
                        t(hidden, dtype=dtype), t(hidden, dtype=dtype), 1e-12)
            for approximate in ("tanh", "none"):
                x = t(256, 768, dtype=dtype)
                w1, b1 = t(3072, 768, dtype=dtype), t(3072, dtype=dtype)
                w2, b2 = t(768, 3072, dtype=dtype), t(768, dtype=dtype)
                fwd_bwd(ffn.linear_gelu, x, w1, b1, approximate)
                fwd_bwd(ffn.gelu_ffn, x, w1, b1, w2, b2, approximate)
    return launches


def _jit_function(kernel):
    """The JITFunction under any wrappers (an Autotuner keeps it in .fn)."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _head_dims():
    return importlib.import_module(_PACKAGE).HEAD_DIMS


# ------------------------------------------------------------------------------------------------
# Turning a launch into what triton.compile takes, the way the runtime does

def _spec(jit_fn, args, kwargs, arch: int):
    """(signature, constexprs, attrs, options) exactly as triton's runtime binder derives them."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=kwargs.get("debug", jit_fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _configs_for(kernel, args, kwargs, arch: int) -> list:
    """The launch options autotuning may pick on `arch` (one empty dict for a plain kernel)."""
    from triton.runtime.autotuner import Autotuner
    if not isinstance(kernel, Autotuner):
        return [{}]
    from .gelu_ffn import has_gelu, usable_configs
    elem_bytes = next(a.element_size() for a in args if isinstance(a, torch.Tensor))
    return [c.all_kwargs() for c in usable_configs(kernel.configs, elem_bytes, SHARED_LIMIT[arch],
                                                   has_gelu(kwargs))]


def _dtype_label(args) -> str:
    """The dtype a launch is for: its narrowest float tensor (fp32 statistics buffers aside)."""
    floats = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return str(min(floats, key=lambda d: d.itemsize)).replace("torch.", "")


def collect_jobs(archs=(80, 90)) -> list:
    jobs, seen = [], set()
    for mod_name, name, kernel, args, kwargs in _run_workloads():
        jit_fn = _jit_function(kernel)
        dtype = _dtype_label(args)
        for arch in archs:
            for config in _configs_for(kernel, args, kwargs, arch):
                launch_kwargs = {**kwargs, **config}
                options, signature, constexprs, attrs = _spec(jit_fn, args, launch_kwargs, arch)
                opts = tuple(sorted(options.__dict__.items()))
                key = (mod_name, name, arch, tuple(signature.items()), tuple(sorted(constexprs.items())),
                       tuple(sorted((k, str(v)) for k, v in attrs.items())), opts)
                if key in seen:
                    continue
                seen.add(key)
                shown = {k: v for k, v in launch_kwargs.items() if k not in ("debug", "instrumentation_mode")}
                shown.setdefault("num_warps", options.num_warps)
                shown.setdefault("num_stages", options.num_stages)
                label = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(shown.items()))
                jobs.append(Job(mod_name, name, arch, tuple(signature.items()),
                                tuple(constexprs.items()), tuple(attrs.items()), opts, label, dtype,
                                tuple(sorted(shown.items())), tuple(sorted(config.items()))))
    return jobs


# ------------------------------------------------------------------------------------------------
# Compiling

def _resource_usage(cubin: bytes) -> tuple:
    """(registers, stack + local bytes) per thread, read from the cubin with triton's cuobjdump.

    Triton kernels make no calls and have no local arrays, so stack and local memory are spills
    (ptxas -v reports the same bytes as "spill stores")."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    return int(fields.get("REG", -1)), int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))


def compile_job(job: Job) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(f"{_PACKAGE}.{job.module}"), job.name)
        jit_fn = _jit_function(kernel)
        src = ASTSource(jit_fn, dict(job.signature), dict(job.constexprs), dict(job.attrs))
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        regs, spills = _resource_usage(compiled.asm["cubin"])
        return Result(job, compiled.metadata.shared, regs, spills, time.perf_counter() - start)
    except Exception as e:  # reported in the table, and the run fails
        first = (str(e).strip().splitlines() or [""])[0]
        return Result(job, seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {first[:200]}")


def compile_all(archs=(80, 90), jobs: Optional[int] = None) -> list:
    todo = collect_jobs(archs)
    workers = jobs or os.cpu_count() or 1
    if workers == 1:
        return [compile_job(j) for j in todo]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_job, todo, chunksize=4))


def to_json(results: list) -> list:
    return [dict(kernel=r.job.name, module=r.job.module, arch=r.job.arch, dtype=r.job.dtype,
                 config=r.job.label, launch=dict(r.job.launch), tuned=dict(r.job.tuned),
                 shared=r.shared, shared_limit=SHARED_LIMIT[r.job.arch], regs=r.regs,
                 spill_bytes=r.spill_bytes, seconds=round(r.seconds, 2), error=r.error)
            for r in results]


def format_table(results: list) -> str:
    head = (f"{'kernel':<28} {'dtype':<8} {'arch':<5} {'shared':>6} {'limit':>6} {'regs':>4} "
            f"{'spill':>5} {'sec':>5}  config")
    lines = [head, "-" * len(head)]
    for r in results:
        j = r.job
        if r.error:
            lines.append(f"{j.name:<28} {j.dtype:<8} sm_{j.arch:<2} FAILED {r.error}  {j.label}")
            continue
        flag = "" if r.ok else "  OVER THE SHARED MEMORY LIMIT OR SPILLING"
        lines.append(f"{j.name:<28} {j.dtype:<8} sm_{j.arch:<2} {r.shared:>6} {SHARED_LIMIT[j.arch]:>6} "
                     f"{r.regs:>4} {r.spill_bytes:>5} {r.seconds:>5.1f}  {j.label}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON rows to FILE")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = compile_all(tuple(args.arch), args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results), f, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} kernels compiled for {', '.join(f'sm_{a}' for a in args.arch)} in "
          f"{time.perf_counter() - start:.0f} s; {len(bad)} failed or over the shared memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    # Through the package's module, not __main__, so that the worker processes find compile_job.
    sys.exit(importlib.import_module(f"{_PACKAGE}.aot").main())
