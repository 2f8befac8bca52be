"""The built packages carry their kernels: a wheel and an sdist, each installed into a fresh virtual
environment outside the checkout, build the C++ extension from the sources they ship and run it.

The checkout's files (tracked and untracked, not ignored) are copied to a temporary folder first,
so that no build/ or egg-info of the shared tree leaks into the packages. The virtual environment
is built for the interpreter that runs the tests, with what that interpreter has: a .pth file in
its site-packages lists the running interpreter's package folders (its sys.path beyond the
standard library and the checkout), so torch, numpy, ninja and setuptools are found as the tests
see them, whether pytest runs in a user's venv or in the base interpreter (`--system-site-packages`
would expose the base interpreter's packages instead of the running venv's). Nothing is
downloaded; the package is installed with --no-deps. Each first use compiles the extension (~70 s
on 2 cores) from the sources its package installed, into one private ALBERT_KERNELS_BUILD_DIR: the
two land under the same cache key (the key hashes every source and header, so the sdist's sources
are byte for byte the wheel's), and ninja compiles again for the sdist because the source paths
differ. Marked slow; .ci/run runs it.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# own_build: these tests build the extension from the packaged sources, not the checkout's build
pytestmark = [pytest.mark.slow, pytest.mark.own_build]

# Run inside the virtual environment, from a folder outside the checkout.
_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    import albert_kernels as ak
    from albert_kernels.backends.extension import build
    from albert_kernels.tools.budget import check_budget

    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(64, 96, generator=gen), torch.randn(64, 96, generator=gen)
    w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
    y = ak.add_layer_norm(x, r, w, b, eps=1e-12, backend="cpp")
    ln = lambda *t: torch.nn.functional.layer_norm(t[0] + t[1], (96,), t[2], t[3], 1e-12)
    ln_budget = check_budget(y, ln(x, r, w, b), ln(*(t.double() for t in (x, r, w, b))))

    q, k, v = (torch.randn(2, 3, 40, 32, generator=gen) for _ in range(3))
    mask = torch.arange(40)[None, :] < torch.tensor([40, 17])[:, None]
    o = ak.attention(q, k, v, key_padding_mask=mask, backend="cpp")
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :])
    att_budget = check_budget(o, sdpa(q, k, v), sdpa(q.double(), k.double(), v.double()))

    print(json.dumps({
        "package": ak.__file__, "csrc": str(build.csrc_dir()), "prefix": sys.prefix,
        "available": ak.available_backends("cpu"), "loaded": build._loaded.get("path"),
        "add_layer_norm": [ln_budget.ok, str(ln_budget)],
        "attention": [att_budget.ok, str(att_budget)],
    }))
""")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy_checkout(dest: Path) -> Path:
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                  cwd=REPO).stdout.split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _clean_env(build_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ALBERT_KERNELS_CSRC", "PIP_REQUIRE_VIRTUALENV")}
    return dict(env, ALBERT_KERNELS_BUILD_DIR=str(build_dir), PIP_NO_INDEX="1",
                PIP_DISABLE_PIP_VERSION_CHECK="1")


def package_dirs() -> list[str]:
    """The running interpreter's package folders: its sys.path without the standard library, the
    checkout (PYTHONPATH=$PWD) and entries that are not folders (editable-install hooks)."""
    stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
    out = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if not entry or not path.is_dir() or path == REPO or REPO in path.parents:
            continue
        standard = path in stdlib or any(s in path.parents for s in stdlib)
        if standard and "site-packages" not in path.parts:   # lib-dynload and the like
            continue
        if (path / "albert_kernels").is_dir():     # another copy of this package: not visible
            continue
        if str(path) not in out:
            out.append(str(path))
    return out


def make_venv(env_dir: Path) -> Path:
    """A virtual environment for this interpreter that sees this interpreter's packages (torch,
    setuptools, ...) after its own; its python."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True,
                          env=_clean_env(env_dir)).stdout.strip()
    (Path(site) / "running_interpreter.pth").write_text("\n".join(package_dirs()) + "\n")
    return python


def test_venv_sees_the_running_interpreters_packages(tmp_path):
    """The venv imports torch and setuptools from where the tests import them, and can build a
    wheel (setuptools >= 70.1 has bdist_wheel; older ones need the `wheel` package, which the
    test extra installs)."""
    python = make_venv(tmp_path / "venv")
    probe = ("import json, setuptools, torch; from setuptools.dist import Distribution; "
             "print(json.dumps([torch.__file__, setuptools.__file__, "
             "Distribution().get_command_class('bdist_wheel').__module__]))")
    torch_file, setuptools_file, _ = json.loads(
        _run([str(python), "-c", probe], env=_clean_env(tmp_path), cwd=tmp_path).stdout)
    import setuptools
    import torch
    assert Path(torch_file) == Path(torch.__file__)
    assert Path(setuptools_file) == Path(setuptools.__file__)


def _install_and_probe(package: Path, where: Path, build_dir: Path) -> dict:
    env_dir = where / "venv"
    python = make_venv(env_dir)
    env = _clean_env(build_dir)
    # this interpreter's pip, installing into the venv (which builds with this interpreter's
    # setuptools, listed in its .pth file)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-build-isolation", str(package)], env=env, cwd=where)
    run_dir = where / "elsewhere"
    run_dir.mkdir()
    out = _run([str(python), "-c", _PROBE], env=env, cwd=run_dir).stdout
    result = json.loads(out.strip().splitlines()[-1])
    installed = Path(result["package"]).resolve()
    assert env_dir.resolve() in installed.parents, result   # the venv's copy, not the checkout
    assert Path(result["csrc"]) == installed.parent / "csrc", result  # the packaged sources
    assert "cpp" in result["available"], result
    assert Path(result["loaded"]).resolve().is_relative_to(build_dir.resolve()), result
    assert result["add_layer_norm"][0], result["add_layer_norm"][1]
    assert result["attention"][0], result["attention"][1]
    return result


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """(wheel, sdist) built from a copy of the checkout, without network or build isolation."""
    root = tmp_path_factory.mktemp("packages")
    src = _copy_checkout(root / "src")
    env = _clean_env(root / "unused-build")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "-w", str(root / "dist"), str(src)], env=env, cwd=root)
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
          "build_meta.build_sdist(sys.argv[1])", str(root / "dist")], env=env, cwd=src)
    wheel, = (root / "dist").glob("*.whl")
    sdist, = (root / "dist").glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ak-build")


def test_packages_list_the_kernel_sources(packages):
    import tarfile
    import zipfile
    wheel, sdist = packages
    expected = {p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*")
                if p.is_file() and p.suffix in (".cpp", ".h", ".cu", ".cuh")}
    in_wheel = {n.split("albert_kernels/csrc/", 1)[1] for n in zipfile.ZipFile(wheel).namelist()
                if n.startswith("albert_kernels/csrc/")}
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/csrc/", 1)[1] for n in tar.getnames()
                    if "/csrc/" in n and not n.endswith("/")}
    assert expected and expected <= in_wheel, expected - in_wheel
    assert expected <= in_sdist, expected - in_sdist


def test_wheel_builds_and_runs_cpp_outside_the_checkout(packages, build_dir, tmp_path):
    _install_and_probe(packages[0], tmp_path, build_dir)


def test_sdist_installs_and_runs_cpp_outside_the_checkout(packages, build_dir, tmp_path):
    result = _install_and_probe(packages[1], tmp_path, build_dir)
    # Same sources as the wheel: the same cache key, in the private build dir.
    assert Path(result["loaded"]).resolve().parent.parent == build_dir.resolve()
