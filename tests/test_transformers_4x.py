"""patch_hf and the transformers comparisons also hold on a 4.x release with SDPA for ALBERT.

The test extra installs transformers 5.x; this test installs transformers 4.46.3 (the first 4.x
with SDPA for ALBERT) into a private folder once, and runs tests/test_patch_hf.py against it in a
subprocess. Skipped only when pip cannot fetch it (no package index reachable).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "4.46.3"
PINS = [f"transformers=={VERSION}", "tokenizers<0.21", "huggingface-hub<1.0"]


def _target() -> Path:
    root = Path(os.environ.get("ALBERT_KERNELS_BUILD_DIR", Path.home() / ".cache" / "albert_kernels"))
    return root / f"transformers-{VERSION}"


@pytest.mark.slow
def test_patch_hf_on_transformers_4x():
    target = _target()
    if not (target / "transformers").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts",
                               "--target", str(target), *PINS],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"could not install transformers {VERSION}: {proc.stderr.strip()[-300:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.stdout.strip() == VERSION, probe.stdout + probe.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_patch_hf.py")],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
