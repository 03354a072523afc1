#!/usr/bin/env bash
# The test command (README, CI): builds the library, the C++ tests, the example and the Python
# extension, then runs the C++ tests (CPU oracle, layout math) and the Python tests. GPU tests run
# when GPUs are present and report themselves skipped otherwise; the CPU tests (test_cpu.py) never
# skip: a missing or broken extension fails them, and so does any skip among them (issue 7).
# Last, a self-check: the CPU tests run against a staged copy of the package whose _C*.so is garbage
# (and one without it) and must fail; if they pass there, they prove nothing, and this script fails.
# Extra arguments go to the main pytest run.
#
# Both builds: with NVSHMEM (FLASHEP_WITH_NVSHMEM=ON; the wheel nvidia-nvshmem-cu13==3.4.5 is
# installed if missing) in $BUILD_DIR, and without it (OFF) in $BUILD_DIR-no-nvshmem; each gets the
# whole suite and must report the build it is. FLASHEP_TEST_NVSHMEM="ON" or "OFF" runs one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
PYTHON=${PYTHON:-python3}
read -r -a NVSHMEM_MODES <<< "${FLASHEP_TEST_NVSHMEM:-ON OFF}"

# Build-time Python packages (PyPI); present already on the GPU machines.
if ! "$PYTHON" -c "import nanobind, numpy, pytest" 2>/dev/null; then
  "$PYTHON" -m pip install -q nanobind numpy pytest
fi
for mode in "${NVSHMEM_MODES[@]}"; do
  if [[ $mode == ON ]] && ! "$PYTHON" -c "import nvidia.nvshmem" 2>/dev/null; then
    "$PYTHON" -m pip install -q nvidia-nvshmem-cu13==3.4.5
  fi
done

rc=0
# run_suite BUILD_DIR ON|OFF: build, C++ tests, example, Python tests, skip check. Sets rc; leaves
# the staged package in $STAGE.
run_suite() {
  local build="$1" mode="$2" want
  echo "==== build $build (FLASHEP_WITH_NVSHMEM=$mode)"
  cmake -S . -B "$build" -G Ninja -DFLASHEP_BUILD_PYTHON=ON -DFLASHEP_BUILD_TESTS=ON -DFLASHEP_BUILD_EXAMPLES=ON \
    -DFLASHEP_WITH_NVSHMEM="$mode" -DPython_EXECUTABLE="$(command -v "$PYTHON")"
  cmake --build "$build" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

  echo "== C++ tests ($mode)"
  (cd "$build" && ctest --output-on-failure)
  echo "== C++ example (skips itself without GPUs)"
  "$build/examples/flashep_example"

  # Stage the package (Python sources + the built extension) for the Python tests.
  STAGE="$build/pkg/flashep"
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  cp python/flashep/*.py "$STAGE/"
  cp "$build"/_C*.so "$STAGE/"
  # Built only against a torch of the build's interpreter (FLASHEP_WITH_TORCH=AUTO); none in CI.
  for module in "$build"/_torch_outputs*.so; do if [[ -e $module ]]; then cp "$module" "$STAGE/"; fi; done
  echo "== the extension is the build it claims (nvshmem_built() for FLASHEP_WITH_NVSHMEM=$mode)"
  want=$([[ $mode == ON ]] && echo True || echo False)
  PYTHONPATH="$build/pkg" "$PYTHON" -c "
import importlib.util, glob, sys
path = glob.glob('$STAGE/_C*.so')[0]
spec = importlib.util.spec_from_file_location('flashep._C', path)
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
got = m.nvshmem_built()
print('nvshmem_built() =', got)
sys.exit(0 if str(got) == '$want' else 'expected $want')"

  local junit="$build/pytest.xml" prc
  rm -f "$junit"  # a stale xml must not stand in for a run that wrote none
  echo "== Python tests ($mode)"
  set +e
  PYTHONPATH="$build/pkg${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -rs --junitxml "$junit" tests/python "${PYTEST_ARGS[@]}"
  prc=$?
  set -e
  # pytest exits 5 when it collected nothing; that is a failure of this script's purpose too.
  echo "== no CPU test may skip (test_cpu.py has nothing to wait for: a skip there tested nothing)"
  if ! "$PYTHON" scripts/check_skips.py --forbid-skips-in test_cpu "$junit"; then
    echo "FAILED: tests in test_cpu.py skipped (see above)" >&2
    [[ $prc -ne 0 ]] || prc=1
  fi
  if [[ $prc -ne 0 ]]; then
    echo "FAILED: Python tests of the $mode build (exit $prc)" >&2
    rc=$prc
  fi
}

PYTEST_ARGS=("$@")
for mode in "${NVSHMEM_MODES[@]}"; do
  case "$mode" in
    ON) run_suite "$BUILD_DIR" ON ;;
    OFF) run_suite "$BUILD_DIR${NVSHMEM_MODES[1]:+-no-nvshmem}" OFF ;;
    *) echo "FLASHEP_TEST_NVSHMEM: '$mode' is neither ON nor OFF" >&2; exit 2 ;;
  esac
done

# ---- self-check: the CPU tests must FAIL on a broken extension. Once they skipped instead, and CI
# passed on a garbage _C.so ("36 skipped", exit 0). Each case stages the package's Python sources
# with the extension replaced, runs test_cpu.py against it alone (FLASHEP_EXT_DIR unset, so nothing
# else can supply a working _C), and expects pytest's "tests failed" (1) or "collection error" (2).
# Exit 0 means the tests cannot catch a broken build; any other code means pytest itself did not
# run, so the check proved nothing either.
echo "== self-check: a broken extension must fail the tests"
SELF="$BUILD_DIR-selfcheck"
selfcheck_failed=0
for case in garbage missing; do
  pkg="$SELF/$case/flashep"
  rm -rf "${SELF:?}/$case" && mkdir -p "$pkg"
  cp python/flashep/*.py "$pkg/"
  if [[ $case == garbage ]]; then
    what="a garbage"
    for so in "$STAGE"/_C*.so; do  # same file names as the real extension, so the import finds them
      { printf 'flashep self-check: garbage bytes in place of the extension\n'; head -c 4096 /dev/zero; } \
        > "$pkg/$(basename "$so")"
      what+=" $(basename "$so")"
    done
  else
    what="no _C*.so at all"
  fi
  log="$SELF/$case.log"
  set +e
  # -p no:cacheprovider: these intended failures must not land in .pytest_cache (--lf, --ff).
  env -u FLASHEP_EXT_DIR PYTHONPATH="$SELF/$case${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/python/test_cpu.py > "$log" 2>&1
  src=$?
  set -e
  outcome="$(tail -n 1 "$log")"
  if [[ $src -eq 1 || $src -eq 2 ]]; then
    echo "ok: with $what, test_cpu.py fails (pytest exit $src: $outcome)"
  else
    tail -n 20 "$log" >&2
    if [[ $src -eq 0 ]]; then
      echo "SELF-CHECK FAILED: with $what, test_cpu.py PASSED (pytest exit 0: $outcome); the CPU tests" \
        "would not catch a broken extension (log: $log)" >&2
    else
      echo "SELF-CHECK FAILED: with $what, pytest exited $src (not 'tests failed'), so it did not run" \
        "the tests and the check proves nothing (log: $log)" >&2
    fi
    selfcheck_failed=1
  fi
done

if [[ $rc -ne 0 ]]; then
  echo "FAILED: Python tests (exit $rc)" >&2
  exit "$rc"
fi
if [[ $selfcheck_failed -ne 0 ]]; then
  echo "FAILED: self-check (a broken extension must fail the tests)" >&2
  exit 1
fi
