"""Separate query and key sequences in varlen attention (FlashAttention's cu_seqlens_q /
cu_seqlens_k), and what masked or out-of-sequence slots may hold, on every CPU backend, against
an independent float64 dense attention."""
import pytest
import torch

from attention_helpers import (BACKENDS, FLOATS, backend_module, check_fwd_bwd, dense_padded,
                               dense_varlen)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lq, lk, H=2, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(q.shape, generator=gen, dtype=torch.float64)


# (query lengths, key lengths): the left-padding layout (one query-only token, the pooled pad
# position, ahead of each sequence's real tokens), zero-key sequences, zero-query sequences,
# several query and key blocks of the cpp kernel (48 rows, 128 keys)
LAYOUTS = {
    "query-only first token": ([6, 11, 3], [5, 10, 2]),
    "zero keys and zero queries": ([4, 0, 7, 2], [0, 6, 7, 5]),
    "more keys than queries": ([1, 9], [13, 30]),
    "multi-block": ([70, 130, 1], [150, 40, 3]),
}


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", BACKENDS)
def test_varlen_separate_q_k_matches_dense(name, layout, dtype):
    if name == "triton" and layout == "multi-block":
        pytest.skip("too slow under the Triton interpreter (tests/test_triton_interpreter.py)")
    module = backend_module(name)
    lq, lk = LAYOUTS[layout]
    q, k, v, grad_out = _packed(lq, lk)
    cu_q, cu_k = _cu(lq), _cu(lk)
    scale = 32 ** -0.5
    out, cand = check_fwd_bwd(
        lambda q, k, v: module.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), scale),
        lambda q, k, v: dense_varlen(q, k, v, cu_q, cu_k, scale),
        (q, k, v), FLOATS[dtype], grad_out, f"{name} {layout}")
    for s, (nq, nk) in enumerate(zip(lq, lk)):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        if nk == 0:  # queries without keys: exactly zero rows and zero query gradients
            assert torch.equal(out[qs], torch.zeros_like(out[qs]))
            assert torch.equal(cand[0].grad[qs], torch.zeros_like(cand[0].grad[qs]))
        if nq == 0:  # keys no query sees: zero key and value gradients
            assert not cand[1].grad[ks].any() and not cand[2].grad[ks].any()


@pytest.mark.parametrize("name", BACKENDS)
def test_query_only_tokens_match_padded_attention(name):
    """A left-padded row as varlen: the padded first position is a query that attends to the
    real keys (what the pooler reads in transformers); padded attention with the key mask gives
    the same rows."""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(3)
    B, H, L, D = 2, 2, 12, 32
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :4] = False                     # left padding: keys 4.. are real
    padded = module.attention(q, k, v, mask, 0.3)
    # queries: position 0 (a pad) and the real ones; keys: the real ones
    rows = [[0] + mask[b].nonzero().flatten().tolist() for b in range(B)]
    keys = [mask[b].nonzero().flatten().tolist() for b in range(B)]
    tok = lambda t, idx: torch.cat([t[b][:, idx[b]].transpose(0, 1) for b in range(B)])
    out = module.varlen_attention(tok(q, rows), tok(k, keys), tok(v, keys),
                                  _cu([len(r) for r in rows]), _cu([len(c) for c in keys]),
                                  max(map(len, rows)), max(map(len, keys)), 0.3)
    expected = tok(padded, rows)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def _poison(t, where, value):
    t = t.clone()
    t[where] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", BACKENDS)
def test_masked_key_value_slots_never_reach_real_rows(name, value):
    """Padded key/value slots (padded layout) and keys of a sequence without
    queries (varlen) hold NaN / inf; real rows' outputs and every real gradient stay finite and
    right, with and without dropout."""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(8)
    B, H, L, D = 2, 2, 20, 32
    q, k, v, g = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 13:] = False
    mask[1, :5] = False
    slots = ~mask[:, None, :, None].expand(B, H, L, D)
    k, v = _poison(k, slots, value), _poison(v, slots, value)
    for p in (0.0, 0.25):
        cand = [t.float().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(1)
        out = module.attention(*cand, mask, 0.2, p)
        out.backward(g.float())
        assert torch.isfinite(out).all() and torch.isfinite(cand[0].grad).all()
        real = mask[:, None, :, None].expand(B, H, L, D)
        for grad in cand[1].grad, cand[2].grad:
            assert torch.isfinite(grad[real]).all() and not grad[~real].any()
        if p == 0:
            gold = dense_padded(q, k.masked_fill(slots, 0), v.masked_fill(slots, 0), mask, 0.2)
            assert torch.allclose(out.double(), gold, atol=1e-5)
    lq, lk = [5, 0, 4], [6, 3, 7]           # sequence 1: keys only, holding NaN / inf
    qv, kv, vv, gv = _packed(lq, lk, seed=9)
    kv, vv = _poison(kv, slice(6, 9), value), _poison(vv, slice(6, 9), value)
    cand = [t.float().requires_grad_() for t in (qv, kv, vv)]
    out = module.varlen_attention(*cand, _cu(lq), _cu(lk), 5, 7, 0.2)
    out.backward(gv.float())
    assert torch.isfinite(out).all() and all(torch.isfinite(c.grad).all() for c in cand)
    assert not cand[1].grad[6:9].any() and not cand[2].grad[6:9].any()


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", BACKENDS)
def test_huge_scores_stay_finite_and_right(name, dtype):
    """q.k in the thousands (softmax saturates to one key per row); the
    output and gradients stay finite and within the budget of float64. (triton fp32 dV was
    5.4e-4 off against a budget of 2.6e-4 under the interpreter, whose fp32 dot summed the
    forward's Q K^T and the backward's K Q^T in different orders: backends/triton/common.py.)"""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(6)
    B, H, L, D = 1, 2, 24, 32
    q, k = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 30 for _ in range(2))
    v, g = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -3:] = False
    out, cand = check_fwd_bwd(lambda q, k, v: module.attention(q, k, v, mask, D ** -0.5),
                              lambda q, k, v: dense_padded(q, k, v, mask, D ** -0.5),
                              (q, k, v), FLOATS[dtype], g, f"{name} huge scores")
    assert torch.isfinite(out).all() and all(torch.isfinite(c.grad).all() for c in cand)


def test_public_ops_take_cu_seqlens_k_and_dropout():
    """ak.varlen_attention(..., cu_seqlens_k=, max_seqlen_k=, dropout_p=) and ak.attention(...,
    dropout_p=) reach the backend with the contract's arguments; None means the query layout."""
    import albert_kernels as ak
    lq, lk = [3, 0, 7, 2], [5, 4, 0, 11]
    q, k, v, _ = _packed(lq, lk, H=2, D=16)
    q, k, v = q.float(), k.float(), v.float()
    cu_q, cu_k = _cu(lq), _cu(lk)
    out = ak.varlen_attention(q, k, v, cu_q, 7, cu_seqlens_k=cu_k, max_seqlen_k=11,
                              backend="reference")
    assert torch.allclose(out.double(), dense_varlen(q.double(), k.double(), v.double(), cu_q,
                                                      cu_k, 0.25), atol=1e-6)
    same = ak.varlen_attention(q, q, q, cu_q, 7, backend="reference")
    assert torch.equal(same, ak.varlen_attention(q, q, q, cu_q, 7, cu_seqlens_k=cu_q,
                                                 max_seqlen_k=7, backend="reference"))
    torch.manual_seed(0)
    a = ak.varlen_attention(q, k, v, cu_q, 7, cu_seqlens_k=cu_k, max_seqlen_k=11, dropout_p=0.5,
                            backend="reference")
    assert not torch.equal(a, out)
    torch.manual_seed(0)
    assert torch.equal(a, ak.varlen_attention(q, k, v, cu_q, 7, cu_seqlens_k=cu_k,
                                              max_seqlen_k=11, dropout_p=0.5,
                                              backend="reference"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cu_seqlens_k=None), ValueError, "need cu_seqlens_k"),
    (dict(cu_seqlens_k="k"), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 9, 9, 20])), TypeError, "cu_seqlens_k must be int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 20], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k must have the B\+1 = 5 entries"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 9, 9, 19], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k\[-1\] must equal T = 20 \(tokens in k\)"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 4, 9, 20], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    (dict(max_seqlen_k=10), ValueError, r"max_seqlen_k = 10 is smaller"),
    (dict(max_seqlen_k=None), ValueError, r"max_seqlen_k \(None: max_seqlen\) = 8 is smaller"),
    (dict(max_seqlen_k=11.0), TypeError, "max_seqlen_k must be a non-negative int"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
])
def test_varlen_validation_names_the_argument(kwargs, error, match):
    import albert_kernels as ak
    q, k, v = torch.randn(12, 2, 16), torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    cu_q = torch.tensor([0, 3, 3, 10, 12], dtype=torch.int32)
    args = dict(cu_seqlens_k=torch.tensor([0, 5, 9, 9, 20], dtype=torch.int32), max_seqlen_k=11)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ak.varlen_attention(q, k, v, cu_q, 8, backend="reference", **args)


def test_attention_dropout_p_validation():
    import albert_kernels as ak
    q = torch.randn(1, 2, 3, 4)
    for bad, error in [(1.0, ValueError), (-1e-9, ValueError), (True, TypeError)]:
        with pytest.raises(error, match="dropout_p"):
            ak.attention(q, q, q, dropout_p=bad, backend="reference")
    with pytest.raises(ValueError, match=r"k must be \[Tk, H, D\] with q's H, D"):
        ak.varlen_attention(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8),
                            torch.tensor([0, 4], dtype=torch.int32), 4, backend="reference")
