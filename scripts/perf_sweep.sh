#!/usr/bin/env bash
# flashep: tuning sweep on the GPU machine (the installed package), DeepEP workload.
#   scripts/perf_sweep.sh [SMS] [CHUNKS] [LAGS] [SKIPS]
# SMS: comma-separated SM counts (default 24); CHUNKS: ring configs 'send:recv,...' (default 2:16);
# LAGS: FLASHEP_PUBLISH_LAG values, space-separated (default 4); SKIPS: FLASHEP_DEBUG_DISPATCH_SKIP
# values, space-separated (default 0; see docs/env.md). COMBINE_SENDERS (env): FLASHEP_COMBINE_SENDER
# values (default "warp"). Prints one table row per measurement.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SMS=${1:-24}
CHUNKS=${2:-2:16}
LAGS=${3:-4}
SKIPS=${4:-0}
PY="${PYTHON:-python3}"
for sender in ${COMBINE_SENDERS:-warp}; do
  for skip in $SKIPS; do
    for lag in $LAGS; do
      echo "== FLASHEP_COMBINE_SENDER=$sender FLASHEP_PUBLISH_LAG=$lag FLASHEP_DEBUG_DISPATCH_SKIP=$skip sms=$SMS chunks=$CHUNKS"
      FLASHEP_COMBINE_SENDER=$sender FLASHEP_PUBLISH_LAG=$lag FLASHEP_DEBUG_DISPATCH_SKIP=$skip "$PY" -m flashep.bench \
        --shapes deepep --sms "$SMS" --chunks "$CHUNKS" --timeout 300 | grep -E '^\| [0-9]' || echo "(bench failed)"
    done
  done
done
