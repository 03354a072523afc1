#!/usr/bin/env bash
# The test command (README, CI): builds the library, the C++ tests, the example and the Python
# extension, then runs the C++ tests (CPU oracle, layout math) and the Python tests. GPU tests run
# when GPUs are present and report themselves skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
PYTHON=${PYTHON:-python3}

# Build-time Python packages (PyPI); present already on the GPU machines.
if ! "$PYTHON" -c "import nanobind, numpy, pytest" 2>/dev/null; then
  "$PYTHON" -m pip install -q nanobind numpy pytest
fi

cmake -S . -B "$BUILD_DIR" -G Ninja -DFLASHEP_BUILD_PYTHON=ON -DFLASHEP_BUILD_TESTS=ON -DFLASHEP_BUILD_EXAMPLES=ON \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")"
cmake --build "$BUILD_DIR" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

echo "== C++ tests"
(cd "$BUILD_DIR" && ctest --output-on-failure)
echo "== C++ example (skips itself without GPUs)"
"$BUILD_DIR/examples/flashep_example"

# Stage the package (Python sources + the built extension) for the Python tests.
STAGE="$BUILD_DIR/pkg/flashep"
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp python/flashep/*.py "$STAGE/"
cp "$BUILD_DIR"/_C*.so "$STAGE/"
echo "== Python tests"
set +e
PYTHONPATH="$BUILD_DIR/pkg${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest -q -rs tests/python "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing; that is a failure of this script's purpose too.
exit $rc
