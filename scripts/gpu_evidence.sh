#!/usr/bin/env bash
# The GPU evidence runs behind reports/h200/. On the GPU machine, from the checkout:
#   bash scripts/gpu_evidence.sh STEP...    (results kept in $RUNS across calls on one machine)
# Each step logs its exact command, exit code and wall time (timings.tsv); the steps share one time
# budget (BUDGET_S) so the packing into $OUT/evidence.tgz always runs inside the call's limit.
set -uo pipefail
. scripts/gpu_env.sh
export MPLBACKEND=Agg PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
RUNS=${RUNS:-/tmp/gdn-runs}
mkdir -p "$RUNS"
J=${J:-16}
FI=${GDN_FLASHINFER:-0.7.4}
BASELINE=reports/h100/2026-11-24b/full_cold/results.jsonl.gz  # flashinfer 0.7.2.post1, fla 0.6.0 (H100)
log() { echo "+ $*" | tee -a "$RUNS/commands.txt"; }
timed() {  # timed NAME CMD...: run, record command, wall time and exit code
  local name=$1; shift
  log "[flashinfer $FI] $*"
  local t0=$(date +%s.%N)
  "$@" > "$RUNS/$name.log" 2>&1 &
  wait $!
  local rc=$?
  local t1=$(date +%s.%N)
  printf '%s\tflashinfer=%s\trc=%s\twall_s=%.1f\t%s\n' "$name" "$FI" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "$*" \
    | tee -a "$RUNS/timings.tsv"
  tail -n 12 "$RUNS/$name.log"
}
sample() {  # host load, GPU use and memory every 5 s into $RUNS/NAME.util.tsv
  while sleep 5; do
    printf '%s\t%s\t%s\n' "$(date +%s)" "$(cut -d' ' -f1 /proc/loadavg)" \
      "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | tr -d ' ')"
  done > "$RUNS/$1.util.tsv"
}
sampled() { sample "$1" & local sp=$!; timed "$@"; kill $sp; }
# Kernel caches: cold NAME starts empty Triton / CuTe DSL / FlashInfer caches; warm NAME reuses them.
cold() { warm "$1"; rm -rf "$RUNS/cache/$1"; mkdir -p "$TRITON_CACHE_DIR" "$CUTE_DSL_CACHE_DIR" "$FLASHINFER_WORKSPACE_BASE"; }
warm() { export TRITON_CACHE_DIR="$RUNS/cache/$1/triton" CUTE_DSL_CACHE_DIR="$RUNS/cache/$1/cute" \
           FLASHINFER_WORKSPACE_BASE="$RUNS/cache/$1/flashinfer"; }
FIB="-b flashinfer-prefill -b flashinfer-prefill-cp -b flashinfer-prefill-chunk -b flashinfer-decode -b flashinfer-mtp -b flashinfer-mtp-ssm"

step_env() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton, flashinfer, fla; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__, 'fla', getattr(fla, '__version__', '?'))"
    (command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer) && compute-sanitizer --version | tail -1
    python -m gdncheck --version; } > "$RUNS/gpu-$FI.txt" 2>&1
  cat "$RUNS/gpu-$FI.txt"
}
# Real compute-sanitizer reports of planted bugs (the parser's recorded tests).
step_probes() {
  mkdir -p "$RUNS/sanitizer_probes"
  for t in "memcheck oob" "memcheck clean" "initcheck uninit" "racecheck clean"; do
    set -- $t
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool "$1" python scripts/sanitizer_probe.py "$2" \
      > "$RUNS/sanitizer_probes/h200_$1_$2.txt" 2>&1
    echo "$1 $2: exit $?"
  done
}
# Issue 18: the smoke tier cold on one GPU (every default backend); then, for each count n in
# SHARD_NS, its n compile-unit shards side by side on this GPU, each with J/n lanes and its own empty
# caches (so no shard reuses another's compiles, and the lanes together load the host as the
# unsharded run did), merged, compared with the unsharded run, and the benchmark of their results.
step_smoke_cold() { cold smoke; sampled smoke_cold gdncheck gate --tier smoke -j "$J" --out "$RUNS/smoke_cold" --no-progress; }
step_smoke_warm() { warm smoke; timed smoke_warm gdncheck gate --tier smoke -j "$J" --out "$RUNS/smoke_warm" --no-progress; }
step_smoke_shards_cold() {
  local n i files
  for n in ${SHARD_NS:-2 4}; do
    files=()
    sample "smoke_s$n" & local sp=$!
    for ((i = 0; i < n; i++)); do
      ( cold "s${n}_$i"
        timed "smoke_s${n}_${i}_cold" gdncheck gate --tier smoke --shard $i/$n -j $((J / n)) \
          --out "$RUNS/smoke_s${n}_$i" --no-progress --no-judge ) &
      files+=("$RUNS/smoke_s${n}_$i/results.jsonl")
    done
    wait $(jobs -p | grep -vx "$sp")
    kill $sp
    timed "merge_s$n" gdncheck report merge "${files[@]}" --out "$RUNS/smoke_merged_s$n.jsonl"
    timed "compare_s$n" gdncheck report compare "$RUNS/smoke_cold/results.jsonl" "$RUNS/smoke_merged_s$n.jsonl" \
      --json "$RUNS/smoke_s${n}_compare.json"
    python scripts/bench_shards.py --unsharded "$RUNS/smoke_cold/results.jsonl" --shards "${files[@]}" -n 2 4 --side-by-side \
      | tee "$RUNS/bench_shards_$n.txt"
  done
}
# Issue 15: the full tier (smoke, models, edges, findings) against the H100 0.7.2.post1 baseline.
step_full() {
  warm "smoke"
  sampled "full_$FI" gdncheck gate --tier full -j "$J" --baseline "$BASELINE" --min-overlap 0.25 \
    --out "$RUNS/full_$FI" --no-progress
  gdncheck report matrix "$RUNS/full_$FI/results.jsonl" --out "$RUNS/matrix_$FI" > /dev/null
}
step_full_resume() {
  warm "smoke"
  sampled "full_${FI}_resume" gdncheck gate --tier full -j "$J" --baseline "$BASELINE" --min-overlap 0.25 \
    --out "$RUNS/full_$FI" --resume --no-progress
}
# Issue 15: every SM90 entry point and argument combination (the api suite) on the version-aware
# backends; on 0.7.2.post1 the 0.7.4-only arguments and entry points say so.
API="-b flashinfer-prefill-args -b flashinfer-prefill-paged -b flashinfer-decode-paged -b flashinfer-decode-vlast -b flashinfer-cake-mtp"
step_api() {
  warm smoke
  sampled "api_$FI" gdncheck run -s api $API -j "$J" --out "$RUNS/api_$FI" --no-progress
  python -m gdncheck.findings "$RUNS/full_$FI/results.jsonl" > "$RUNS/findings_$FI.md" 2>&1
}
# FlashInfer 0.7.2.post1 after 0.7.4 on one machine: the smoke, edges and findings suites (the models
# suite passed on 0.7.2.post1 in the H100 full tier), and the api suite.
step_older() {
  warm smoke
  sampled "older_$FI" gdncheck gate -s smoke -s edges -s findings -j "$J" --baseline "$BASELINE" --min-overlap 0.25 \
    --out "$RUNS/full_$FI" --no-progress
  gdncheck report matrix "$RUNS/full_$FI/results.jsonl" --out "$RUNS/matrix_$FI" > /dev/null
  timed "api_$FI" timeout 200 python -m gdncheck run -s api $API -j "$J" --out "$RUNS/api_$FI" --no-progress
  python -m gdncheck.findings "$RUNS/full_$FI/results.jsonl" > "$RUNS/findings_$FI.md" 2>&1
}
step_gputests() { warm smoke; timed "gpu_tests_$FI" timeout 300 python -m pytest -q -m gpu tests/test_backends_gpu.py -p no:cacheprovider; }
# Issue 16: every engine path over smoke, models and edges.
step_engines() {
  warm smoke
  local eng; eng=$(python -c "from gdncheck.backends import BUILTIN; print(' '.join('-b ' + n for n in BUILTIN if n.startswith(('sglang', 'vllm')) and not n.endswith('-interp')))")
  sampled "engines_$FI" gdncheck run -s smoke -s models -s edges $eng -j "$J" --out "$RUNS/engines_$FI" --no-progress
}
# Issue 16 after the carry fix: SGLang's own Triton paths (its FlashInfer call patterns ran before).
step_engines_sglang() {
  warm smoke
  sampled "engines_sglang_$FI" gdncheck run -s smoke -s models -s edges -b sglang-decode -b sglang-fused-sigmoid \
    -b sglang-extend -j "$J" --out "$RUNS/engines_sglang_$FI" --no-progress
}
# Issue 16: the engines' findings (8 through vLLM's FlashInfer call, 10 in vLLM's chunk path), and
# finding 10 under initcheck (a read of memory nothing wrote).
step_engines_findings() {
  warm smoke
  timed "engines_findings_$FI" gdncheck run -s findings -b vllm-chunk -b vllm-flashinfer-prefill -b sglang-extend \
    -b sglang-flashinfer-extend -j 8 --out "$RUNS/engines_findings_$FI" --no-progress
  timed "initcheck_vllm_$FI" timeout "${INIT_S:-150}" python -m gdncheck run -s findings -b vllm-chunk \
    --sanitize initcheck -j 4 --out "$RUNS/initcheck_vllm_$FI" --no-progress
}
# Issue 16: each engine's Triton path against its FlashInfer path on identical inputs.
step_parity() {
  warm smoke
  timed "parity_$FI" timeout "${PARITY_S:-150}" python -m gdncheck.engine_parity --engine sglang --engine vllm \
    -s smoke -s edges --device cuda --out "$RUNS/parity_$FI"
}
# Issue 17: each engine's Triton path against its FlashInfer path, explained.
step_explain_engines() {
  warm smoke
  local a b
  for pair in "sglang-extend sglang-flashinfer-extend" "sglang-decode sglang-flashinfer-decode" \
              "sglang-fused-sigmoid sglang-flashinfer-verify" "vllm-chunk vllm-flashinfer-prefill"; do
    set -- $pair
    timed "explain_$1" timeout 90 python -m gdncheck explain "$1" "$2" --device cuda --out "$RUNS/explain/$1"
  done
}
# Issue 17: the real pairs.
step_explain() {
  warm smoke
  timed explain_prefill timeout 110 python -m gdncheck explain flashinfer-prefill fla-chunk --device cuda --out "$RUNS/explain/prefill"
  timed explain_decode timeout 90 python -m gdncheck explain flashinfer-decode fla-recurrent --device cuda --out "$RUNS/explain/decode"
}
# One backend on two versions: save outputs under each version (run this step once per FlashInfer).
step_explain_save() {
  warm smoke
  timed "explain_save_$FI" timeout 80 python -m gdncheck explain flashinfer-prefill --save "$RUNS/explain-fi" --device cuda
  timed "explain_save_decode_$FI" timeout 60 python -m gdncheck explain flashinfer-decode --save "$RUNS/explain-fi" --device cuda
}
# Issue 20: the sanitize tier under memcheck (FlashInfer and FLA), the big pools alone at the end.
step_sanitize() {  # SAN_FLA=0: FlashInfer only (FLA is the same package on both FlashInfer versions)
  warm smoke
  local fla="-b fla-chunk -b fla-recurrent"; [ "${SAN_FLA:-1}" = 0 ] && fla=""
  timed "sanitize_$FI" timeout "${SAN_S:-300}" python -m gdncheck gate --suite sanitize $FIB $fla \
    --sanitize memcheck -j "${SAN_J:-8}" --out "$RUNS/sanitize_$FI" --no-progress
}
step_sanitize_resume() {
  warm smoke
  timed "sanitize_${FI}_resume" timeout "${SAN_S:-300}" python -m gdncheck gate --suite sanitize $FIB -b fla-chunk \
    -b fla-recurrent --sanitize memcheck -j 8 --out "$RUNS/sanitize_$FI" --resume --no-progress
}
step_sanitize_large() {
  warm smoke
  timed "sanitize_large_$FI" timeout "${SANL_S:-240}" python -m gdncheck gate --suite sanitize_large $FIB --sanitize memcheck \
    --out "$RUNS/sanitize_large_$FI" --no-progress
}
step_redzone_cost() {  # FlashInfer's own paths only: the bundle's FLA chunk would spend the time autotuning
  warm smoke
  timed "redzone_cost" timeout 200 python scripts/bench_redzone.py --device cuda --suite smoke -b flashinfer-decode \
    -b flashinfer-mtp -b flashinfer-prefill --repeat 2
}
export -f log timed gdncheck cold warm sample sampled $(declare -F | awk '/step_/{print $3}')
export RUNS J FI FIB BASELINE API
timeout "${BUDGET_S:-560}" bash -c 'trap "kill -TERM \$(jobs -p) 2>/dev/null; pkill -TERM -P \$\$; exit 124" TERM
  for s in "$@"; do echo "=== step $s"; "step_$s"; done' _ "$@"
echo "steps ended with rc=$?"
tar czf "$OUT/evidence.tgz" -C "$RUNS" --exclude ./cache . && ls -la "$OUT"  # explain-fi's saved outputs travel too
cat "$RUNS/timings.tsv"
