"""How the Triton backend launches its kernels, checked without running them (no GPU needed).

- Attention's launch grids stay within CUDA's limits (x < 2^31, y and z <= 65535) for a varlen
  batch of 70,000 sequences, forward and backward, with and without dropout: the launch code runs
  on CPU tensors with the kernels' ``run`` replaced by a recorder, so the grids are computed, not
  launched. Sequences are on x; y and z (65535) would refuse such a batch with "invalid argument".
- The GEMM's autotune key separates launches that compile different code (PROLOGUE, EPILOGUE,
  ROWSUM_A): a GELU launch never reuses a tile chosen for a plain launch of the same shape.
"""
import contextlib
import importlib

import pytest
import torch

pytest.importorskip("triton")

# the modules (the package's attributes `attention` etc. are the op functions)
attn = importlib.import_module("albert_kernels.backends.triton.attention")
gelu_ffn = importlib.import_module("albert_kernels.backends.triton.gelu_ffn")

CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                     "_attn_bwd_dq_kernel")


@contextlib.contextmanager
def recorded_grids():
    """[(kernel name, grid)] of every attention kernel launch inside the block; nothing runs."""
    launches = []
    kernels = [getattr(attn, name) for name in ATTENTION_KERNELS]
    for name, kernel in zip(ATTENTION_KERNELS, kernels):
        def run(*args, _name=name, grid=None, warmup=False, **kwargs):
            launches.append((_name, grid))
        kernel.run = run
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


def test_the_module_limits_are_cudas():
    assert attn.GRID_LIMITS == CUDA_GRID_LIMITS


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_varlen_grid_of_70000_sequences_stays_within_cuda_limits(dropout_p):
    n_seq, heads, head_dim = 70_000, 4, 32
    lengths = torch.arange(n_seq) % 5 + 1  # 1..5 tokens; more keys than queries below
    cu_q = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), (lengths + 2).cumsum(0)]).to(torch.int32)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(total_q, heads, head_dim, dtype=torch.float16, requires_grad=True)
    k = torch.randn(total_k, heads, head_dim, dtype=torch.float16, requires_grad=True)
    v = torch.randn(total_k, heads, head_dim, dtype=torch.float16, requires_grad=True)
    with recorded_grids() as launches:
        out = attn.varlen_attention(q, k, v, cu_q, cu_k, 5, 7, head_dim ** -0.5, dropout_p)
        out.backward(torch.ones_like(out))
    assert sorted({name for name, _ in launches}) == sorted(ATTENTION_KERNELS), launches
    for name, grid in launches:
        assert len(grid) == 3, (name, grid)
        for axis, (count, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
            assert 1 <= count <= limit, f"{name}: grid {grid}, axis {axis} over CUDA's {limit}"
        assert grid[0] == n_seq and grid[2] == heads, (name, grid)


def test_padded_grid_puts_the_batch_on_x():
    q = torch.randn(70_000, 1, 16, 16, dtype=torch.float16)
    with recorded_grids() as launches:
        attn.attention(q, q, q, None, 0.25)
    assert launches == [("_attn_fwd_kernel", (70_000, 1, 1))]


def test_a_grid_over_cudas_limits_is_refused_with_a_clear_error():
    # 70,000 heads (y, z allow 65535): q [T, H, D] only needs its shape here, so a stride-0 view
    q = torch.zeros(1, 1, 1).expand(1, 70_000, 1)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    layout = attn._Layout(q, q, None, cu, cu, 1, 1)
    with pytest.raises(ValueError, match="70000 heads exceed CUDA's grid limit 65535"):
        layout.grid(32)


def test_autotune_key_names_the_code_selecting_constexprs():
    kernel = gelu_ffn._matmul_kernel
    assert {"M", "N", "K", "PROLOGUE", "EPILOGUE", "ROWSUM_A"} <= set(kernel.keys)
    # triton's autotuner silently skips a key that is not an argument of the kernel
    assert set(kernel.keys) <= set(kernel.arg_names), set(kernel.keys) - set(kernel.arg_names)


def test_gelu_and_plain_launches_of_one_shape_are_tuned_apart():
    """Same shape and dtype, plain bias epilogue, then GELU: two autotune cache entries (with
    M, N, K alone the GELU launch would reuse the plain launch's tile, which may be one that
    usable_configs excludes for GELU because it spills), and the GELU one is a GELU tile."""
    kernel = gelu_ffn._matmul_kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(32, 64, dtype=torch.float16, device=device)
    b = torch.randn(64, 48, dtype=torch.float16, device=device)
    bias = torch.randn(48, dtype=torch.float16, device=device)
    saved = dict(kernel.cache)
    kernel.cache.clear()
    try:
        gelu_ffn.matmul(a, b, epilogue=gelu_ffn.EPI_BIAS, bias=bias)
        gelu_ffn.matmul(a, b, epilogue=gelu_ffn.EPI_BIAS_GELU, bias=bias, gelu_tanh=False)
        entries = dict(kernel.cache)
    finally:
        kernel.cache.clear()
        kernel.cache.update(saved)
    assert len(entries) == 2, entries
    limit = 1 << 30 if device == "cpu" else torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    allowed = gelu_ffn.usable_configs(gelu_ffn.CONFIGS, 2, limit, gelu=True)
    epilogue = kernel.keys.index("EPILOGUE")
    assert sorted(key[epilogue] for key in entries) == [gelu_ffn.EPI_BIAS.value,
                                                        gelu_ffn.EPI_BIAS_GELU.value], entries
    gelu_entries = [c for key, c in entries.items() if key[epilogue] == gelu_ffn.EPI_BIAS_GELU.value]
    assert len(gelu_entries) == 1 and any(gelu_entries[0] is c for c in allowed), entries
