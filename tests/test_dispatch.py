"""One dispatch point: backends/dispatch.py resolve() picks and checks a backend for the ops, our
models and patch_hf alike; the models resolve when built, moved or switched (never in forward:
torch.compile works before any eager call), and run their layers without host syncs."""
import ast
import copy
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import registry, resolve, unavailable_reason
from albert_kernels.backends.op_table import OP_NAMES
from albert_kernels.backends import reference as ref
from albert_kernels.model.layers import key_mask_from_attention_mask

transformers = pytest.importorskip("transformers")

PACKAGE = Path(ak.__file__).resolve().parent
VOCAB, SEQ = 100, 11
SPY = "h1_spy_backend"


def _hf_model(cls_name="AlbertModel", hidden=64, heads=4):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=32, hidden_size=hidden,
                                    num_hidden_layers=2, num_attention_heads=heads,
                                    intermediate_size=128, attn_implementation="sdpa")
    return getattr(transformers, cls_name)(cfg).eval()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 9:] = 0
    return ids, mask


@pytest.fixture
def spy_backend(monkeypatch):
    """The reference kernels behind a registered backend that accepts fp32/fp16 and head dims
    16 and 32 only, and counts its calls."""
    mod = types.ModuleType("albert_kernels_test_spy_backend")
    mod.DTYPES, mod.HEAD_DIMS, mod.calls = {torch.float32, torch.float16}, {16, 32}, []

    def wrap(name):
        def fn(*args, **kwargs):
            mod.calls.append(name)
            return getattr(ref, name)(*args, **kwargs)
        return fn

    for name in OP_NAMES:
        setattr(mod, name, wrap(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    registry.register_backend(registry.BackendSpec(name=SPY, module=mod.__name__,
                                                   probe=lambda d: None if d == "cpu" else "cpu"))
    try:
        yield mod
    finally:
        registry._BACKENDS.pop(SPY, None)


def test_resolve_is_the_only_caller_of_the_registry_lookup():
    callers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("lookup", "get_backend") or \
                    isinstance(node, ast.Name) and node.id in ("lookup", "get_backend"):
                callers.append(path.relative_to(PACKAGE).as_posix())
    assert set(callers) == {"backends/dispatch.py"}, callers


def test_resolve_checks_dtype_and_head_dim(spy_backend):
    kernels = resolve(SPY, "cpu", torch.float32, 32)
    assert kernels.name == SPY and kernels.module is spy_backend
    assert resolve(SPY, torch.device("cpu"), torch.float16) is kernels    # one object per backend
    with pytest.raises(TypeError, match=rf"{SPY}.*float64"):
        resolve(SPY, "cpu", torch.float64)
    with pytest.raises(ValueError, match=rf"{SPY}.*head dim 24"):
        resolve(SPY, "cpu", torch.float32, 24)
    with pytest.raises(ak.BackendUnavailable, match="meta"):
        resolve(SPY, "meta", torch.float32)
    with pytest.raises(TypeError, match="backend"):
        resolve(3, "cpu", torch.float32)


def test_head_dim_error_is_the_same_for_every_entry_point(spy_backend):
    """An unsupported head dim raises the same ValueError from the constructor, from_hf,
    set_backend and patch_hf, before any forward."""
    hf = _hf_model(hidden=48, heads=2)                                   # head dim 24
    cfg = ak.AlbertConfig.from_hf(hf.config)
    messages = []
    for make in (lambda: ak.AlbertModel(cfg, backend=SPY),
                 lambda: ak.AlbertModel.from_hf(hf, backend=SPY),
                 lambda: ak.AlbertForPreTraining(cfg, backend="reference").set_backend(SPY),
                 lambda: ak.patch_hf(copy.deepcopy(hf), backend=SPY)):
        with pytest.raises(ValueError, match="head dim 24") as info:
            make()
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages
    assert spy_backend.calls == []


@pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None,
                    reason=f"triton: {unavailable_reason('triton', 'cpu')}")
def test_patch_hf_triton_head_dim_24_is_a_clear_error():
    hf = _hf_model(hidden=48, heads=2)
    with pytest.raises(ValueError, match=r"'triton' supports head dims \[32, 64, 128\]") as ours:
        ak.AlbertModel.from_hf(hf, backend="triton")
    with pytest.raises(ValueError) as patched:
        ak.patch_hf(hf, backend="triton")
    assert str(patched.value) == str(ours.value)


def test_backend_follows_the_parameters(spy_backend):
    cfg = ak.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                          num_attention_heads=2, intermediate_size=64)
    model = ak.AlbertModel(cfg, backend=SPY)
    assert model.kernels.name == SPY
    with pytest.raises(TypeError, match=rf"{SPY}.*float64"):
        model.double()                                    # resolved again on every move / cast
    model.float()
    with pytest.raises(ak.BackendUnavailable, match="nope"):
        model.set_backend("nope")
    assert model.backend == SPY and model.kernels.name == SPY, "a failed switch changes nothing"
    assert model.set_backend("reference").kernels.name == "reference"
    # A backend for another device is no error until forward (built on CPU, moved later).
    cuda = ak.AlbertModel(cfg, backend="cuda")
    with pytest.raises(ak.BackendUnavailable, match="cuda"):
        cuda(torch.randint(1, VOCAB, (1, 4)))


def test_copies_and_pickles_keep_their_backend():
    cfg = ak.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                          num_attention_heads=2, intermediate_size=64)
    model = ak.AlbertModel(cfg, backend="reference").eval()
    ids, mask = _inputs()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.kernels.name == "reference"
        assert torch.equal(clone(ids, mask)[0], model(ids, mask)[0])


def _tripwire(monkeypatch, active):
    """Make every device->host read raise while active[0] is True."""
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu",
                 "numpy", "nonzero"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if active[0]:
                raise AssertionError(f"host sync: Tensor.{_name} after the input validation")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guarded)


def _arm_after_kernels(monkeypatch, spy_backend, active):
    """From the first kernel call on, host reads raise, except inside the kernels themselves."""
    for name in OP_NAMES:
        kernel = getattr(spy_backend, name)

        def armed(*args, _kernel=kernel, **kwargs):
            active[0] = False                  # the kernel itself may read what it likes
            try:
                return _kernel(*args, **kwargs)
            finally:
                active[0] = True
        monkeypatch.setattr(spy_backend, name, armed)
    _tripwire(monkeypatch, active)


@pytest.mark.parametrize("masked", [True, False])
def test_no_host_sync_after_validation(spy_backend, monkeypatch, masked):
    """From the first kernel call to the end of AlbertModel.forward, no tensor is read on the
    host (outside the kernels themselves): the layers run without per-layer syncs."""
    cfg = ak.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                          num_attention_heads=2, intermediate_size=64, num_hidden_layers=3)
    model = ak.AlbertModel(cfg, backend=SPY).eval()
    ids, mask = _inputs()
    expected = model.set_backend("reference")(ids, mask if masked else None)[0]
    model.set_backend(SPY)
    active = [False]
    _arm_after_kernels(monkeypatch, spy_backend, active)
    try:
        out = model(ids, mask if masked else None)[0]
    finally:
        active[0] = False
    assert spy_backend.calls.count("varlen_attention") == cfg.num_hidden_layers
    assert torch.equal(out, expected)


def test_varlen_attention_check_inputs_false_reads_nothing(spy_backend, monkeypatch):
    """check_inputs=False: the op layer reads nothing on the host (the kernel may)."""
    q = torch.randn(7, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    checked = ak.varlen_attention(q, q, q, cu, 4, backend="reference")
    active = [True]
    _arm_after_kernels(monkeypatch, spy_backend, active)
    try:
        with pytest.raises(AssertionError, match="host sync"):
            ak.varlen_attention(q, q, q, cu, 4, backend=SPY)
        with pytest.raises(TypeError, match="cu_seqlens must be int32"):   # still checked
            ak.varlen_attention(q, q, q, cu.long(), 4, backend=SPY, check_inputs=False)
        active[0] = True
        unchecked = ak.varlen_attention(q, q, q, cu, 4, backend=SPY, check_inputs=False)
    finally:
        active[0] = False
    assert torch.equal(unchecked, checked)
    assert spy_backend.calls == ["varlen_attention"]
    with pytest.raises(TypeError, match="check_inputs"):
        ak.varlen_attention(q, q, q, cu, 4, backend="reference", check_inputs=1)


def test_key_mask_from_attention_mask():
    expect = torch.tensor([[True, True, False], [True, False, False]])
    as_int = expect.long()
    assert key_mask_from_attention_mask(None, 2, 3) is None
    for mask in (expect, as_int, as_int.float(), expect[:, None, None, :].expand(2, 1, 3, 3),
                 torch.where(expect, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]):
        assert torch.equal(key_mask_from_attention_mask(mask, 2, 3), expect)
    for bad in (as_int[:, :2], as_int[None], torch.ones(2, 2, 1, 3)):
        with pytest.raises(ValueError, match="attention_mask"):
            key_mask_from_attention_mask(bad, 2, 3)
    with pytest.raises(ValueError, match="only 0 and 1"):
        key_mask_from_attention_mask(as_int * 2, 2, 3)
    with pytest.raises(ValueError, match="attn_implementation"):
        key_mask_from_attention_mask([[1, 1, 0]], 2, 3)


_COMPILE_FIRST = r"""
import copy, json, sys
import torch, transformers
import albert_kernels as ak
backend = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, attn_implementation="sdpa")
hf = transformers.AlbertForSequenceClassification(cfg).eval()
ids = torch.randint(1, 100, (3, 11)); mask = torch.ones(3, 11, dtype=torch.long); mask[0, 6:] = 0
ours = ak.AlbertModel.from_hf(hf, backend=backend).eval()
pretrain = ak.AlbertForPreTraining(ak.AlbertConfig.from_hf(cfg), backend=backend).eval()
patched = ak.patch_hf(copy.deepcopy(hf), backend=backend)
runs = {"ours": (ours, lambda m: m(ids, mask)[0]),
        "pretraining": (pretrain, lambda m: m(ids, mask).prediction_logits),
        "patched": (patched, lambda m: m(input_ids=ids, attention_mask=mask).logits)}
out = {}
with torch.no_grad():
    for name, (model, call) in runs.items():   # compiled first, before any eager call
        compiled = call(torch.compile(model, fullgraph=True))
        eager = call(model)
        if compiled.dim() == 3:
            compiled, eager = compiled[mask.bool()], eager[mask.bool()]
        out[name] = (compiled - eager).abs().max().item()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp")
                                     if unavailable_reason(b, "cpu") is None])
def test_compile_before_any_eager_call_in_a_fresh_process(backend):
    """torch.compile(fullgraph=True) on freshly built models (ours, the pretraining heads, and
    a patched transformers classifier) in a process that never ran them eagerly."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST, backend], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    diffs = json.loads(line[len("RESULT "):])
    assert set(diffs) == {"ours", "pretraining", "patched"}
    assert all(d <= 1e-5 for d in diffs.values()), diffs
