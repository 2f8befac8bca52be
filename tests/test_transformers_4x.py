"""patch_hf and the transformers comparisons also hold on a 4.x release with SDPA for ALBERT.

The test extra installs transformers 5.x. transformers 4.46.3 (the first 4.x with SDPA for ALBERT)
is installed by .ci/run into a private folder, never at test time (docs/build.md has the command):

    python -m pip install --no-deps --target ~/.cache/albert_kernels/transformers-4.46.3 \
        transformers==4.46.3 tokenizers==0.20.3 huggingface-hub==0.26.5

and named by ALBERT_KERNELS_HF4X (that folder by default). This test runs
tests/test_patch_hf.py against it in a subprocess. Without the folder it skips with the command to
run, except when CI is set: there a missing folder is a failure.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ci

ROOT = Path(__file__).resolve().parents[1]
VERSION = "4.46.3"


def _target() -> Path:
    default = Path.home() / ".cache" / "albert_kernels" / f"transformers-{VERSION}"
    return Path(os.environ.get("ALBERT_KERNELS_HF4X") or default).expanduser()


@pytest.mark.slow
def test_patch_hf_on_transformers_4x():
    target = _target()
    if not (target / "transformers").is_dir():
        message = (f"transformers {VERSION} not found in {target} (ALBERT_KERNELS_HF4X); install it "
                   "with the command in docs/build.md (.ci/run does)")
        if ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.stdout.strip() == VERSION, probe.stdout + probe.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_patch_hf.py")],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
