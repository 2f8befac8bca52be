"""torch.autocast on ak.AlbertModel, our heads and patched transformers models, forward and
backward: outputs and gradients within the error budget of transformers' model under the same
autocast (base) against transformers in float64 without autocast (gold); and the policy itself
(matmul-like kernels in the autocast dtype, LayerNorm in float32) on the public ops."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 60, 9
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["own", "reference"])
def backend(request, cpu_backend):
    return cpu_backend if request.param == "own" else "reference"


def _hf(cls_name):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=40, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                                    max_position_embeddings=16, num_labels=3,
                                    attn_implementation="eager")
    return getattr(transformers, cls_name)(cfg).train()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0      # left padding too
    return ids, mask, torch.tensor([0, 2, 1])


def _run(model, dtype, device="cpu", **inputs):
    """Output and parameter gradients of sum(output * fixed weights), under autocast if dtype."""
    model.zero_grad()
    if dtype is None:
        out = model(**inputs)
    else:
        with torch.autocast(device, dtype=dtype):
            out = model(**inputs)
    value = out.logits if hasattr(out, "logits") else out.pooler_output
    weights = torch.linspace(-1, 1, value.numel(), dtype=torch.float64).reshape(value.shape)
    (value.double() * weights.to(value.device)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _compare(cand, base, gold, dtype):
    (c, cg), (b, bg), (g, gg) = cand, base, gold
    assert c.dtype == b.dtype, "the output dtype under autocast is transformers'"
    result = check_budget(c, b, g, dtype=dtype)
    assert result.ok, f"output: {result}"
    scale = max(t.abs().max().item() for t in gg.values())
    for name, grad in gg.items():
        candidate = cg.get(name, cg.get(name.replace("albert.", "", 1)))
        assert candidate is not None, f"no gradient for {name}"
        result = check_budget(candidate, bg[name], grad, dtype=dtype, scale=scale)
        assert result.ok, f"grad of {name}: {result}"


@pytest.mark.parametrize("dtype", LOW)
def test_patched_classifier_under_autocast(dtype, backend):
    hf = _hf("AlbertForSequenceClassification")
    gold_model = copy.deepcopy(hf).double()
    ours = ak.patch_hf(copy.deepcopy(hf), backend=backend)
    ids, mask, labels = _batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    _compare(_run(ours, dtype, **inputs), _run(hf, dtype, **inputs),
             _run(gold_model, None, **inputs), dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_our_model_under_autocast(dtype, backend):
    hf = _hf("AlbertModel")
    gold_model = copy.deepcopy(hf).double()
    ours = ak.AlbertModel.from_hf(hf, backend=backend).train()
    ids, mask, _ = _batch()
    cand = _run(ours, dtype, input_ids=ids, attention_mask=mask)
    _compare(cand, _run(hf, dtype, input_ids=ids, attention_mask=mask),
             _run(gold_model, None, input_ids=ids, attention_mask=mask), dtype)


def test_our_heads_train_under_autocast(backend):
    hf = _hf("AlbertForSequenceClassification")
    ours = ak.AlbertForSequenceClassification.from_hf(hf, backend=backend).train()
    ids, mask, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(ids, mask, labels=labels)
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - expected.loss.item()) < 0.05 * max(1.0, expected.loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in ours.parameters() if p.requires_grad and p.grad is not None)


@pytest.mark.parametrize("dtype", LOW)
def test_policy_on_the_ops(dtype, backend):
    """Matrix-product kernels run in the autocast dtype (float32 inputs and parameters, as a
    model gives them), LayerNorm in float32 even from low-precision inputs."""
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    w, b = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        y = ak.linear_gelu(x, w, b, backend=backend)
        expected = torch.nn.functional.linear(x, w, b)
        low = [t.to(dtype) for t in (x, res, torch.ones(32), torch.zeros(32))]
        n = ak.add_layer_norm(*low, backend=backend)
        # float32 as on CUDA (autocast's float32 list); CPU autocast leaves layer_norm in the
        # input dtype, but a model's residual stream is float32 there, so it is float32 too
        expected_n = torch.nn.functional.layer_norm(low[0].float() + low[1].float(), (32,))
        q = torch.randn(2, 4, 5, 8, generator=gen)
        o = ak.attention(q, q, q, backend=backend)
    assert y.dtype == expected.dtype == dtype
    assert n.dtype == torch.float32
    torch.testing.assert_close(n, expected_n, rtol=1e-5, atol=1e-5)
    assert o.dtype == dtype


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts float32 -> low-precision copies of tensors with `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype) \
                and args[0].numel() == self.numel and args[0].dtype == torch.float32:
            self.count += 1
        return func(*args, **kwargs)


def _shared_model(backend, layers=6):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    intermediate_size=40, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, attn_implementation="eager")
    hf = transformers.AlbertModel(cfg).eval()
    return hf, ak.AlbertModel.from_hf(hf, backend=backend).eval()


@pytest.mark.parametrize("grad", [False, True])
def test_shared_layer_weights_cast_once_per_forward(grad, backend):
    """A shared layer applied 6 times: its FFN weight [40, 32] is cast to bfloat16 once per
    forward (not 6 times), and again on the next forward (the cache does not outlive the call)."""
    hf, ours = _shared_model(backend)
    ids, mask, _ = _batch()
    counter = _CountCasts(40 * 32)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        with counter:
            ours(input_ids=ids, attention_mask=mask)
        first = counter.count
        with counter:
            ours(input_ids=ids, attention_mask=mask)
    # the FFN's input weight [40, 32] and output weight [32, 40] have the same size: two casts
    assert first == 2, f"{first} casts of the FFN weights in one forward of 6 layers"
    assert counter.count == 4


def test_cast_cache_sees_weight_writes(backend):
    """A weight written between forwards (or between layer applications) is read as it is."""
    hf, ours = _shared_model(backend, layers=3)
    ids, mask, _ = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        ffn = ours.encoder.albert_layer_groups[0].albert_layers[0].ffn
        ffn.weight.mul_(-1.5)
        hf.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.mul_(-1.5)
        after = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (after - before).abs().max() > 0.1
    valid = mask.bool()
    torch.testing.assert_close(after[valid].float(), expected[valid].float(), rtol=0.05, atol=0.05)
    # inside one cache block, an in-place write makes a new cast (the key holds the version)
    from albert_kernels.backends import autocast as policy
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.no_grad(), policy.cast_cache():
        a = policy._cast(w, torch.bfloat16)
        assert policy._cast(w, torch.bfloat16) is a
        w.add_(1.0)
        b = policy._cast(w, torch.bfloat16)
    assert b is not a
    torch.testing.assert_close(b.float(), (a.float() + 1.0), rtol=0.01, atol=0.02)


def test_cast_cache_keeps_grad_and_no_grad_apart():
    """A cast made under no_grad has no autograd edge: it is never reused with grad enabled."""
    from albert_kernels.backends import autocast as policy
    w = torch.nn.Parameter(torch.randn(4, 4))
    with policy.cast_cache():
        with torch.no_grad():
            plain = policy._cast(w, torch.bfloat16)
        tracked = policy._cast(w, torch.bfloat16)
        again = policy._cast(w, torch.bfloat16)
    assert plain.grad_fn is None and tracked.grad_fn is not None and again is tracked
    (tracked.float().sum() + again.float().sum()).backward()
    torch.testing.assert_close(w.grad, torch.full((4, 4), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", LOW)
def test_patched_classifier_under_cuda_autocast(dtype):
    hf = _hf("AlbertForSequenceClassification").cuda()
    gold_model = copy.deepcopy(hf).double()
    ours = ak.patch_hf(copy.deepcopy(hf))
    ids, mask, _ = (t.cuda() for t in _batch())
    inputs = dict(input_ids=ids, attention_mask=mask)
    _compare(_run(ours, dtype, "cuda", **inputs), _run(hf, dtype, "cuda", **inputs),
             _run(gold_model, None, "cuda", **inputs), dtype)
