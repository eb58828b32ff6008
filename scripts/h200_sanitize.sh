#!/usr/bin/env bash
# The sanitize tier on one H200, in steps that each fit a 10-minute call; rerun a step until it
# prints "done" (results resume). From the repository root, with the kernel packages on the path:
#
#   . scripts/gpu_env.sh            # or a venv with .[flashinfer,fla]
#   scripts/h200_sanitize.sh probes     # ~1 min: real reports of planted bugs -> tests/data/sanitizer/h200_*.txt
#   scripts/h200_sanitize.sh warm       # ~3-6 min cold: the tier without the tool (compiles, FLA autotuning on disk)
#   scripts/h200_sanitize.sh memcheck   # small cases, FlashInfer + FLA (60 pairs)
#   scripts/h200_sanitize.sh large      # slot >= 4096 pools, FlashInfer only (7 pairs, one at a time)
#
# OUT (default reports/h200/sanitize) gets one directory per step: results.jsonl, gate.json,
# gate.md, sanitizer/*.log (whole reports), step.log (command and wall time).
set -uo pipefail
OUT=${OUT:-reports/h200/sanitize}
JOBS=${JOBS:-8}
LIMIT=${LIMIT:-570}  # seconds per call; the runner kills its sessions on TERM and --resume redoes them
FI="-b flashinfer-prefill -b flashinfer-decode -b flashinfer-mtp -b flashinfer-mtp-ssm"
FLA="-b fla-chunk -b fla-recurrent"


step() {  # step NAME COMMAND...: run with the time limit, log command and wall time
  local name=$1; shift
  mkdir -p "$OUT/$name"
  local t0=$SECONDS
  echo "\$ $*" >> "$OUT/$name/step.log"
  timeout -s TERM "$LIMIT" "$@"
  local rc=$?
  echo "# exit $rc after $((SECONDS - t0)) s ($(date -u +%FT%TZ))" >> "$OUT/$name/step.log"
  if [ $rc -eq 124 ]; then echo "$name: time limit reached; rerun the same step to resume"; else echo "$name: done (exit $rc)"; fi
}

case "${1:-}" in
  probes)
    command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer
    compute-sanitizer --version | tail -1
    for t in "memcheck oob" "memcheck clean" "initcheck uninit" "racecheck clean"; do
      set -- $t
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool "$1" python scripts/sanitizer_probe.py "$2" \
        > "tests/data/sanitizer/h200_$1_$2.txt" 2>&1
      echo "$1 $2: exit $? -> tests/data/sanitizer/h200_$1_$2.txt"
    done ;;
  warm)
    step warm python -m gdncheck gate --tier sanitize $FI $FLA -j "$JOBS" --resume --out "$OUT/warm" --no-progress ;;
  memcheck|initcheck|racecheck)
    step "$1" python -m gdncheck gate --suite sanitize $FI $FLA --sanitize "$1" -j "$JOBS" --resume --out "$OUT/$1" --no-progress ;;
  large)
    step large python -m gdncheck gate --suite sanitize_large $FI --sanitize memcheck --resume --out "$OUT/large" --no-progress ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
