#!/usr/bin/env bash
# paper003 on one GPU machine: every (method, seed) cell and every sweep cell in its own
# process, all in parallel, under one shared deadline; a cell still running at the deadline
# is saved as partial (its rounds so far). Then one merged table + figure. Usage:
#   OUT=results_dir ROUNDS=50 LIMIT=480 bash benchmarks/paper003_gpu.sh [--data-root DIR]
# METHODS, SEEDS and SWEEP (1/0) pick a subset: every process shares one GPU, and all 31 at
# once starve the slower MPT cells, e.g. the 100-round core comparison alone:
#   METHODS="fedavg mpt-fl-1/32 mpt-fl-1bit-sign" SWEEP=0 ROUNDS=100 LIMIT=480 bash benchmarks/paper003_gpu.sh
# SWEEP_SEEDS: seeds of the prune-ratio sweep cells (default 0). EXTRA_MERGE names earlier
# result files of the same --rounds to merge with (where cells overlap, the longest run wins).
set -u
OUT=${OUT:-benchmarks/results}; ROUNDS=${ROUNDS:-50}; LIMIT=${LIMIT:-480}
METHODS=${METHODS:-"dnn-central mpt-central-1/32 fedavg bnn-fl-1/1 bnn-fl-1/32 mpt-fl-1/1 mpt-fl-1/32 mpt-fl-1bit mpt-fl-1bit-sign"}
SEEDS=${SEEDS:-"0 1 2"}; SWEEP=${SWEEP:-1}; SWEEP_SEEDS=${SWEEP_SEEDS:-0}; EXTRA_MERGE=${EXTRA_MERGE:-}
mkdir -p "$OUT/parts"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + LIMIT ))
common=(--transport inproc --profile desktop-gpu --rounds "$ROUNDS" "$@")
cell() {  # cell TAG ARGS...: one process, stopped (SIGTERM -> partial cell saved) at the deadline
  local tag=$1; shift
  timeout "$(( deadline - $(date +%s) ))" python3 benchmarks/paper003.py "${common[@]}" "$@" \
    --out "$OUT/parts/$tag.json" > "$OUT/parts/$tag.log" 2>&1 &
}
# longest first: the centralised runs train on all 4,000 images every epoch
for m in $METHODS; do
  for s in $SEEDS; do cell "$(echo "$m" | tr '/' '_')-s$s" --methods "$m" --seeds "$s"; done
done
[ "$SWEEP" = 1 ] && for s in $SWEEP_SEEDS; do
  for p in 0.5 0.9; do
    for m in mpt-fl-1/32 mpt-fl-1/1; do
      cell "sweep-$(echo "$m" | tr '/' '_')-p$p-s$s" --sweep-only --sweep-methods "$m" --ratios "$p" --seeds "$s"
    done
  done
done
wait
# shellcheck disable=SC2086  # EXTRA_MERGE is a list of paths
python3 benchmarks/paper003.py --merge $EXTRA_MERGE "$OUT"/parts/*.json --out "$OUT/paper003.json"
