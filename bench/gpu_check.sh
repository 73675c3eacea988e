#!/usr/bin/env bash
# One-shot check on the GPU machine (H200, its own python3 + torch, no network):
#   build fastpeft for sm_90a -> build_info -> pytest -m cuda -> python -m bench.run --device cuda
# Run from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
# Every stage has its own timeout and logs under $OUT; one stage failing does not stop the next.
# Budget (defaults): build 240 s + info 45 s + tests 150 s (op fuzzing, compile, long-run memory, gradient
# checkpointing, FSDP2 included) + bench 200 s (every suite but oft, the GPU-specific
# ones first: nf4_cuda, lora, mixed, xlora) + oft 90 s (peft's BOFT compiles its fbd_cuda extension there
# first), about 12 minutes at most in all.
set -u
set -x
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T_BUILD="${T_BUILD:-240}"
T_TEST="${T_TEST:-150}"
T_BENCH="${T_BENCH:-200}"
T_OFT="${T_OFT:-90}"
BENCH_ARGS="${BENCH_ARGS:-}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1      # no network there: never try to reach an index
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STATUS="$OUT/status.txt"
: > "$STATUS"
stage() {  # stage NAME TIMEOUT LOG CMD...
  local name=$1 t=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$t" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
  return $rc
}

# 0. the machine
{ date -u; nvidia-smi; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')";
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|peft|transformers|scikit|cmake|ninja|pytest|matplotlib|safetensors|numpy) "; which nvcc; nvcc --version; } > "$OUT/env.log" 2>&1
cat "$OUT/env.log" | tail -25

# 1. build. SKIP_BUILD=1 keeps the fastpeft already installed; INSTALL_MODE=regular installs a copy
# instead of an editable one. The build tree lives outside the repo so a build/ copied from another
# machine is never reused.
EDITABLE=-e; [ "${INSTALL_MODE:-editable}" = regular ] && EDITABLE=
[ "${SKIP_BUILD:-0}" = 1 ] || stage build "$T_BUILD" "$OUT/build.log" \
  "$PY" -m pip install --no-build-isolation --no-deps -v --config-settings=build-dir=/tmp/fastpeft-build $EDITABLE .
[ -f "$OUT/build.log" ] && { grep -iE "error|warning: .*sm_|Successfully" "$OUT/build.log" | head -20; tail -5 "$OUT/build.log"; }

# 2. what was built
stage build_info 45 "$OUT/build_info.log" "$PY" -c "import fastpeft, json; print(json.dumps(fastpeft.build_info(), indent=1)); import fastpeft.ops as o; print('ops:', o.lora_linear)"
cat "$OUT/build_info.log"

# 3. CUDA tests
stage pytest_cuda "$T_TEST" "$OUT/pytest_cuda.log" "$PY" -m pytest -m cuda -q -p no:cacheprovider --durations=15 tests \
  || true
tail -25 "$OUT/pytest_cuda.log"

# 4. benchmarks on the GPU (tables to the log, JSON + PNG to $OUT/results)
# the suites with issue targets on the GPU first, so a timeout loses the least
SUITES=$("$PY" -c "
from bench import common, run
run.load_suites()
first = [s for s in ('nf4_cuda', 'lora', 'mixed', 'xlora') if s in common.SUITES]
print(','.join(first + [s for s in common.SUITES if s not in first and s != 'oft']))")
stage bench_cuda "$T_BENCH" "$OUT/bench_cuda.log" "$PY" -m bench.run --device cuda --only "$SUITES" --out "$OUT/results" $BENCH_ARGS
grep -E "^(== |op|dtype|dropout|bf16|fp32|0|nf4_linear|grad_input|  (PASS|MISS|n/a)|  !)" "$OUT/bench_cuda.log" | cut -c1-220 | tail -90

# 5. OFT/BOFT vs peft on the GPU (peft's BOFT builds and uses its fbd_cuda extension here)
stage bench_oft_cuda "$T_OFT" "$OUT/bench_oft_cuda.log" "$PY" -m bench.run --device cuda --only oft --out "$OUT/results" $BENCH_ARGS
grep -E "^(== |dtype|bf16|fp32|  (PASS|MISS|n/a)|  !)" "$OUT/bench_oft_cuda.log" | cut -c1-220 | tail -40

set +x
echo "==== stages ===="; cat "$STATUS"
exit 0
