"""Attention dropout: the Philox generator of backends/dropout.py, the keep
rate, reproducibility, and every CPU backend (reference, cpp, triton under the interpreter)
against an independent dense attention given the mask the call drew, forward and backward."""
import math

import pytest
import torch

from albert_kernels.backends import dropout
from attention_helpers import (BACKENDS, FLOATS, backend_module, binomial_bounds, check_fwd_bwd,
                               dense_padded, dense_varlen, replay_keep)

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter[4] key[2] -> output[4]
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = dropout.philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_randint_is_triton_randint():
    """Element for element equal to tl.randint(seed, offset) with int64 seeds (both halves of the
    key in use, the sign bit too) and int64 offsets beyond 2**32 (the counter's high word)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draws(out_ptr, seed, base, N: tl.constexpr):
        offsets = tl.arange(0, N).to(tl.int64) + base
        tl.store(out_ptr + tl.arange(0, N), tl.randint(seed, offsets))

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET (conftest)
    for seed, base in [(0, 0), (123456789012345, 7), (2 ** 63 - 5, 2 ** 40 - 3),
                       (-5, 2 ** 33 + 11), (0x9E3779B97F4A7C15 - 2 ** 64, 2 ** 62)]:
        out = torch.empty(256, dtype=torch.int32, device=device)
        draws[(1,)](out, seed, base, N=256)
        expected = dropout.randint(seed, torch.arange(256, dtype=torch.int64) + base)
        assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, expected), (seed, base)


def test_keep_mask_offsets_follow_the_contract():
    """keep[s, h, i, j] uses offset + ((s * H + h) * max_q + i) * max_k + j, compared one
    element at a time with the draw at that offset."""
    seed, offset, p, grid = 987654321987, 4096, 0.3, (3, 2, 5, 7)
    keep = dropout.keep_mask(seed, offset, p, *grid)
    thr = dropout.threshold(p)
    n_seqs, heads, max_q, max_k = grid
    for s, h, i, j in [(0, 0, 0, 0), (2, 1, 4, 6), (1, 0, 3, 2), (2, 0, 0, 5), (0, 1, 4, 0)]:
        at = offset + ((s * heads + h) * max_q + i) * max_k + j
        draw = int(dropout.randint(seed, torch.tensor([at]))[0])
        assert bool(keep[s, h, i, j]) == (draw >= thr)


def test_threshold_and_keep_rate():
    assert dropout.threshold(0.0) == 0 and dropout.threshold(0.5) == 2 ** 31
    assert dropout.threshold(1 - 2 ** -40) == 2 ** 32 - 1
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            dropout.threshold(bad)
    for p in (0.1, 0.5, 0.9):
        keep = dropout.keep_mask(42, 0, p, 2, 4, 64, 64)
        lo, hi = binomial_bounds(keep.numel(), 1 - p)
        assert lo <= int(keep.sum()) <= hi, p


def test_draw_seed_offset_follows_the_generator():
    torch.manual_seed(3)
    a = dropout.draw_seed_offset(torch.device("cpu"), 100)
    b = dropout.draw_seed_offset(torch.device("cpu"), 100)
    torch.manual_seed(3)
    assert dropout.draw_seed_offset(torch.device("cpu"), 100) == a and a != b
    assert 0 <= a[0] < 2 ** 63 and a[1] == 0


def _padded_inputs(name, gen):
    """Shapes spanning several query and key blocks of the cpp kernel (48 rows, 128 keys);
    smaller under the Triton interpreter."""
    B, H, L, D = (2, 2, 40, 32) if name == "triton" else (2, 2, 150, 24)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, L - 17:] = False      # right padding
    mask[1, :9] = False           # left padding and a hole
    mask[1, L // 2] = False
    return q, k, v, mask


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", BACKENDS)
def test_padded_dropout_matches_dense_given_the_mask(name, dtype):
    module = backend_module(name)
    gen = torch.Generator().manual_seed(11)
    q, k, v, mask = _padded_inputs(name, gen)
    B, H, L, D = q.shape
    p, seed, scale = 0.3, 1234, D ** -0.5
    keep = replay_keep(seed, p, B, H, L, L)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    check_fwd_bwd(lambda q, k, v: module.attention(q, k, v, mask, scale, p),
                  lambda q, k, v: dense_padded(q, k, v, mask, scale, keep, p),
                  (q, k, v), FLOATS[dtype], grad_out, f"{name} padded dropout", seed=seed)


@pytest.mark.parametrize("dtype", list(FLOATS))
@pytest.mark.parametrize("name", BACKENDS)
def test_varlen_dropout_matches_dense_given_the_mask(name, dtype):
    """Separate q / k sequences, max_seqlen_q / _k above the longest (they lay out the offsets)."""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(12)
    lq, lk = ([9, 0, 30, 4], [17, 5, 25, 0]) if name == "triton" else ([60, 0, 130, 7],
                                                                      [140, 5, 50, 0])
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    H, D = 2, 32
    q = torch.randn(sum(lq), H, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    max_q, max_k, p, seed = max(lq) + 3, max(lk) + 1, 0.2, 99
    keep = replay_keep(seed, p, len(lq), H, max_q, max_k)
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    check_fwd_bwd(
        lambda q, k, v: module.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, D ** -0.5, p),
        lambda q, k, v: dense_varlen(q, k, v, cu_q, cu_k, D ** -0.5, keep, p),
        (q, k, v), FLOATS[dtype], grad_out, f"{name} varlen dropout", seed=seed)


@pytest.mark.parametrize("name", BACKENDS)
def test_dropout_keep_rate_of_the_kernel(name):
    """What the kernel itself drops, read off its output: q = 0 gives uniform probabilities 1/L
    and v = the identity makes out[b, h, i, j] = keep / ((1 - p) L)."""
    module = backend_module(name)
    B, H, L = (1, 2, 32) if name == "triton" else (2, 4, 96)
    q = torch.zeros(B, H, L, L)
    v = torch.eye(L).expand(B, H, L, L).contiguous()
    for p in (0.1, 0.6):
        out = module.attention(q, q.clone(), v, None, 1.0, p)
        kept = out > 0
        assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / ((1 - p) * L)), rtol=1e-5)
        lo, hi = binomial_bounds(out.numel(), 1 - p)
        assert lo <= int(kept.sum()) <= hi, (name, p)


@pytest.mark.parametrize("name", BACKENDS)
def test_dropout_is_reproducible_and_fresh_per_call(name):
    """torch.manual_seed twice: identical outputs and gradients; another seed or the next call
    draws another mask; p = 0 draws nothing from the generator."""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 24, 32, generator=gen, requires_grad=True) for _ in range(3))

    def run(seed):
        torch.manual_seed(seed)
        out = module.attention(q, k, v, None, 0.2, 0.5)
        return (out.detach(),) + torch.autograd.grad(out.sum(), (q, k, v))

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(7)
    assert not torch.equal(module.attention(q, k, v, None, 0.2, 0.5), module.attention(
        q, k, v, None, 0.2, 0.5))
    state = torch.get_rng_state()
    module.attention(q, k, v, None, 0.2, 0.0)
    assert torch.equal(torch.get_rng_state(), state), "p = 0 must not draw"


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_gradcheck_with_dropout(name):
    """float64 gradcheck of the dropped attention, the seed fixed before every evaluation (so
    every evaluation sees one mask), padded with a mask and varlen with separate q / k."""
    module = backend_module(name)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = torch.tensor([[True] * 5 + [False] * 2, [False] + [True] * 6])

    def padded(q, k, v):
        torch.manual_seed(21)
        return module.attention(q, k, v, mask, 0.5, 0.4)

    assert torch.autograd.gradcheck(padded, (q, k, v))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 3, 4, 7], [0, 5, 5, 9]))
    qv = torch.randn(7, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kv, vv = (torch.randn(9, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
              for _ in range(2))

    def varlen(q, k, v):
        torch.manual_seed(22)
        return module.varlen_attention(q, k, v, cu_q, cu_k, 3, 5, 0.5, 0.4)

    assert torch.autograd.gradcheck(varlen, (qv, kv, vv))


def test_dropout_is_unbiased():
    """The expectation of the dropped output is the undropped one (nn.Dropout's scaling)."""
    module = backend_module("cpp")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 16, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    plain = module.attention(q, k, v, None, 0.5, 0.0)
    mean = sum(module.attention(q, k, v, None, 0.5, 0.5) for _ in range(4000)) / 4000
    assert float((mean - plain).abs().max()) < 6 * float(v.abs().max()) / math.sqrt(4000)
