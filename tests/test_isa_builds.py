"""The CPU kernels of a lower vector ISA, built and run on this machine.

The extension is compiled for the best vector ISA the CPU has (backends/extension/build.py), so
a suite on an AVX-512 machine would otherwise never run the AVX2 kernels (the small-M kernel's
4x24 tile, the AVX2 epilogues) and one on an AVX2 machine never the portable ones.
``ALBERT_KERNELS_CPU_ISA`` builds the next lower ISA; a child process loads that build and holds
its kernels to float64 and to the reference backend.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from albert_kernels.backends.extension import build
from lower_isa import lower_isa

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import albert_kernels as ak
    from albert_kernels.backends.cpp import isa
    from albert_kernels.backends.extension import build
    torch.manual_seed(0)
    ops = torch.ops.albert_kernels
    assert build.build_isa() == EXPECTED, build.build_isa()
    assert isa.built_vector_isa() == EXPECTED.lower()
    print("panel", int(ops.packed_panel_width()))
    for m in (1, 5, 64, 300):
        for n, k in ((72, 40), (50, 130)):
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            packed = ops.pack_linear_weight(w, 1)
            for act in ("none", "tanh"):
                got = ops.packed_linear(x, packed, n, b, None if act == "none" else act, 1)
                ref = F.linear(x.double(), w.double(), b.double())
                if act != "none":
                    ref = F.gelu(ref, approximate=act)
                err = (got.double() - ref).abs().max().item()
                assert err < 1e-4 * (1 + ref.abs().max().item()), (m, n, k, act, err)
    cfg = ak.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=64,
                          num_attention_heads=4, intermediate_size=96, num_hidden_layers=3)
    model = ak.AlbertModel(cfg).eval()
    ids = torch.randint(0, 50, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        got = model(ids, mask).last_hidden_state
        model.set_backend("reference")
        ref = model(ids, mask).last_hidden_state
    err = (got - ref).abs().max().item()
    assert err < 1e-4, err
    x = torch.randn(37, 64, dtype=torch.float64, requires_grad=True)
    r, w, bb = torch.randn(37, 64), torch.randn(64), torch.randn(64)
    y = ak.add_layer_norm(x.float(), r, w, bb, backend="cpp")
    z = ak.add_layer_norm(x.float(), r, w, bb, backend="reference")
    assert (y - z).abs().max().item() < 1e-5
    # int8: this build's choice (avx2 / portable) sums exactly; quantize_dynamic runs on it
    expected_int8 = {"AVX2": "avx2", "DEFAULT": "portable"}.get(EXPECTED)
    if expected_int8 is not None:
        assert isa.int8_kernel(5) == expected_int8, isa.int8_kernel(5)
    for m, k, n in ((3, 101, 33), (40, 384, 64)):
        xq = torch.randn(m, k)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        q, _, _ = ops.int8_quantize_rows(xq)
        sums = ops.int8_gemm(q, ops.int8_pack_weight(wq), wq, isa.int8_kernel(m))
        assert torch.equal(sums.long(), q.long() @ wq.long().t()), (m, k, n)
    qmodel = ak.quantize_dynamic(model, products="all")
    with torch.no_grad():
        model.set_backend("cpp")
        qgot = qmodel(ids, mask).last_hidden_state
    real = mask.bool()
    assert (qgot - got)[real].abs().max().item() < 0.05 * got[real].abs().max().item()
    print("ok", build.build_isa())
""")


@pytest.mark.slow
def test_lower_isa_build_runs_within_budget(tmp_path):
    lower = lower_isa()
    if lower is None:
        pytest.skip("this CPU has no vector ISA above the portable build")
    env = dict(os.environ, **{build.ISA_ENV: lower.lower(), "OMP_NUM_THREADS": "2",
                              "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    proc = subprocess.run([sys.executable, "-c", f"EXPECTED = {lower!r}\n" + CHECK], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"ok {lower}" in proc.stdout
    width = {"AVX2": 24}.get(lower)
    if width is not None:
        assert f"panel {width}" in proc.stdout


def test_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv(build.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=build.ISA_ENV):
        build.build_isa()
    monkeypatch.setenv(build.ISA_ENV, "default")
    assert build.build_isa() == "DEFAULT"
    assert build.isa_flags() == build.ISA_FLAGS["DEFAULT"]
    monkeypatch.setenv(build.ISA_ENV, "auto")
    assert build.build_isa() in build.ISA_FLAGS
