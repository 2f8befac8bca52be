"""CUDA graphs for the padding-free encoder (albert_kernels/backends/cuda_graphs.py).

Everything but the capture is device-independent and proven here on the CPU backends: the
bucket ladder, the dummy tokens and sequences, the padded cu_seqlens and max_seqlen, the
query-only slots of left padding, and the outputs on real tokens equal to the plain packed path
for lengths in the same and in different buckets (CudaGraphRunner(capture=False) runs the
bucketed inputs eagerly). The kernels' side of the contract (zero-length sequences and a
max_seqlen above the longest are accepted) is checked on every CPU backend. The capture itself
runs only on a GPU (skipped here); the CUDA-only parts raise clear errors on the CPU.
"""
import math
from types import SimpleNamespace

import pytest
import torch

import albert_kernels as ak
from albert_kernels.backends import available_backends, unavailable_reason
from albert_kernels.backends.cuda_graphs import (CudaGraphRunner, bucket_tokens, choose_bucket,
                                                 fill_bucketed_inputs, graph_encoder)
from albert_kernels.backends.dispatch import Kernels, resolve
from albert_kernels.errors import BackendUnavailable
from albert_kernels.model.layers import AttentionPlan

CPU_BACKENDS = [b for b in ("cpp", "reference") if b in available_backends("cpu")]


def _config(**over):
    kw = dict(vocab_size=100, embedding_size=16, hidden_size=64, num_attention_heads=4,
              intermediate_size=128, num_hidden_layers=3, max_position_embeddings=128)
    kw.update(over)
    return ak.AlbertConfig(**kw)


def _model(backend, **over):
    torch.manual_seed(0)
    return ak.AlbertModel(_config(**over), backend=backend).eval()


# ------------------------------------------------------------------------------- the buckets
def test_token_ladder():
    assert [bucket_tokens(n) for n in (0, 1, 16, 17, 24, 25, 32, 33, 48, 49, 64, 65, 97, 129)] \
        == [16, 16, 16, 24, 24, 32, 32, 48, 48, 64, 64, 96, 128, 192]
    for n in range(1, 3000):
        b = bucket_tokens(n)
        assert b >= n and (n <= 16 or b <= math.ceil(n * 1.5)), n


@pytest.mark.parametrize("seed", range(5))
def test_bucketed_layout_is_valid_for_random_batches(seed):
    """For random packed batches: every real sequence keeps its rows and bounds, dummy sequences
    are each at most max_seqlen long and cover the dummy rows, the rest are empty, cu_seqlens
    ends at the bucket's token count, max_seqlen bounds every sequence, and the query-only slots
    hold the batch's query-only tokens at their rows."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        n_seq = int(torch.randint(1, 9, (1,), generator=gen))
        lengths = torch.randint(0, 40, (n_seq,), generator=gen)
        lengths[0] = max(int(lengths[0]), 1)
        t = int(lengths.sum())
        cu = torch.zeros(n_seq + 1, dtype=torch.int32)
        cu[1:] = lengths.cumsum(0)
        lead = torch.rand(n_seq, generator=gen) < 0.5
        cu_extra = torch.zeros(n_seq + 1, dtype=torch.int32)
        cu_extra[1:] = lead.cumsum(0)
        n_extra = int(lead.sum())
        tokens = torch.randint(1, 100, (t + n_extra, 3), generator=gen)
        plan = AttentionPlan(None, cu_seqlens=cu, max_seqlen=int(lengths.max()),
                                             n_real=t, cu_extra=cu_extra if n_extra else None)
        bucket = choose_bucket(t, n_seq, int(lengths.max()), n_extra > 0)
        ids = torch.full((bucket.rows, 3), -1, dtype=torch.long)
        cu_b = torch.full((bucket.sequences + 1,), -1, dtype=torch.int32)
        dummy = torch.tensor([0, 0, 0])
        slots = fill_bucketed_inputs(ids, cu_b, tokens, plan, bucket, dummy)
        assert bucket.tokens == bucket_tokens(t) and bucket.max_seqlen >= int(lengths.max())
        assert torch.equal(cu_b[:n_seq + 1], cu) and int(cu_b[-1]) == bucket.tokens
        seq_len = (cu_b[1:] - cu_b[:-1]).tolist()
        assert min(seq_len) >= 0 and max(seq_len) <= bucket.max_seqlen
        dummy_lengths = [n for n in seq_len[n_seq:] if n > 0]
        assert sum(dummy_lengths) == bucket.tokens - t
        assert all(n == 0 for n in seq_len[n_seq + len(dummy_lengths):])  # then only empties
        assert torch.equal(ids[:t], tokens[:t]) and bool((ids[t:bucket.tokens] == 0).all())
        if n_extra:
            rows = torch.nonzero(lead).reshape(-1)
            assert torch.equal(slots, rows)
            assert torch.equal(ids[bucket.tokens + rows], tokens[t:])
            others = torch.ones(bucket.sequences, dtype=torch.bool)
            others[rows] = False
            assert bool((ids[bucket.tokens:][others] == 0).all())
        else:
            assert bucket.rows == bucket.tokens


def test_choose_bucket_rejects_inconsistent_counts():
    with pytest.raises(ValueError, match="max_seqlen"):
        choose_bucket(4, 1, 5, False)


# ----------------------------------------------- the kernels' side: empty sequences, larger max
def _varlen_backends():
    out = [(b, "cpu") for b in CPU_BACKENDS]
    if unavailable_reason("triton", "cpu") is None:  # under TRITON_INTERPRET=1
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        out += [(b, "cuda") for b in ("cuda", "triton") if unavailable_reason(b, "cuda") is None]
    return out


@pytest.mark.parametrize("backend,device", _varlen_backends())
def test_varlen_accepts_empty_sequences_and_a_larger_max_seqlen(backend, device):
    """What the bucketing relies on, for each backend's varlen kernel: real sequences followed
    by a dummy sequence and empty sequences (end offsets repeated), with max_seqlen rounded up,
    give the real sequences' rows of the exact call; the query-only call too."""
    torch.manual_seed(1)
    h, d = 2, 32
    lengths = [5, 0, 11]
    t = sum(lengths)
    dummy = 7
    q, k, v = (torch.randn(t + dummy, h, d, device=device) for _ in range(3))
    cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32, device=device)
    cu_b = torch.tensor([0, 5, 5, 16, 23, 23, 23, 23, 23], dtype=torch.int32, device=device)
    module = resolve(backend, device, torch.float32, d).module
    exact = module.varlen_attention(q[:t], k[:t], v[:t], cu, cu, 11, 11, d ** -0.5)
    bucketed = module.varlen_attention(q, k, v, cu_b, cu_b, 16, 16, d ** -0.5)
    torch.testing.assert_close(bucketed[:t], exact, rtol=1e-6, atol=1e-6)
    # query-only rows: one per sequence, the rows of sequences 0 and 2 used, the others dummies
    qx = torch.randn(8, h, d, device=device)
    cu_x = torch.arange(9, dtype=torch.int32, device=device)
    exact_x = module.varlen_attention(qx[[0, 2]], k[:t], v[:t],
                                      torch.tensor([0, 1, 1, 2], dtype=torch.int32, device=device),
                                      cu, 1, 11, d ** -0.5)
    bucketed_x = module.varlen_attention(qx, k, v, cu_x, cu_b, 1, 16, d ** -0.5)
    torch.testing.assert_close(bucketed_x[[0, 2]], exact_x, rtol=1e-6, atol=1e-6)
    assert bucketed_x[1].abs().max() == 0 and bucketed_x[5:].abs().max() == 0  # no keys: zeros


# ------------------------------------------------------------ the model: bucketed == plain
def _inputs(lengths, seqlen=None, left=False, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    seqlen = seqlen or max(lengths)
    ids = torch.randint(5, 100, (len(lengths), seqlen), generator=gen)
    pos = torch.arange(seqlen)[None, :]
    n = torch.tensor(lengths)[:, None]
    mask = (pos >= seqlen - n) if left else (pos < n)
    return ids, mask.long()


CASES = {  # name: (lengths per row, left padding); single rows land in buckets 16, 16, 16, 24, 48
    "one-3": ([3], False), "one-9": ([9], False), "one-16": ([16], False),
    "one-17": ([17], False), "one-40": ([40], False),
    "batch-right": ([12, 5, 30, 1], False), "batch-empty-row": ([7, 0, 20], False),
    "batch-left": ([12, 5, 30, 9], True),
}


def _run_both(model, ids, mask, **kw):
    model.cuda_graphs = None
    with torch.inference_mode():
        plain = model(ids, mask, **kw)
    model.cuda_graphs = CudaGraphRunner(max_tokens=256, capture=False)
    with torch.inference_mode():
        bucketed = model(ids, mask, **kw)
    return plain, bucketed


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bucketed_encoder_gives_the_plain_outputs(backend, case):
    lengths, left = CASES[case]
    model = _model(backend)
    ids, mask = _inputs(lengths, left=left)
    plain, bucketed = _run_both(model, ids, mask)
    runner = model.cuda_graphs
    assert sum(runner.bucket_calls.values()) == 1, "the bucketed path did not run"
    bucket = runner.last_bucket
    assert bucket.tokens == bucket_tokens(sum(lengths)) and bucket.query_only == left
    torch.testing.assert_close(bucketed.last_hidden_state, plain.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bucketed.pooler_output, plain.pooler_output, rtol=1e-5, atol=1e-5)
    real = mask.bool()
    if not left:  # padded positions are zero rows, as in the plain path
        assert bucketed.last_hidden_state[~real].abs().max() == 0 if (~real).any() else True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_and_different_buckets_across_calls(backend):
    """Successive requests of several lengths through one runner: the same bucket is reused for
    lengths that share it, others get their own; every output is the plain path's."""
    model = _model(backend)
    runner = CudaGraphRunner(max_tokens=64, capture=False)
    for n, tokens in ((3, 16), (11, 16), (16, 16), (17, 24), (20, 24), (33, 48), (48, 48)):
        ids, mask = _inputs([n], gen_seed=n)
        model.cuda_graphs = None
        with torch.inference_mode():
            plain = model(ids, mask).last_hidden_state
        model.cuda_graphs = runner
        with torch.inference_mode():
            out = model(ids, mask).last_hidden_state
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        assert runner.last_bucket.tokens == tokens
    assert sorted(runner.bucket_calls.values()) == [2, 2, 3]  # three buckets


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
def test_packed_rows_and_heads(backend):
    """Packed rows (position_ids restarting at 0) and a task head through the bucketed path."""
    torch.manual_seed(0)
    clf = ak.AlbertForSequenceClassification(_config(), num_labels=3, backend=backend).eval()
    ids = torch.randint(5, 100, (2, 20))
    position_ids = torch.cat([torch.arange(8), torch.arange(12)]).expand(2, 20)
    with torch.inference_mode():
        plain = clf(ids, position_ids=position_ids).logits
        clf.albert.cuda_graphs = CudaGraphRunner(capture=False)
        out = clf(ids, position_ids=position_ids).logits
    assert clf.albert.cuda_graphs.last_bucket.tokens == 48  # 40 tokens in 4 sequences
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
def test_eager_fallbacks(backend):
    """Runs eagerly (the runner not used): a bucket above max_tokens, hidden states asked for,
    the padded layout."""
    model = _model(backend)
    model.cuda_graphs = runner = CudaGraphRunner(max_tokens=32, capture=False)
    ids, mask = _inputs([40])
    with torch.inference_mode():
        model(ids, mask)
        model(ids[:, :10], mask[:, :10], output_hidden_states=True)
        model.unpad = False
        model(ids[:, :10], mask[:, :10])
    assert runner.last_bucket is None and not runner.bucket_calls


# -------------------------------------------------------------------------------- the errors
@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
def test_errors_on_the_cpu_and_in_training(backend):
    model = _model(backend)
    with pytest.raises(RuntimeError, match="CUDA device"):
        model.enable_cuda_graphs()
    assert model.cuda_graphs is None
    clf = ak.AlbertForSequenceClassification(_config(), backend=backend).eval()
    with pytest.raises(RuntimeError, match="CUDA device"):
        clf.enable_cuda_graphs(max_tokens=128)
    with pytest.raises(ValueError, match="max_tokens"):
        CudaGraphRunner(max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        CudaGraphRunner(max_tokens=True)
    ids, mask = _inputs([9])
    model.cuda_graphs = CudaGraphRunner(capture=False)
    with pytest.raises(RuntimeError, match="inference_mode"):  # autograd on
        model(ids, mask)
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="eval"):  # dropout RNG: refused
        model(ids, mask)
    model.eval()
    runner = CudaGraphRunner(capture=True)  # the capturing runner on CPU parameters
    model.cuda_graphs = runner
    with torch.no_grad(), pytest.raises(RuntimeError, match="CUDA device"):
        model(ids, mask)
    model.disable_cuda_graphs()
    assert model.cuda_graphs is None


class _OnCuda:
    """What the CUDA-graph checks read of a model (mode and parameters), its parameter claiming
    a CUDA device, so that the backend check is reached on a machine without one."""
    training = False

    def parameters(self):
        yield SimpleNamespace(device=torch.device("cuda", 0), requires_grad=False)


def test_graph_encoder_capability():
    """Kernels.graph_encoder: the backends that export graph_encoder give a capturing runner;
    the others raise BackendUnavailable naming the backends that have one; max_tokens, the
    mode and the device are checked first, in that order (the errors of enable_cuda_graphs)."""
    capable = Kernels("fake", SimpleNamespace(graph_encoder=graph_encoder))
    runner = capable.graph_encoder(_OnCuda(), 64)
    assert isinstance(runner, CudaGraphRunner) and runner.capture and runner.max_tokens == 64
    for backend in CPU_BACKENDS:
        kernels = resolve(backend, "cpu", torch.float32)
        with pytest.raises(BackendUnavailable,
                           match=rf"'cuda' or 'triton' backend, got '{backend}'"):
            kernels.graph_encoder(_OnCuda(), 64)
        with pytest.raises(ValueError, match="max_tokens"):
            kernels.graph_encoder(_OnCuda(), 0)
        training = _OnCuda()
        training.training = True
        with pytest.raises(RuntimeError, match="eval"):
            kernels.graph_encoder(training, 64)
        with pytest.raises(RuntimeError, match="CUDA device"):
            kernels.graph_encoder(_model(backend), 64)
    assert not hasattr(resolve(CPU_BACKENDS[0], "cpu", torch.float32).module, "graph_encoder")


def test_runner_copies_without_graphs():
    import copy
    import pickle
    runner = CudaGraphRunner(max_tokens=64)
    runner.graphs[("k", None)] = object()
    for clone in (copy.deepcopy(runner), pickle.loads(pickle.dumps(runner))):
        assert clone.max_tokens == 64 and clone.capture and clone.graphs == {}
    model = _model(CPU_BACKENDS[0])
    model.cuda_graphs = runner
    clone = copy.deepcopy(model)
    assert clone.cuda_graphs is not runner and clone.cuda_graphs.graphs == {}


# ------------------------------------------------------------------------- torch.compile on CPU
@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
def test_torch_compile_reduce_overhead_runs_on_cpu(backend):
    """torch.compile(model, mode="reduce-overhead") (CUDA graphs on a GPU; on the CPU it just
    compiles): the padded layout runs under compile and gives the eager outputs."""
    model = _model(backend, num_hidden_layers=2)
    ids, mask = _inputs([12, 5], gen_seed=3)
    with torch.no_grad():
        eager = model(ids, mask)
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(2):
            out = compiled(ids, mask)
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, eager.pooler_output, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_capture_and_replay_match_the_eager_model(backend, dtype):
    if unavailable_reason(backend, "cuda") is not None:
        pytest.skip(unavailable_reason(backend, "cuda"))
    torch.manual_seed(0)
    model = ak.AlbertModel(_config(hidden_size=128, num_attention_heads=4), backend=backend)
    model = model.to("cuda", dtype).eval()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    model.enable_cuda_graphs(max_tokens=256)
    runner = model.cuda_graphs
    for lengths, left in (([3], False), ([9], False), ([17], False), ([12, 5, 30], False),
                          ([12, 5, 30], True), ([9], False)):
        _replay_matches_eager(model, runner, _inputs(lengths, left=left), tol)
    assert len(runner.graphs) == 4  # 16 (3 and 9), 24 (17), 48, 48 with query-only slots
    # values changed in place are read by the next replay; a cast captures anew
    with torch.no_grad():
        model.encoder.embedding_hidden_mapping_in.bias.add_(0.5)
    _replay_matches_eager(model, runner, _inputs([9]), tol)
    assert len(runner.graphs) == 4
    model.float() if dtype != torch.float32 else model.half()
    _replay_matches_eager(model, runner, _inputs([9]), dict(rtol=2e-2, atol=2e-2))
    assert len(runner.graphs) == 1


def _replay_matches_eager(model, runner, inputs, tol):
    ids, mask = (t.cuda() for t in inputs)
    with torch.inference_mode():
        out = model(ids, mask)
        model.cuda_graphs = None
        eager = model(ids, mask)
        model.cuda_graphs = runner
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state, **tol)
    torch.testing.assert_close(out.pooler_output, eager.pooler_output, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_reduce_overhead_on_cuda_records_cuda_graphs(backend):
    """torch.compile(model, mode="reduce-overhead") on CUDA: the padded layout has static shapes,
    so inductor must record CUDA graphs without skipping them (no host sync, no boolean
    index_put, no CPU op in the graph) and give the eager outputs."""
    if unavailable_reason(backend, "cuda") is not None:
        pytest.skip(unavailable_reason(backend, "cuda"))
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = ak.AlbertModel(_config(hidden_size=128, num_attention_heads=4), backend=backend)
    model = model.cuda().eval()
    ids, mask = (t.cuda() for t in _inputs([12, 5], gen_seed=3))
    counters.clear()
    with torch.no_grad():
        eager = model(ids, mask)
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(ids, mask)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(out.last_hidden_state, eager.last_hidden_state,
                               rtol=1e-4, atol=1e-4)
