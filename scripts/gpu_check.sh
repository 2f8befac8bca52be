#!/usr/bin/env bash
# The GPU check (VERIFY.md): on a bare GPU machine with this working tree (no network, no pip),
# build the extension with its CUDA sources, run the test suite, `albert-kernels verify` and the
# GPU benchmarks, all in about 8 minutes, and leave everything under $OUT:
#
#   $OUT/summary.txt      one line per step (status, seconds), the kernels' ptxas table, log tails
#   $OUT/bench_gpu.json   the benchmark results (albert-kernels bench --json)
#   $OUT/verify.json      albert-kernels verify's results, when its --json is available
#   $OUT/logs.tar.gz      every step's full log and the compiler's build.log
#
#   OUT=/some/dir PYTHONPATH=. bash scripts/gpu_check.sh      (from the repository root)
#
# Environment: GPU_CHECK_BUDGET (seconds for everything, default 470), MAX_JOBS (default 16),
# CUDA_ARCH (default 9.0), PYTHON (default python3, else python).
# Each step runs under `timeout`, capped by what is left of the budget; a failing or missing step
# is recorded and the next one still runs. Exit status: 0 if every step passed, else 1.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:?set OUT to the directory that receives the results}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXXXX)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

BUDGET=${GPU_CHECK_BUDGET:-470}
START=$(date +%s)
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}
export CUDA_ARCH=${CUDA_ARCH:-9.0}
export ALBERT_KERNELS_CUDA_ARCH="$CUDA_ARCH"   # the JIT build at first use compiles this arch only
export TORCH_CUDA_ARCH_LIST="$CUDA_ARCH"
export ALBERT_KERNELS_BUILD_DIR=${ALBERT_KERNELS_BUILD_DIR:-/tmp/albert_kernels_build}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME
  fi
fi

FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME CAP_SECONDS CMD...: runs CMD with its output in $LOGS/NAME.log, under
# timeout min(CAP, what is left of the budget - 10 s); records status and duration.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left limit t0 rc
  left=$(($(remaining) - 10))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    note "SKIP  $name: out of time (budget ${BUDGET}s)"
    FAILED=1
    return 124
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    note "PASS  $name (${dt}s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "TIME  $name: killed after ${limit}s"
    FAILED=1
  else
    note "FAIL  $name: exit $rc (${dt}s)"
    FAILED=1
  fi
  return $rc
}

# A CLI command the project may not have yet: say so clearly instead of failing obscurely.
has_cli_command() {
  timeout 60 "$PY" -m albert_kernels --help 2>/dev/null | grep -qw "$1"
}

# The last N lines of a step's log, indented, into the summary.
tail_log() {
  [ -f "$LOGS/$1.log" ] && tail -n "$2" "$LOGS/$1.log" | sed 's/^/      /' >>"$SUMMARY"
  return 0
}

note "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); budget ${BUDGET}s; arch $CUDA_ARCH; MAX_JOBS $MAX_JOBS"

# 1. Environment
export PY
run_step env 60 bash -c 'nvidia-smi; echo
  "$PY" -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"NO GPU\")"
  "$PY" -c "import triton; print(\"triton\", triton.__version__)"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version; echo "ninja $(ninja --version)"; echo'
grep -E "torch|triton|release|NVIDIA H" "$LOGS/env.log" | head -6 | sed 's/^/      /' | tee -a "$SUMMARY"

# 2. Build the extension with CUDA (the JIT build the backends use, cached in the build dir)
if run_step build 300 "$PY" -c "
from albert_kernels.backends.extension.build import build
print(build(with_cuda=True, cuda_arch='$CUDA_ARCH', verbose=True))
"; then
  BUILD_LOG=$(ls -t "$ALBERT_KERNELS_BUILD_DIR"/*/build.log 2>/dev/null | head -1)
  if [ -n "$BUILD_LOG" ] && grep -q "ptxas info" "$BUILD_LOG"; then
    cp "$BUILD_LOG" "$LOGS/build.compiler.log"
    { echo; echo "ptxas report of this build (registers, spills, static shared memory per kernel):";
      timeout 60 "$PY" scripts/check_cuda_build.py --from-log "$BUILD_LOG" --arch "$CUDA_ARCH" 2>&1
      echo; } >>"$SUMMARY"
  else
    note "      (the extension was already built in $ALBERT_KERNELS_BUILD_DIR: no fresh ptxas report)"
  fi
else
  tail_log build 30
fi

# 3. The test suite on CUDA. The nvcc compile test (cuda_build) is left to CI: step 2 has just
#    compiled the same sources on this machine.
run_step pytest 240 "$PY" -m pytest tests -x -q -m "not cuda_build" -p no:cacheprovider
tail_log pytest 15

# 4. albert-kernels verify
if has_cli_command verify; then
  if "$PY" -m albert_kernels verify --help 2>/dev/null | grep -q -- "--json"; then
    run_step verify 150 "$PY" -m albert_kernels verify --json "$OUT/verify.json"
  else
    run_step verify 150 "$PY" -m albert_kernels verify
  fi
  tail_log verify 15
else
  note "MISS  verify: 'python -m albert_kernels verify' does not exist in this tree yet"
  FAILED=1
fi

# 5. Benchmarks on the GPU
if has_cli_command bench; then
  run_step bench 200 "$PY" -m albert_kernels bench --device cuda --json "$OUT/bench_gpu.json"
  tail_log bench 25
else
  note "MISS  bench: 'python -m albert_kernels bench' does not exist in this tree yet"
  FAILED=1
fi

# 6. If time is left: every CUDA-backend op case without -x (the full list of failures, if any)
if [ "$(remaining)" -gt 60 ]; then
  run_step cuda_ops 120 "$PY" -m pytest tests/test_ops.py -q -k "cuda-cuda" -p no:cacheprovider
  tail_log cuda_ops 8
fi

note "total $(($(date +%s) - START))s; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null || cp "$LOGS"/*.log "$OUT"/ 2>/dev/null
rm -rf "$LOGS"
exit $FAILED
