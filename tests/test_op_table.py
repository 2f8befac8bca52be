"""The op table (backends/op_table.py) is the one list of ops: every other list derives from it."""
import sys
import types

import pytest
import torch

import albert_kernels as ak
from albert_kernels import ops as public_ops
from albert_kernels.backends import autocast, registry, resolve
from albert_kernels.backends.dispatch import Kernels
from albert_kernels.backends.op_table import BY_NAME, EXTENSION_OPS, OP_NAMES, OPS, missing_ops
from albert_kernels.errors import BackendUnavailable


def test_names_are_unique_and_classes_known():
    assert len(set(OP_NAMES)) == len(OPS)
    assert len(set(EXTENSION_OPS)) == 2 * len(OPS)
    assert {op.autocast for op in OPS} <= {"lower", "float32"}


def test_public_ops_and_package_exports_are_the_table():
    for name in OP_NAMES:
        assert name in public_ops.__all__ and name in ak.__all__
        assert getattr(ak, name) is getattr(public_ops, name)
        assert callable(getattr(ak, name))
    assert len(ak.__all__) == len(set(ak.__all__))


def test_every_op_has_a_kernels_method_and_an_autocast_class():
    for op in OPS:
        method = getattr(Kernels, op.name)
        assert method.__name__ == op.name and op.signature in method.__doc__
        assert (op.name in autocast.LOW_PRECISION_OPS) == (op.autocast == "lower")
        assert (op.name in autocast.FLOAT32_OPS) == (op.autocast == "float32")


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_loaded_backends_define_every_op(name):
    module = resolve(name, "cpu", torch.float32).module
    assert missing_ops(module) == []
    assert set(OP_NAMES) <= set(module.__all__)


def test_extension_declares_every_table_op():
    resolve("cpp", "cpu", torch.float32)  # loads the extension
    for name in EXTENSION_OPS:
        assert hasattr(torch.ops.albert_kernels, name), name


def test_kernels_method_calls_the_backend_and_autocasts():
    k = resolve("reference", "cpu", torch.float32)
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    out = k.add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + r, (8,), w, b, 1e-5))
    with torch.autocast("cpu", torch.bfloat16):  # "float32" class: inputs cast to fp32
        assert k.add_layer_norm(x.bfloat16(), r, w, b, 1e-5).dtype == torch.float32
        assert k.linear_gelu(x, torch.randn(4, 8), torch.zeros(4), "none").dtype == torch.bfloat16


def test_backend_lacking_an_op_is_unavailable_naming_it(monkeypatch):
    mod = types.ModuleType("albert_kernels_test_partial_backend")
    mod.DTYPES, mod.HEAD_DIMS = {torch.float32}, None
    ref = resolve("reference", "cpu", torch.float32).module
    for name in OP_NAMES[:-1]:
        setattr(mod, name, getattr(ref, name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    registry.register_backend(registry.BackendSpec(name="partial", module=mod.__name__,
                                                   probe=lambda d: None))
    try:
        with pytest.raises(BackendUnavailable, match=OP_NAMES[-1]):
            resolve("partial", "cpu", torch.float32)
        assert "partial" not in ak.available_backends("cpu")
    finally:
        registry._BACKENDS.pop("partial", None)
    assert BY_NAME[OP_NAMES[-1]].name == OP_NAMES[-1]
