"""setup.py: metadata lives in pyproject.toml; this file ships the kernel sources and, opt-in, the
compiled extension.

The C++/CUDA sources (csrc/ at the repository root) are copied into every built package as
``albert_kernels/csrc`` (``build_py`` below), so that an installed wheel can build its extension
just in time on first use (albert_kernels/backends/extension/build.py) exactly as a checkout does;
the sdist carries csrc/ through MANIFEST.in. An editable install (``pip install -e .``) copies
nothing and builds from the checkout's csrc/.

Building the extension into the wheel is opt-in with ALBERT_KERNELS_BUILD_EXT=1 (albert_kernels._C,
loaded in place of the JIT build), so that ``pip install -e .`` stays fast and never fails on a
compiler; such a wheel carries the sources too. See docs/build.md.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
_SKIP = shutil.ignore_patterns("__pycache__", "*.o", "*.so", "*.pyc", ".ninja*", "build.ninja")


class build_py_with_csrc(build_py):
    """build_py, plus csrc/ copied to <build_lib>/albert_kernels/csrc (not in editable mode)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        if not (CSRC / "registration.cpp").is_file():
            raise FileNotFoundError(f"kernel sources not found: {CSRC / 'registration.cpp'}")
        target = Path(self.build_lib) / "albert_kernels" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=_SKIP)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        target = Path(self.build_lib) / "albert_kernels" / "csrc"
        return outputs + [str(p) for p in sorted(target.rglob("*")) if p.is_file()]


ext_modules, cmdclass = [], {"build_py": build_py_with_csrc}
if os.environ.get("ALBERT_KERNELS_BUILD_EXT") == "1":
    # this tree's build.py (and so its csrc/), not that of an albert_kernels installed elsewhere
    sys.path.insert(0, str(CSRC.parent))
    from albert_kernels.backends.extension.build import setuptools_extension  # noqa: E402
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [setuptools_extension()]
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
