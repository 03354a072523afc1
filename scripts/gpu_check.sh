#!/usr/bin/env bash
# flashep: build, install and check everything on the GPU machine (no network needed).
#
#   scripts/gpu_check.sh [--quick] [--sanitize] [--no-tests] [--no-bench] [--no-install] [--no-cpp]
#                        [-- extra pytest arguments]
#
# Steps (each logged to $LOGDIR/<step>.log; a failing step does not stop the later ones, except that
# nothing that needs the package runs when its install failed):
#   1. install   python3 -m pip install --no-build-isolation --no-deps -v .   (CMAKE_BUILD_PARALLEL_LEVEL=nproc)
#   2. cpp       cmake -B build -G Ninja && cmake --build build && ctest --test-dir build, then the C++
#                example (build/examples/flashep_example: all local GPUs, torch-free)
#   3. pytest    python3 -m pytest -x -v -s tests/python   (GPU tests adapt to the GPU count)
#   3b. kernels16 the intranode tests again (quick grid) on the kernels built for 8- and 16-rank
#                domains (FLASHEP_DEBUG_KERNEL_RANKS), so fewer GPUs test that code too
#   4. bench     python3 -m flashep.bench [--out $OUT/bench.md]
#   5. sanitize  (--sanitize) compute-sanitizer memcheck on the 2-rank intranode test, quick grid;
#                CUDA API return codes are not reported (NCCL probes kernel images at init)
#                (bounded by SANITIZE_TIMEOUT_S, default 600)
# Flags: --quick      smaller test grids (FLASHEP_TEST_QUICK=1)
#        --sanitize   add step 4
#        --no-tests   skip steps 2 and 3 (and 4)
#        --no-bench   skip step 5
#        --no-install reuse the installed package (skip step 1)
#        --no-cpp     skip step 2
# Environment: OUT (results folder: logs, bench.md, pytest junit xml), PYTHON (default python3),
#              BENCH_ARGS (extra arguments for flashep.bench, e.g. "--shapes deepep --sms 24").
# Exit status: 0 when every step that ran passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

QUICK=0 SANITIZE=0 RUN_TESTS=1 RUN_BENCH=1 RUN_INSTALL=1 RUN_CPP=1
PYTEST_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --sanitize) SANITIZE=1 ;;
    --no-tests) RUN_TESTS=0 ;;
    --no-bench) RUN_BENCH=0 ;;
    --no-install) RUN_INSTALL=0 ;;
    --no-cpp) RUN_CPP=0 ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

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
    FAILED=1
  fi
  return "$rc"
}

skip_step() {
  SUMMARY+=("$(printf '%-9s SKIP         %s' "$1" "$2")")
}

echo "flashep gpu_check: $(date -u +%FT%TZ) in $ROOT"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; } || echo "(nvidia-smi not available)"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count())' || true

# ---- 1. build + install the Python package
INSTALL_OK=1
if [[ $RUN_INSTALL -eq 1 ]]; then
  install_pkg() { CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" "$PY" -m pip install --no-build-isolation --no-deps -v . ; }
  run_step install install_pkg || INSTALL_OK=0
else
  skip_step install "--no-install (using the installed package)"
fi

# ---- 2. C++ tests and examples
if [[ $RUN_TESTS -eq 1 && $RUN_CPP -eq 1 ]]; then
  cpp_tests() {
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${CUDACXX:+-DCMAKE_CUDA_COMPILER="$CUDACXX"} &&
      cmake --build build -j "$NPROC" &&
      ctest --test-dir build --output-on-failure &&
      { [[ ! -x build/examples/flashep_example ]] || build/examples/flashep_example; }
  }
  run_step cpp cpp_tests || true
else
  skip_step cpp "$([[ $RUN_TESTS -eq 0 ]] && echo --no-tests || echo --no-cpp)"
fi

# ---- 3. Python tests (CPU + GPU; the GPU ones adapt to the GPU count)
JUNIT=()
if [[ -n "${OUT:-}" ]]; then JUNIT=(--junitxml "$OUT/pytest.xml"); fi
if [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 ]]; then
  py_tests() { "$PY" -m pytest -x -v -s -rs -p no:cacheprovider "${JUNIT[@]}" tests/python "${PYTEST_EXTRA[@]}"; }
  run_step pytest py_tests || true
elif [[ $RUN_TESTS -eq 1 ]]; then
  skip_step pytest "install failed"
else
  skip_step pytest "--no-tests"
fi

# ---- 3b. the kernels built for larger domains (8 and 16 ranks: other register budgets and
#          unrolling), run on the GPUs here through FLASHEP_DEBUG_KERNEL_RANKS, quick grid
if [[ $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 ]]; then
  larger_domains() {
    local k
    for k in 8 16; do
      echo "--- FLASHEP_DEBUG_KERNEL_RANKS=$k"
      FLASHEP_DEBUG_KERNEL_RANKS=$k FLASHEP_TEST_QUICK=1 "$PY" -m pytest -x -v -s -rs -p no:cacheprovider \
        tests/python/test_intranode.py || return 1
    done
  }
  run_step kernels16 larger_domains || true
fi

# ---- 4. benchmark (before the sanitizer: it is the main job, the sanitizer the slowest step)
if [[ $RUN_BENCH -eq 1 && $INSTALL_OK -eq 1 ]]; then
  BENCH_OUT=()
  if [[ -n "${OUT:-}" ]]; then BENCH_OUT=(--out "$OUT/bench.md"); fi
  # shellcheck disable=SC2086
  bench() { "$PY" -m flashep.bench "${BENCH_OUT[@]}" ${BENCH_ARGS:-}; }
  run_step bench bench || true
elif [[ $RUN_BENCH -eq 1 ]]; then
  skip_step bench "install failed"
else
  skip_step bench "--no-bench"
fi

# ---- 5. compute-sanitizer memcheck on the 2-rank intranode test (quick grid, short stress loop)
if [[ $SANITIZE -eq 1 && $RUN_TESTS -eq 1 && $INSTALL_OK -eq 1 ]]; then
  SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  sanitize() {
    FLASHEP_TEST_QUICK=1 FLASHEP_TEST_STRESS_ITERS=20 FLASHEP_TIMEOUT_S=600 FLASHEP_TEST_TIMEOUT_S=3000 \
      timeout "${SANITIZE_TIMEOUT_S:-600}" "$SANITIZER" --tool memcheck --target-processes all --report-api-errors no --error-exitcode 99 \
      "$PY" -m pytest -x -v -s -p no:cacheprovider tests/python/test_intranode.py -k R2
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
