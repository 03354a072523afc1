#!/usr/bin/env bash
# The main job (README): install the package, then benchmark on all local GPUs, next to NCCL's
# all-to-all: the high-throughput dispatch/combine (`python3 -m flashep.bench`; extra arguments go
# to it, see its --help), then the low-latency mode (`python3 -m flashep.bench_low_latency`;
# arguments in BENCH_LL_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# Offline GPU hosts have the build backends installed: build against them. Elsewhere let pip fetch.
if "$PYTHON" -c "import scikit_build_core, nanobind" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps .
else
  "$PYTHON" -m pip install -q .
fi
cd /tmp  # import the installed package, not the source folder
"$PYTHON" -m flashep.bench "$@"
# shellcheck disable=SC2086
exec "$PYTHON" -m flashep.bench_low_latency ${BENCH_LL_ARGS:-}
