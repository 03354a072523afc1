#!/usr/bin/env bash
# flashep: build, install and check everything on the GPU machine (no network needed).
#
#   scripts/gpu_check.sh [--gpus N] [--quick] [--sanitize] [--ll-trace] [--low-latency] [--no-tests]
#                        [--no-bench] [--no-install] [--no-cpp] [-- extra pytest arguments]
#
# A GPU machine that cannot run the GPU tests is a failure here, never a pass with skips (issue 7):
# the machine is expected to have N GPUs (--gpus N; default: the GPUs `nvidia-smi -L` lists; no
# nvidia-smi and no --gpus: exit 2 at once), FLASHEP_TEST_EXPECT_GPUS=N is exported so that a test
# needing <= N GPUs fails instead of skipping (tests/python/dist_harness.py), and every pytest step
# checks its junit xml with scripts/check_skips.py: a skip for a GPU/torch reason of a test needing
# <= N GPUs, or any skip of a CPU test (test_cpu.py), fails the step.
#
# Steps (each logged to $LOGDIR/<step>.log; a failing step does not stop the later ones, except that
# nothing that needs the package runs when its install failed):
#   0. gpus      torch imports, is built with CUDA, and torch.cuda.device_count() == N (always runs)
#   1. install   python3 -m pip install --no-build-isolation --no-deps -v .   (CMAKE_BUILD_PARALLEL_LEVEL=nproc)
#   2. cpp       cmake -B build -G Ninja && cmake --build build && ctest --test-dir build, then the C++
#                example (build/examples/flashep_example: all local GPUs, torch-free)
#   3. pytest    python3 -m pytest -x -v -s tests/python   (GPU tests adapt to the GPU count), then
#                the skip check of its junit xml
#   3a. internode the multi-node tests (test_internode_rail.py, test_internode.py), apart from step 3 so
#                that a failure of the newest path does not stop the others' tests (+ skip check)
#   3b. kernels16 the intranode tests again (quick grid) on the kernels built for 8- and 16-rank
#                domains (FLASHEP_DEBUG_KERNEL_RANKS), so fewer GPUs test that code too (+ skip check)
#   3c. shared_gpu (one GPU only) the 2-rank low-latency tests with both ranks on the GPU
#                (FLASHEP_TEST_SHARE_GPUS=2, quick grid; + skip check)
#   4. bench     python3 -m flashep.bench [--out $OUT/bench.md], then
#                python3 -m flashep.bench_low_latency [--out $OUT/bench_low_latency.md], then
#                scripts/latency_probe.cu (built with nvcc: load round trips, local and peer) and
#                scripts/icache_probe.cu (straight-line code run once: cold instruction fetch), then (2+ GPUs,
#                NVSHMEM) the multi-node path as 2 nodes of N/2: python3 -m flashep.bench --shapes deepep
#                --nvl-domain-size N/2 --sms 12,24 --profile [--out $OUT/bench_multinode.md]
#   4b. ll_trace (--ll-trace) the low-latency kernels' timeline: installs a diagnostics build
#                (-Ccmake.define.FLASHEP_ENABLE_DIAGNOSTICS=ON), runs
#                python3 -m flashep.bench_low_latency --trace --tokens 1,128 --paths nvlink, then
#                installs the normal build again (so the sanitizer step runs production kernels)
#   5. sanitize  (--sanitize) compute-sanitizer memcheck on the 2-rank intranode test, quick grid,
#                on the foundation's bad-input and transport tests (test_foundation.py) and on the
#                2-rank low-latency test (quick grid, both transports) and on the multi-node test as
#                2 nodes x 1 GPU (quick grid);
#                CUDA API return codes are not reported (NCCL probes kernel images at init)
#                (bounded by SANITIZE_TIMEOUT_S, default 600) (+ skip check)
# Flags: --gpus N     the number of GPUs this machine must have and the tests must use (N >= 1;
#                     set it when CUDA_VISIBLE_DEVICES hides some of what nvidia-smi lists)
#        --quick      smaller test grids (FLASHEP_TEST_QUICK=1)
#        --sanitize   add step 5
#        --ll-trace   add step 4b
#        --low-latency the low-latency mode only (issue 8's checks in one device call): step 3 runs
#                     test_low_latency.py and test_low_latency_failures.py, step 4 only
#                     bench_low_latency, step 5 only its low-latency part; steps 2, 3a, 3b, the
#                     high-throughput and multi-node benchmarks and the probes are skipped
#        --no-tests   skip steps 2, 3, 3b (and 5)
#        --no-bench   skip step 4
#        --no-install reuse the installed package (skip step 1)
#        --no-cpp     skip step 2
# Environment: OUT (results folder: logs, bench.md, pytest junit xml files; without OUT they go to
#              build/gpu_check_logs), PYTHON (default python3),
#              BENCH_ARGS (extra arguments for flashep.bench, e.g. "--shapes deepep --sms 24"),
#              BENCH_LL_ARGS (extra arguments for flashep.bench_low_latency, e.g. "--tokens 128"),
#              BENCH_MN_ARGS (extra arguments for the multi-node bench, e.g. "--chunks 8:256,16:128").
# Exit status: 0 when every step that ran passed; 2 for bad arguments or an unknown GPU count.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

QUICK=0 SANITIZE=0 LL_TRACE=0 LL_ONLY=0 RUN_TESTS=1 RUN_BENCH=1 RUN_INSTALL=1 RUN_CPP=1
EXPECT_GPUS=""
PYTEST_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus) [[ $# -ge 2 ]] || { echo "gpu_check.sh: --gpus needs a number" >&2; exit 2; }
            shift; EXPECT_GPUS="$1" ;;
    --gpus=*) EXPECT_GPUS="${1#--gpus=}" ;;
    --quick) QUICK=1 ;;
    --sanitize) SANITIZE=1 ;;
    --ll-trace) LL_TRACE=1 ;;
    --low-latency) LL_ONLY=1 ;;
    --no-tests) RUN_TESTS=0 ;;
    --no-bench) RUN_BENCH=0 ;;
    --no-install) RUN_INSTALL=0 ;;
    --no-cpp) RUN_CPP=0 ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The GPU count this machine must have. Without it, a machine whose GPUs or torch are missing would
# just skip every GPU test and pass, so no guess: nvidia-smi's list, or --gpus, or stop here.
if [[ -z "$EXPECT_GPUS" ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check.sh: FAILED: nvidia-smi not found and no --gpus N given: cannot tell how many GPUs" \
      "this machine must test (pass --gpus N)" >&2
    exit 2
  fi
  if ! SMI_LIST="$(nvidia-smi -L)"; then
    echo "gpu_check.sh: FAILED: 'nvidia-smi -L' failed (driver not loaded?); pass --gpus N to go on" >&2
    exit 2
  fi
  EXPECT_GPUS="$(grep -c '^GPU [0-9]' <<<"$SMI_LIST" || true)"  # MIG lines are indented: not counted
  EXPECT_GPUS_FROM="nvidia-smi -L"
else
  EXPECT_GPUS_FROM="--gpus"
fi
if ! [[ "$EXPECT_GPUS" =~ ^[0-9]+$ ]] || [[ "$EXPECT_GPUS" -lt 1 ]]; then
  echo "gpu_check.sh: FAILED: expected GPU count '$EXPECT_GPUS' (from $EXPECT_GPUS_FROM) is not a number >= 1" >&2
  exit 2
fi
# Strict mode of tests/python/dist_harness.py: a test needing <= N GPUs fails instead of skipping.
export FLASHEP_TEST_EXPECT_GPUS="$EXPECT_GPUS"

PY="${PYTHON:-python3}"
NPROC="$(nproc)"
if [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
  export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  LOGDIR="$OUT/logs"
else
  LOGDIR="$ROOT/build/gpu_check_logs"
fi
mkdir -p "$LOGDIR"
XMLDIR="${OUT:-$LOGDIR}"  # pytest junit xml files (read by the skip checks)
if [[ $QUICK -eq 1 ]]; then export FLASHEP_TEST_QUICK=1; fi

SUMMARY=()
FAILED=0
T_START=$SECONDS

# run_step NAME COMMAND...: runs the command (output shown and logged), records PASS/FAIL and time.
run_step() {
  local name="$1"; shift
  local log="$LOGDIR/$name.log"
  local t0=$SECONDS rc
  echo
  echo "=================== [$name] $*"
  set +e
  ( set -o pipefail; "$@" ) 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    SUMMARY+=("$(printf '%-9s PASS  %5ds  %s' "$name" "$dt" "$log")")
  else
    SUMMARY+=("$(printf '%-9s FAIL  %5ds  %s  (exit %d)' "$name" "$dt" "$log" "$rc")")
    # The step's last "FAIL..." line (the checks below print one; so does pytest's -r summary) says why.
    local why
    why="$(grep -E '^FAIL' "$log" | tail -n 1 | cut -c1-200 || true)"
    if [[ -n "$why" ]]; then SUMMARY+=("          -> $why"); fi
    FAILED=1
  fi
  return "$rc"
}

skip_step() {
  SUMMARY+=("$(printf '%-9s SKIP         %s' "$1" "$2")")
}

# skips_ok XML: the pytest junit xml shows no skip that must not happen here: a GPU/torch skip of a
# test needing <= EXPECT_GPUS GPUs, or any skip of a CPU test. Strict mode should have turned the
# first kind into failures already; this also catches skips that do not go through dist_harness.
skips_ok() {
  "$PY" "$ROOT/scripts/check_skips.py" --expect-gpus "$EXPECT_GPUS" --forbid-skips-in test_cpu "$1"
}

# pytest_checked XML ARGS...: pytest ARGS writing the junit XML, then skips_ok XML; fails if either does.
pytest_checked() {
  local xml="$1" rc=0; shift
  rm -f "$xml"  # a stale xml must not stand in for a run that wrote none
  # COLUMNS: pytest cuts its "FAILED test - reason" lines to the terminal width (80 in a pipe); the
  # summary below quotes the last one.
  COLUMNS="${COLUMNS:-160}" "$PY" -m pytest --junitxml "$xml" "$@" || rc=$?
  skips_ok "$xml" || { [[ $rc -ne 0 ]] || rc=1; }
  return "$rc"
}

echo "flashep gpu_check: $(date -u +%FT%TZ) in $ROOT; expecting $EXPECT_GPUS GPUs ($EXPECT_GPUS_FROM)"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; } || echo "(nvidia-smi not available)"

# ---- 0. torch with CUDA and exactly the expected GPUs: otherwise every GPU test below could only
#         skip (or, in strict mode, fail), and the benchmark would measure another machine.
check_gpus() {
  "$PY" - "$EXPECT_GPUS" <<'PYEOF'
import sys
expect = int(sys.argv[1])
print("python", sys.version.split()[0])
try:
    import torch
except Exception as error:
    sys.exit(f"FAIL: torch does not import ({type(error).__name__}: {error}); the GPU tests and the bench need it")
print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.version.cuda:
    sys.exit(f"FAIL: torch {torch.__version__} is built without CUDA")
if not torch.cuda.is_available():
    sys.exit("FAIL: torch.cuda.is_available() is False (driver, CUDA_VISIBLE_DEVICES?)")
count = torch.cuda.device_count()
for i in range(count):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
if count != expect:
    sys.exit(f"FAIL: torch.cuda.device_count() = {count}, expected {expect} GPUs (set --gpus to what this machine must have)")
print(f"OK: torch sees the {count} expected GPUs")
PYEOF
}
run_step gpus check_gpus || true

# ---- 1. build + install the Python package
INSTALL_OK=1
if [[ $RUN_INSTALL -eq 1 ]]; then
  install_pkg() { CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" "$PY" -m pip install --no-build-isolation --no-deps -v . ; }
  run_step install install_pkg || INSTALL_OK=0
else
  skip_step install "--no-install (using the installed package)"
fi

# The NVSHMEM wheel is there (the GPU machines have it): the build found it (FLASHEP_WITH_NVSHMEM=AUTO),
# so the NVSHMEM tests must run, not skip.
if "$PY" -c "import nvidia.nvshmem" 2>/dev/null; then
  export FLASHEP_TEST_EXPECT_NVSHMEM=1
  echo "NVSHMEM wheel found: FLASHEP_TEST_EXPECT_NVSHMEM=1 (the NVSHMEM transport test must run)"
fi

# ---- 2. C++ tests and examples
if [[ $RUN_TESTS -eq 1 && $RUN_CPP -eq 1 && $LL_ONLY -eq 0 ]]; then
  cpp_tests() {
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${CUDACXX:+-DCMAKE_CUDA_COMPILER="$CUDACXX"} &&
      cmake --build build -j "$NPROC" &&
      ctest --test-dir build --output-on-failure &&
      { [[ ! -x build/examples/flashep_example ]] || build/examples/flashep_example; }
  }
  run_step cpp cpp_tests || true
else
  skip_step cpp "$([[ $RUN_TESTS -eq 0 ]] && echo --no-tests || { [[ $LL_ONLY -eq 1 ]] && echo --low-latency || echo --no-cpp; })"
fi

# ---- 3. Python tests (CPU + GPU; the GPU ones adapt to the GPU count; strict mode: none of those
#         needing <= EXPECT_GPUS may skip)
if [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 && $LL_ONLY -eq 1 ]]; then
  py_tests() {
    pytest_checked "$XMLDIR/pytest.xml" -x -v -s -rfEs -p no:cacheprovider tests/python/test_low_latency.py \
      tests/python/test_low_latency_failures.py "${PYTEST_EXTRA[@]}"
  }
  run_step pytest py_tests || true
  skip_step internode "--low-latency"
elif [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 ]]; then
  py_tests() {
    pytest_checked "$XMLDIR/pytest.xml" -x -v -s -rfEs -p no:cacheprovider tests/python \
      --ignore=tests/python/test_internode.py --ignore=tests/python/test_internode_rail.py "${PYTEST_EXTRA[@]}"
  }
  run_step pytest py_tests || true
  internode_tests() {
    pytest_checked "$XMLDIR/pytest-internode.xml" -v -s -rfEs -p no:cacheprovider \
      tests/python/test_internode_rail.py tests/python/test_internode.py "${PYTEST_EXTRA[@]}"
  }
  run_step internode internode_tests || true
elif [[ $RUN_TESTS -eq 1 ]]; then
  skip_step pytest "install failed"
else
  skip_step pytest "--no-tests"
fi

# ---- 3b. the kernels built for larger domains (8 and 16 ranks: other register budgets and
#          unrolling), run on the GPUs here through FLASHEP_DEBUG_KERNEL_RANKS, quick grid
if [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 && $LL_ONLY -eq 0 ]]; then
  larger_domains() {
    local k
    for k in 8 16; do
      echo "--- FLASHEP_DEBUG_KERNEL_RANKS=$k"
      FLASHEP_DEBUG_KERNEL_RANKS=$k FLASHEP_TEST_QUICK=1 pytest_checked "$XMLDIR/pytest-kernels$k.xml" \
        -x -v -s -rfEs -p no:cacheprovider tests/python/test_intranode.py || return 1
    done
  }
  run_step kernels16 larger_domains || true
fi

# ---- 3c. one GPU: the 2-rank low-latency tests with both ranks on it (FLASHEP_TEST_SHARE_GPUS=2:
#          correctness only, the ranks time-slice the GPU), so a 1-GPU machine still runs the
#          multi-rank paths (this found a race that the 1-rank tests cannot, 2026-12-01)
if [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 && "${EXPECT_GPUS:-0}" -lt 2 ]]; then
  shared_gpu() {
    FLASHEP_TEST_SHARE_GPUS=2 FLASHEP_TEST_QUICK=1 pytest_checked "$XMLDIR/pytest-shared.xml" -v -s -rfEs \
      -p no:cacheprovider tests/python/test_low_latency.py tests/python/test_low_latency_failures.py \
      -k "not R1 and not R4 and not R8"
  }
  run_step shared_gpu shared_gpu || true
fi

# ---- 4. benchmark (before the sanitizer: it is the main job, the sanitizer the slowest step)
if [[ $RUN_BENCH -eq 1 && $INSTALL_OK -eq 1 ]]; then
  BENCH_OUT=()
  if [[ -n "${OUT:-}" ]]; then BENCH_OUT=(--out "$OUT/bench.md"); fi
  # shellcheck disable=SC2086
  bench() { "$PY" -m flashep.bench "${BENCH_OUT[@]}" ${BENCH_ARGS:-}; }
  if [[ $LL_ONLY -eq 0 ]]; then run_step bench bench || true; else skip_step bench "--low-latency"; fi
  BENCH_LL_OUT=()
  if [[ -n "${OUT:-}" ]]; then BENCH_LL_OUT=(--out "$OUT/bench_low_latency.md"); fi
  # shellcheck disable=SC2086
  bench_ll() { "$PY" -m flashep.bench_low_latency "${BENCH_LL_OUT[@]}" ${BENCH_LL_ARGS:-}; }
  run_step bench_low_latency bench_ll || true
  # The memory round trip of each load kind, local and peer (scripts/latency_probe.cu): what the
  # low-latency kernels' dependent steps cost at least.
  latency_probe() {
    local probe="${TMPDIR:-/tmp}/flashep_latency_probe"
    "${NVCC:-/usr/local/cuda/bin/nvcc}" -O3 -arch=sm_90 -o "$probe" scripts/latency_probe.cu && "$probe"
  }
  if [[ $LL_ONLY -eq 0 ]]; then run_step latency_probe latency_probe || true; fi
  # What straight-line code costs the first time it runs (scripts/icache_probe.cu).
  icache_probe() {
    local probe="${TMPDIR:-/tmp}/flashep_icache_probe"
    "${NVCC:-/usr/local/cuda/bin/nvcc}" -O3 -arch=sm_90 -o "$probe" scripts/icache_probe.cu && "$probe"
  }
  if [[ $LL_ONLY -eq 0 ]]; then run_step icache_probe icache_probe || true; fi
  # The multi-node path on this host (2+ GPUs, a build with NVSHMEM): 2 virtual nodes of R/2 GPUs,
  # the DeepEP workload, the raw NVSHMEM put next to it and the kernels of each call (--profile).
  if [[ $LL_ONLY -eq 1 ]]; then
    skip_step bench_multinode "--low-latency"
  elif [[ "$EXPECT_GPUS" -ge 2 && $((EXPECT_GPUS % 2)) -eq 0 ]] && "$PY" -c "import flashep, sys; sys.exit(0 if flashep._C.nvshmem_built() else 1)"; then
    BENCH_MN_OUT=()
    if [[ -n "${OUT:-}" ]]; then BENCH_MN_OUT=(--out "$OUT/bench_multinode.md"); fi
    # shellcheck disable=SC2086
    bench_mn() { "$PY" -m flashep.bench --num-ranks "$EXPECT_GPUS" --shapes deepep --nvl-domain-size $((EXPECT_GPUS / 2)) --sms 12,24 --profile \
                   "${BENCH_MN_OUT[@]}" ${BENCH_MN_ARGS:-}; }
    run_step bench_multinode bench_mn || true
  else
    if [[ "${FLASHEP_TEST_EXPECT_NVSHMEM:-0}" == 1 && "$EXPECT_GPUS" -ge 2 && $((EXPECT_GPUS % 2)) -eq 0 ]]; then
      SUMMARY+=("$(printf '%-9s FAIL         %s' bench_multinode "FLASHEP_TEST_EXPECT_NVSHMEM=1 but the build has no NVSHMEM")")
      FAILED=1
    else
      skip_step bench_multinode "an odd GPU count or fewer than 2, or a build without NVSHMEM"
    fi
  fi
elif [[ $RUN_BENCH -eq 1 ]]; then
  skip_step bench "install failed"
else
  skip_step bench "--no-bench"
fi

# ---- 4b. the low-latency kernels' timeline (diagnostics build), then the production build again
if [[ $LL_TRACE -eq 1 && $INSTALL_OK -eq 1 ]]; then
  ll_trace() {
    local rc=0
    CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" "$PY" -m pip install --no-build-isolation --no-deps \
      -Ccmake.define.FLASHEP_ENABLE_DIAGNOSTICS=ON . || return 1
    (cd /tmp && "$PY" -m flashep.bench_low_latency --trace --tokens 1,128 --paths nvlink) || rc=$?
    CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" "$PY" -m pip install --no-build-isolation --no-deps . || rc=1
    return "$rc"
  }
  run_step ll_trace ll_trace || true
fi

# ---- 5. compute-sanitizer memcheck on the 2-rank intranode test (quick grid, short stress loop)
if [[ $SANITIZE -eq 1 && $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 ]]; then
  SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  sanitize() {
    local xml="$XMLDIR/pytest-sanitize.xml" rc=0
    rm -f "$xml"
    if [[ $LL_ONLY -eq 0 ]]; then
      COLUMNS="${COLUMNS:-160}" FLASHEP_TEST_QUICK=1 FLASHEP_TEST_STRESS_ITERS=20 FLASHEP_TIMEOUT_S=600 FLASHEP_TEST_TIMEOUT_S=3000 \
        timeout "${SANITIZE_TIMEOUT_S:-600}" "$SANITIZER" --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
        "$PY" -m pytest -x -v -s -rfEs -p no:cacheprovider --junitxml "$xml" tests/python/test_intranode.py -k R2 || rc=$?
      skips_ok "$xml" || { [[ $rc -ne 0 ]] || rc=1; }
      # The GPU's own input checks (bad counts, expert ids, handles) and the abort paths: nothing is
      # read or written out of bounds on the way to the error. Peers raise later under the sanitizer.
      local xml2="$XMLDIR/pytest-sanitize-foundation.xml"
      rm -f "$xml2"
      COLUMNS="${COLUMNS:-160}" FLASHEP_TEST_PEER_RAISE_S=60 FLASHEP_TEST_TIMEOUT_S=3000 \
        timeout "${SANITIZE_TIMEOUT_S:-600}" "$SANITIZER" --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
        "$PY" -m pytest -x -v -s -rfEs -p no:cacheprovider --junitxml "$xml2" tests/python/test_foundation.py \
        -k "containment or bad_input or nvlink" || rc=$?
      skips_ok "$xml2" || { [[ $rc -ne 0 ]] || rc=1; }
    fi
    # The low-latency kernels, both transports, quick grid.
    local xml3="$XMLDIR/pytest-sanitize-low-latency.xml"
    rm -f "$xml3"
    COLUMNS="${COLUMNS:-160}" FLASHEP_TEST_QUICK=1 FLASHEP_TEST_STRESS_ITERS=20 FLASHEP_TEST_GRAPH_REPLAYS=3 \
      FLASHEP_TIMEOUT_S=600 FLASHEP_TEST_TIMEOUT_S=3000 \
      timeout "${SANITIZE_TIMEOUT_S:-600}" "$SANITIZER" --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
      "$PY" -m pytest -x -v -s -rfEs -p no:cacheprovider --junitxml "$xml3" tests/python/test_low_latency.py -k R2 || rc=$?
    skips_ok "$xml3" || { [[ $rc -ne 0 ]] || rc=1; }
    [[ $LL_ONLY -eq 0 ]] || return "$rc"
    # The multi-node path (rail stage, reordering, NVLink stage) as 2 nodes of 1 GPU, quick grid.
    local xml4="$XMLDIR/pytest-sanitize-internode.xml"
    rm -f "$xml4"
    COLUMNS="${COLUMNS:-160}" FLASHEP_TEST_QUICK=1 FLASHEP_TEST_STRESS_ITERS=20 FLASHEP_TEST_GRAPH_REPLAYS=3 \
      FLASHEP_TIMEOUT_S=600 FLASHEP_TEST_TIMEOUT_S=3000 \
      timeout "${SANITIZE_TIMEOUT_S:-600}" "$SANITIZER" --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
      "$PY" -m pytest -x -v -s -rfEs -p no:cacheprovider --junitxml "$xml4" tests/python/test_internode.py -k R2-M1 || rc=$?
    skips_ok "$xml4" || { [[ $rc -ne 0 ]] || rc=1; }
    return "$rc"
  }
  run_step sanitize sanitize || true
elif [[ $SANITIZE -eq 1 ]]; then
  skip_step sanitize "tests disabled or install failed"
fi

echo
echo "=================== gpu_check summary ($((SECONDS - T_START)) s; logs in $LOGDIR)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ -n "${OUT:-}" && -f "$OUT/bench.md" ]]; then echo "  bench table: $OUT/bench.md"; fi
if [[ $FAILED -ne 0 ]]; then
  echo "RESULT: FAILED"
  exit 1
fi
echo "RESULT: PASSED"
