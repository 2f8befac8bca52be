"""CPU op benchmarks of the "cpp" backend against in-process baselines (docs/performance.md).

    python benchmarks/bench_cpu_ops.py [--repeats 30] [--dtype float32] [--threads N]

Workload: ALBERT-base, B=8, L=128, hidden 768, intermediate 3072, 12 heads x 64, sequence lengths
drawn uniformly from [32, 128] with a fixed seed (per-token ops run on the packed real tokens, as
the model does). Timings are medians over repeats after warm-up, under torch.inference_mode();
the spread is the interquartile range. Figures are ratios to baselines measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import albert_kernels as ak


def bench(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median seconds, interquartile range) of fn() over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def row(name: str, t: tuple[float, float], nbytes: float | None = None, ref: float | None = None,
        ref_name: str = "") -> None:
    gbs = f"{nbytes / t[0] / 1e9:8.1f} GB/s" if nbytes else " " * 13
    ratio = f"{ref / t[0]:6.2f}x {ref_name}" if ref else ""
    print(f"  {name:<42} {t[0] * 1e3:9.3f} ms +-{t[1] * 1e3:6.3f}  {gbs}  {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 gives steadier figures on a busy machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dt = getattr(torch, args.dtype)
    R = args.repeats
    B, L, H, D, hidden, inner = 8, 128, 12, 64, 768, 3072
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    T = int(lengths.sum())
    esize = torch.finfo(dt).bits // 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"B={B} L={L} lengths U[32,128] -> T={T} real tokens ({T / (B * L):.0%})")
    ak.add_layer_norm(*(torch.zeros(1, 8),) * 2, torch.ones(8), torch.zeros(8), backend="cpp")

    with torch.inference_mode():
        # ---- add + LayerNorm on [T, 768]: reads x, r; writes out
        x, r = (torch.randn(T, hidden, generator=gen).to(dt) for _ in range(2))
        w, b = torch.randn(hidden).to(dt), torch.randn(hidden).to(dt)
        nbytes = 3 * T * hidden * esize
        src = torch.randn(nbytes // 2 // esize).to(dt)
        dst = torch.empty_like(src)
        eager_ln = lambda: F.layer_norm(x + r, (hidden,), w, b, 1e-12)
        compiled_ln = torch.compile(lambda x, r: F.layer_norm(x + r, (hidden,), w, b, 1e-12))
        print(f"\nadd + LayerNorm [{T}, {hidden}] ({nbytes / 1e6:.1f} MB moved)")
        t_copy = bench(lambda: dst.copy_(src), R)
        row("copy_ of the same bytes", t_copy, nbytes)
        t_ours = bench(lambda: ak.add_layer_norm(x, r, w, b, backend="cpp"), R)
        t_eager = bench(eager_ln, R)
        t_comp = bench(lambda: compiled_ln(x, r), R)
        row("cpp add_layer_norm", t_ours, nbytes, t_copy[0], "of copy time (1.0 = copy speed)")
        row("eager F.layer_norm(x + r)", t_eager, nbytes)
        row("torch.compile F.layer_norm(x + r)", t_comp, nbytes)
        print(f"  -> cpp is {t_eager[0] / t_ours[0]:.2f}x eager, {t_comp[0] / t_ours[0]:.2f}x "
              f"torch.compile, at {t_copy[0] / t_ours[0]:.0%} of copy bandwidth")

        # ---- linear + bias + GELU on [T, 768] -> [T, 3072]
        xg = torch.randn(T, hidden, generator=gen).to(dt)
        wg = (torch.randn(inner, hidden, generator=gen) * hidden ** -0.5).to(dt)
        bg = torch.randn(inner, generator=gen).to(dt)
        pre = F.linear(xg, wg)
        ep_bytes = 2 * T * inner * esize  # the epilogue reads the GEMM output, writes the result
        src2 = torch.randn(ep_bytes // 2 // esize).to(dt)
        dst2 = torch.empty_like(src2)
        gelu_expr = lambda p: F.gelu(p + bg, approximate="tanh")
        compiled_gelu = torch.compile(gelu_expr)
        compiled_lin = torch.compile(lambda x: F.gelu(F.linear(x, wg, bg), approximate="tanh"))
        print(f"\nbias + GELU(tanh) on [{T}, {inner}] ({ep_bytes / 1e6:.1f} MB moved by the "
              "epilogue), and the whole linear_gelu")
        t_copy = bench(lambda: dst2.copy_(src2), R)
        row("copy_ of the epilogue's bytes", t_copy, ep_bytes)
        t_eager_ep = bench(lambda: gelu_expr(pre), R)
        t_comp_ep = bench(lambda: compiled_gelu(pre), R)
        row("eager F.gelu(pre + b) (epilogue only)", t_eager_ep, ep_bytes)
        row("torch.compile F.gelu(pre + b) (epilogue only)", t_comp_ep, ep_bytes)
        t_gemm = bench(lambda: torch.addmm(bg, xg, wg.t()), R)
        t_lin = bench(lambda: ak.linear_gelu(xg, wg, bg, backend="cpp"), R)
        t_lin_eager = bench(lambda: F.gelu(F.linear(xg, wg, bg), approximate="tanh"), R)
        t_lin_comp = bench(lambda: compiled_lin(xg), R)
        row("addmm alone (the GEMM floor)", t_gemm)
        row("cpp linear_gelu (GEMM + fused epilogue)", t_lin)
        row("eager F.gelu(F.linear(x, W, b))", t_lin_eager)
        row("torch.compile F.gelu(F.linear(x, W, b))", t_lin_comp)
        t_ep = max(t_lin[0] - t_gemm[0], 1e-9)
        print(f"  -> cpp epilogue (linear_gelu - addmm) {t_ep * 1e3:.3f} ms = "
              f"{ep_bytes / t_ep / 1e9:.1f} GB/s, {t_copy[0] / t_ep:.0%} of copy; linear_gelu is "
              f"{t_lin_eager[0] / t_lin[0]:.2f}x eager, {t_lin_comp[0] / t_lin[0]:.2f}x compiled, "
              f"{t_lin[0] / t_gemm[0]:.2f}x the GEMM alone")

        # ---- attention, B=8 H=12 L=128 D=64
        q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dt) for _ in range(3))
        sdpa_mask = mask[:, None, None, :]
        idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        qp, kp, vp = (t.transpose(1, 2).reshape(B * L, H, D)[idx].contiguous() for t in (q, k, v))
        print(f"\nattention B={B} H={H} L={L} D={D}")
        t_sdpa_mask = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), R)
        t_sdpa_full = bench(lambda: F.scaled_dot_product_attention(q, k, v), R)
        t_ours_mask = bench(lambda: ak.attention(q, k, v, key_padding_mask=mask, backend="cpp"), R)
        t_ours_full = bench(lambda: ak.attention(q, k, v, backend="cpp"), R)
        t_varlen = bench(lambda: ak.varlen_attention(qp, kp, vp, cu, int(lengths.max()),
                                                     backend="cpp"), R)
        row("SDPA, bool key padding mask", t_sdpa_mask)
        row("cpp attention, key_padding_mask", t_ours_mask, None, t_sdpa_mask[0], "SDPA+mask")
        row("cpp varlen_attention (packed real tokens)", t_varlen, None, t_sdpa_mask[0],
            "SDPA+mask")
        row("SDPA, no padding", t_sdpa_full)
        row("cpp attention, no padding", t_ours_full, None, t_sdpa_full[0], "SDPA no padding")


if __name__ == "__main__":
    main()
