#!/usr/bin/env bash
# make gpu-check: the whole GPU check of deepsim_rt in one script, <= 450 s on an H100/H200 by its own budgets.
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh          # from the repo root (make gpu-check)
#
# Results go under $OUT when set (the lent GPU machine sends back at most 8 files from there), else
# benchmarks/results/tmp/gpu_check_out/. Each part folds its results in AS SOON AS IT ENDS, so a run killed at its limit loses only
# the part that was running:
#   gpu_check.log             every part's output, appended live
#   gpu_check.json            card, versions, toolchain + one record per finished part (rc, seconds, test counts)
#   gpu_check.xml             JUnit XML of every part (pytest's; one synthetic testcase for a script part)
#   gpu-kernels.json          kernel suite, reference + triton providers        (pytest-benchmark JSON)
#   gpu-kernels-compile.json  kernel suite, torch.compile provider
#   gpu-train.json            training step per loss, reference vs kernels, peak memory
#   gpu-infer.json            registration inference per backend (eager, compile, ORT, AOTI, TRT)
#   gpu-refine.json           refinement benchmarks (benchmarks/test_refine.py, when present)
# The report (RESULTS.md, speedups.png) is written to benchmarks/results/tmp/gpu_check/ and its summary printed:
# rerun `python benchmarks/report.py <the JSON files>` here to regenerate it.
#
# Parts, in order of importance, with their time boxes (s): preflight 30 (torch import + the first JIT compile of
# the 6 kernels; they stay in Triton's cache for the later parts) · mutation analysis 60 (in the background, beside
# the preflight and the CUDA tests: no time of its own) · CUDA tests 90 · kernels 65 · kernels-compile
# 50 · train-step 45 · inference 60 · refine 30 · graphs 20 · report 15 = 405, + 5 s kill grace each = 450. A part also never runs past the global deadline (GPU_CHECK_BUDGET_S, default 450 s from the start).
# Each part runs under `timeout -s INT`: pytest stops cleanly on SIGINT and pytest-benchmark still writes the JSON
# of the benchmarks that finished. A failing part does not stop the others; the preflight does (nothing else
# could run): it stops the script with one line saying what is missing.
#
# Environment: PYTHON (default python3), BENCH_BUDGET_S (timed seconds per benchmark, default 0.25 here),
# GPU_CHECK_ALLOW_CPU=1 runs the plumbing without CUDA (kernels under the Triton interpreter in the preflight;
# every GPU-only test and benchmark skips), GPU_CHECK_BUDGET_S (global deadline, default 450),
# GPU_CHECK_TIME_SCALE (integer factor on every time box; the CPU plumbing test uses it: the interpreter is slow),
# GPU_CHECK_SELECT (extra pytest args for every pytest part, e.g. "-k expr"), GPU_CHECK_WORK (raw per-part files).

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
# Without $OUT: a git-ignored folder (gpu_check.json there would break report.py's glob of benchmarks/results/*.json);
# copy the gpu-*.json files into benchmarks/results/ to commit them.
DEST=${OUT:-$ROOT/benchmarks/results/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-$ROOT/benchmarks/results/tmp/gpu_check}  # per-part raw files (junit, report): never under $OUT
rm -rf "$WORK"
mkdir -p "$DEST" "$WORK"
LOG="$DEST/gpu_check.log"
: > "$LOG"
rm -f "$DEST/gpu_check.json" "$DEST/gpu_check.xml"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BENCH_BUDGET_S=${BENCH_BUDGET_S:-0.25}
export BENCH_CACHE=${BENCH_CACHE:-/tmp/deepsim_rt_bench_cache}
export BENCH_GIT_SHA=${BENCH_GIT_SHA:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
export MPLBACKEND=Agg
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
SCALE=${GPU_CHECK_TIME_SCALE:-1}  # integer; > 1 only for CPU plumbing runs on a loaded machine (the tests)
BUDGET=${GPU_CHECK_BUDGET_S:-$(( 450 * SCALE ))}
GRACE=5
T_START=$(date +%s)
FAILED=0
PARTS="$PY -m benchmarks.gpu_check_parts"

# part NAME BUDGET_S CMD...: run CMD in its time box (never past the global deadline), log its output live,
# then record it under $DEST (gpu_check.json + gpu_check.xml).
part() {
    local name=$1 budget=$2
    shift 2
    local t0 rc left
    budget=$(( budget * SCALE ))
    t0=$(date +%s)
    left=$(( BUDGET - (t0 - T_START) - GRACE ))
    [ "$left" -lt "$budget" ] && budget=$left
    if [ "$budget" -lt 5 ]; then
        echo "===== [$name] skipped: the global budget of ${BUDGET}s is spent" | tee -a "$LOG"
        $PARTS record --dest "$DEST" --work "$WORK" --name "$name" --rc 124 --seconds 0 --budget 0 >/dev/null \
            || FAILED=1
        return
    fi
    echo "===== [$name] budget ${budget}s: $*" | tee -a "$LOG"
    timeout -s INT -k "$GRACE" "$budget" "$@" >> "$LOG" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "===== [$name] rc=$rc in ${dt}s" | tee -a "$LOG"
    $PARTS record --dest "$DEST" --work "$WORK" --name "$name" --rc "$rc" --seconds "$dt" --budget "$budget" \
        >> "$LOG" 2>&1 || FAILED=1
}

# ---- 0a. torch's mutation analysis of every kernel launch, on THIS machine's torch (2.11 on the GPU machines, which
# predates pytorch#172354: the static gate can only emulate it). CPU only, compiles nothing (~10-30 s): it runs in
# the background beside the preflight and the CUDA tests and is recorded as part "mutation" after them. Fails on a
# declared write (deepsim_rt.kernels._triton_common.declare_writes) not reported, an input reported as written, or
# an analysis that gave up ("assuming every input is mutated": torch.compile would clone every input per launch).
MUT_BUDGET=$(( 60 * SCALE ))
(
    t0=$(date +%s)
    timeout -s INT -k "$GRACE" "$MUT_BUDGET" env -u TRITON_INTERPRET "$PY" -m benchmarks.gpu_static \
        --mutation-only installed --json "$WORK/mutation.json" > "$WORK/mutation.log" 2>&1
    echo "$? $(( $(date +%s) - t0 ))" > "$WORK/mutation.rc"
) &
MUT_PID=$!
collect_mutation() {  # wait for 0a, fold its output into the log and its verdict into the records
    local rc=1 dt=0
    wait "$MUT_PID"
    [ -s "$WORK/mutation.rc" ] && read -r rc dt < "$WORK/mutation.rc"
    echo "===== [mutation] budget ${MUT_BUDGET}s (background): gpu_static --mutation-only installed" >> "$LOG"
    cat "$WORK/mutation.log" >> "$LOG" 2>/dev/null
    echo "===== [mutation] rc=$rc in ${dt}s" | tee -a "$LOG"
    $PARTS record --dest "$DEST" --work "$WORK" --name mutation --rc "$rc" --seconds "$dt" --budget "$MUT_BUDGET" \
        >> "$LOG" 2>&1 || FAILED=1
}

# ---- 0b. preflight: CUDA, C compiler + Python.h (Triton's launcher), g++ (AOTInductor), one launch per kernel ----
CPU_FLAG=()
[ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] && CPU_FLAG=(--allow-cpu)
part preflight 30 $PARTS preflight --work "$WORK" "${CPU_FLAG[@]}"
if [ "$FAILED" != 0 ]; then
    collect_mutation
    grep -h "PREFLIGHT FAILED" "$LOG" | tail -n 1
    $PARTS summary --dest "$DEST" --total $(( $(date +%s) - T_START )) --budget "$BUDGET"
    exit 2
fi
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv >> "$LOG" 2>&1 || true
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rs)
# GPU_CHECK_SELECT="-k expr" narrows every pytest part (the CPU plumbing test in CI uses it to stay short).
read -r -a SELECT <<< "${GPU_CHECK_SELECT:-}"
bench() {  # bench NAME BUDGET FILE [pytest args...]: a benchmark part writing $DEST/gpu-<NAME>.json
    local name=$1 budget=$2 json=$3
    shift 3
    part "$name" "$budget" "${PYTEST[@]}" "$@" -m gpu --benchmark-only --benchmark-json="$DEST/$json" \
        --benchmark-columns=median,iqr,rounds --junitxml="$WORK/$name.xml" "${SELECT[@]}"
}

# ---- 1. CUDA tests: real launches of the kernels, compile/export capture on the GPU ------------------------------
part tests 90 "${PYTEST[@]}" tests -m gpu --junitxml="$WORK/tests.xml" "${SELECT[@]}"
collect_mutation

# ---- 2. kernels: reference + triton first (the claims), then torch.compile (slow to compile) --------------------
bench kernels 65 gpu-kernels.json benchmarks/test_kernels.py -k "not compile"
bench kernels-compile 50 gpu-kernels-compile.json benchmarks/test_kernels.py -k "compile"

# ---- 3. training step per loss, reference vs kernels; 4. registration inference per backend ---------------------
bench train-step 45 gpu-train.json benchmarks/test_train_step.py
bench inference 60 gpu-infer.json benchmarks/test_inference.py

# ---- 5. refinement benchmarks (benchmarks/test_refine.py, gpu-marked cases), when the suite exists ---------------
if [ -f benchmarks/test_refine.py ]; then
    bench refine 30 gpu-refine.json benchmarks/test_refine.py
fi

# ---- 6. host launch cost: the inference and one refinement step at 80x96x80, eager vs replayed from a CUDA graph
# (deepsim_rt.kernels.cuda_graph); figures in the log and in gpu_check.json's record of the part -------------------
part graphs 20 "$PY" -m benchmarks.launch_cost --cuda-graph --json "$WORK/graphs.result.json"

# ---- 7. report over this run's JSON + the committed results (other machines side by side) ----------------------
JSONS=()
for f in "$DEST"/gpu-*.json "$ROOT"/benchmarks/results/*.json; do
    [ -s "$f" ] && JSONS+=("$f")
done
part report 15 "$PY" benchmarks/report.py "${JSONS[@]}" --out "$WORK/RESULTS.md" --plot "$WORK/speedups.png" \
    --summary

# ---- summary (printed last: one screen) ---------------------------------------------------------------------------
echo
sed -n '/^===== \[report\] budget/,/^===== \[report\] rc=/p' "$LOG" | sed '1d;$d' | tail -n 25
$PARTS summary --dest "$DEST" --total $(( $(date +%s) - T_START )) --budget "$BUDGET"
exit $FAILED
