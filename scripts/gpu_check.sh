#!/usr/bin/env bash
# One device call: build the extension, run all tests (GPU ones included), run the benchmark.
# Logs and results go to $OUT (or ./gpu_check_out); a short summary is printed last.
#   scripts/gpu_check.sh            # build + tests + full benchmark
#   BENCH=quick scripts/gpu_check.sh
#   BENCH=none  scripts/gpu_check.sh
#   BENCH_ARGS="--no-square --ms 1,4,8,16" scripts/gpu_check.sh   # extra benchmark arguments
#   DEMO=0 skips the sparsify-on-GPU demo; PROBE=<seconds> adds the cuSPARSELt algorithm probe
#   SANITIZE=1 runs compute-sanitizer (SANITIZE_TOOLS, default memcheck racecheck synccheck) on the decode kernel
#   MODEL=1 runs benchmarks/bench_model.py (MODEL_ARGS: its options; several runs separated by ';'); at
#     MODEL_TIMEOUT a run is sent SIGTERM and writes what it measured (give it ~30 s before the call's limit)
#   LOADMEM=1 runs benchmarks/load_memory.py on the GPU (LOADMEM_ARGS: its shape options)
#   NCU=1 profiles the decode kernel and cuBLAS with Nsight Compute (NCU_ARGS: the driver's options)
#   VARIANTS=1 runs scripts/probe_decode_variants.py (every decode-kernel variant, timed as the dispatcher does)
#   PROBE_M=1 runs scripts/probe_m_sweep.py (PROBE_M_ARGS: its options; every CUTLASS configuration per (shape, M))
#   TAIL=1 runs scripts/probe_tail_tile.py (a part-filled last token tile: extent or memory?)
#   HOST=1 runs scripts/probe_host_cost.py (host time per call at each level of the call stack;
#     HOST_ARGS="--generate" for a small Llama's eager generate, dense and 2:4, with a host profile)
#   STEP_PROFILE=1 runs benchmarks/profile_step.py (STEP_PROFILE_ARGS: e.g. "--batch 16;--prefill 2048", runs split on ';';
#     where a compiled model step's GPU time goes, dense and 2:4, per kernel class)
#   TESTS=<paths> (default tests; "none" runs none), TEST_SHARD=i/n (the i-th of n shares of the test files),
#     PYTEST_K, PYTEST_ARGS, TEST_TIMEOUT
#   REBUILD=1 builds even when this (warm) machine already built the same sources
#   A benchmark cut short by the call's time limit goes on in the next call: copy the returned
#   dispatch-*.json into .sfcache/ and linear_<gpu>.json anywhere in the tree, carry .sfcache, and
#   pass BENCH_ARGS="... --resume <that file>"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
# Dispatcher decisions: .sfcache/ when the call carries one (decisions measured by an earlier call,
# so a benchmark resumed in a new call does not measure them again), else a fresh directory.
[ -d .sfcache ] && SPARSEFLOW_CACHE_DIR=${SPARSEFLOW_CACHE_DIR:-$PWD/.sfcache}
export PYTHONUNBUFFERED=1 SPARSEFLOW_CACHE_DIR="${SPARSEFLOW_CACHE_DIR:-/tmp/sparseflow_cache}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the scripts import this tree's sparseflow (a prebuilt one is not pip-installed)
export SPARSEFLOW_TUNER_LOG="${SPARSEFLOW_TUNER_LOG:-$OUT/tuner.log}"  # the cuSPARSELt tuner child's stderr
PY=${PYTHON:-python3}
summary=()

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to the device (nvidia-cutlass: CUTLASS's headers)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
summary+=("$(scripts/build_ext.sh "$OUT/build.log")")
$PY -c "import sparseflow as sf; print('extension:', sf.extension_available(), sf._ext.EXT_ERROR, '| CUTLASS sm90:', sf._ext._CUTLASS is not None, sf._ext.CUTLASS_ERROR)" | tee -a "$OUT/build.log"

t0=$(date +%s)
# TEST_SHARD=i/n: the i-th of n shares of the test files (every n-th file in name order), so a
# whole suite that outlasts one call's limit runs in n calls. The slowest tests are listed.
tests=${TESTS:-tests}
if [ -n "${TEST_SHARD:-}" ]; then
  i=${TEST_SHARD%/*} n=${TEST_SHARD#*/}
  tests=$(ls tests/test_*.py | LC_ALL=C sort | awk -v i="$i" -v n="$n" '(NR - i) % n == 0' | tr '\n' ' ')
  echo "test shard $TEST_SHARD: $tests"
fi
# PYTEST_K: a -k expression (spaces kept); PYTEST_ARGS: more options, split on spaces
if [ "$tests" != none ]; then
  timeout ${TEST_TIMEOUT:-1800} $PY -m pytest -q -p no:cacheprovider --durations=15 $tests ${PYTEST_ARGS:-} \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/tests.log" | tail -30
  summary+=("tests: $(grep -E '^[0-9]+ (passed|failed)|passed|failed|error' "$OUT/tests.log" | tail -1) ($(( $(date +%s) - t0 ))s)")
fi

if [ "${SANITIZE:-0}" = 1 ]; then  # compute-sanitizer on the decode kernel (issue: sanitizer-clean)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    timeout ${SANITIZE_TIMEOUT:-600} compute-sanitizer --tool $tool $PY scripts/sanitize_decode.py >"$OUT/sanitize_$tool.log" 2>&1
    summary+=("compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1) $(grep -o 'worst rel err.*' "$OUT/sanitize_$tool.log")")
  done
fi
if [ "${VARIANTS:-0}" = 1 ]; then
  timeout 300 $PY scripts/probe_decode_variants.py ${VARIANTS_ARGS:-} 2>&1 | tee "$OUT/variants.log"
fi
if [ "${NCU:-0}" = 1 ]; then  # hardware counters: where the decode kernel's time goes
  timeout ${NCU_TIMEOUT:-300} ncu --clock-control none --nvtx --nvtx-include "prof/" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    $PY scripts/profile_decode.py ${NCU_ARGS:-} >"$OUT/ncu.log" 2>&1
  summary+=("ncu: rc=$? $(grep -c 'profiled:' "$OUT/ncu.log") ranges, $(grep -c 'DRAM Throughput' "$OUT/ncu.log") kernels profiled")
fi
if [ "${PROBE_M:-0}" = 1 ]; then
  timeout ${PROBE_M_TIMEOUT:-300} $PY scripts/probe_m_sweep.py --out "$OUT" ${PROBE_M_ARGS:-} 2>&1 | tee "$OUT/probe_m.log"
  summary+=("probe_m: $(grep -c ' M=' "$OUT/probe_m.log") rows, $(tail -1 "$OUT/probe_m.log")")
fi
if [ "${TAIL:-0}" = 1 ]; then  # why a part-filled last token tile costs more (scripts/probe_tail_tile.py)
  timeout 120 $PY scripts/probe_tail_tile.py --out "$OUT" 2>&1 | tee "$OUT/tail.log"
  summary+=("$(grep '^TAIL' "$OUT/tail.log")")
fi
if [ "${HOST:-0}" = 1 ]; then
  timeout ${HOST_TIMEOUT:-300} $PY scripts/probe_host_cost.py --out "$OUT" ${HOST_ARGS:-} 2>&1 | tee "$OUT/host.log" | grep -v "^HOST"
  summary+=("$(grep '^HOST' "$OUT/host.log")")
fi
if [ "${MODEL:-0}" = 1 ]; then  # whole-model speed; MODEL_ARGS: runs separated by ';', MODEL_TIMEOUT per run
  IFS=';' read -ra runs <<<"${MODEL_ARGS:-}"
  [ ${#runs[@]} = 0 ] && runs=("")
  for i in "${!runs[@]}"; do
    timeout -k 60 ${MODEL_TIMEOUT:-420} $PY benchmarks/bench_model.py --out "$OUT" ${runs[$i]} 2>&1 | tee "$OUT/model_$i.log" | grep -v "^MODEL"
    summary+=("$(grep '^MODEL' "$OUT/model_$i.log")")
  done
fi
if [ "${STEP_PROFILE:-0}" = 1 ]; then  # STEP_PROFILE_ARGS: one run's options, runs separated by ';'
  IFS=';' read -ra runs <<<"${STEP_PROFILE_ARGS:---batch 16}"
  for i in "${!runs[@]}"; do
    timeout ${STEP_PROFILE_TIMEOUT:-300} $PY benchmarks/profile_step.py --out "$OUT" ${runs[$i]} 2>&1 \
      | tee "$OUT/step_profile_$i.log" | grep -v "^PROFILE"
    summary+=("$(grep '^PROFILE' "$OUT/step_profile_$i.log")")
  done
fi
if [ "${LOADMEM:-0}" = 1 ]; then  # loading a 2:4 checkpoint straight to the GPU: peak over what stays
  timeout ${LOADMEM_TIMEOUT:-300} $PY benchmarks/load_memory.py --device cuda:0 ${LOADMEM_ARGS:---hidden 4096 --intermediate 14336 --layers 8} \
    2>&1 | tee "$OUT/loadmem.log"
  summary+=("load_memory: $(tail -1 "$OUT/loadmem.log" | grep -o '"cuda_peak_over_final": [0-9.]*')")
fi
if [ "${BENCH:-full}" != "none" ]; then
  args=(${BENCH_ARGS:-}); [ "${BENCH:-full}" = quick ] && args+=(--quick)
  timeout ${BENCH_TIMEOUT:-1800} $PY benchmarks/bench_dense_vs_sparse.py "${args[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v "^SUMMARY"
  summary+=("$(grep '^SUMMARY' "$OUT/bench.log")")
  if ! grep -q '^SUMMARY' "$OUT/bench.log"; then  # cut short by BENCH_TIMEOUT: the rows so far, summarised
    for f in "$OUT"/linear_*.json; do  # (the file itself stays as it is, for --resume)
      [ -f "$f" ] && summary+=("cut short: $($PY benchmarks/results_tool.py finish "$f" --out /tmp/finished_$(basename "$f") 2>&1 | grep -E '^(SUMMARY|.*not measured:)' | tr '\n' ' ')")
    done
  fi
fi
if [ "${DEMO:-1}" = 1 ]; then  # issue 3's GPU path: sf.sparsify on the GPU, then SparseLinear inference
  timeout 300 $PY examples/sparsify_gpu_demo.py 2>&1 | tee "$OUT/demo.log" | grep -v "^DEMO"
  summary+=("$(grep -E '^(sparsify|logits|greedy|converted|DEMO)' "$OUT/demo.log")")
fi
if [ "${PROBE:-0}" != 0 ]; then  # per-algorithm cuSPARSELt sweep, crash-isolated (informational)
  timeout $((PROBE + 30)) $PY benchmarks/probe_cusparselt_layouts.py --budget-s "$PROBE" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.log"
fi
cp "$SPARSEFLOW_CACHE_DIR"/dispatch-*.json "$OUT"/ 2>/dev/null  # to carry into the next call's .sfcache/
# At most 8 files come back from a device call: the logs travel as one archive.
(cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
echo "================ gpu_check summary ================"
printf '%s\n' "${summary[@]}"
