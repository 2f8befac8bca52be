"""Building the compiled extension (C++ CPU kernels, and CUDA kernels where a GPU build is possible).

Just in time on first use (``build()``, called by ``ops.py``), with ``torch.utils.cpp_extension.load``
and ninja, into a cache directory keyed by everything that changes the binary::

    $ALBERT_KERNELS_BUILD_DIR/<key>    (default root: ~/.cache/albert_kernels)
    key = hash(source files, compiler flags, CPU ISA flags, CUDA archs, torch and Python versions)

Sources: ``csrc/registration.cpp`` + ``csrc/cpu/*.cpp``, plus ``csrc/cuda/*.cu`` only with CUDA,
found by :func:`csrc_dir`: ``ALBERT_KERNELS_CSRC`` if set (the tests point it at a broken copy to
check that a bad source gives a clear :class:`~albert_kernels.errors.BackendUnavailable`), else the
copy a wheel carries as ``albert_kernels/csrc`` (setup.py puts it there), else the repository's
``csrc/`` (an editable checkout). docs/build.md lists every build environment variable.

Two processes may build at once: an ``fcntl.flock`` on ``<build dir>/albert_build.lock`` makes
the second wait and then reuse the first one's result. The compiler's output (with ``-Xptxas -v``
for CUDA) is kept in ``<build dir>/build.log``.

The CPU code is vectorised with ATen's ``at::vec::Vectorized`` for the ISA this machine has
(AVX-512 or AVX2+FMA, read from /proc/cpuinfo), never ``-march=native``; the chosen flags are part
of the cache key, so a cache shared between machines never hands one CPU another's binary.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import hashlib
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from ...errors import BackendUnavailable

EXT_NAME = "albert_kernels_ext"
PACKAGE_ROOT = Path(__file__).resolve().parents[3]   # the repository root in a checkout
PACKAGED_CSRC = Path(__file__).resolve().parents[2] / "csrc"  # albert_kernels/csrc in a wheel
DEFAULT_CUDA_ARCH = "8.0;9.0"
_loaded: dict = {}  # the one library loaded in this process: {"key": ..., "path": ...}


def csrc_dir() -> Path:
    """The C++/CUDA source tree to build: $ALBERT_KERNELS_CSRC, else the sources packaged inside
    an installed wheel (albert_kernels/csrc), else the checkout's csrc/. A tree without
    registration.cpp is passed over; when none has it, build() names the missing files."""
    override = os.environ.get("ALBERT_KERNELS_CSRC")
    if override:
        return Path(override).expanduser().resolve()
    checkout = PACKAGE_ROOT / "csrc"
    for root in (PACKAGED_CSRC, checkout):
        if (root / "registration.cpp").is_file():
            return root.resolve()
    return checkout.resolve()


def cache_root() -> Path:
    default = Path.home() / ".cache" / "albert_kernels"
    return Path(os.environ.get("ALBERT_KERNELS_BUILD_DIR", default)).expanduser()


def sources(with_cuda: bool) -> list[Path]:
    root = csrc_dir()
    files = [root / "registration.cpp"] + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once per
    process: the kernel choice asks on every frozen forward."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


# The vector ISAs the CPU kernels are built for (ATen's CPU_CAPABILITY names): the flags, and the
# /proc/cpuinfo flags a CPU needs for them. Every one must compile (tests/test_cpp_extension.py).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
_ISA_NEEDS = {"AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
              "AVX2": {"avx2", "fma", "f16c"}}


ISA_ENV = "ALBERT_KERNELS_CPU_ISA"


def build_isa() -> str:
    """The vector ISA the CPU kernels are compiled for (a key of :data:`ISA_FLAGS`): the best one
    this CPU has, or a lower one named by ``$ALBERT_KERNELS_CPU_ISA`` (``avx512``, ``avx2``,
    ``default``; ``auto`` or unset: the best), so that an AVX-512 machine can build and run the
    AVX2 kernels and the portable ones. Raises ValueError naming the variable for an unknown ISA
    or one this CPU cannot run."""
    supported = ["DEFAULT"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = _cpu_flags()
        supported = [isa for isa in ("AVX512", "AVX2") if _ISA_NEEDS[isa] <= flags] + supported
    want = os.environ.get(ISA_ENV, "").strip().upper()
    if want in ("", "AUTO"):
        return supported[0]
    if want not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV} must be auto, {', '.join(i.lower() for i in ISA_FLAGS)}, "
                         f"got {os.environ[ISA_ENV]!r}")
    if want not in supported:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r}: this CPU cannot run it (it has "
                         f"{', '.join(i.lower() for i in supported)})")
    return want


def isa_flags() -> list[str]:
    """Compiler flags for ATen's vectorisation at :func:`build_isa` (part of the cache key)."""
    return ISA_FLAGS[build_isa()]


def cxx_flags() -> list[str]:
    # -ffp-contract=off: FMAs only where the code asks (at::vec::fmadd), so that a value recomputed
    # in backward (e.g. the scaled score) rounds exactly as it did in forward
    return ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG", *isa_flags()]


def nvcc_flags(cuda_arch: str) -> list[str]:
    # exact math: no --use_fast_math. No -std: torch's cpp_extension adds the standard its
    # headers need (c++17 with torch 2.11, c++20 with torch 2.14; scripts/check_cuda_build.py
    # torch_std reads it off torch's own build).
    flags = ["-O3", "-Xptxas", "-v"]
    for arch in [a.strip() for a in cuda_arch.split(";") if a.strip()]:
        num = arch.replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


LD_FLAGS = ["-fopenmp"]
CUDA_LD_FLAGS = ["-lcublasLt", "-lcublas"]


def _cublas_dirs() -> tuple[list[str], list[str]]:
    """(include dirs, lib dirs) holding cuBLAS(Lt): the toolkit's, else the nvidia-cublas wheel's
    (pip builds of torch ship cuBLAS as a wheel, with versioned .so files only)."""
    import importlib.util
    home = _default_cuda_home()
    candidates = [(Path(home, "include"), Path(home, "lib64"))] if home else []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cu12", "cublas"):
            candidates.append((Path(root, sub, "include"), Path(root, sub, "lib")))
    incs = [str(i) for i, _ in candidates if (i / "cublasLt.h").exists()]
    libs = [str(lib) for _, lib in candidates if any(lib.glob("libcublasLt.so*"))]
    return incs, libs


def cuda_include_paths() -> list[str]:
    return _cublas_dirs()[0]


def cuda_ld_flags() -> list[str]:
    """-lcublasLt -lcublas, pointed at the first directory that has them (-l:libX.so.N when only
    versioned files exist); the same libraries torch itself loads."""
    _, libs = _cublas_dirs()
    if not libs:
        return list(CUDA_LD_FLAGS)
    lib = Path(libs[0])
    flags = [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    for name in ("cublasLt", "cublas"):
        if (lib / f"lib{name}.so").exists():
            flags.append(f"-l{name}")
        else:
            versioned = sorted(p.name for p in lib.glob(f"lib{name}.so.*"))
            flags.append(f"-l:{versioned[0]}" if versioned else f"-l{name}")
    return flags


def find_nvcc() -> Optional[str]:
    """The project's one nvcc lookup (the build, `albert-kernels info`, scripts/ and the tests all
    use it): ``$CUDA_HOME/bin/nvcc`` when CUDA_HOME is set (a CUDA_HOME without nvcc gives None:
    an explicit setting is never silently replaced), else ``/usr/local/cuda/bin/nvcc``, else the
    first ``nvcc`` on PATH. Returns the path, or None when there is no nvcc."""
    home = os.environ.get("CUDA_HOME")
    if home:
        nvcc = Path(home, "bin", "nvcc")
        return str(nvcc) if nvcc.is_file() else None
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else shutil.which("nvcc")


def _default_cuda_home() -> Optional[str]:
    """$CUDA_HOME if set, else the toolkit that holds find_nvcc()'s nvcc."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = find_nvcc()
    return str(Path(nvcc).parent.parent) if nvcc else None


def cuda_buildable() -> bool:
    """with_cuda=None means: CUDA build of torch, nvcc found, and a GPU to run the result on."""
    import torch
    return bool(torch.version.cuda) and find_nvcc() is not None and torch.cuda.is_available()


def cache_key(files: list[Path], cflags: list[str], cuda_flags: list[str]) -> str:
    import torch
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for header in sorted(csrc_dir().rglob("*.h")) + sorted(csrc_dir().rglob("*.cuh")):
        h.update(header.name.encode())
        h.update(header.read_bytes())
    h.update(repr((cflags, cuda_flags, LD_FLAGS, torch.__version__, torch.version.cuda,
                   sys.version_info[:2], platform.machine())).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    import fcntl
    with open(build_dir / "albert_build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # torch's own FileBaton ("lock") may be left over by a build that was killed; nobody
            # else can be building here while we hold the flock, so it is stale.
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout/stderr (and so the compiler's) to log_path while building."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _first_errors(text: str, limit: int = 8) -> str:
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b", ln, re.IGNORECASE)]
    return "\n".join(lines[:limit]) or "\n".join(text.strip().splitlines()[-limit:])


def build(with_cuda: Optional[bool] = None, cuda_arch: Optional[str] = None,
          verbose: bool = False) -> str:
    """Compile (if not cached) and load the extension; returns the path of the shared library.

    with_cuda=None: CUDA sources only if this is a CUDA build of torch, nvcc exists and a GPU is
    visible. cuda_arch: "8.0;9.0" by default. Raises BackendUnavailable with the compiler's
    first error lines if the build fails.
    """
    if with_cuda is None:
        with_cuda = cuda_buildable()
    cuda_arch = cuda_arch or os.environ.get("ALBERT_KERNELS_CUDA_ARCH") or DEFAULT_CUDA_ARCH
    files = sources(with_cuda)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise BackendUnavailable(
            f"extension sources not found: {', '.join(missing)} (looked in $ALBERT_KERNELS_CSRC, "
            f"{PACKAGED_CSRC} and {PACKAGE_ROOT / 'csrc'})")
    cflags = cxx_flags()
    cuda_flags = nvcc_flags(cuda_arch) if with_cuda else []
    key = cache_key(files, cflags, cuda_flags)
    if _loaded:
        if _loaded["key"] == key:
            return _loaded["path"]
        raise BackendUnavailable(
            f"another build of the extension ({_loaded['path']}) is already loaded in this "
            "process; build this variant in a fresh process (albert-kernels build)")
    build_dir = cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir):
        path = _compile_and_load(files, cflags, cuda_flags, with_cuda, build_dir, verbose)
    _loaded.update(key=key, path=path)
    return path


def _compile_and_load(files, cflags, cuda_flags, with_cuda, build_dir: Path, verbose) -> str:
    if _default_cuda_home():  # torch guesses /usr/local (and warns) when CUDA_HOME is unset
        os.environ.setdefault("CUDA_HOME", _default_cuda_home())
    # torch warns "No CUDA runtime is found" on a machine without a GPU: true, and irrelevant to
    # a CPU build, so it is kept out of every user's output.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension
    if with_cuda and os.environ.get("CUDA_HOME"):
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # read once at import by torch
    built = build_dir / f"{EXT_NAME}.so"
    if not built.exists():
        print("albert_kernels: compiling the C++ extension (once, ~1 min)...", file=sys.stderr,
              flush=True)
    log_path = build_dir / "build.log"
    try:
        with _output_to(log_path):
            cpp_extension.load(
                name=EXT_NAME, sources=[str(f) for f in files], extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags or None,
                extra_ldflags=LD_FLAGS + (cuda_ld_flags() if with_cuda else []),
                extra_include_paths=[str(csrc_dir() / "cpu")] + (
                    cuda_include_paths() if with_cuda else []),
                build_directory=str(build_dir),
                verbose=True, with_cuda=with_cuda, is_python_module=False)
    except Exception as e:  # compiler, linker or loader error
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise BackendUnavailable(
            f"building the C++ extension failed (full log: {log_path}):\n"
            f"{_first_errors(log + chr(10) + str(e))}") from e
    finally:
        if verbose and log_path.exists():
            sys.stderr.write(log_path.read_text(errors="replace"))
    return str(built)


def setuptools_extension():
    """The extension for setup.py (ALBERT_KERNELS_BUILD_EXT=1): albert_kernels._C, built with
    this machine's ISA flags; with CUDA sources when torch is a CUDA build and nvcc is found."""
    import torch
    from torch.utils import cpp_extension
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    files = [str(f.relative_to(PACKAGE_ROOT)) for f in sources(with_cuda)]
    kwargs = dict(name="albert_kernels._C", sources=files,
                  include_dirs=[str(csrc_dir() / "cpu")] + (cuda_include_paths() if with_cuda else []),
                  extra_compile_args={"cxx": cxx_flags()},
                  extra_link_args=LD_FLAGS + (cuda_ld_flags() if with_cuda else []))
    if with_cuda:
        arch = os.environ.get("ALBERT_KERNELS_CUDA_ARCH") or DEFAULT_CUDA_ARCH
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags(arch)
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)
