"""Opt-in int8 inference (``ak.quantize_dynamic``, ``csrc/cpu/int8_linear.cpp``).

Budgets: the int8 sums are integers and are held to an int64 reference exactly, on every kernel
this CPU can run (the AVX2 kernel is forced on an AVX-512 machine, and must equal the VNNI and
library kernels bit for bit); the dequantized output to the float64 formula of the same integers
within 1e-5 relative (fp32 epilogue rounding); a quantized product to the fp32 product within
2 quantization steps per term bound (below); quantized models to fp32 within 0.05 of the
hidden states' scale on tiny random models; all-MiniLM-L6-v2's embeddings >= 0.999 cosine to
fp32 on 306 real sentences (the default products).
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import albert_kernels as ak
from albert_kernels.backends.cpp import isa
from albert_kernels.model.quantized import DEFAULT_PRODUCTS, QuantizedLinear

sys.path.insert(0, str(Path(__file__).parent))
from minilm import SENTENCES, minilm_path  # noqa: E402,F401
from family_batches import padded_batch  # noqa: E402

transformers = pytest.importorskip("transformers")
ops = torch.ops.albert_kernels
SHAPES = [(1, 384, 384), (7, 101, 33), (64, 1536, 384), (5, 30, 1536), (130, 64, 72)]


def _kernels():
    names = ["portable"]
    try:
        names.append(isa.int8_kernel(1, force="avx2"))
        names.append(isa.int8_kernel(1, force="vnni"))
        names.append("library")  # exact only with VNNI / AMX: it is here, since vnni was
    except ValueError:
        pass
    return names


KERNELS = _kernels()


def _case(m, k, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, k // 3] *= 30                           # an outlier channel
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    wq[0] = 127
    wq[-1] = -127
    return x, wq


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_gemm_exact(m, k, n):
    x, wq = _case(m, k, n)
    x[0] = x[0].abs() + 1                        # a row quantized to the top of [0, 255]
    q, scale, zp = ops.int8_quantize_rows(x)
    assert q.dtype == torch.uint8 and int(q[0].max()) == 255
    ref = q.long() @ wq.long().t()
    packed = ops.int8_pack_weight(wq)
    for kernel in KERNELS:
        got = ops.int8_gemm(q, packed, wq, kernel)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), ref), kernel


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quantize_rows(m, k, n):
    x, _ = _case(m, k, n)
    s_in = torch.rand(k) + 0.5
    q, scale, zp = ops.int8_quantize_rows(x, s_in)
    y = x * s_in
    lo = y.amin(1).clamp(max=0)
    hi = y.amax(1).clamp(min=0)
    torch.testing.assert_close(scale, (hi - lo) / 255, rtol=1e-6, atol=0)
    assert ((zp >= 0) & (zp <= 255)).all()
    deq = (q.float() - zp[:, None]) * scale[:, None]
    # round to nearest: at most half a step (plus fp32 rounding of the products)
    assert ((deq - y).abs() <= scale[:, None] * 0.5001).all()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
def test_int8_linear_epilogue(m, k, n, gelu):
    x, wq = _case(m, k, n)
    packed, sums = ops.int8_pack_weight(wq), wq.sum(1, dtype=torch.int32)
    ws, b = torch.rand(n) / 100, torch.randn(n)
    q, scale, zp = ops.int8_quantize_rows(x)
    acc = (q.long() - zp[:, None].long()) @ wq.long().t()
    ref = acc.double() * scale[:, None].double() * ws.double() + b.double()
    if gelu is not None:
        ref = F.gelu(ref, approximate=gelu)
    outs = [ops.int8_linear(x, packed, wq, ws, sums, b, None, gelu, kn) for kn in KERNELS]
    for kernel, out in zip(KERNELS, outs):
        assert torch.equal(out, outs[0]), kernel   # the same sums, the same epilogue
    err = (outs[0].double() - ref).abs().max().item()
    assert err <= 1e-5 * (1 + ref.abs().max().item()), err


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quantized_linear_against_fp32(m, k, n):
    """|int8 - fp32| <= sum_k (|x_k| e_w[n] + |w_nk| e_x[m] + e_x e_w) with the half steps
    e_x = scale_x / 2, e_w = scale_w / 2: the rounding bound of the two quantizations."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    x, _ = _case(m, k, n)
    qlin = QuantizedLinear.from_linear(lin)
    with torch.no_grad():
        got = qlin(x).double()
        ref = lin.double()(x.double())
    _, scale, _ = ops.int8_quantize_rows(x)
    e_x, e_w = scale.double()[:, None] / 2, qlin.weight_scale.double()[None] / 2
    bound = (x.double().abs().sum(1, keepdim=True) * e_w
             + lin.weight.double().abs().sum(1)[None] * e_x + k * e_x * e_w)
    assert ((got - ref).abs() <= bound * 1.001 + 1e-5).all()


@pytest.mark.parametrize("m,k,n", SHAPES[:3])
def test_outlier_channels_stay_fp32(m, k, n):
    """With the outlier channel kept in fp32: the result is the int8 product of the other channels
    (the same bound as above, over them only) plus the exact fp32 product of the kept one, and
    much closer to fp32 than without it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    x, _ = _case(m, k, n)
    keep = torch.tensor([k // 3])
    qlin = QuantizedLinear.from_linear(lin, keep)
    assert qlin.input_scale[k // 3] == 0 and int(qlin.weight_q[:, k // 3].abs().sum()) == 0
    with torch.no_grad():
        ref = lin.double()(x.double())
        err_kept = (qlin(x).double() - ref).abs().max().item()
        err_plain = (QuantizedLinear.from_linear(lin)(x).double() - ref).abs().max().item()
        gelu = qlin.linear_gelu(x, "tanh")
    assert err_kept < 0.5 * err_plain, (err_kept, err_plain)
    rest = x.clone()
    rest[:, k // 3] = 0
    _, scale, _ = ops.int8_quantize_rows(rest)
    e_x, e_w = scale.double()[:, None] / 2, qlin.weight_scale.double()[None] / 2
    w_rest = lin.weight.double().clone()
    w_rest[:, k // 3] = 0
    bound = (rest.double().abs().sum(1, keepdim=True) * e_w
             + w_rest.abs().sum(1)[None] * e_x + k * e_x * e_w)
    assert ((qlin(x).double() - ref).abs() <= bound * 1.001 + 1e-4).all()
    torch.testing.assert_close(gelu, F.gelu(qlin(x), approximate="tanh"), rtol=1e-5, atol=1e-5)


def test_forced_kernel_env(monkeypatch):
    monkeypatch.setenv(isa.INT8_ENV_VAR, "portable")
    assert isa.int8_kernel(1000) == "portable"
    monkeypatch.setenv(isa.INT8_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match=isa.INT8_ENV_VAR):
        isa.int8_kernel(1)
    monkeypatch.setenv(isa.INT8_ENV_VAR, "auto")
    assert isa.int8_kernel(1) in isa.INT8_KERNELS


# ------------------------------------------------------------------------------ models
VOCAB, SEQ = 100, 11


def _inputs(padding):
    return padded_batch(VOCAB, SEQ, padding)


def _models():
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64)
    ours = ak.AlbertModel(ak.AlbertConfig(embedding_size=32, num_hidden_layers=3, **cfg))
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        embedding_size=32, num_hidden_layers=3, attn_implementation="sdpa", **cfg))
    bert = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, attn_implementation="sdpa", pad_token_id=1, **cfg))
    ak.patch_hf(albert)
    ak.patch_hf(bert)
    return {"ours": ours.eval(), "albert": albert.eval(), "bert": bert.eval()}


@pytest.fixture(scope="module")
def models():
    return _models()


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", ["ours", "albert", "bert"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("products", [DEFAULT_PRODUCTS, "all"])
def test_quantized_model_close_to_fp32(models, name, padding, products):
    model = models[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = ak.quantize_dynamic(model, products=products)
    assert qmodel is not model
    n_int8 = sum(isinstance(m, QuantizedLinear) for m in qmodel.modules())
    assert n_int8 > 0 and not any(isinstance(m, QuantizedLinear) for m in model.modules())
    ids, mask = _inputs(padding)
    ref, got = _hidden(model, ids, mask), _hidden(qmodel, ids, mask)
    real = mask.bool()
    err = (got - ref)[real].abs().max().item()
    assert err < 0.05 * ref[real].abs().max().item(), err
    assert err > 0   # the int8 products did run
    for k, v in model.state_dict().items():   # the input model untouched
        assert torch.equal(v, before[k]), k


def test_weight_write_does_not_reach_the_copy(models):
    model = copy.deepcopy(models["bert"])
    qmodel = ak.quantize_dynamic(model, products="all")
    ids, mask = _inputs("right")
    before = _hidden(qmodel, ids, mask)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(3.0)
    assert torch.equal(_hidden(qmodel, ids, mask), before)


def test_hooks_on_quantized_model_fire(models):
    for name in ("ours", "bert"):
        qmodel = ak.quantize_dynamic(models[name], products="all")
        ids, mask = _inputs("right")
        ref = _hidden(qmodel, ids, mask)
        seen = []
        qlins = [m for m in qmodel.modules() if isinstance(m, QuantizedLinear)]
        handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
                   for m in qlins]
        got = _hidden(qmodel, ids, mask)
        for h in handles:
            h.remove()
        assert len(seen) >= len(qlins), name
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


def test_bad_input(models):
    with pytest.raises(ValueError, match="no encoder"):
        ak.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    unpatched = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64))
    with pytest.raises(ValueError, match="patch_hf"):
        ak.quantize_dynamic(unpatched)
    with pytest.raises(TypeError, match="model"):
        ak.quantize_dynamic("bert")
    with pytest.raises(ValueError, match="products"):
        ak.quantize_dynamic(models["bert"], products=("query", "gate"))
    with pytest.raises(ValueError, match="outlier_channels"):
        ak.quantize_dynamic(models["bert"], outlier_channels=-1)
    meta = copy.deepcopy(models["bert"]).to("meta")
    with pytest.raises(ValueError, match="on meta"):
        ak.quantize_dynamic(meta)
    qmodel = ak.quantize_dynamic(models["ours"])
    ids, mask = _inputs("right")
    emb = torch.randn(2, 5, 64, requires_grad=True)
    qlin = next(m for m in qmodel.modules() if isinstance(m, QuantizedLinear))
    with pytest.raises(RuntimeError, match="inference only"):
        qlin(emb)
    with pytest.raises(TypeError, match="float32"):
        qlin(emb.detach().double())


# ------------------------------------------------------------------ all-MiniLM-L6-v2 quality
def test_minilm_quality_gate(minilm_path):
    """The default products keep all-MiniLM-L6-v2's normalised mean-pooled embeddings at >= 0.999
    cosine to fp32 on every one of 306 real sentences (measured 0.99931 on the Xeon; all six
    products int8: 0.9980; without outlier channels 0.9939)."""
    from sentence_transformers import SentenceTransformer
    sentences = [s.strip() for s in (Path(__file__).parent / "data" / "sentences.txt")
                 .read_text().splitlines() if s.strip()] + list(SENTENCES)
    assert len(sentences) >= 300
    st = SentenceTransformer(str(minilm_path), device="cpu")
    ref = st.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    ak.patch_hf(st[0].auto_model)
    qst = ak.quantize_dynamic(st)
    assert type(qst) is type(st) and qst is not st
    got = qst.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    cos = (got * ref).sum(-1)
    assert cos.min().item() >= 0.999, cos.min().item()
    assert cos.min().item() < 1.0 - 1e-7   # int8 did run


@pytest.mark.parametrize("name", ["ours", "albert", "bert"])
def test_quantized_model_under_autocast(models, name):
    """Under torch.autocast("cpu", bfloat16) the int8 products run as ops of their own
    precision (float32 in and out, autocast off inside) and the rest of the model under
    autocast: the output stays within bf16 rounding of the float32 run of the quantized model."""
    qmodel = ak.quantize_dynamic(models[name])
    ids, mask = _inputs("right")
    want = _hidden(qmodel, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _hidden(qmodel, ids, mask).float()
    real = mask.bool()
    err = (got - want)[real].abs().max().item()
    assert err < 0.05 * want[real].abs().max().item(), err
