#!/usr/bin/env bash
# Rehearse the GPU check here, without a GPU, on the GPU machine's software (the device tool's
# nvidia-h200 image: Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, nvcc 13):
# everything of scripts/gpu_check.sh that needs no GPU, with the real budgets printed.
#
#   bash scripts/gpu_rehearsal.sh [--skip-build] [--skip-aot]      (from anywhere)
#
#   1. the venv ($GPU_VENV, default /work/gpu-venv, outside the repository): created once with
#      $GPU_PYTHON (default /root/.pyenv/versions/3.12.1/bin/python) and those pinned versions;
#      torch 2.11.0 is a CUDA build of several GB: the first run takes a while
#   2. imports and `albert-kernels info` under that venv
#   3. the CUDA sources for sm_90 with torch 2.11's own flags (scripts/check_cuda_build.py: the
#      C++ standard torch's build uses, ptxas registers and spills), then the prebuilt extension
#      the device call carries (scripts/build_gpu_ext.sh -> .gpu_prebuilt/, its manifest checked
#      against this venv)
#   4. the Triton AOT compile of every kernel for sm_90 under triton 3.6 (spills, shared memory),
#      and the PTX and launch tests under triton 3.6 (tests/test_triton_ptx.py: rounding of the
#      attention scores, LayerNorm, erf GELU; tests/test_triton_launch.py: grids, autotune key)
#   5. the step list and its budget sum (under 9 minutes with the machine-start allowance)
#   6. the probe (torch's answer: no GPU, exit 3) and gpu_check.sh itself, up to its GPU-present
#      stop (exit 3, "no GPU" summary)
# Each part prints PASS/FAIL with its wall time; exit status 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${GPU_VENV:-/work/gpu-venv}
GPU_PYTHON=${GPU_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy ninja pytest)
SKIP_BUILD=0 SKIP_AOT=0
for a in "$@"; do
  case $a in --skip-build) SKIP_BUILD=1 ;; --skip-aot) SKIP_AOT=1 ;;
    *) echo "usage: $0 [--skip-build] [--skip-aot]" >&2; exit 2 ;; esac
done
PY="$VENV/bin/python"
LOGS=${REHEARSAL_LOGS:-/tmp/gpu_rehearsal}
mkdir -p "$LOGS"
FAILED=0
export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

part() {  # part NAME CMD...: run, log to $LOGS/NAME.log, print status, wall time and the log's tail
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%-5s %-22s %5d s  (log: %s)\n' "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$name" \
    $(($(date +%s) - t0)) "$LOGS/$name.log"
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

echo "== gpu rehearsal $(date -u +%FT%TZ): venv $VENV"
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, triton, transformers" 2>/dev/null; then
  part venv bash -c "'$GPU_PYTHON' -m venv '$VENV' && '$PY' -m pip install ${PINS[*]}" || exit 1
fi
part versions "$PY" -c "
import sys, torch, triton, transformers
want = {'torch': '2.11.0', 'triton': '3.6.0', 'transformers': '5.17.0'}
got = {'torch': torch.__version__.split('+')[0], 'triton': triton.__version__,
       'transformers': transformers.__version__}
print('python', sys.version.split()[0], got, 'torch CUDA', torch.version.cuda)
assert sys.version_info[:2] == (3, 12) and got == want, (got, want)
import albert_kernels, albert_kernels.backends.triton, albert_kernels.tools.verify
import albert_kernels.tools.bench, albert_kernels.tools.model_workloads
sys.path.insert(0, 'scripts'); import gpu_check, gpu_check_runs, gpu_check_summary
print('imports ok')"
tail -2 "$LOGS/versions.log" | sed 's/^/      /'
part info "$PY" -m albert_kernels info
grep -iE "torch|triton|nvcc|cuda|backend" "$LOGS/info.log" | head -12 | sed 's/^/      /'

if [ $SKIP_BUILD -eq 0 ]; then
  part cuda_compile_sm90 "$PY" scripts/check_cuda_build.py --arch 9.0 --jobs "${MAX_JOBS:-2}"
  grep -E "^nvcc:|\.cu: |^OK|^FAIL|kernel builds" "$LOGS/cuda_compile_sm90.log" | sed 's/^/      /'
  "$PY" -c "import sys; sys.path.insert(0, 'scripts'); import check_cuda_build as c; \
print('      nvcc standard from torch 2.11 build:', c.torch_std('nvcc'), '| cxx:', c.torch_std('cxx'))" 2>/dev/null
  part prebuilt_extension bash scripts/build_gpu_ext.sh "$PY"
  tail -3 "$LOGS/prebuilt_extension.log" | sed 's/^/      /'
  part prebuilt_matches "$PY" scripts/gpu_check.py prebuilt --dir .gpu_prebuilt
  tail -1 "$LOGS/prebuilt_matches.log" | sed 's/^/      /'
fi

if [ $SKIP_AOT -eq 0 ]; then
  part triton_aot_sm90 "$PY" -m albert_kernels.backends.triton.aot --arch 90 \
    --jobs "${MAX_JOBS:-2}" --json "$LOGS/triton_aot_sm90.json"
  tail -1 "$LOGS/triton_aot_sm90.log" | sed 's/^/      /'
  grep -E "FAILED|SPILLING" "$LOGS/triton_aot_sm90.log" | head -10 | sed 's/^/      /'
  # --noconftest: no cpp build under this venv's torch. The PTX test compiles in a subprocess
  # without the interpreter; the launch tests record grids. Not the autotune-cache test: triton
  # 3.6's autotuner benchmarks even a single pruned config, which needs a GPU driver (it runs in
  # the suite here, triton 3.8, and on the GPU)
  part triton_ptx_launch env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider \
    --noconftest tests/test_triton_ptx.py tests/test_triton_launch.py -k "not tuned_apart"
  tail -1 "$LOGS/triton_ptx_launch.log" | sed 's/^/      /'
fi

part plan bash scripts/gpu_check.sh --plan
sed 's/^/      /' "$LOGS/plan.log"

# torch's own answer too (on the GPU machine the probe asks torch: there is a device node there)
part probe_says_no_gpu bash -c "'$PY' scripts/gpu_check.py probe --jsonl '$LOGS/probe.jsonl'; [ \$? -eq 3 ]"
tail -1 "$LOGS/probe.jsonl" | sed 's/^/      /'

rm -rf "$LOGS/out"
OUT="$LOGS/out" PYTHON="$PY" bash scripts/gpu_check.sh >"$LOGS/gpu_check.log" 2>&1
rc=$?
printf '%-5s %-22s exit %d (3 = "no GPU", as documented)\n' "$([ $rc -eq 3 ] && echo PASS || echo FAIL)" \
  "gpu_check_until_stop" $rc
[ $rc -eq 3 ] || FAILED=1
sed 's/^/      /' "$LOGS/out/summary.md" | head -8

echo "== rehearsal $([ $FAILED -eq 0 ] && echo passed || echo 'FAILED (see the logs above)')"
exit $FAILED
