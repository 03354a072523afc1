#!/usr/bin/env bash
# flashep: A/B of git refs on the GPU machine, same machine and session, alternating installs (the
# machines differ by ~2%, so only such pairs compare; docs/performance.md). The GPU machine's copy of
# the tree has no .git, so the refs travel as tarballs:
#
#   here:    scripts/ab.sh pack REF [REF ...]     writes .ab/<ref>.tar.gz ('/' in a ref becomes '-');
#                                                 .ab/ is untracked (not ignored), so the device tool
#                                                 carries it; delete it afterwards
#   device:  scripts/ab.sh run REPS "CMD" NAME [NAME ...]
#            for each of REPS rounds, for each NAME: extract .ab/NAME.tar.gz (once) to /tmp/ab/NAME,
#            pip-install it (no build isolation), run CMD (bash -c) and log it to $OUT/ab-NAME-ROUND.log
#            (or .ab/logs without OUT); prints each run's last lines.
# Example: scripts/ab.sh run 2 "python3 -m flashep.bench --shapes deepep --sms 12,24" main my-branch
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
  pack)
    shift
    [[ $# -ge 1 ]] || { echo "ab.sh pack: name at least one ref" >&2; exit 2; }
    mkdir -p .ab
    for ref in "$@"; do
      name="${ref//\//-}"
      git archive --format=tar.gz -o ".ab/$name.tar.gz" "$ref"
      echo ".ab/$name.tar.gz  ($(git rev-parse --short "$ref"))"
    done ;;
  run)
    [[ $# -ge 4 ]] || { echo "ab.sh run: REPS \"CMD\" NAME [NAME ...]" >&2; exit 2; }
    reps="$2" cmd="$3"; shift 3
    logs="${OUT:-$ROOT/.ab/logs}"; mkdir -p "$logs"
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    for name in "$@"; do
      [[ -f ".ab/$name.tar.gz" ]] || { echo "ab.sh: no .ab/$name.tar.gz (run 'ab.sh pack' here first)" >&2; exit 2; }
      rm -rf "/tmp/ab/$name" && mkdir -p "/tmp/ab/$name" && tar xzf ".ab/$name.tar.gz" -C "/tmp/ab/$name"
    done
    for ((round = 1; round <= reps; ++round)); do
      for name in "$@"; do
        log="$logs/ab-$name-$round.log"
        if ! (cd "/tmp/ab/$name" && python3 -m pip install -q --no-build-isolation --no-deps . > "$log.install" 2>&1); then
          echo "== $name round $round: install FAILED ($log.install)"; continue
        fi
        rc=0; bash -c "$cmd" > "$log" 2>&1 || rc=$?
        echo "== $name round $round (rc $rc): $log"; tail -n "${AB_TAIL:-6}" "$log"
      done
    done ;;
  *) sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
