"""attn_implementation="albert_kernels": transformers' own BERT and ALBERT classes with our attention
behind AttentionInterface give transformers' outputs and gradients (SDPA / eager in float32 as the
base, float64 SDPA as the gold of the error budget), run our kernels where they can (checked by
counting the calls), and fall back to transformers' SDPA / eager where they cannot."""
import copy

import pytest
import torch

import albert_kernels as ak
from albert_kernels.integrations import hf_attention
from albert_kernels.tools.budget import check_budget

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AttentionInterface"):
    pytest.skip("transformers >= 5 is needed for AttentionInterface", allow_module_level=True)

VOCAB, SEQ = 80, 10
KINDS = ["bert", "albert"]


@pytest.fixture(params=["own", "reference"])
def impl(request, cpu_backend):
    """The attn_implementation name registered for the backend under test."""
    backend = cpu_backend if request.param == "own" else "reference"
    return ak.register_hf_attention(f"albert_kernels_{backend}", backend=backend)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the calls that reach our kernels and transformers' SDPA fallback."""
    counts = {"attention": 0, "varlen": 0, "sdpa": 0}
    sdpa_module = pytest.importorskip("transformers.integrations.sdpa_attention")

    def spy(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(hf_attention, "attention", spy("attention", hf_attention.attention))
    monkeypatch.setattr(hf_attention, "varlen_attention", spy("varlen", hf_attention.varlen_attention))
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward",
                        spy("sdpa", sdpa_module.sdpa_attention_forward))
    return counts


def _config(kind, attn="sdpa", **kw):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  max_position_embeddings=32, num_labels=3)
    common.update(kw)
    if kind == "bert":
        cfg = transformers.BertConfig(**common)
    else:
        cfg = transformers.AlbertConfig(embedding_size=16, classifier_dropout_prob=0.0, **common)
    cfg._attn_implementation = attn
    return cfg


def _model(kind, cls="Model", attn="sdpa", **kw):
    torch.manual_seed(0)
    name = ("Bert" if kind == "bert" else "Albert") + cls
    return getattr(transformers, name)(_config(kind, attn, **kw)).train()


def _with(model, attn, dtype=None):
    other = copy.deepcopy(model)
    if dtype is not None:
        other = other.to(dtype)
    other.set_attn_implementation(attn)
    return other


def _batch(padding):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones(3, SEQ, dtype=torch.long)
    if padding == "right":
        mask[0, 4:] = 0
        mask[2, 7:] = 0
    elif padding == "left":
        mask[0, :5] = 0
        mask[1, :2] = 0
    return ids, mask


def _run(model, autocast=None, **inputs):
    """Every hidden state (padded positions included) and the parameter gradients of a fixed
    weighted sum of them, under CPU autocast when asked."""
    model.zero_grad()
    if autocast is None:
        out = model(**inputs)
    else:
        with torch.autocast("cpu", dtype=autocast):
            out = model(**inputs)
    value = out.last_hidden_state
    weights = torch.linspace(-1, 1, value.numel(), dtype=torch.float64).reshape(value.shape)
    (value.double() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _compare(cand, base, gold, dtype=None):
    (c, cg), (b, bg), (g, gg) = cand, base, gold
    assert c.dtype == b.dtype
    result = check_budget(c, b, g, dtype=dtype)
    assert result.ok, f"output: {result}"
    assert set(cg) == set(bg) == set(gg)
    scale = max(t.abs().max().item() for t in gg.values())
    for name, grad in gg.items():
        result = check_budget(cg[name], bg[name], grad, dtype=dtype, scale=scale)
        assert result.ok, f"grad of {name}: {result}"


@pytest.mark.parametrize("padding,base_attn", [("right", "sdpa"), ("left", "sdpa"),
                                               ("none", "sdpa"), ("left", "eager")])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_grads_fp32(kind, padding, base_attn, impl, calls):
    model = _model(kind, attn=base_attn)
    ids, mask = _batch(padding)
    inputs = dict(input_ids=ids, attention_mask=mask)
    base = _run(model, **inputs)
    gold = _run(_with(model, "sdpa", torch.float64), **inputs)
    ours = _with(model, impl)
    assert ours.config._attn_implementation == impl
    cand = _run(ours, **inputs)
    _compare(cand, base, gold)
    assert calls["attention"] == 2 and calls["sdpa"] == 0, calls   # one per layer, all fused


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_grads_under_autocast(kind, padding, dtype, impl, calls):
    model = _model(kind)
    ids, mask = _batch(padding)
    inputs = dict(input_ids=ids, attention_mask=mask)
    gold = _run(_with(model, "sdpa", torch.float64), **inputs)
    base = _run(model, autocast=dtype, **inputs)
    cand = _run(_with(model, impl), autocast=dtype, **inputs)
    _compare(cand, base, gold, dtype)
    assert calls["attention"] == 2 and calls["sdpa"] == 0, calls


@pytest.mark.parametrize("kind", KINDS)
def test_packed_rows_from_position_ids_run_varlen(kind, impl, calls):
    """position_ids restarting at 0 inside a row (DataCollatorWithFlattening's packing): BERT's
    mask makes each run its own sequence (SDPA's block-diagonal mask; ours: varlen). transformers'
    ALBERT builds its mask without position_ids, so there every row is one sequence, in SDPA and
    in ours alike."""
    model = _model(kind)
    ids, _ = _batch("none")
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2],
                                 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                                 [0, 0, 1, 2, 3, 4, 0, 1, 2, 3]])
    inputs = dict(input_ids=ids, position_ids=position_ids)
    base = _run(model, **inputs)
    gold = _run(_with(model, "sdpa", torch.float64), **inputs)
    cand = _run(_with(model, impl), **inputs)
    _compare(cand, base, gold)
    fused = {"bert": "varlen", "albert": "attention"}[kind]
    assert calls[fused] == 2 and calls["sdpa"] == 0, calls


def test_packed_rows_layout_recognises_only_block_diagonal_masks():
    runs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    block = (runs[:, :, None] == runs[:, None, :])[:, None]
    cu_seqlens, max_seqlen = hf_attention.packed_rows_layout(block)
    assert cu_seqlens.tolist() == [0, 2, 5, 6] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3
    two_rows = torch.cat([block, torch.ones_like(block)])
    assert hf_attention.packed_rows_layout(two_rows)[0].tolist() == [0, 2, 5, 6, 12]
    padding = torch.tensor([[True] * 4 + [False] * 2]).reshape(1, 1, 1, 6).expand(1, 1, 6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    not_contiguous = (torch.tensor([[0, 1, 0, 1, 0, 1]])[:, :, None]
                      == torch.tensor([[0, 1, 0, 1, 0, 1]])[:, None, :])[:, None]
    for mask in (padding, causal, not_contiguous, block.float()):
        assert hf_attention.packed_rows_layout(mask) is None


def _flattened(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    return seqs, batch


@pytest.mark.parametrize("kind", KINDS)
def test_flash_style_cu_seq_lens_kwargs(kind, impl, calls):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): cu_seq_lens_q/k and
    max_length_q/k reach the attention as keyword arguments; each sequence gives what it gives
    alone (SDPA, one sequence per call)."""
    model = _model(kind).eval()
    ours = _with(model, impl)
    seqs, batch = _flattened([4, 7, 1, 5])
    assert "cu_seq_lens_q" in batch and "position_ids" in batch
    with torch.no_grad():
        packed = ours(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state[0]
        alone = torch.cat([model(input_ids=s[None]).last_hidden_state[0] for s in seqs])
        without_position_ids = ours(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                                    cu_seq_lens_k=batch["cu_seq_lens_k"],
                                    max_length_q=batch["max_length_q"],
                                    max_length_k=batch["max_length_k"]).last_hidden_state[0]
    assert (packed - alone).abs().max().item() <= 1e-5
    assert calls["varlen"] == 4 and calls["sdpa"] == 0, calls   # 2 layers x 2 calls
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        ours(input_ids=batch["input_ids"], attention_mask=mask,
             cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
             max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"])
    assert without_position_ids.shape == packed.shape


@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions_are_eager_probabilities(kind, impl, calls):
    model = _model(kind, attn="eager").eval()
    ids, mask = _batch("right")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = _with(model, impl)(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-6)
    assert calls["attention"] == 0 and calls["sdpa"] == 0


def test_output_attentions_from_the_config(impl):
    model = _model("bert", attn="eager", output_attentions=True).eval()
    ids, mask = _batch("left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).attentions
        got = _with(model, impl)(input_ids=ids, attention_mask=mask).attentions
    assert len(got) == 2 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_output_attentions_with_cu_seq_lens_needs_the_packed_mask(impl):
    model = _with(_model("bert").eval(), impl)
    _, batch = _flattened([3, 4])
    flash = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions"):
            model(input_ids=batch["input_ids"], output_attentions=True, **flash)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    output_attentions=True, **flash)
    probs = out.attentions[0][0, 0]
    assert probs[:3, 3:].abs().max().item() == 0 and probs[3:, :3].abs().max().item() == 0


def test_custom_4d_additive_mask_falls_back_to_sdpa(impl, calls):
    """A 4D mask we did not build (here arbitrary additive biases) is passed to transformers' SDPA
    as it is: the same numbers as attn_implementation="sdpa"."""
    model = _model("bert").eval()
    ids, _ = _batch("none")
    bias = torch.randn(3, 1, SEQ, SEQ, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=bias).last_hidden_state
        got = _with(model, impl)(input_ids=ids, attention_mask=bias).last_hidden_state
    assert torch.equal(got, want)
    assert calls["sdpa"] == 2 and calls["attention"] == 0


def test_decoder_and_cross_attention_fall_back_to_sdpa(impl, calls):
    """BERT as a decoder: causal self-attention and cross-attention, which our kernels do not
    express, give transformers' SDPA numbers."""
    model = _model("bert", "LMHeadModel", is_decoder=True, add_cross_attention=True).eval()
    ids, mask = _batch("right")
    encoder_states = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(4))
    inputs = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=encoder_states,
                  use_cache=False)
    with torch.no_grad():
        want = model(**inputs).logits
        got = _with(model, impl)(**inputs).logits
    assert torch.equal(got, want)
    assert calls["attention"] == 0 and calls["sdpa"] == 4   # 2 layers x (self + cross)


def test_head_mask_is_rejected():
    q = torch.randn(1, 2, 3, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="head_mask"):
        hf_attention.hf_attention_forward(module, q, q, q, None, head_mask=torch.ones(2))


def test_attention_dropout_runs_in_the_kernel(impl, calls):
    model = _model("bert", attention_probs_dropout_prob=0.5)
    ours = _with(model, impl)
    ids, mask = _batch("right")
    torch.manual_seed(0)
    a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    b = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.equal(a, b), "dropout draws differ from call to call"
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    ours.eval()
    with torch.no_grad():
        c = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        d = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (c - d).abs().max().item() <= 1e-5
    assert calls["attention"] == 6 and calls["sdpa"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_with_the_default_name(kind, tmp_path):
    assert ak.register_hf_attention() == "albert_kernels"
    model = _model(kind, "ForSequenceClassification").eval()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="albert_kernels").eval()
    assert loaded.config._attn_implementation == "albert_kernels"
    ids, mask = _batch("left")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match="name"):
        ak.register_hf_attention("")
    with pytest.raises(ValueError, match="name"):
        ak.register_hf_attention("my/sdpa")
    with pytest.raises(ValueError, match="name"):
        ak.register_hf_attention("flex_attention")
    with pytest.raises(TypeError, match="backend"):
        ak.register_hf_attention("albert_kernels_x", backend=3)
    with pytest.raises(ValueError, match="backend"):
        ak.register_hf_attention("albert_kernels_x", backend="nope")


FAMILY = {
    "roberta": lambda kw: transformers.RobertaConfig(**kw),
    "xlm_roberta": lambda kw: transformers.XLMRobertaConfig(**kw),
    "electra": lambda kw: transformers.ElectraConfig(embedding_size=16, **kw),
    "distilbert": lambda kw: transformers.DistilBertConfig(
        vocab_size=kw["vocab_size"], dim=32, n_layers=2, n_heads=4, hidden_dim=48,
        max_position_embeddings=kw["max_position_embeddings"], attention_dropout=0.0, dropout=0.0),
}


@pytest.mark.parametrize("family", sorted(FAMILY))
def test_other_encoders_dispatch_through_the_interface(family, cpu_backend, calls):
    """The rest of the BERT family reaches our attention through the same string and keeps
    transformers' SDPA outputs (left and right padding in one batch)."""
    name = ak.register_hf_attention(f"albert_kernels_{cpu_backend}", backend=cpu_backend)
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(FAMILY[family](kw), attn_implementation="sdpa")
    model.eval()
    ids, mask = _batch("right")
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = _with(model, name)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5
    assert calls["attention"] == 2 and calls["sdpa"] == 0, calls
