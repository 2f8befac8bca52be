"""The compiled extension and its "cpp" backend: registration (opcheck, torch.compile), float64
gradcheck, determinism, the sources compiling for every ISA. The op-by-op error budget lives in
test_ops.py, which runs the "cpp" backend with every other one; the build machinery (a broken
source, two processes building at once) in test_extension_build.py, which runs even when this
module's build is broken."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import unavailable_reason

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(unavailable_reason("cpp", "cpu") is not None,
                                reason=f"cpp backend: {unavailable_reason('cpp', 'cpu')}")


@pytest.fixture(scope="module")
def ops():
    from albert_kernels.backends.extension import ops as ext_ops  # builds once (cached)
    return ext_ops


def _rand(*shape, dtype=torch.float64, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(grad)


def _mask(batch, seqlen, lengths):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------ gradcheck in float64
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_gelu_ops(ops, approximate):
    torch.manual_seed(0)
    x, w1, b1 = _rand(3, 5), _rand(7, 5, scale=0.5), _rand(7)
    w2, b2 = _rand(5, 7, scale=0.5), _rand(5)
    assert torch.autograd.gradcheck(
        lambda *a: ak.linear_gelu(*a, approximate=approximate, backend="cpp"), (x, w1, b1))
    assert torch.autograd.gradcheck(
        lambda *a: ak.gelu_ffn(*a, approximate=approximate, backend="cpp"), (x, w1, b1, w2, b2))


def test_gradcheck_add_layer_norm(ops):
    torch.manual_seed(0)
    args = (_rand(2, 3, 11), _rand(2, 3, 11), _rand(11), _rand(11))
    assert torch.autograd.gradcheck(
        lambda *a: ak.add_layer_norm(*a, eps=1e-5, backend="cpp"), args)


def test_gradcheck_attention(ops):
    torch.manual_seed(0)
    q, k, v = (_rand(2, 2, 5, 8) for _ in range(3))
    mask = _mask(2, 5, [3, 0])  # second batch row: no real key at all
    fn = lambda q, k, v: ak.attention(q, k, v, key_padding_mask=mask, backend="cpp")
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no key: zeros, not NaN
    assert torch.autograd.gradcheck(lambda *a: ak.attention(*a, backend="cpp"), (q, k, v))


def test_gradcheck_varlen_attention(ops):
    torch.manual_seed(0)
    q, k, v = (_rand(9, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)  # an empty sequence in the middle
    assert torch.autograd.gradcheck(
        lambda *a: ak.varlen_attention(*a, cu, 5, backend="cpp"), (q, k, v))


@pytest.mark.slow
def test_cpu_sources_compile_for_every_isa():
    """The CPU kernels must compile for every vector ISA the build may pick, not only this
    machine's: an AVX-512 host (the GPU machines) builds the same sources with other at::vec
    specialisations (vec_reduce_all was not declared there without ATen/cpu/vec/functional.h, and
    the extension, CUDA kernels included, would not have built). Syntax and templates only
    (-fsyntax-only), two compilers at a time; the ISAs that other tests build for real (this
    machine's, and the lower one of tests/test_isa_builds.py) are skipped here."""
    import sysconfig
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import include_paths

    from albert_kernels.backends.extension.build import ISA_FLAGS, build_isa

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    from lower_isa import lower_isa

    # this machine's own ISA is compiled for real by the extension build the other tests use,
    # and the next lower one by tests/test_isa_builds.py
    built = {build_isa(), lower_isa()}
    jobs = [(isa, src) for isa in ISA_FLAGS if isa not in built
            for src in sorted((REPO / "csrc" / "cpu").glob("*.cpp"))]
    if not jobs:
        pytest.skip("every vector ISA is built for real by other tests")

    std = _torch_std("cxx")  # torch's own choice: c++17 with torch 2.11, c++20 with 2.14

    def compile_one(job):
        isa, src = job
        cmd = [cxx, std, "-fsyntax-only", "-fopenmp", *includes, *ISA_FLAGS[isa],
               str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return isa, src.name, proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f"{isa} {name}:\n{err[-2000:]}" for isa, name, rc, err in
                    pool.map(compile_one, jobs) if rc != 0]
    assert not failures, "\n".join(failures)


def _torch_std(compiler: str) -> str:
    """The -std= flag torch's JIT build uses (scripts/check_cuda_build.py reads it off torch)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_cuda_build",
                                                  REPO / "scripts" / "check_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name].torch_std(compiler)


# ------------------------------------------------------------------ registration
def _op_samples():
    """(op name, args) for every custom op, float32 CPU tensors; forward ops with grad inputs."""
    torch.manual_seed(0)
    f = lambda *s, grad=False: torch.randn(*s).requires_grad_(grad)
    ao = torch.ops.albert_kernels
    x, r, w, b = f(6, 16, grad=True), f(6, 16, grad=True), f(16, grad=True), f(16, grad=True)
    _, mean, rstd = ao.add_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b.detach(), 1e-5)
    w1, b1, w2, b2 = f(24, 16, grad=True), f(24, grad=True), f(16, 24, grad=True), f(16, grad=True)
    _, pre1 = ao.linear_gelu_fwd(x.detach(), w1.detach(), b1.detach(), "tanh")
    q, k, v = (f(2, 3, 10, 32, grad=True) for _ in range(3))
    mask = _mask(2, 10, [7, 10])
    drop = (0.25, 1234567, 96)  # dropout_p, Philox seed, offset
    out, lse = ao.attention_fwd(q.detach(), k.detach(), v.detach(), mask, 0.2, *drop)
    qv, kv, vv = (f(10, 3, 32, grad=True) for _ in range(3))
    kv2, vv2 = f(12, 3, 32, grad=True), f(12, 3, 32, grad=True)  # separate key tokens
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 12], dtype=torch.int32)  # sequence 0: queries, no keys
    vout, vlse = ao.varlen_attention_fwd(qv.detach(), kv.detach(), vv.detach(), cu, cu, 7, 7, 0.2,
                                         *drop)
    d = lambda *ts: [t.detach() for t in ts]
    wq = torch.randint(-127, 128, (20, 30), dtype=torch.int8)
    return [
        ("add_layer_norm_fwd", (x, r, w, b, 1e-5)),
        ("add_layer_norm_bwd", (f(6, 16), *d(x, r, w), mean, rstd)),
        ("linear_gelu_fwd", (x, w1, b1, "none")),
        ("linear_gelu_bwd", (f(6, 24), *d(x, w1), pre1, "tanh")),
        ("gelu_ffn_fwd", (x, w1, b1, w2, b2, "tanh")),
        ("gelu_ffn_bwd", (f(6, 16), *d(x, w1, w2), pre1, "tanh")),
        ("attention_fwd", (q, k, v, mask, 0.2, 0.0, 0, 0)),
        ("attention_fwd", (q, k, v, None, 0.2, *drop)),
        ("attention_fwd", (q, k, v, mask, 0.2, 0.0, 0, 0, True)),  # save_residual (CUDA's)
        ("attention_bwd", (f(2, 3, 10, 32), *d(q, k, v), out, lse, mask, 0.2, *drop)),
        ("varlen_attention_fwd", (qv, kv, vv, cu, cu, 7, 7, 0.2, 0.0, 0, 0)),
        ("varlen_attention_fwd", (qv, kv2, vv2, cu, cu_k, 7, 12, 0.2, *drop)),
        ("varlen_attention_fwd", (qv, kv, vv, cu, cu, 7, 7, 0.2, 0.0, 0, 0, True)),
        ("varlen_attention_bwd", (f(10, 3, 32), *d(qv, kv, vv), vout, vlse, cu, cu, 7, 7, 0.2,
                                  *drop)),
        # the small-M inference ops (no autograd): hidden 48 (4 heads), FFN 40 (a partial panel)
        ("packed_panel_width", ()),
        ("pack_linear_weight", (f(3 * 48, 48), 3)),
        ("packed_linear", (f(5, 48), ao.pack_linear_weight(f(40, 48)), 40, f(40), "none")),
        ("packed_albert_layer", (
            f(10, 48), cu, 7, ao.pack_linear_weight(f(3 * 48, 48), 3), f(3 * 48),
            ao.pack_linear_weight(f(48, 48)), f(48), f(48), f(48), 1e-12,
            ao.pack_linear_weight(f(40, 48)), f(40), ao.pack_linear_weight(f(48, 40)), f(48),
            f(48), f(48), 1e-12, 4, 0.25, "tanh")),
        # the int8 inference ops: N = 20, K = 30 (partial panels and groups)
        ("int8_pack_weight", (wq,)),
        ("int8_quantize_rows", (f(5, 30), f(30))),
        ("int8_gemm", (ao.int8_quantize_rows(f(5, 30))[0], ao.int8_pack_weight(wq), wq,
                       "portable")),
        ("int8_linear", (f(5, 30), ao.int8_pack_weight(wq), wq, torch.rand(20) / 50,
                         wq.sum(1, dtype=torch.int32), f(20), None, "tanh", "portable")),
        ("int8_linear", (f(5, 30), ao.int8_pack_weight(wq), wq, torch.rand(20) / 50,
                         wq.sum(1, dtype=torch.int32), None, f(30), None, "portable", f(5, 20))),
    ]


def test_opcheck_every_op(ops):
    samples = _op_samples()
    names = {name for name, _ in samples}
    # every op the library defines (dir() of the namespace only lists ops already looked up)
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("albert_kernels::")}
    assert names == registered, f"opcheck must cover every op: missing {registered - names}"
    for name, args in samples:
        torch.library.opcheck(getattr(torch.ops.albert_kernels, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_linear_gelu_epilogue(ops, dtype, approximate):
    """linear_gelu's epilogue (bias + GELU after the bias-free GEMM, the pre-activation written
    over the GEMM's output): with an identity weight the GEMM is exact, so `pre` must be x + b
    and `out` gelu(x + b) within the GELU budget, for odd N (vector tails) and large |x| (the
    exp is clamped; no inf * 0); with a random weight, against float64."""
    from albert_kernels.tools.budget import check_budget
    gelu = torch.nn.functional.gelu
    torch.manual_seed(0)
    n = 75
    x = (torch.randn(37, n, dtype=torch.float64) * 8).to(dtype)
    big = 60.0 if dtype == torch.float16 else 200.0  # fp16's largest is 65504
    x[0, :4] = torch.tensor([-big, -60.0, 60.0, big], dtype=dtype)
    b = torch.randn(n, dtype=torch.float64).to(dtype)
    eye = torch.eye(n, dtype=dtype)
    out, pre = torch.ops.albert_kernels.linear_gelu_fwd(x, eye, b, approximate)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(pre, x + b, rtol=0, atol=0)
    result = check_budget(out, gelu(x + b, approximate=approximate),
                          gelu(x.double() + b.double(), approximate=approximate))
    assert result.ok, f"linear_gelu epilogue {approximate} {dtype}: {result}"
    w = (torch.randn(n, 48, dtype=torch.float64) / 7).to(dtype)
    h = torch.randn(37, 48, dtype=torch.float64).to(dtype)
    out, pre = torch.ops.albert_kernels.linear_gelu_fwd(h, w, b, approximate)
    gold_pre = torch.nn.functional.linear(h.double(), w.double(), b.double())
    base_pre = torch.nn.functional.linear(h.float(), w.float(), b.float()).to(dtype)
    result = check_budget(pre, base_pre, gold_pre)
    assert result.ok, f"linear_gelu pre-activation {approximate} {dtype}: {result}"
    result = check_budget(out, gelu(base_pre.float(), approximate=approximate).to(dtype),
                          gelu(gold_pre, approximate=approximate))
    assert result.ok, f"linear_gelu {approximate} {dtype}: {result}"


def _all_ops(x, r, w, b, w1, b1, w2, b2, q, k, v, mask, qv, kv, vv, cu):
    y = ak.add_layer_norm(x, r, w, b, backend="cpp")
    h = ak.linear_gelu(y, w1, b1, backend="cpp")
    z = ak.gelu_ffn(y, w1, b1, w2, b2, approximate="none", backend="cpp")
    a = ak.attention(q, k, v, key_padding_mask=mask, backend="cpp")
    va = ak.varlen_attention(qv, kv, vv, cu, 7, backend="cpp")
    return y, h, z, a, va


def test_torch_compile_fullgraph(ops):
    torch.manual_seed(0)
    f = lambda *s: torch.randn(*s)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    args = (f(4, 5, 16), f(4, 5, 16), f(16), f(16), f(24, 16), f(24), f(16, 24), f(16),
            f(2, 3, 10, 32), f(2, 3, 10, 32), f(2, 3, 10, 32), _mask(2, 10, [4, 10]),
            f(10, 3, 32), f(10, 3, 32), f(10, 3, 32), cu)
    eager = _all_ops(*args)
    # ak.varlen_attention validates cu_seqlens with .tolist(): outside the graph, so call the
    # backend function (what the op layer calls after validation) inside it.
    from albert_kernels.backends import cpp

    def traced(x, r, w, b, w1, b1, w2, b2, q, k, v, mask, qv, kv, vv, cu):
        y = cpp.add_layer_norm(x, r, w, b, 1e-12)
        return (y, cpp.linear_gelu(y, w1, b1, "tanh"), cpp.gelu_ffn(y, w1, b1, w2, b2, "none"),
                cpp.attention(q, k, v, mask, 32 ** -0.5),
                cpp.varlen_attention(qv, kv, vv, cu, cu, 7, 7, 32 ** -0.5))

    compiled = torch.compile(traced, fullgraph=True)
    grad_args = [a.requires_grad_() if a.is_floating_point() else a for a in args]
    outs = compiled(*grad_args)
    for e, c in zip(eager, outs):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    sum(o.sum() for o in outs).backward()  # backward through the registered autograd
    assert all(a.grad is not None and torch.isfinite(a.grad).all()
               for a in grad_args if a.is_floating_point())


# ------------------------------------------------------------------ determinism
def test_weight_gradients_do_not_depend_on_thread_count(ops):
    torch.manual_seed(0)
    x, r = torch.randn(333, 96), torch.randn(333, 96)
    w, b = torch.randn(96).requires_grad_(), torch.randn(96).requires_grad_()
    w1, b1 = (torch.randn(64, 96) * 0.1).requires_grad_(), torch.randn(64).requires_grad_()
    g = torch.randn(333, 64)

    def grads():
        for t in (w, b, w1, b1):
            t.grad = None
        y = ak.linear_gelu(ak.add_layer_norm(x, r, w, b, backend="cpp"), w1, b1, backend="cpp")
        y.backward(g)
        return [t.grad.clone() for t in (w, b, b1)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads()
        torch.set_num_threads(max(2, threads))
        many = grads()
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, many):
        assert torch.equal(a, c)


# ------------------------------------------------------------------ bf16 attention kernels
def _bf16_attention_cases(D):
    """Padded [B, H, L, D] (two key blocks, left padding, a hole, a row with no key) and packed
    (an empty sequence, one longer than a key block) bf16 inputs, scaled so that the softmax is
    peaked (the rounding of P matters)."""
    gen = torch.Generator().manual_seed(D)
    B, H, L = 3, 2, 150
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    mask = _mask(B, L, [150, 37, 0])
    mask[0, :9] = False
    mask[1, 5] = False
    cu = torch.tensor([0, 150, 187, 187, 200], dtype=torch.int32)
    qv, kv, vv = (torch.randn(200, H, D, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    return (q, k, v, mask), (qv, kv, vv, cu)


@pytest.mark.parametrize("kernel", ["auto", "fp32"])
@pytest.mark.parametrize("D", [64, 24, 7, 80, 128])
def test_bf16_attention_kernels_within_budget(ops, monkeypatch, kernel, D):
    """bf16 attention forward, on AMX tiles where the CPU has them (auto) and forced to the fp32
    kernel: within the bf16 budget of the reference backend in bf16 against float64 on the same
    (bf16-rounded) inputs, padded and packed layouts; the two kernels differ where AMX runs."""
    from albert_kernels.backends.cpp import isa
    from albert_kernels.tools.budget import check_budget
    monkeypatch.setenv(isa.BF16_ATTENTION_ENV, kernel)
    (q, k, v, mask), (qv, kv, vv, cu) = _bf16_attention_cases(D)
    low = lambda *ts: [t.bfloat16() for t in ts]
    cases = {
        "padded": lambda dtype, backend, ts: ak.attention(
            *(t.to(dtype) for t in ts), key_padding_mask=mask, backend=backend),
        "varlen": lambda dtype, backend, ts: ak.varlen_attention(
            *(t.to(dtype) for t in ts), cu, 150, backend=backend),
    }
    inputs = {"padded": low(q, k, v), "varlen": low(qv, kv, vv)}
    for name, run in cases.items():
        ts = inputs[name]
        out = run(torch.bfloat16, "cpp", ts)
        base = run(torch.bfloat16, "reference", ts)
        gold = run(torch.float64, "reference", ts)
        result = check_budget(out, base, gold, dtype=torch.bfloat16)
        assert out.dtype == torch.bfloat16 and result.ok, f"{name} D={D} {kernel}: {result}"
        if kernel == "auto" and isa.bf16_attention_kernel() == "amx":
            monkeypatch.setenv(isa.BF16_ATTENTION_ENV, "fp32")
            fallback = run(torch.bfloat16, "cpp", ts)
            monkeypatch.setenv(isa.BF16_ATTENTION_ENV, "auto")
            assert not torch.equal(out, fallback), "AMX and fp32 kernels gave identical bits"


def test_bf16_attention_kernels_agree_with_dropout(ops, monkeypatch):
    """With dropout, the AMX kernel drops the same entries as the fp32 one (one Philox stream):
    the outputs differ by bf16 rounding only, and the lse (fp32 statistics) agrees closely."""
    from albert_kernels.backends.cpp import isa
    (q, k, v, mask), _ = _bf16_attention_cases(64)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    ao = torch.ops.albert_kernels
    results = {}
    for kernel in ("auto", "fp32"):
        monkeypatch.setenv(isa.BF16_ATTENTION_ENV, kernel)
        results[kernel] = ao.attention_fwd(q, k, v, mask, 0.125, 0.3, 1234, 8)
    (o_a, lse_a), (o_f, lse_f) = results["auto"], results["fp32"]
    no_drop = ao.attention_fwd(q, k, v, mask, 0.125, 0.0, 0, 0)[0]
    scale = o_f.float().abs().max().item()
    assert (o_a.float() - o_f.float()).abs().max().item() <= 0.02 * scale
    assert (no_drop.float() - o_f.float()).abs().max().item() > 0.1 * scale
    finite = torch.isfinite(lse_f)
    assert torch.equal(finite, torch.isfinite(lse_a))
    torch.testing.assert_close(lse_a[finite], lse_f[finite], rtol=1e-4, atol=1e-4)


def test_bf16_attention_env_is_checked(ops, monkeypatch):
    from albert_kernels.backends.cpp import isa
    monkeypatch.setenv(isa.BF16_ATTENTION_ENV, "tiles")
    with pytest.raises(ValueError, match=isa.BF16_ATTENTION_ENV):
        isa.bf16_attention_kernel()
    q = torch.randn(1, 1, 4, 8).bfloat16()
    with pytest.raises(RuntimeError, match=isa.BF16_ATTENTION_ENV):
        ak.attention(q, q, q, backend="cpp")
