"""setup.py: metadata lives in pyproject.toml; this file exists for the compiled extension.

The C++/CUDA extension is built just in time on first use (albert_kernels/backends/extension/build.py)
or ahead of time with `albert-kernels build`. Building it into a wheel here is opt-in with
ALBERT_KERNELS_BUILD_EXT=1 so that `pip install -e .` stays fast and never fails on a compiler.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("ALBERT_KERNELS_BUILD_EXT") == "1":
    from albert_kernels.backends.extension.build import setuptools_extension  # noqa: E402
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [setuptools_extension()]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
