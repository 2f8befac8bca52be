#!/usr/bin/env bash
# The GPU check (docs/correctness.md, "The GPU check"): one call on a bare GPU machine (no network,
# no pip) that always brings back what it learned. Steps in priority order, each under its own
# time budget (seconds), the whole inside GPU_CHECK_BUDGET (default: the budgets' sum, 445 s; with
# a 90 s machine-start allowance, 535 s: under 9 minutes):
#
#   gpu         20  GPU present? Else stop at once: summary says "no GPU", exit status 3
#   build      130  load the carried prebuilt extension ($GPU_CHECK_PREBUILT, default .gpu_prebuilt,
#                   made by scripts/build_gpu_ext.sh) if it matches, else build it for sm_90; the
#                   Triton AOT compile (all cores) starts beside it. A failed build stops the CUDA
#                   steps only, and no later process recompiles it
#   review      90  first, what the review without a GPU says to confirm first
#                   (scripts/gpu_check_review.py): Triton (and CUDA) fp32 attention at huge scores,
#                   padded and varlen, output and dq/dk/dv; the dropout keep masks of cuda, triton
#                   and the reference equal to the replay; fp16/bf16 backward (the rounding
#                   residual) on one-hot rows, a single real key, a row with no real key, varlen
#                   with an empty sequence
#   sanitizer   75  compute-sanitizer memcheck, racecheck and synccheck (25 s each), CUDA
#                   attention first (fp16/bf16, head dims 32/64/128, dropout off/on, padded with a
#                   row without keys, varlen with an empty sequence), then small LayerNorm and
#                   GELU-FFN cases (our kernels only)
#   cuda_ops    35  albert-kernels verify --device cuda --backend cuda: every op case, fwd+bwd,
#                   fp32/fp16/bf16, under the error budget
#   triton_ops  45  wait for the Triton AOT compile (autotuning cached: TRITON_CACHE_AUTOTUNING=1),
#                   then albert-kernels verify --device cuda --backend triton
#   model       25  the model on CUDA vs transformers, fp16/bf16, padded batch, cuda and triton
#   bench       20  ops vs SDPA flash/efficient/cudnn, add+LN vs copy, linear_gelu vs GEMM; model
#                   forward; latency (batch 1, L=8/32/128, fp16/fp32: ours eager, ours with CUDA
#                   graphs, transformers sdpa); training step vs transformers sdpa; last, when
#                   time is left, torch.compile(transformers, reduce-overhead) latency (gets any
#                   time earlier steps left unused)
#   summary      5  summary.md (also rewritten after every step and on exit)
#
# Results, under $OUT, appended as they are produced (a kill loses nothing already measured):
#   steps.jsonl  one line per step (status PASS/FAIL/TIME/SKIP, seconds, budget) + the environment
#   review.jsonl one line per review check (the ops.jsonl fields)
#   ops.jsonl    one line per op case (check, case, backend, dtype, pass, error, budget, ratio)
#   model.jsonl  one line per model check;  bench.jsonl  one line per benchmark workload
#   summary.md   the one-page summary;      logs.tar.gz  every step's full log, the AOT table
#
#   OUT=/some/dir bash scripts/gpu_check.sh           (from anywhere; runs from the repo root)
#   bash scripts/gpu_check.sh --plan                  the step list and budgets, runs nothing
#
# Exit status: 0 every step passed; 1 a step failed, timed out or was skipped; 2 usage (OUT unset);
# 3 no GPU (only the first step ran). Environment: GPU_CHECK_BUDGET, GPU_CHECK_PREBUILT, MAX_JOBS
# (default: all cores), CUDA_ARCH (default 9.0), PYTHON (default python3), GPU_CHECK_ALWAYS_PROBE
# (ask torch even where there is no /dev/nvidia* node and no nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PLAN="gpu 20
build 130
review 90
sanitizer 75
cuda_ops 35
triton_ops 45
model 25
bench 20
summary 5"
START_ALLOWANCE=90   # seconds the device tool may spend starting the machine, outside the script
budget_of() { echo "$PLAN" | awk -v s="$1" '$1 == s {print $2}'; }
PLAN_SUM=$(echo "$PLAN" | awk '{s += $2} END {print s}')

if [ "${1:-}" = "--plan" ]; then
  echo "$PLAN" | awk '{printf "  %-11s %4d s\n", $1, $2}'
  echo "  steps total  $PLAN_SUM s + machine start allowance $START_ALLOWANCE s = $((PLAN_SUM + START_ALLOWANCE)) s (limit 540 s = 9 min)"
  [ $((PLAN_SUM + START_ALLOWANCE)) -le 540 ]
  exit $?
fi

OUT=${OUT:-}
if [ -z "$OUT" ]; then
  echo "gpu_check: set OUT to the directory that receives the results" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXXXX)
BUDGET=${GPU_CHECK_BUDGET:-$PLAN_SUM}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PY=${PYTHON:-$(command -v python3 || command -v python)}
CORES=$(nproc 2>/dev/null || echo 4)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$CORES}
export CUDA_ARCH=${CUDA_ARCH:-9.0}
export ALBERT_KERNELS_CUDA_ARCH="$CUDA_ARCH" TORCH_CUDA_ARCH_LIST="$CUDA_ARCH"
export ALBERT_KERNELS_BUILD_DIR=${ALBERT_KERNELS_BUILD_DIR:-/tmp/albert_kernels_build}
export TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpu_check_triton_cache}
unset TRITON_INTERPRET
PREBUILT=${GPU_CHECK_PREBUILT:-$ROOT/.gpu_prebuilt}
STEPS="$OUT/steps.jsonl"
: >"$STEPS"
: >"$OUT/review.jsonl"
: >"$OUT/ops.jsonl"
: >"$OUT/model.jsonl"
: >"$OUT/bench.jsonl"
FAILED=0
CUDA_OK=1

# summary.md from the JSON lines (plain-text fallback if even python fails) and the logs tarball
write_summary() {
  local final=${1:-}
  timeout 30 "$PY" scripts/gpu_check.py summary --out "$OUT" $final >"$LOGS/summary.log" 2>&1 || {
    { echo "# albert_kernels GPU check (summary.py failed: plain list)"; cat "$STEPS"
      tail -5 "$LOGS/summary.log"; } >"$OUT/summary.md"; }
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "${AOT_PID:-}" ] && kill "$AOT_PID" 2>/dev/null
  write_summary --final
  rm -rf "$LOGS"
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

record() {  # record STEP STATUS SECONDS BUDGET [NOTE]: a line in steps.jsonl and on stdout
  local note
  note=$(printf '%s' "${5:-}" | tr -d '\\"\000-\037')
  printf '{"step": "%s", "status": "%s", "seconds": %s, "budget": %s, "note": "%s"}\n' \
    "$1" "$2" "$3" "${4:-null}" "$note" >>"$STEPS"
  echo "$2  $1 (${3}s / ${4:-?}s)${note:+: $note}"
}

# run_step NAME CAP CMD...: CMD under timeout min(CAP, time left - 5 s), log in $LOGS/NAME.log
run_step() {
  local name=$1 cap=$2 left limit t0 rc dt
  shift 2
  left=$((DEADLINE - $(date +%s) - 5))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    record "$name" SKIP 0 "$cap" "out of time (budget ${BUDGET}s)"
    FAILED=1
    return 124
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    record "$name" PASS "$dt" "$limit"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    record "$name" TIME "$dt" "$limit" "killed at its ${limit}s budget"
    FAILED=1
  else
    record "$name" FAIL "$dt" "$limit" "exit $rc; $(tail -n 3 "$LOGS/$name.log" | tr '\n\t' '  ' | cut -c1-300)"
    FAILED=1
  fi
  write_summary
  return $rc
}

echo "gpu_check: $(date -u +%FT%TZ); budget ${BUDGET}s; arch $CUDA_ARCH; $CORES cores; OUT=$OUT"

# 1. GPU present? (else stop at once). No NVIDIA device node and no nvidia-smi: no GPU, known
#    without starting Python (importing torch alone can take half a minute on a loaded CPU host).
t0=$(date +%s)
if [ -z "${GPU_CHECK_ALWAYS_PROBE:-}" ] && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 \
    && ! command -v nvidia-smi >/dev/null; then
  echo '{"step": "env", "gpu": null, "reason": "no /dev/nvidia* device and no nvidia-smi"}' >>"$STEPS"
  rc=3
else
  timeout "$(budget_of gpu)" "$PY" scripts/gpu_check.py probe --jsonl "$STEPS" >"$LOGS/gpu.log" 2>&1
  rc=$?
fi
case $rc in
  0) record gpu PASS $(($(date +%s) - t0)) "$(budget_of gpu)" ;;
  3) record gpu STOP $(($(date +%s) - t0)) "$(budget_of gpu)" "no GPU: nothing else was run"
     exit 3 ;;
  *) record gpu FAIL $(($(date +%s) - t0)) "$(budget_of gpu)" \
       "the probe failed (exit $rc): $(tail -n 2 "$LOGS/gpu.log" | tr '\n' ' ' | cut -c1-300)"
     exit 1 ;;
esac

# 2. The Triton AOT compile in the background (half the cores: the build may need the rest),
#    then the extension: the carried prebuilt one if it matches, else a build here
( timeout "$(( $(budget_of build) + $(budget_of triton_ops) ))" "$PY" -m albert_kernels.backends.triton.aot \
    --arch "${CUDA_ARCH/./}" --jobs $((CORES > 4 ? CORES / 2 : 1)) --json "$LOGS/triton_aot.json" \
    >"$LOGS/triton_aot.log" 2>&1; echo $? >"$LOGS/triton_aot.rc" ) &
AOT_PID=$!
AOT_T0=$(date +%s)
t0=$(date +%s)
timeout 90 "$PY" scripts/gpu_check.py prebuilt --dir "$PREBUILT" --install >"$LOGS/prebuilt.log" 2>&1
if [ $? -eq 0 ]; then
  record build PASS $(($(date +%s) - t0)) "$(budget_of build)" "the carried prebuilt extension matched and ran"
else  # not a failure: the build below is the fallback
  record prebuilt INFO $(($(date +%s) - t0)) 90 "not used: $(grep -v '^ *$' "$LOGS/prebuilt.log" | tail -n 2 | tr '\n' ' ' | cut -c1-250)"
  if run_step build "$(budget_of build)" "$PY" -m albert_kernels build --cuda --cuda-arch "$CUDA_ARCH"; then
    BUILD_LOG=$(ls -t "$ALBERT_KERNELS_BUILD_DIR"/*/build.log 2>/dev/null | head -1)
    [ -n "$BUILD_LOG" ] && cp "$BUILD_LOG" "$LOGS/build.compiler.log" && timeout 30 "$PY" \
      scripts/check_cuda_build.py --from-log "$BUILD_LOG" --arch "$CUDA_ARCH" >"$LOGS/ptxas.txt" 2>&1
  else
    CUDA_OK=0
    # every later process: no sources, so no recompile; cpp/cuda report BackendUnavailable at once
    export ALBERT_KERNELS_CSRC="$LOGS/no-csrc-after-failed-build"
    record cuda_steps SKIP 0 null "the CUDA extension did not build: CUDA steps skipped, Triton ones run"
  fi
fi

# 3. First, what the review without a GPU says to confirm first (Triton kernels compile here, on
#    first use, beside the background AOT compile)
run_step review "$(budget_of review)" "$PY" scripts/gpu_check.py review --jsonl "$OUT/review.jsonl"

# 4. compute-sanitizer: CUDA attention over the review's shapes first, then small cases of the
#    other ops
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ $CUDA_OK -eq 1 ] && [ -n "$SANITIZER" ]; then
  # no caching allocator: each tensor its own allocation, so memcheck sees an overrun past it.
  # Only our kernels are checked (--kernel-name); a sanitizer that does not know that option
  # (it answers at once) is run again without it. Exit 9: the sanitizer found errors.
  third=$(( $(budget_of sanitizer) / 3 ))
  for tool in memcheck racecheck synccheck; do
    filter=(--kernel-name kns=albert_kernels)
    for attempt in 1 2; do
      run_step "sanitizer_$tool" "$third" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
        --tool "$tool" --error-exitcode 9 --print-limit 20 "${filter[@]}" \
        "$PY" scripts/gpu_check.py sanitize-attention && break
      head -n 5 "$LOGS/sanitizer_$tool.log" | grep -qi "option" || break
      filter=()
    done
  done
elif [ $CUDA_OK -eq 1 ]; then
  record sanitizer SKIP 0 "$(budget_of sanitizer)" "compute-sanitizer not found"
fi

# 5. CUDA op correctness
if [ $CUDA_OK -eq 1 ]; then
  run_step cuda_ops "$(budget_of cuda_ops)" "$PY" -m albert_kernels verify --device cuda \
    --backend cuda --no-model --jsonl "$OUT/ops.jsonl"
fi

# 6. Triton: the AOT compile (started in step 2), then the op cases
aot_wait() {
  while kill -0 "$AOT_PID" 2>/dev/null && [ $(($(date +%s))) -lt $((DEADLINE - 60)) ]; do sleep 1; done
  kill -0 "$AOT_PID" 2>/dev/null && { kill "$AOT_PID"; return 124; }
  return "$(cat "$LOGS/triton_aot.rc" 2>/dev/null || echo 1)"
}
aot_wait
rc=$?
record triton_aot "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" $(($(date +%s) - AOT_T0)) null \
  "$(tail -n 1 "$LOGS/triton_aot.log" 2>/dev/null | cut -c1-200) (background, since the build)"
[ $rc -eq 0 ] || FAILED=1
run_step triton_ops "$(budget_of triton_ops)" "$PY" -m albert_kernels verify --device cuda \
  --backend triton --no-model --jsonl "$OUT/ops.jsonl"

# 7. The model on CUDA vs transformers
MODEL_BACKENDS=(--backend triton)
[ $CUDA_OK -eq 1 ] && MODEL_BACKENDS=(--backend cuda --backend triton)
run_step model "$(budget_of model)" "$PY" scripts/gpu_check.py model "${MODEL_BACKENDS[@]}" \
  --jsonl "$OUT/model.jsonl"

# 8. The short benchmark: whatever time is left, less the summary's
left=$((DEADLINE - $(date +%s) - $(budget_of summary) - 5))
run_step bench "$((left > $(budget_of bench) ? left : $(budget_of bench)))" "$PY" scripts/gpu_check.py \
  bench --jsonl "$OUT/bench.jsonl" --deadline "$((DEADLINE - $(budget_of summary) - 5))"

echo "total $(($(date +%s) - START))s; $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
