"""Test setup: the Triton interpreter on CPU, and when a backend that cannot load is a failure.

Without a GPU, Triton kernels run under the Triton interpreter: the variable has to be set before
triton is first imported, which is why it is done here, at collection time.

Skip or fail (docs/correctness.md): backends that cannot run on this host (cuda and triton without
a GPU) skip, each with its reason. The compiled ``cpp`` backend is *required* when ``CI`` is set or
a C++ compiler is found: there a cpp backend that does not load (a source that does not compile, a
missing header) fails every test that needs it, with the build error, and fails the session even
when the tests that noticed it would have skipped or fallen back to the reference backend. Only on
a host with no compiler and no ``CI`` do cpp tests skip. Tests marked ``own_build`` build their
own extension from a copy of csrc/ (``ALBERT_KERNELS_CSRC``) and never depend on the main build.
"""
import os
import re
import shutil
import sys
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)

_CPP_TEST = re.compile(r"(?<![a-z])cpp(?![a-z])")  # test_cpp_extension.py, [cpp-cpu-...], ...
_STATE: dict = {}


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cpp_required() -> Optional[str]:
    """Why this host must be able to build and load the cpp backend, or None if it need not."""
    if ci():
        return f"CI={os.environ['CI']!r} is set"
    # torch's JIT build uses $CXX, else c++ (importing torch.utils.cpp_extension to ask it would
    # print its "No CUDA runtime" warning in every session on a machine without a GPU)
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    return f"a C++ compiler was found: {compiler}" if compiler else None


def cpp_failure() -> Optional[str]:
    """The failure message when cpp is required here but does not load; None otherwise.
    Computed once per session (this is where the extension is built, or found in the cache)."""
    if "failure" not in _STATE:
        why = cpp_required()
        reason = None
        if why:
            from albert_kernels.backends import unavailable_reason
            reason = unavailable_reason("cpp", "cpu")
        _STATE["failure"] = None if reason is None else (
            f"the cpp backend must load on this host ({why}) but it does not:\n{reason}")
    return _STATE["failure"]


def _needs_cpp(item) -> bool:
    return "own_build" not in item.keywords and bool(_CPP_TEST.search(item.nodeid))


@pytest.fixture
def cpu_backend() -> str:
    """The backend a CPU test means when it means the library's own kernels: "cpp". Fails where
    cpp is required but does not load; on a host without a compiler (and not in CI) it is
    "reference", the only CPU backend there. Pin it explicitly (backend=cpu_backend) instead of
    backend=None, which would fall back to the reference backend without a word."""
    failure = cpp_failure()
    if failure:
        pytest.fail(failure, pytrace=False)
    from albert_kernels.backends import unavailable_reason
    return "cpp" if unavailable_reason("cpp", "cpu") is None else "reference"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "own_build: builds its own extension from a copy of csrc/ (not the main build)")


def pytest_collection_finish(session):
    """At session start: when a collected test needs cpp, build it now and say loudly if it fails."""
    if any(_needs_cpp(item) for item in session.items) and cpp_failure():
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("!", "cpp backend required but unavailable", red=True, bold=True)
            reporter.write_line(cpp_failure())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _needs_cpp(item) and cpp_failure():
        pytest.fail(cpp_failure(), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    # A test that asked for backend=None, or listed available_backends(), saw no cpp and passed
    # on the reference backend: the session still fails.
    if "albert_kernels" in sys.modules and cpp_failure() and exitstatus in (0, 5):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _STATE.get("failure"):
        terminalreporter.write_sep("!", "cpp backend required but unavailable: run FAILED",
                                   red=True, bold=True)
        terminalreporter.write_line(_STATE["failure"])
