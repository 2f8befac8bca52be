"""The cpp backend's small-M ops (csrc/cpu/small_m.cpp): pack_linear_weight, packed_linear and
packed_albert_layer, each held to the fp32 error budget set by plain PyTorch against float64, on
shapes that exercise every edge of the kernel (rows not a multiple of the row tile, 4 or 8 rows;
outputs not a multiple of the panel, 24 or 48 wide; inputs not a multiple of the block, 256 or 128
long; more rows than one pass), and the errors for bad arguments. The model-level path that uses
them is tested in test_packed_linear.py."""
import pytest
import torch
import torch.nn.functional as F

import albert_kernels as ak
from albert_kernels.backends import unavailable_reason
from albert_kernels.tools.budget import check_budget

pytestmark = pytest.mark.skipif(unavailable_reason("cpp", "cpu") is not None,
                                reason=f"cpp backend: {unavailable_reason('cpp', 'cpu')}")


@pytest.fixture(scope="module")
def ops():
    from albert_kernels.backends.extension import ops as ext_ops  # builds once (cached)
    return ext_ops._ops


def _linear(x, w, b, approximate):
    y = F.linear(x, w, b)
    return y if approximate is None else F.gelu(y, approximate=approximate)


@pytest.mark.parametrize("m, n, k", [(1, 24, 16), (2, 768, 768), (5, 50, 300), (7, 3072, 768),
                                     (8, 768, 3072), (13, 25, 513), (128, 96, 64),
                                     (17, 96, 129), (257, 24, 16), (603, 50, 300)])
@pytest.mark.parametrize("approximate", [None, "tanh", "none"])
def test_packed_linear_within_budget(ops, m, n, k, approximate):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    b = torch.randn(n, generator=gen)
    got = ops.packed_linear(x, ops.pack_linear_weight(w), n, b, approximate)
    gold = _linear(x.double(), w.double(), b.double(), approximate)
    result = check_budget(got, _linear(x, w, b, approximate), gold)
    assert result.ok, str(result)


def test_packed_linear_segments_and_no_bias(ops):
    """Q, K, V as three segments of one packed weight: three [M, N] outputs, each its own
    product; N = 40 leaves a partial panel in every segment."""
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 32), torch.randn(3 * 40, 32), torch.randn(3 * 40)
    packed = ops.pack_linear_weight(w, 3)
    panel = ops.packed_panel_width()
    assert panel in (24, 48)  # the AVX2 / AVX-512 tile (one panel of 48 or two of 24 per segment)
    assert packed.shape == (3 * -(-40 // panel), 32, panel)
    got = ops.packed_linear(x, packed, 40, b, None, 3)
    assert got.shape == (3, 6, 40)
    for s in range(3):
        part = slice(40 * s, 40 * (s + 1))
        gold = F.linear(x.double(), w[part].double(), b[part].double())
        assert check_budget(got[s], F.linear(x, w[part], b[part]), gold).ok
    no_bias = ops.packed_linear(x, ops.pack_linear_weight(w), 120)
    assert check_budget(no_bias, x @ w.T, x.double() @ w.double().T).ok
    assert ops.packed_linear(x[:0], packed, 40, b, None, 3).shape == (3, 0, 40)


def test_gelu_epilogue_tails(ops):
    """The epilogue's GELU is the backend's: exact in both tails (no NaN at large |x|)."""
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, 3e38]]).T.contiguous()
    w, b = torch.ones(1, 1), torch.zeros(1)
    for approximate in ("tanh", "none"):
        got = ops.packed_linear(x, ops.pack_linear_weight(w), 1, b, approximate)
        gold = F.gelu(x.double(), approximate=approximate)
        assert torch.isfinite(got).all()
        assert check_budget(got, F.gelu(x, approximate=approximate), gold).ok


def _layer_inputs(hidden=48, heads=4, inter=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=gen) * scale
    return dict(qkv_w=r(3 * hidden, hidden), qkv_b=r(3 * hidden), o_w=r(hidden, hidden),
                o_b=r(hidden), ln1_w=1 + r(hidden), ln1_b=r(hidden), f1_w=r(inter, hidden),
                f1_b=r(inter), f2_w=r(hidden, inter), f2_b=r(hidden), ln2_w=1 + r(hidden),
                ln2_b=r(hidden), heads=heads)


def _layer_plain(h, cu, p, approximate, eps=1e-12):
    """transformers' AlbertLayer in eval mode, written out in plain PyTorch (any dtype)."""
    c = lambda t: t.to(h.dtype)
    n, hidden = h.shape
    heads, d = p["heads"], hidden // p["heads"]
    q, k, v = F.linear(h, c(p["qkv_w"]), c(p["qkv_b"])).view(n, 3, heads, d).unbind(1)
    ctx = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        att = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
        ctx[s:e] = att.transpose(0, 1)
    a = F.layer_norm(F.linear(ctx.reshape(n, hidden), c(p["o_w"]), c(p["o_b"])) + h, (hidden,),
                     c(p["ln1_w"]), c(p["ln1_b"]), eps)
    f = F.gelu(F.linear(a, c(p["f1_w"]), c(p["f1_b"])), approximate=approximate)
    return F.layer_norm(F.linear(f, c(p["f2_w"]), c(p["f2_b"])) + a, (hidden,), c(p["ln2_w"]),
                        c(p["ln2_b"]), eps)


def _layer_call(ops, h, cu, p, approximate, eps=1e-12, **override):
    hidden = h.shape[1]
    args = dict(hidden_states=h, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()),
                qkv_weight=ops.pack_linear_weight(p["qkv_w"], 3), qkv_bias=p["qkv_b"],
                dense_weight=ops.pack_linear_weight(p["o_w"]), dense_bias=p["o_b"],
                attention_ln_weight=p["ln1_w"], attention_ln_bias=p["ln1_b"],
                attention_ln_eps=eps, ffn_weight=ops.pack_linear_weight(p["f1_w"]),
                ffn_bias=p["f1_b"], ffn_output_weight=ops.pack_linear_weight(p["f2_w"]),
                ffn_output_bias=p["f2_b"], full_ln_weight=p["ln2_w"], full_ln_bias=p["ln2_b"],
                full_ln_eps=eps, num_heads=p["heads"], scale=(hidden // p["heads"]) ** -0.5,
                gelu_approximate=approximate)
    args.update(override)
    return ops.packed_albert_layer(**args)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("lengths", [[8], [3, 1, 5], [2, 0, 7], [200, 0, 90]])
def test_packed_albert_layer_within_budget(ops, approximate, lengths):
    p = _layer_inputs()
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    h = torch.randn(int(cu[-1]), 48, generator=torch.Generator().manual_seed(3))
    got = _layer_call(ops, h, cu, p, approximate)
    base = _layer_plain(h, cu, p, approximate)
    gold = _layer_plain(h.double(), cu, p, approximate)
    result = check_budget(got, base, gold)
    assert result.ok, str(result)


def test_bad_arguments_name_what_was_expected(ops):
    w = torch.randn(30, 16)
    packed = ops.pack_linear_weight(w)
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="pack_linear_weight: weight must be a contiguous 2-d "
                                           "float32"):
        ops.pack_linear_weight(w.double())
    with pytest.raises(RuntimeError, match="segments must be >= 1 and divide"):
        ops.pack_linear_weight(w, 4)
    with pytest.raises(RuntimeError, match="packed_linear: x must be a contiguous 2-d float32"):
        ops.packed_linear(x.t(), packed, 30)
    panel = ops.packed_panel_width()
    with pytest.raises(RuntimeError, match=r"packed_weight must be a pack_linear_weight result of "
                                           rf"shape \[{-(-60 // panel)}, 16, {panel}\] .*got "
                                           rf"\[{-(-30 // panel)}, 16, {panel}\]"):
        ops.packed_linear(x, packed, 60)
    with pytest.raises(RuntimeError, match="packed_linear: bias must have 30 elements"):
        ops.packed_linear(x, packed, 30, torch.zeros(29))
    with pytest.raises(RuntimeError, match="approximate must be 'tanh' or 'none'"):
        ops.packed_linear(x, packed, 30, None, "erf")
    p = _layer_inputs()
    h, cu = torch.randn(5, 48), torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="num_heads must divide the hidden size 48"):
        _layer_call(ops, h, cu, p, "tanh", num_heads=5)
    with pytest.raises(RuntimeError, match="packed_albert_layer: dense_weight must be a "
                                           "pack_linear_weight result"):
        _layer_call(ops, h, cu, p, "tanh", dense_weight=ops.pack_linear_weight(p["qkv_w"]))
    with pytest.raises(RuntimeError, match="packed_albert_layer: hidden_states must be a "
                                           "contiguous 2-d float32"):
        _layer_call(ops, h.double(), cu, p, "tanh")


def test_model_path_matches_the_per_op_path(ops):
    """An ALBERT model on the fused layer (packed sequences) and the same model's op-by-op packed
    path (the padded layout) agree to rounding."""
    torch.manual_seed(0)
    cfg = ak.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=48, num_attention_heads=4,
                          intermediate_size=100, num_hidden_layers=3)
    model = ak.freeze(ak.AlbertModel(cfg, backend="cpp").eval())
    ids = torch.randint(1, 50, (1, 9))
    with torch.no_grad():
        fused = model(ids).last_hidden_state
        model.unpad = False
        per_op = model(ids).last_hidden_state
    assert model.encoder._frozen is not None
    assert (fused - per_op).abs().max().item() <= 1e-5
