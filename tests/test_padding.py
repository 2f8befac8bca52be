"""ak.unpad / ak.pad against plain Python loops over the mask: every mask kind and mask dtype,
more trailing dims, float64, gradients (and gradcheck), and unpad's output as valid
varlen_attention arguments."""
import pytest
import torch

import albert_kernels as ak
from formulas import F64, REF, assert_close64, gradcheck, leaf, make_mask, randn, varlen_formula


def unpad_loops(hidden, mask):
    B, L = mask.shape
    rows, indices, cu, longest = [], [], [0], 0
    for b in range(B):
        n = 0
        for l in range(L):
            if bool(mask[b, l]):
                rows.append(hidden[b, l])
                indices.append(b * L + l)
                n += 1
        cu.append(cu[-1] + n)
        longest = max(longest, n)
    packed = torch.stack(rows) if rows else hidden.new_zeros(0, *hidden.shape[2:])
    return packed, indices, cu, longest


def pad_loops(packed, indices, B, L):
    out = [[None] * L for _ in range(B)]
    for row, i in zip(packed, indices):
        out[i // L][i % L] = row
    zero = packed.new_zeros(packed.shape[1:])
    return torch.stack([torch.stack([r if r is not None else zero for r in line]) for line in out]) \
        if B and L else packed.new_zeros(B, L, *packed.shape[1:])


MASKS = ["right", "left", "random", "all_pad_row", "none_real", "all_real"]


def _padding_mask(kind, B, L):
    if kind == "none_real":
        return torch.zeros(B, L, dtype=torch.bool)
    if kind == "all_real":
        return torch.ones(B, L, dtype=torch.bool)
    return make_mask(kind, B, L, seed=3)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.uint8], ids=str)
@pytest.mark.parametrize("kind", MASKS)
def test_unpad_pad_match_loops(kind, mask_dtype):
    B, L = 3, 6
    hidden = randn(B, L, 5, seed=1)
    bool_mask = _padding_mask(kind, B, L)
    mask = bool_mask.to(mask_dtype)
    packed, indices, cu, max_seqlen = ak.unpad(hidden, mask)
    e_packed, e_idx, e_cu, e_max = unpad_loops(hidden, bool_mask)
    assert torch.equal(packed, e_packed)
    assert indices.dtype == torch.int64 and indices.tolist() == e_idx
    assert cu.dtype == torch.int32 and cu.tolist() == e_cu
    assert isinstance(max_seqlen, int) and max_seqlen == e_max
    back = ak.pad(packed, indices, B, L)
    assert torch.equal(back, pad_loops(packed, e_idx, B, L))
    # round trip: real rows come back, padded rows are zero
    assert torch.equal(back, hidden * bool_mask[..., None])


def test_unpad_pad_more_trailing_dims_and_float64():
    B, L = 2, 5
    hidden = randn(B, L, 3, 4, dtype=F64, seed=2)
    mask = _padding_mask("random", B, L)
    packed, indices, cu, m = ak.unpad(hidden, mask)
    assert packed.dtype == F64 and packed.shape == (int(mask.sum()), 3, 4)
    back = ak.pad(packed, indices, B, L)
    assert back.dtype == F64
    assert torch.equal(back, hidden * mask[..., None, None])


def test_unpad_pad_output_feeds_varlen_attention():
    """cu_seqlens / max_seqlen from unpad are valid varlen_attention arguments."""
    B, L, H, D = 3, 6, 2, 4
    mask = _padding_mask("all_pad_row", B, L)
    q = randn(B, L, H, D, dtype=F64, seed=1)
    packed, indices, cu, m = ak.unpad(q, mask)
    out = ak.varlen_attention(packed, packed, packed, cu, m, backend=REF)
    lengths = mask.sum(1).tolist()
    assert_close64(out, varlen_formula(packed, packed, packed, lengths), F64)


def test_unpad_pad_gradients_flow():
    B, L = 3, 5
    mask = _padding_mask("random", B, L)
    hidden = randn(B, L, 4, dtype=F64, seed=1).requires_grad_()
    packed, indices, _, _ = ak.unpad(hidden, mask)
    g = randn(*packed.shape, dtype=F64, seed=2)
    packed.backward(g)
    assert torch.equal(hidden.grad, ak.pad(g, indices, B, L))      # scatter of the gradient
    assert torch.equal(hidden.grad[~mask], torch.zeros_like(hidden.grad[~mask]))

    p = packed.detach().clone().requires_grad_()
    out = ak.pad(p, indices, B, L)
    go = randn(B, L, 4, dtype=F64, seed=3)
    out.backward(go)
    assert torch.equal(p.grad, go.reshape(B * L, 4)[indices])      # gather of the gradient



def test_gradcheck_unpad_pad():
    mask = _padding_mask("random", 2, 4)
    hidden = leaf(2, 4, 3, seed=1)
    assert gradcheck(lambda h: ak.unpad(h, mask)[0], (hidden,))
    _, indices, _, _ = ak.unpad(hidden.detach(), mask)
    packed = leaf(int(mask.sum()), 3, seed=2)
    assert gradcheck(lambda p: ak.pad(p, indices, 2, 4), (packed,))
