#!/usr/bin/env bash
# The H100 evidence runs behind reports/h100/. Usage on the GPU machine, from the checkout:
#   bash scripts/h100_evidence.sh STEP...      (steps below; results kept in $RUNS across calls)
# Each step logs its exact command and wall time; everything is packed into $OUT/h100.tgz.
set -uo pipefail
. scripts/gpu_env.sh
export MPLBACKEND=Agg
RUNS=${RUNS:-/tmp/gdn-runs}
mkdir -p "$RUNS"
log() { echo "+ $*" | tee -a "$RUNS/commands.txt"; }
timed() {  # timed NAME CMD...: run, record command, wall time and exit code
  local name=$1; shift
  log "$*"
  local t0=$(date +%s.%N)
  "$@" > "$RUNS/$name.log" 2>&1 &  # waited on, so that the budget's TERM reaches it (trap below)
  wait $!
  local rc=$?
  local t1=$(date +%s.%N)
  printf '%s\trc=%s\twall_s=%.1f\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "$*" | tee -a "$RUNS/timings.tsv"
  tail -n 25 "$RUNS/$name.log"
}
step_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RUNS/gpu.txt"
  python -c "import torch, triton, flashinfer, fla; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__, 'fla', getattr(fla, '__version__', '?'))" >> "$RUNS/gpu.txt" 2>&1
  cat "$RUNS/gpu.txt"
}
# sample NAME: host load and GPU use every 5 s into $RUNS/NAME.util.tsv (in the background)
sample() {
  while sleep 5; do
    printf '%s\t%s\t%s\n' "$(date +%s)" "$(cut -d' ' -f1 /proc/loadavg)" \
      "$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits | tr -d ' ')"
  done > "$RUNS/$1.util.tsv"
}
# sampled NAME CMD...: `timed NAME CMD...` with host load and GPU use sampled beside it
sampled() { sample "$1" & local sp=$!; timed "$@"; kill $sp; }
step_quantile() { timed bench_quantile python scripts/bench_quantile.py --device cuda; }
step_bench() { timed bench_oracle gdncheck bench oracle --device cuda --json "$RUNS/bench_oracle.json"; }
step_digests() {
  for id in $(cat reports/digest_ids.txt); do
    timed "digest_$id" gdncheck repro "$id" --backend twin-fla --device cuda
  done
}
# Kernel caches: a step named *cold* starts from empty Triton and CuTe DSL caches (a fresh CI
# runner); later steps reuse the caches of the step named in WARM_FROM (a persistent runner).
J=${J:-12}
cold() { warm "$1"; rm -rf "$RUNS/cache/$1"; mkdir -p "$TRITON_CACHE_DIR" "$CUTE_DSL_CACHE_DIR" "$FLASHINFER_WORKSPACE_BASE"; }
warm() { export TRITON_CACHE_DIR="$RUNS/cache/$1/triton" CUTE_DSL_CACHE_DIR="$RUNS/cache/$1/cute" \
           FLASHINFER_WORKSPACE_BASE="$RUNS/cache/$1/flashinfer"; }
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
step_gate_smoke() { cold smoke; timed gate_smoke gdncheck gate --tier smoke -j "$J" --out "$RUNS/gate_smoke" --no-progress; }
# The same tier again on the caches the cold run left (a persistent runner's second run).
step_gate_smoke_warm() { warm "${WARM_FROM:-smoke}"; timed gate_smoke_warm gdncheck gate --tier smoke -j "$J" --out "$RUNS/gate_smoke_warm" --no-progress; }
step_models() { cold models; sampled models gdncheck run --suite models -j "$J" --out "$RUNS/models" --no-progress --no-render; }
step_gate_full() { cold full; sampled gate_full gdncheck gate --tier full -j "$J" --out "$RUNS/gate_full" --no-progress; }
# A full tier cut by the call's time limit goes on where it stopped (results are incremental).
step_gate_full_resume() {
  warm full; sampled gate_full_resume gdncheck gate --tier full -j "$J" --out "$RUNS/gate_full" --resume --no-progress
}
# The full tier again, from scratch, on the caches the cold full tier left (a nightly runner).
step_gate_full_warm() {
  warm full; sampled gate_full_warm gdncheck gate --tier full -j "$J" --out "$RUNS/gate_full_warm" --no-progress
}
# One GPU: the smoke tier unsharded, then as two shards merged; both on warm caches.
step_smoke_shards() {
  warm full
  timed gate_smoke_warm gdncheck gate --tier smoke -j "$J" --out "$RUNS/smoke_warm" --no-progress
  for i in 0 1; do
    timed "gate_smoke_shard$i" gdncheck gate --tier smoke --shard $i/2 -j "$J" --out "$RUNS/smoke_shard$i" --no-progress
  done
  timed merge_shards gdncheck report merge "$RUNS/smoke_shard0/results.jsonl" "$RUNS/smoke_shard1/results.jsonl" \
    --out "$RUNS/smoke_merged.jsonl"
  timed compare_shards gdncheck report compare "$RUNS/smoke_warm/results.jsonl" "$RUNS/smoke_merged.jsonl" \
    --json "$RUNS/smoke_shards_compare.json"
}
# Compile-unit shards (issue 18), one GPU: the smoke tier cold, unsharded and as shards 0/2 and 1/2
# one after another, each from empty caches; then the benchmark of their results files. JS: lanes.
JS=${JS:-16}
step_smoke_cold16() {
  cold smoke16; sampled smoke_cold16 gdncheck gate --tier smoke -j "$JS" --out "$RUNS/smoke_cold16" --no-progress
}
step_smoke_shards_cold() {
  for i in 0 1; do
    cold "shard$i"
    sampled "smoke_shard${i}_cold" gdncheck gate --tier smoke --shard $i/2 -j "$JS" --out "$RUNS/smoke_shard${i}_cold" --no-progress
  done
  timed merge_shards_cold gdncheck report merge "$RUNS/smoke_shard0_cold/results.jsonl" \
    "$RUNS/smoke_shard1_cold/results.jsonl" --out "$RUNS/smoke_merged_cold.jsonl"
  timed compare_shards_cold gdncheck report compare "$RUNS/smoke_cold16/results.jsonl" "$RUNS/smoke_merged_cold.jsonl" \
    --json "$RUNS/smoke_shards_cold_compare.json"
}
step_bench_shards() {
  python scripts/bench_shards.py --unsharded "$RUNS/smoke_cold16/results.jsonl" \
    --shards "$RUNS/smoke_shard0_cold/results.jsonl" "$RUNS/smoke_shard1_cold/results.jsonl" -n 2 4 \
    | tee "$RUNS/bench_shards.txt"
}
# The smoke tier again on the caches smoke_cold16 left (target: under 60 s warm).
step_smoke_warm16() {
  warm smoke16; timed smoke_warm16 gdncheck gate --tier smoke -j "$JS" --out "$RUNS/smoke_warm16" --no-progress
}
# On the caches of the models step. The backends that take g and beta or a state dtype from the caller.
step_ablate() {
  warm models
  sampled ablate gdncheck ablate --beta-quant --exp-precision --state-dtype --suite models --seeds 2 -j "${JA:-8}" \
    -b twin-fla -b twin-flashinfer -b fla-chunk -b fla-recurrent -b flashinfer-prefill -b flashinfer-decode \
    -b flashinfer-mtp --no-progress --out "$RUNS/ablate"
}
step_drift() {
  timed drift_position timeout 200 gdncheck drift position -b flashinfer-prefill -b fla-chunk --T 16384 --bins 32 --vocab 151936 \
    --out "$RUNS/drift"
  timed drift_rollout timeout 200 gdncheck drift rollout -b flashinfer-decode -b fla-recurrent --steps 1000 --N 8 \
    --state-dtype float32 --state-dtype bfloat16 --vocab 151936 --out "$RUNS/drift"
}
step_gputests() { warm full; timed gpu_tests timeout 300 python -m pytest -q -m gpu tests/test_backends_gpu.py -p no:cacheprovider; }
# Steps share one time budget so the packing below always runs inside the call's limit.
export -f log timed gdncheck $(declare -F | awk '/step_/{print $3}')
export RUNS J JS
export -f cold warm sample sampled
timeout "${BUDGET_S:-540}" bash -c 'trap "kill -TERM \$(jobs -p) 2>/dev/null; pkill -TERM -P \$\$; exit 124" TERM
  for s in "$@"; do echo "=== step $s"; "step_$s"; done' _ "$@"
echo "steps ended with rc=$?"
tar czf "$OUT/h100.tgz" -C "$RUNS" --exclude ./cache . && ls -la "$OUT"
cat "$RUNS/timings.tsv"
