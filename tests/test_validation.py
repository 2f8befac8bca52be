"""Bad input (docs/api.md): every op raises ValueError or TypeError naming the argument, before any
backend runs; unknown or unwilling backends raise BackendUnavailable / TypeError / ValueError.

Device mismatches are tested with 'meta' tensors (no GPU needed): a meta tensor is on another
device than a CPU tensor, so the same checks fire as for CPU vs CUDA.
"""
import sys
import types

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import registry
from albert_kernels.backends.registry import BackendSpec, register_backend
from albert_kernels.backends.op_table import OP_NAMES

BAD = (ValueError, TypeError)
META = torch.device("meta")


def t(*shape, dtype=torch.float32, device="cpu"):
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=torch.float32).to(dtype).to(device)
    return torch.zeros(*shape, dtype=dtype, device=device)


def raises(exc, name):
    """The error type and a message that names the argument (as a whole word)."""
    return pytest.raises(exc, match=rf"\b{name}\b")


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

B, H, L, D = 2, 2, 5, 8


def _qkv(**kw):
    return [t(B, H, L, D, **kw) for _ in range(3)]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
class TestAttentionTensors:
    def _call(self, which, bad, **kw):
        args = _qkv()
        args[which] = bad
        return ak.attention(*args, **kw)

    def test_non_tensor(self, which):
        name = "qkv"[which]
        with raises(TypeError, name):
            self._call(which, [[1.0]])
        with raises(TypeError, name):
            self._call(which, None)
        with raises(TypeError, name):
            self._call(which, t(B, H, L, D).numpy())

    @pytest.mark.parametrize("shape", [(H, L, D), (B, H, L, D, 1), (D,)], ids=["rank3", "rank5", "rank1"])
    def test_wrong_rank(self, which, shape):
        with raises(ValueError, "qkv"[which]):
            self._call(which, t(*shape))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
    def test_non_float_dtype(self, which, dtype):
        with raises(TypeError, "qkv"[which]):
            self._call(which, t(B, H, L, D, dtype=dtype))

    def test_dtype_mismatch(self, which):
        if which == 0:  # q is the one the others are compared against
            with raises(TypeError, "k"):
                self._call(0, t(B, H, L, D, dtype=torch.float16))
        else:
            with raises(TypeError, "qkv"[which]):
                self._call(which, t(B, H, L, D, dtype=torch.bfloat16))

    @pytest.mark.parametrize("shape", [(B, H, L + 1, D), (B, H + 1, L, D), (B + 1, H, L, D),
                                       (B, H, L, D * 2)], ids=["L", "H", "B", "D"])
    def test_shape_mismatch(self, which, shape):
        name = "k" if which == 0 else "qkv"[which]
        with raises(ValueError, name):
            self._call(which, t(*shape))

    def test_device_mismatch(self, which):
        name = "k" if which == 0 else "qkv"[which]
        with raises(ValueError, name):
            self._call(which, t(B, H, L, D, device=META))


@pytest.mark.parametrize("mask", [
    pytest.param(lambda: t(B, L), id="float"),
    pytest.param(lambda: torch.ones(B, L, dtype=torch.int64), id="int64"),
    pytest.param(lambda: torch.ones(B, L, dtype=torch.uint8), id="uint8"),
    pytest.param(lambda: torch.ones(B, L + 1, dtype=torch.bool), id="long"),
    pytest.param(lambda: torch.ones(B + 1, L, dtype=torch.bool), id="batch"),
    pytest.param(lambda: torch.ones(L, dtype=torch.bool), id="rank1"),
    pytest.param(lambda: torch.ones(B, 1, 1, L, dtype=torch.bool), id="hf_extended"),
    pytest.param(lambda: torch.ones(B, H, L, L, dtype=torch.bool), id="full_matrix"),
])
def test_attention_mask_not_bool_BL(mask):
    with raises(BAD, "key_padding_mask"):
        ak.attention(*_qkv(), key_padding_mask=mask())


def test_attention_mask_non_tensor_and_device():
    with raises(TypeError, "key_padding_mask"):
        ak.attention(*_qkv(), key_padding_mask=[[True] * L] * B)
    with raises(ValueError, "key_padding_mask"):
        ak.attention(*_qkv(), key_padding_mask=torch.ones(B, L, dtype=torch.bool, device=META))


@pytest.mark.parametrize("scale", ["0.1", [0.1], True, torch.tensor(0.1)], ids=repr)
def test_attention_bad_scale(scale):
    with raises(TypeError, "scale"):
        ak.attention(*_qkv(), scale=scale)


# ---------------------------------------------------------------------------------------------
# varlen_attention
# ---------------------------------------------------------------------------------------------

T = 7
CU = [0, 3, 7]


def _packed(**kw):
    return [t(T, H, D, **kw) for _ in range(3)]


def _cu(values, dtype=torch.int32, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_varlen_tensor_checks(which):
    name = "qkv"[which]
    other = "k" if which == 0 else name

    def call(bad):
        args = _packed()
        args[which] = bad
        return ak.varlen_attention(*args, _cu(CU), 4)

    with raises(TypeError, name):
        call([1.0])
    with raises(ValueError, name):
        call(t(1, T, H, D))           # padded layout where packed is expected
    with raises(ValueError, name):
        call(t(T, H * D))
    with raises(TypeError, name):
        call(t(T, H, D, dtype=torch.int64))
    with raises(TypeError, other):
        call(t(T, H, D, dtype=torch.float16) if which else t(T, H, D, dtype=torch.float64))
    with raises(ValueError, other):
        call(t(T, H, D + 8) if which else t(T + 1, H, D))
    with raises(ValueError, other):
        call(t(T, H, D, device=META))


@pytest.mark.parametrize("cu", [
    pytest.param(lambda: _cu(CU, torch.int64), id="int64"),
    pytest.param(lambda: _cu(CU, torch.int16), id="int16"),
    pytest.param(lambda: torch.tensor(CU, dtype=torch.float32), id="float32"),
    pytest.param(lambda: CU, id="list"),
    pytest.param(lambda: None, id="None"),
])
def test_varlen_cu_seqlens_type(cu):
    with raises(TypeError, "cu_seqlens"):
        ak.varlen_attention(*_packed(), cu(), 4)


@pytest.mark.parametrize("values", [
    pytest.param([1, 3, 7], id="not_starting_at_0"),
    pytest.param([0, 5, 3, 7], id="decreasing"),
    pytest.param([0, 3, 6], id="ends_before_T"),
    pytest.param([0, 3, 8], id="ends_after_T"),
    pytest.param([], id="empty"),
])
def test_varlen_cu_seqlens_values(values):
    with raises(ValueError, "cu_seqlens"):
        ak.varlen_attention(*_packed(), _cu(values), 7)


def test_varlen_cu_seqlens_rank_and_device():
    with raises(ValueError, "cu_seqlens"):
        ak.varlen_attention(*_packed(), _cu([CU]), 4)
    with raises(ValueError, "cu_seqlens"):
        ak.varlen_attention(*_packed(), _cu(CU, device=META), 4)


def test_varlen_max_seqlen_too_small():
    with raises(ValueError, "max_seqlen"):
        ak.varlen_attention(*_packed(), _cu(CU), 3)


@pytest.mark.parametrize("max_seqlen", [4.0, "4", None, True, torch.tensor(4), -1], ids=repr)
def test_varlen_max_seqlen_not_int(max_seqlen):
    with raises(BAD, "max_seqlen"):
        ak.varlen_attention(*_packed(), _cu(CU), max_seqlen)


def test_varlen_bad_scale():
    with raises(TypeError, "scale"):
        ak.varlen_attention(*_packed(), _cu(CU), 4, scale="x")


def test_varlen_good_edge_inputs_are_accepted():
    """Not errors: a larger max_seqlen than needed, zero-length sequences, T = 0."""
    ak.varlen_attention(*_packed(), _cu(CU), 100, backend="reference")
    ak.varlen_attention(*_packed(), _cu([0, 0, 3, 3, 7]), 4, backend="reference")
    empty = [t(0, H, D) for _ in range(3)]
    assert ak.varlen_attention(*empty, _cu([0]), 0, backend="reference").shape == (0, H, D)
    assert ak.varlen_attention(*empty, _cu([0, 0]), 0, backend="reference").shape == (0, H, D)


# ---------------------------------------------------------------------------------------------
# add_layer_norm
# ---------------------------------------------------------------------------------------------

N = 16


def _ln(**over):
    args = dict(x=t(3, N), residual=t(3, N), weight=t(N), bias=t(N))
    args.update(over)
    return args


def _call_ln(**over):
    a = _ln(**over)
    return ak.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"])


@pytest.mark.parametrize("name", ["x", "residual", "weight", "bias"])
def test_add_layer_norm_non_tensor_and_int(name):
    with raises(TypeError, name):
        _call_ln(**{name: 1.0})
    with raises(TypeError, name):
        _call_ln(**{name: [1.0] * N})
    with raises(TypeError, name):
        _call_ln(**{name: t(*_ln()[name].shape, dtype=torch.int64)})


def test_add_layer_norm_wrong_rank():
    with raises(ValueError, "x"):
        ak.add_layer_norm(torch.tensor(1.0), torch.tensor(1.0), t(1), t(1))
    with raises(ValueError, "weight"):
        _call_ln(weight=t(1, N))
    with raises(ValueError, "bias"):
        _call_ln(bias=t(N, 1))


@pytest.mark.parametrize("name,bad", [
    ("residual", lambda: t(3, N + 1)), ("residual", lambda: t(4, N)), ("residual", lambda: t(1, 3, N)),
    ("weight", lambda: t(N + 1)), ("bias", lambda: t(N - 1)),
], ids=["residual_N", "residual_rows", "residual_rank", "weight_len", "bias_len"])
def test_add_layer_norm_shape_mismatch(name, bad):
    with raises(ValueError, name):
        _call_ln(**{name: bad()})


@pytest.mark.parametrize("name", ["residual", "weight", "bias"])
def test_add_layer_norm_dtype_and_device_mismatch(name):
    shape = _ln()[name].shape
    with raises(TypeError, name):
        _call_ln(**{name: t(*shape, dtype=torch.float16)})
    with raises(ValueError, name):
        _call_ln(**{name: t(*shape, device=META)})


@pytest.mark.parametrize("eps", [-1e-5, "1e-5", None, float("nan"), True], ids=repr)
def test_add_layer_norm_bad_eps(eps):
    a = _ln()
    with raises(BAD, "eps"):
        ak.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], eps)


# ---------------------------------------------------------------------------------------------
# linear_gelu and gelu_ffn
# ---------------------------------------------------------------------------------------------

K, NOUT = 12, 20


def _lg(**over):
    args = dict(x=t(4, K), weight=t(NOUT, K), bias=t(NOUT))
    args.update(over)
    approximate = args.pop("approximate", "tanh")
    return ak.linear_gelu(args["x"], args["weight"], args["bias"], approximate=approximate)


@pytest.mark.parametrize("name,bad,exc", [
    ("x", lambda: [1.0] * K, TypeError),
    ("x", lambda: torch.tensor(1.0), ValueError),
    ("x", lambda: t(4, K, dtype=torch.int32), TypeError),
    ("weight", lambda: None, TypeError),
    ("weight", lambda: t(K), ValueError),
    ("weight", lambda: t(NOUT, K + 1), ValueError),        # K mismatch with x
    ("weight", lambda: t(K, NOUT), ValueError),            # transposed weight
    ("weight", lambda: t(NOUT, K, dtype=torch.int64), TypeError),
    ("weight", lambda: t(NOUT, K, dtype=torch.bfloat16), TypeError),
    ("weight", lambda: t(NOUT, K, device=META), ValueError),
    ("bias", lambda: 0.0, TypeError),
    ("bias", lambda: t(NOUT + 1), ValueError),
    ("bias", lambda: t(1, NOUT), ValueError),
    ("bias", lambda: t(NOUT, dtype=torch.float16), TypeError),
    ("bias", lambda: t(NOUT, device=META), ValueError),
])
def test_linear_gelu_bad_tensors(name, bad, exc):
    with raises(exc, name):
        _lg(**{name: bad()})


@pytest.mark.parametrize("approximate", ["gelu", "erf", "Tanh", None, True, "gelu_new"], ids=repr)
def test_linear_gelu_bad_approximate(approximate):
    with raises(ValueError, "approximate"):
        _lg(approximate=approximate)


HID, INNER = 12, 20


def _ffn(**over):
    args = dict(x=t(4, HID), w1=t(INNER, HID), b1=t(INNER), w2=t(HID, INNER), b2=t(HID))
    args.update(over)
    approximate = args.pop("approximate", "tanh")
    return ak.gelu_ffn(*args.values(), approximate=approximate)


@pytest.mark.parametrize("name,bad,exc", [
    ("x", lambda: "x", TypeError),
    ("x", lambda: t(4, HID, dtype=torch.int64), TypeError),
    ("x", lambda: torch.tensor(1.0), ValueError),
    ("w1", lambda: t(INNER, HID + 1), ValueError),
    ("w1", lambda: t(INNER), ValueError),
    ("w1", lambda: t(INNER, HID, dtype=torch.float16), TypeError),
    ("w1", lambda: t(INNER, HID, device=META), ValueError),
    ("b1", lambda: t(INNER + 1), ValueError),
    ("b1", lambda: t(INNER, dtype=torch.int64), TypeError),
    ("w2", lambda: None, TypeError),
    ("w2", lambda: t(HID, INNER + 1), ValueError),
    ("w2", lambda: t(INNER, HID), ValueError),             # w1's layout by mistake
    ("w2", lambda: t(HID * INNER), ValueError),
    ("w2", lambda: t(HID, INNER, dtype=torch.bfloat16), TypeError),
    ("w2", lambda: t(HID, INNER, device=META), ValueError),
    ("b2", lambda: t(HID + 1), ValueError),
    ("b2", lambda: t(INNER), ValueError),
    ("b2", lambda: t(HID, dtype=torch.float64), TypeError),
    ("b2", lambda: t(HID, device=META), ValueError),
])
def test_gelu_ffn_bad_tensors(name, bad, exc):
    with raises(exc, name):
        _ffn(**{name: bad()})


@pytest.mark.parametrize("approximate", ["gelu", None], ids=repr)
def test_gelu_ffn_bad_approximate(approximate):
    with raises(ValueError, "approximate"):
        _ffn(approximate=approximate)


# ---------------------------------------------------------------------------------------------
# unpad / pad
# ---------------------------------------------------------------------------------------------

def test_unpad_bad_inputs():
    h = t(2, 5, 4)
    with raises(TypeError, "hidden"):
        ak.unpad([[1.0]], torch.ones(2, 5, dtype=torch.bool))
    with raises(ValueError, "hidden"):
        ak.unpad(t(5), torch.ones(2, 5, dtype=torch.bool))
    with raises(TypeError, "attention_mask"):
        ak.unpad(h, [[1] * 5] * 2)
    with raises(ValueError, "attention_mask"):
        ak.unpad(h, torch.ones(10, dtype=torch.bool))
    with raises(ValueError, "attention_mask"):
        ak.unpad(h, torch.ones(2, 6, dtype=torch.bool))
    with raises(ValueError, "attention_mask"):
        ak.unpad(h, torch.ones(5, 2, dtype=torch.bool))
    with raises(TypeError, "attention_mask"):
        ak.unpad(h, torch.ones(2, 5))                       # float mask
    with raises(ValueError, "attention_mask"):
        ak.unpad(h, torch.full((2, 5), 2, dtype=torch.int64))  # not 0/1
    with raises(ValueError, "attention_mask"):
        ak.unpad(h, torch.ones(2, 5, dtype=torch.bool, device=META))


def test_pad_bad_inputs():
    packed, idx = t(3, 4), torch.tensor([0, 2, 5])
    with raises(TypeError, "packed"):
        ak.pad([1.0], idx, 2, 3)
    with raises(ValueError, "packed"):
        ak.pad(torch.tensor(1.0), idx, 2, 3)
    with raises(TypeError, "indices"):
        ak.pad(packed, [0, 2, 5], 2, 3)
    with raises(TypeError, "indices"):
        ak.pad(packed, idx.float(), 2, 3)
    with raises(ValueError, "indices"):
        ak.pad(packed, idx[None], 2, 3)
    with raises(ValueError, "indices"):
        ak.pad(packed, idx[:2], 2, 3)
    with raises(ValueError, "indices"):
        ak.pad(packed, torch.tensor([0, 2, 6]), 2, 3)     # out of range
    with raises(ValueError, "indices"):
        ak.pad(packed, torch.tensor([-1, 2, 5]), 2, 3)
    with raises(ValueError, "batch"):
        ak.pad(packed, idx, -1, 3)
    with raises(ValueError, "seqlen"):
        ak.pad(packed, idx, 2, 3.0)


def test_pad_indices_device_mismatch():
    with raises(ValueError, "indices"):
        ak.pad(t(3, 4), torch.tensor([0, 2, 5], device=META), 2, 3)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

def test_available_backends_cpu_includes_reference():
    for device in ("cpu", torch.device("cpu")):
        names = ak.available_backends(device)
        assert "reference" in names
        assert all(isinstance(n, str) for n in names)


def test_unknown_backend_lists_known_backends():
    with pytest.raises(ak.BackendUnavailable, match="no_such_backend") as info:
        ak.attention(*_qkv(), backend="no_such_backend")
    for known in registry.backend_names():
        assert known in str(info.value)
    with pytest.raises(ak.BackendUnavailable, match="reference"):
        ak.add_layer_norm(**_ln(), backend="Reference")


def test_backend_must_be_a_string():
    with raises(TypeError, "backend"):
        ak.attention(*_qkv(), backend=3)


def test_backend_on_a_device_it_cannot_run():
    """The reference cannot run on meta tensors: BackendUnavailable, not a crash."""
    q = t(B, H, L, D, device=META)
    with pytest.raises(ak.BackendUnavailable, match="meta"):
        ak.attention(q, q, q, backend="reference")
    with pytest.raises(ak.BackendUnavailable, match="meta"):
        ak.attention(q, q, q)


FAKE = "fake_test_backend"


@pytest.fixture
def fake_backend(monkeypatch):
    """A registered backend that accepts only fp32/fp16 and head dims 32 and 64, and records
    whether any of its ops got called (validation must stop bad input before that)."""
    mod = types.ModuleType("albert_kernels_test_fake_backend")
    mod.DTYPES = {torch.float32, torch.float16}
    mod.HEAD_DIMS = {32, 64}
    mod.calls = []

    def op(name):
        def fn(*args):
            mod.calls.append(name)
            return torch.zeros(1)
        return fn

    for name in OP_NAMES:
        setattr(mod, name, op(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    register_backend(BackendSpec(name=FAKE, module=mod.__name__, probe=lambda device: None))
    try:
        yield mod
    finally:
        registry._BACKENDS.pop(FAKE, None)


def test_fake_backend_is_registered_and_removed(fake_backend):
    assert FAKE in registry.backend_names()
    assert registry.unavailable_reason(FAKE, "cpu") is None
    assert registry.best_backend("cpu") != FAKE        # priority 0: never the default
    ak.attention(*[t(1, 1, 2, 32) for _ in range(3)], backend=FAKE)
    assert fake_backend.calls == ["attention"]


def test_fake_backend_gone_after_fixture():
    assert FAKE not in registry.backend_names()


def test_backend_rejects_dtype(fake_backend):
    q = [t(1, 1, 2, 32, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(TypeError, match=rf"{FAKE}.*float64"):
        ak.attention(*q, backend=FAKE)
    x = t(3, N, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=rf"{FAKE}.*bfloat16"):
        ak.add_layer_norm(x, x, t(N, dtype=torch.bfloat16), t(N, dtype=torch.bfloat16), backend=FAKE)
    w = t(NOUT, N, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"{FAKE}.*float64"):
        ak.linear_gelu(t(2, N, dtype=torch.float64), w, t(NOUT, dtype=torch.float64), backend=FAKE)
    xs = [t(2, N, dtype=torch.float64), w, t(NOUT, dtype=torch.float64), t(N, NOUT, dtype=torch.float64),
          t(N, dtype=torch.float64)]
    with pytest.raises(TypeError, match=rf"{FAKE}.*float64"):
        ak.gelu_ffn(*xs, backend=FAKE)
    assert fake_backend.calls == []


@pytest.mark.parametrize("head_dim", [8, 48, 128])
def test_backend_rejects_head_dim(fake_backend, head_dim):
    with pytest.raises(ValueError, match=rf"{FAKE}.*head dim.*{head_dim}"):
        ak.attention(*[t(1, 1, 2, head_dim) for _ in range(3)], backend=FAKE)
    with pytest.raises(ValueError, match=rf"{FAKE}.*head dim.*{head_dim}"):
        ak.varlen_attention(*[t(3, 1, head_dim) for _ in range(3)], _cu([0, 3]), 3, backend=FAKE)
    assert fake_backend.calls == []
    ak.varlen_attention(*[t(3, 1, 64) for _ in range(3)], _cu([0, 3]), 3, backend=FAKE)
    assert fake_backend.calls == ["varlen_attention"]


def test_input_errors_come_before_the_backend(fake_backend):
    """Bad input is reported as such even on a backend that would reject the dtype anyway."""
    q, k, v = [t(1, 1, 2, 32) for _ in range(3)]
    with raises(ValueError, "k"):
        ak.attention(q, k[..., :1, :], v, backend=FAKE)
    with raises(ValueError, "key_padding_mask"):
        ak.attention(q, k, v, key_padding_mask=torch.ones(1, 3, dtype=torch.bool), backend=FAKE)
    assert fake_backend.calls == []
