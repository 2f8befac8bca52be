"""The real all-MiniLM-L6-v2 through sentence-transformers: ``encode`` with the model loaded with
attn_implementation="albert_kernels" gives the unpatched embeddings (transformers' SDPA, float32)
within the float32 error budget: single sentences and a ragged batch of 32, judged on max abs error
and min cosine against the same model in float64 (the budget's gold)."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.integrations import hf_attention
from albert_kernels.tools.budget import check_budget
from minilm import SENTENCES, minilm_path  # noqa: F401  (the fixture)


_MODELS: dict = {}


@pytest.fixture
def models(minilm_path, cpu_backend):   # noqa: F811
    """(unpatched float32, ours, unpatched float64), loaded once per module."""
    if cpu_backend not in _MODELS:
        _MODELS[cpu_backend] = _load(minilm_path, cpu_backend)
    return _MODELS[cpu_backend]


def _load(minilm_path, cpu_backend):   # noqa: F811
    from sentence_transformers import SentenceTransformer
    name = ak.register_hf_attention(f"albert_kernels_{cpu_backend}", backend=cpu_backend)
    base = SentenceTransformer(str(minilm_path), device="cpu")
    ours = SentenceTransformer(str(minilm_path), device="cpu",
                               model_kwargs={"attn_implementation": name})
    gold = copy.deepcopy(base).double()
    assert ours[0].auto_model.config._attn_implementation == name
    assert base[0].auto_model.config._attn_implementation == "sdpa"
    return base, ours, gold


def _encode(model, sentences, batch_size):
    return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                        normalize_embeddings=False)


@pytest.mark.parametrize("case", ["single", "ragged32"])
def test_encode_matches_unpatched(models, case, monkeypatch):
    base, ours, gold = models
    fused = {"n": 0}
    original = hf_attention.attention

    def counting(*args, **kwargs):
        fused["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", counting)
    if case == "single":
        sentences, batch_size = [SENTENCES[0], SENTENCES[6], SENTENCES[24]], 1
    else:
        sentences, batch_size = SENTENCES, 32
    want = _encode(base, sentences, batch_size)
    got = _encode(ours, sentences, batch_size)
    exact = _encode(gold, sentences, batch_size)
    assert got.shape == want.shape == (len(sentences), 384)
    assert fused["n"] == 6 * (len(sentences) // batch_size), "every layer ran our attention"
    result = check_budget(got, want, exact)
    assert result.ok, f"embeddings: {result}"
    cosine = torch.nn.functional.cosine_similarity(got.double(), exact, dim=-1).min().item()
    cosine_base = torch.nn.functional.cosine_similarity(want.double(), exact, dim=-1).min().item()
    assert cosine >= 1 - 2 * (1 - cosine_base) - 1e-6, (cosine, cosine_base)
    max_abs = (got - want).abs().max().item()
    assert max_abs <= 1e-4, max_abs


def test_st_bench_groundwork(minilm_path, cpu_backend):   # noqa: F811
    """tools/st_bench.py times both contenders on the real model and reports each one's quality
    against the unpatched embeddings (here: one workload, the fewest rounds), without importing
    the serving runtimes (they are optional; other tests may have imported them already)."""
    import sys
    from albert_kernels.tools import st_bench
    runtimes = lambda: {m for m in ("onnxruntime", "openvino") if m in sys.modules}
    before = runtimes()
    rows = st_bench.run_st_bench(str(minilm_path), workloads=("ragged 32",), min_time_s=0.0,
                                 backend=cpu_backend, threads=1)
    assert runtimes() == before
    assert [r.name for r in rows] == [st_bench.BASELINE, st_bench.OURS]
    base, ours = rows
    assert base.min_cosine == 1.0 and base.max_abs == 0.0 and base.speedup_vs_sdpa == 1.0
    assert ours.min_cosine > 0.99999 and ours.max_abs <= 1e-4
    assert all(r.median_s > 0 and r.repeats >= 1 for r in rows)
    table = st_bench.format_rows(rows)
    assert st_bench.OURS in table and "min cos" in table


_PATCHED: dict = {}


@pytest.mark.parametrize("case", ["single", "ragged32"])
def test_patch_hf_sentence_transformer(minilm_path, cpu_backend, case, monkeypatch):   # noqa: F811
    """``ak.patch_hf(st_model)`` patches the BertModel inside a SentenceTransformer: its encoder
    runs padding-free on the core (every layer, counted), and ``encode`` gives the unpatched
    embeddings within the float32 error budget, one sentence at a time and a ragged batch of 32."""
    from albert_kernels.model import core
    from albert_kernels.model.hf_family import PatchedFamilyEncoderMixin
    from sentence_transformers import SentenceTransformer
    if cpu_backend not in _PATCHED:
        base = SentenceTransformer(str(minilm_path), device="cpu")
        gold = copy.deepcopy(base).double()
        ours = ak.patch_hf(copy.deepcopy(base), backend=cpu_backend)
        _PATCHED[cpu_backend] = base, ours, gold
    base, ours, gold = _PATCHED[cpu_backend]
    assert isinstance(ours[0].auto_model.encoder, PatchedFamilyEncoderMixin)
    assert not isinstance(base[0].auto_model.encoder, PatchedFamilyEncoderMixin)
    layers = {"n": 0}
    original = core.run_layer

    def counting(*args, **kwargs):
        layers["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "run_layer", counting)
    if case == "single":
        sentences, batch_size = [SENTENCES[0], SENTENCES[6], SENTENCES[24]], 1
    else:
        sentences, batch_size = SENTENCES, 32
    want = _encode(base, sentences, batch_size)
    assert layers["n"] == 0
    got = _encode(ours, sentences, batch_size)
    exact = _encode(gold, sentences, batch_size)
    assert layers["n"] == 6 * (len(sentences) // batch_size), "every layer ran on the core"
    assert got.shape == want.shape == (len(sentences), 384)
    result = check_budget(got, want, exact)
    assert result.ok, f"embeddings: {result}"
    cosine = torch.nn.functional.cosine_similarity(got.double(), exact, dim=-1).min().item()
    cosine_base = torch.nn.functional.cosine_similarity(want.double(), exact, dim=-1).min().item()
    assert cosine >= 1 - 2 * (1 - cosine_base) - 1e-6, (cosine, cosine_base)
    assert (got - want).abs().max().item() <= 1e-4
