"""The extension's build machinery, each test on its own copy of csrc/ (ALBERT_KERNELS_CSRC) and its
own build folder, so that they run, and can fail, even when the main build is broken: a broken
source gives a clear BackendUnavailable and leaves the reference backend working; two processes
building at once compile once; and a broken kernel source makes the test suite itself fail (not
skip) on a host that must build cpp (tests/conftest.py, docs/correctness.md)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.own_build

_PROBE = textwrap.dedent("""
    import json, sys, torch
    import albert_kernels as ak
    result = {"available": ak.available_backends("cpu")}
    try:
        ak.add_layer_norm(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.zeros(4),
                          backend="cpp")
        result["cpp"] = "ok"
    except ak.BackendUnavailable as e:
        result["cpp"] = str(e)
    y = ak.add_layer_norm(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.zeros(4))
    result["default_finite"] = bool(torch.isfinite(y).all())
    print(json.dumps(result))
""")


def _env(csrc: Path, build_dir: Path, **extra) -> dict:
    return dict(os.environ, ALBERT_KERNELS_CSRC=str(csrc), ALBERT_KERNELS_BUILD_DIR=str(build_dir),
                PYTHONPATH=str(REPO), **extra)


def _broken_copy(tmp_path: Path, relative: str) -> Path:
    """A copy of csrc/ whose file `relative` starts with a line that is not C++."""
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    source = csrc / relative
    source.write_text("this is not C++ albert_syntax_error;\n" + source.read_text())
    return csrc


def test_broken_source_gives_backend_unavailable(tmp_path):
    csrc = _broken_copy(tmp_path, "registration.cpp")
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=_env(csrc, tmp_path / "build", MAX_JOBS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "reference" in result["available"] and "cpp" not in result["available"]
    assert "building the C++ extension failed" in result["cpp"]
    # the compiler's own error line, naming the file and line
    assert "registration.cpp:1:1: error:" in result["cpp"], result["cpp"]
    assert result["default_finite"]


def test_broken_kernel_source_fails_the_suite(tmp_path):
    """The proof that CI cannot land a kernel that does not compile: the op tests for cpp, run
    against a copy of csrc/ with a broken attention.cpp and CI set, exit non-zero and say why."""
    csrc = _broken_copy(tmp_path, "cpu/attention.cpp")
    env = _env(csrc, tmp_path / "build", CI="true", MAX_JOBS="2")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_ops.py", "-k", "cpp", "-x"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]   # 1: tests failed (not 0, not a crash or usage error)
    assert "cpp backend required but unavailable" in out, out[-3000:]
    assert "attention.cpp:1:1: error:" in out, out[-3000:]


def test_two_processes_build_at_once(tmp_path):
    # A minimal, valid source tree (the schemas only) keeps this quick; the lock is the same.
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    shutil.copy(REPO / "csrc" / "registration.cpp", csrc / "registration.cpp")
    env = _env(csrc, tmp_path / "build", MAX_JOBS="1")
    code = ("from albert_kernels.backends.extension.build import build; import torch; build(); "
            "print(hasattr(torch.ops.albert_kernels, 'attention_fwd'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
        assert out.strip().endswith("True")
    compiled = [err.count("compiling the C++ extension") for _, err, _ in results]
    assert sorted(compiled) == [0, 1], compiled  # one compiled, the other waited and reused it
