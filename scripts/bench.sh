#!/usr/bin/env bash
# The main job (README): install the package, then benchmark dispatch/combine on all local GPUs
# next to NCCL's all-to-all. Extra arguments go to `python3 -m flashep.bench` (see its --help).
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
exec "$PYTHON" -m flashep.bench "$@"
