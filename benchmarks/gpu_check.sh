#!/usr/bin/env bash
# make gpu-check: the whole GPU check of deepsim_rt in one script, <= 8 minutes on an H100/H200.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # from the repo root
#
# Writes under $OUT when set (the lent GPU machine), else benchmarks/results/:
#   gpu_check.log               every part's output, in order
#   gpu-kernels.json            kernel suite, reference + triton providers     (pytest-benchmark JSON)
#   gpu-kernels-compile.json    kernel suite, torch.compile provider
#   gpu-train.json              training step per loss, reference vs kernels, peak memory
#   gpu-infer.json              registration inference per backend (eager, compile, ORT (CPU build), AOTI, TRT)
#   RESULTS.md, speedups.png    the report over these JSON files (+ the committed ones)
# and prints a short summary table last. At most 8 files (what the lent machine sends back).
#
# Each part runs under `timeout -s INT`: pytest stops cleanly on SIGINT and pytest-benchmark still writes the JSON
# of the benchmarks that finished, so a slow part loses its tail, not the whole run. Budgets (seconds), in order of
# importance (correctness first, then the kernels' claims):
#   env 15 · CUDA tests (-m gpu; they compile and AOT-compile) 100 · kernels ref+triton 90 · kernels compile 100 ·
#   training 60 · inference 90 · report 20  = 475 s (the slowest cases of each part come last in it)
# A missing optional backend (TensorRT, onnxruntime-gpu, AOTI support) is a skip with its reason, not a failure.
# Environment: PYTHON (default python3), BENCH_BUDGET_S (timed seconds per benchmark, default 0.25 here),
# GPU_CHECK_ALLOW_CPU=1 runs the plumbing without CUDA (everything GPU-only skips; for testing this script).

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
: > "$LOG"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BENCH_BUDGET_S=${BENCH_BUDGET_S:-0.25}
export BENCH_CACHE=${BENCH_CACHE:-/tmp/deepsim_rt_bench_cache}
export BENCH_GIT_SHA=${BENCH_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export MPLBACKEND=Agg
T_START=$(date +%s)
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
SUMMARY=()
FAILED=0

# part NAME BUDGET_S CMD...: run CMD under a time box, append its output to the log, record rc and seconds.
part() {
    local name=$1 budget=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "===== [$name] budget ${budget}s: $*" | tee -a "$LOG"
    timeout -s INT -k 20 "$budget" "$@" > "$TMPD/$name.out" 2>&1
    rc=$?
    cat "$TMPD/$name.out" >> "$LOG"
    local dt=$(( $(date +%s) - t0 ))
    local what="ok"
    case $rc in
        0) what="ok" ;;
        5) what="nothing collected/selected" ;;
        124|130|137) what="TIME BOX HIT (partial results kept)" ;;
        *) what="rc=$rc" ;;
    esac
    echo "===== [$name] ${what} in ${dt}s" | tee -a "$LOG"
    SUMMARY+=("$(printf '%-26s %5ss / %4ss  %s' "$name" "$dt" "$budget" "$what")")
    return $rc
}

# ---- 0. environment ------------------------------------------------------------------------------------------
part env 15 "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
for d in ("triton", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pytest", "pytest-benchmark",
          "hypothesis", "safetensors", "nibabel", "matplotlib"):
    try:
        print(f"  {d:18s} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d:18s} absent")
EOF
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" != "1" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check (GPU_CHECK_ALLOW_CPU=1 to test the plumbing)"
    exit 2
fi
if [ "$HAS_CUDA" = "1" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv >> "$LOG" 2>&1 || true
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider)

# ---- 1. CUDA tests: real launches of the kernels, compile/export capture on the GPU ------------------------------
# --continue-on-collection-errors: a test module that needs a package this box lacks (nibabel, tritonclient) must
# not stop the CUDA tests of the other modules.
part tests 100 "${PYTEST[@]}" tests -m gpu -q --continue-on-collection-errors -rs
case $? in 0|5) ;; *) FAILED=1 ;; esac

# ---- 2. kernels: reference + triton first (the claims), then torch.compile (slow to compile) --------------------
part "kernels ref+triton" 90 "${PYTEST[@]}" benchmarks/test_kernels.py -m gpu -k "not compile" --benchmark-only \
    -q -rs --benchmark-json="$DEST/gpu-kernels.json" --benchmark-columns=median,iqr,rounds
part "kernels compile" 100 "${PYTEST[@]}" benchmarks/test_kernels.py -m gpu -k "compile" --benchmark-only \
    -q -rs --benchmark-json="$DEST/gpu-kernels-compile.json" --benchmark-columns=median,iqr,rounds

# ---- 3. training step per loss, reference vs kernels -----------------------------------------------------------
part "training step" 60 "${PYTEST[@]}" benchmarks/test_train_step.py -m gpu --benchmark-only -q -rs \
    --benchmark-json="$DEST/gpu-train.json" --benchmark-columns=median,iqr,rounds

# ---- 4. registration inference per backend ---------------------------------------------------------------------
part "inference" 90 "${PYTEST[@]}" benchmarks/test_inference.py -m gpu --benchmark-only -q -rs \
    --benchmark-json="$DEST/gpu-infer.json" --benchmark-columns=median,iqr,rounds

# ---- 5. report over this run's JSON + the committed results (other machines side by side) ----------------------
JSONS=()
for f in "$DEST"/gpu-*.json "$ROOT"/benchmarks/results/*.json; do
    [ -s "$f" ] && JSONS+=("$f")
done
part report 20 "$PY" benchmarks/report.py "${JSONS[@]}" --out "$DEST/RESULTS.md" --plot "$DEST/speedups.png" \
    --summary

# ---- summary (printed last) -------------------------------------------------------------------------------------
echo
echo "==== gpu_check summary ($(( $(date +%s) - T_START ))s total; results in $DEST) ===="
echo "CUDA tests: $(grep -E '[0-9]+ (passed|failed|skipped|deselected|error)' "$TMPD/tests.out" | tail -n 1)"
printf '%s\n' "${SUMMARY[@]}"
tail -n +2 "$TMPD/report.out"
exit $FAILED
