"""csrc/cuda/philox.cuh, the CUDA kernels' dropout RNG, draws exactly what the contract defines.

The header is plain C++ outside nvcc (its functions are __host__ __device__ under nvcc), so a tiny
host program compiled with the system C++ compiler runs the very code the CUDA attention kernels
use, here, without a GPU. It is compared with backends/dropout.py (the PyTorch definition, itself
checked against triton's tl.randint): single draws over seeds and offsets that exercise both
32-bit halves and negative (two's complement) int64 seeds, the threshold rule, and the keep mask
of a whole (sequences x heads x max_q x max_k) grid through the kernels' own offset helpers.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from albert_kernels.backends import dropout

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "philox.cuh"
using namespace albert_kernels::philox;

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "draws") == 0) {  // stdin: "seed offset" per line
    long long seed, offset;
    while (std::scanf("%lld %lld", &seed, &offset) == 2)
      std::printf("%u\n", draw(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)));
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "threshold") == 0) {  // stdin: p per line
    double p;
    while (std::scanf("%lf", &p) == 1) std::printf("%u\n", threshold(p));
    return 0;
  }
  // mask seed offset p n_seqs heads max_q max_k: '0'/'1' per element, row-major
  Dropout d{};
  d.seed = static_cast<uint64_t>(std::strtoll(argv[2], nullptr, 10));
  d.offset = static_cast<uint64_t>(std::strtoll(argv[3], nullptr, 10));
  d.threshold = threshold(std::strtod(argv[4], nullptr));
  const int n = std::atoi(argv[5]), heads = std::atoi(argv[6]);
  d.max_q = std::atoi(argv[7]);
  d.max_k = std::atoi(argv[8]);
  for (int s = 0; s < n; ++s)
    for (int h = 0; h < heads; ++h) {
      const uint64_t base = head_offset(d, s, h, heads);
      for (int i = 0; i < d.max_q; ++i)
        for (int j = 0; j < d.max_k; ++j) std::putchar(keep(d, base, i, j) ? '1' : '0');
    }
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_exe(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    work = tmp_path_factory.mktemp("philox")
    (work / "main.cpp").write_text(PROGRAM)
    exe = work / "philox"
    subprocess.run([CXX, "-std=c++17", "-O2", "-I", str(ROOT / "csrc" / "cuda"),
                    str(work / "main.cpp"), "-o", str(exe)], check=True, capture_output=True)
    return exe


def _run(exe, *args, stdin=""):
    return subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True,
                          text=True, check=True).stdout


def test_draws_match_the_pytorch_definition(philox_exe):
    gen = torch.Generator().manual_seed(0)
    seeds = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, -1, -(2 ** 63),
             *torch.randint(-2 ** 63, 2 ** 63 - 1, (6,), generator=gen).tolist()]
    offsets = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5, 2 ** 40 + 123, 2 ** 62,
               *torch.randint(0, 2 ** 50, (6,), generator=gen).tolist()]
    pairs = [(s, o) for s in seeds for o in offsets]
    got = [int(x) for x in _run(philox_exe, "draws",
                                stdin="".join(f"{s} {o}\n" for s, o in pairs)).split()]
    want = [int(dropout.randint(s, torch.tensor([o]))[0]) for s, o in pairs]
    assert got == want
    assert len(set(got)) == len(got)  # and they are not constant


def test_threshold_matches_the_pytorch_definition(philox_exe):
    ps = [0.0, 1e-10, 0.1, 0.25, 0.5, 0.9, 1 - 2 ** -33, 0.999999999]
    got = [int(x) for x in _run(philox_exe, "threshold", stdin="".join(f"{p!r}\n" for p in ps)).split()]
    assert got == [dropout.threshold(p) for p in ps]


@pytest.mark.parametrize("seed,offset,p,shape", [
    (12345, 0, 0.1, (2, 3, 5, 7)),
    (-987654321987, 2 ** 33 + 8, 0.5, (3, 2, 9, 4)),   # a CUDA seed >= 2**63, a large offset
    (2 ** 62 + 17, 1024, 0.9, (1, 4, 3, 11)),
])
def test_keep_mask_through_the_kernel_offsets(philox_exe, seed, offset, p, shape):
    bits = _run(philox_exe, "mask", seed, offset, repr(p), *shape)
    got = torch.tensor([c == "1" for c in bits]).view(shape)
    want = dropout.keep_mask(seed, offset, p, *shape)
    assert torch.equal(got, want)
    rate = got.float().mean().item()
    assert abs(rate - (1 - p)) < 0.2  # a sanity check that the mask is not all ones or zeros
