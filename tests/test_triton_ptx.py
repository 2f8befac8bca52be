"""Rounding properties of the Triton kernels, read from their PTX compiled for sm_90 (no GPU).

Triton lets LLVM contract a multiply and an add into one fused multiply-add, and lowers `/`,
``tl.sqrt`` and ``tl.exp`` to approximate instructions. Where the numerics depend on it, the
kernels ask for explicit rounding; these tests compile them ahead of time (as aot.py does, in a
subprocess without TRITON_INTERPRET, which would replace the kernels in-process) and check:

- attention: the scaled scores q.k * sm_scale are one rounded product (``mul.rn.f32``) in the
  forward and in both backward kernels, never an operand of an fma: the backward recomputes
  P from the forward's row max, so it must round the scores exactly as the forward did. A probe
  kernel with a plain product shows the check sees the fusion where there is one;
- LayerNorm: the mean, variance and rstd use correctly rounded division and square root
  (``div.rn``, ``sqrt.rn``), not ``div.full`` / ``sqrt.approx``;
- the erf GELU and its derivative: no ``tl.exp`` (``ex2.approx.f32`` of a rounded
  x * log2(e)), no ``div.full``.

    python tests/test_triton_ptx.py OUT.json     (what the fixture runs)
"""
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from albert_kernels.backends.triton.gelu_ffn import _gelu, _gelu_grad  # noqa: E402

pytestmark = pytest.mark.slow  # about 40 CPU-seconds of compilation with a cold triton cache

ARCH = 90
HEAD_DIM = 64
SCORE_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


@triton.jit
def _scaled_score_probe(X, Y, scale, row_max):
    """x * scale - row_max written plainly: what the attention kernels must not compile to."""
    offs = tl.arange(0, 128)
    tl.store(Y + offs, tl.load(X + offs) * scale - row_max)


@triton.jit
def _erf_gelu_probe(Z, Y, DY):
    """The erf GELU and its derivative (flavour fixed at compile time: no tanh code in the PTX)."""
    offs = tl.arange(0, 128)
    z = tl.load(Z + offs)
    tl.store(Y + offs, _gelu(z, 0))
    tl.store(DY + offs, _gelu_grad(z, 0))


# ------------------------------------------------------------------------------------------------
# Compiling (in the subprocess)

def _ptx_param(job, arg: str) -> str:
    """The PTX name of kernel argument `arg`: constexpr arguments get no parameter."""
    kept = [name for name, ty in job.signature if ty != "constexpr"]
    return f"{job.name}_param_{kept.index(arg)}"


def _compile(fn, signature, constexprs=None, attrs=None, options=None) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn, signature, constexprs or {}, attrs or {})
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options or {}).asm["ptx"]


def dump(path: str) -> None:
    """Compile the kernels the tests read, for sm_90, and write {label: {ptx, scale_param}}."""
    import importlib
    from albert_kernels.backends.triton import aot
    out = {}
    for job in aot.collect_jobs((ARCH,)):
        launch = dict(job.launch)
        wanted = ((job.name in SCORE_KERNELS and launch.get("HEAD_DIM") == HEAD_DIM)
                  or (job.name in ("_add_ln_fwd_kernel", "_add_ln_bwd_dx_kernel")
                      and launch.get("BLOCK_N") == 1024))
        if not wanted:
            continue
        label = f"{job.name} {job.dtype}" + (f" DROPOUT={int(launch['DROPOUT'])}" if "DROPOUT" in launch else "")
        if label in out:
            continue
        fn = aot._jit_function(getattr(importlib.import_module(f"{aot._PACKAGE}.{job.module}"),
                                       job.name))
        out[label] = dict(ptx=_compile(fn, dict(job.signature), dict(job.constexprs),
                                       dict(job.attrs), dict(job.options)),
                          scale_param=_ptx_param(job, "sm_scale") if job.name in SCORE_KERNELS
                          else None)
    out["probe scaled score"] = dict(
        ptx=_compile(_scaled_score_probe, {"X": "*fp32", "Y": "*fp32", "scale": "fp32",
                                           "row_max": "fp32"}),
        scale_param="_scaled_score_probe_param_2")
    out["probe erf gelu"] = dict(
        ptx=_compile(_erf_gelu_probe, {"Z": "*fp32", "Y": "*fp32", "DY": "*fp32"}),
        scale_param=None)
    with open(path, "w") as f:
        json.dump(out, f)


# ------------------------------------------------------------------------------------------------
# Reading PTX

_INSTR = re.compile(r"^\s*([a-z][\w.]*)\s+(.*?);")


def uses_of_param(ptx: str, param: str) -> list:
    """[(opcode, operands)] of every instruction that reads the register `param` is loaded into,
    or a register it is copied to (mov)."""
    load = re.search(rf"ld\.param\.\w+\s+(%\w+),\s*\[{re.escape(param)}\]", ptx)
    assert load, f"{param} is not loaded in the PTX"
    regs, uses = {load.group(1)}, []
    for line in ptx.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(1).startswith("ld.param"):
            continue
        dest, *sources = [x.strip() for x in m.group(2).split(",")]
        if any(s in regs for s in sources):
            if m.group(1).startswith("mov."):
                regs.add(dest)
            else:
                uses.append((m.group(1), sources))
    return uses


def opcodes(ptx: str) -> set:
    return {m.group(1) for m in map(_INSTR.match, ptx.splitlines()) if m}


# ------------------------------------------------------------------------------------------------
# Tests

@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "ptx.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0 and out.exists(), proc.stdout + proc.stderr[-8000:]
    return json.loads(out.read_text())


def test_the_check_sees_a_fused_score_product(ptx):
    """A plain `x * scale - max` does compile to an fma reading sm_scale: the contraction the
    attention kernels avoid, and what the next test would catch."""
    uses = uses_of_param(ptx["probe scaled score"]["ptx"], ptx["probe scaled score"]["scale_param"])
    assert any(op.startswith("fma") for op, _ in uses), uses


@pytest.mark.parametrize("kernel", SCORE_KERNELS)
def test_attention_scores_are_one_rounded_product_in_forward_and_backward(ptx, kernel):
    labels = [k for k in ptx if k.startswith(kernel + " ")]
    # every dtype, with and without dropout
    assert len(labels) == 6, labels
    for label in labels:
        uses = uses_of_param(ptx[label]["ptx"], ptx[label]["scale_param"])
        products = [op for op, _ in uses if op == "mul.rn.f32"]
        others = [op for op, _ in uses if op != "mul.rn.f32"]
        assert products, f"{label}: sm_scale is never the operand of a mul.rn.f32: {uses}"
        assert not [op for op in others if op.startswith(("fma", "mad", "mul", "add", "sub"))], (
            f"{label}: sm_scale also reaches {others} (only mul.rn.f32, and in the backward the "
            f"selp of the dS scale, may read it)")
        if kernel == "_attn_fwd_kernel":
            assert not others, f"{label}: {others}"
        else:  # _ds_scale: where(n_keys > 1, sm_scale, 0)
            assert set(others) <= {"selp.f32", "selp.b32"}, f"{label}: {others}"


def test_layer_norm_uses_correctly_rounded_division_and_sqrt(ptx):
    fwd = [k for k in ptx if k.startswith("_add_ln_fwd_kernel ")]
    bwd = [k for k in ptx if k.startswith("_add_ln_bwd_dx_kernel ")]
    assert len(fwd) == 3 and len(bwd) == 3, list(ptx)
    for label in fwd + bwd:
        ops = opcodes(ptx[label]["ptx"])
        assert "div.rn.f32" in ops, f"{label}: {sorted(ops)}"
        assert not {op for op in ops if op.startswith(("div.full", "div.approx", "sqrt.approx",
                                                       "rsqrt", "rcp.approx"))}, label
    for label in fwd:
        assert "sqrt.rn.f32" in opcodes(ptx[label]["ptx"]), label


def test_erf_gelu_has_no_approximate_exp_or_division(ptx):
    ops = opcodes(ptx["probe erf gelu"]["ptx"])
    assert "ex2.approx.f32" not in ops, "tl.exp (ex2.approx of a rounded x * log2(e)) in erf GELU"
    assert not {op for op in ops if op.startswith(("div.full", "div.approx"))}, sorted(ops)
    assert "div.rn.f32" in ops, sorted(ops)


if __name__ == "__main__":
    dump(sys.argv[1])
