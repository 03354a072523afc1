#!/usr/bin/env bash
# flashep: where the low-latency hook receive spends its time, per SASS instruction (Nsight Compute,
# one GPU, world size 1: every step of the receive runs, each access local). The question it answers
# (docs/performance.md, 2026-12-01): each step of the receive costs 1-2 us at one rank, several local
# round trips' worth; the stall reasons say whether that is memory (long scoreboard), barriers,
# instruction fetch (no_instruction), address translation or something else.
#
#   bash scripts/ll_ncu.sh [OUT_DIR]     (flashep installed; writes OUT_DIR/ll_receive.ncu-rep and .txt)
#
# Per source line: scripts/ncu_by_line.py (with a local -lineinfo build of the same source).
# Profiles 3 launches of the FP8 receive kernel (ncu demangles it as flashep::ll::dispatch<(bool)1, (int)2>) after 10 warm-up calls; kernel
# replay restores the memory each pass writes, so every pass sees the same messages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp}}"
NCU="$(command -v ncu || true)"
[[ -n "$NCU" ]] || NCU=/usr/local/cuda/bin/ncu
[[ -x "$NCU" ]] || { echo "ll_ncu.sh: no ncu (Nsight Compute) on this machine" >&2; exit 2; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_REMOTE_TRANSPORT=none
"$NCU" --kernel-name-base demangled --kernel-name 'regex:ll::dispatch<\(bool\)1, \(int\)2>' --launch-skip 10 --launch-count 3 \
  --section SourceCounters --section WarpStateStats --section SchedulerStats --section LaunchStats \
  --section MemoryWorkloadAnalysis --import-source yes -f -o "$OUT_DIR/ll_receive" \
  python3 scripts/ll_one_rank_hooks.py
"$NCU" -i "$OUT_DIR/ll_receive.ncu-rep" --page details > "$OUT_DIR/ll_receive.txt"
# Per SASS instruction: the warp-state samples (stall reasons), busiest first.
"$NCU" -i "$OUT_DIR/ll_receive.ncu-rep" --page source --csv --print-source sass > "$OUT_DIR/ll_receive_sass.csv" || true
echo "ll_ncu.sh: $OUT_DIR/ll_receive.txt, $OUT_DIR/ll_receive_sass.csv"
grep -E "Warp Cycles Per Issued|Stall|No Instruction|Long Scoreboard|Barrier|Duration" "$OUT_DIR/ll_receive.txt" | head -40
