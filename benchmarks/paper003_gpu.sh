#!/usr/bin/env bash
# paper003 on one GPU machine: every method in its own process (in parallel), 3 seeds each,
# plus the prune-ratio sweep, then one merged table + figure. Usage:
#   OUT=results_dir ROUNDS=50 LIMIT=450 bash benchmarks/paper003_gpu.sh [--data-root DIR]
set -u
OUT=${OUT:-benchmarks/results}; ROUNDS=${ROUNDS:-50}; LIMIT=${LIMIT:-450}
mkdir -p "$OUT/parts"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
common=(--transport plain --profile desktop-gpu --rounds "$ROUNDS" "$@")
for m in dnn-central mpt-central-1/32 fedavg bnn-fl-1/1 bnn-fl-1/32 mpt-fl-1/1 mpt-fl-1/32 mpt-fl-1bit; do
  tag=$(echo "$m" | tr '/' '_')
  timeout "$LIMIT" python3 benchmarks/paper003.py "${common[@]}" --seeds 0 1 2 --methods "$m" \
    --out "$OUT/parts/$tag.json" > "$OUT/parts/$tag.log" 2>&1 &
done
timeout "$LIMIT" python3 benchmarks/paper003.py "${common[@]}" --seeds 0 --sweep-only \
  --out "$OUT/parts/sweep.json" > "$OUT/parts/sweep.log" 2>&1 &
wait
python3 benchmarks/paper003.py --merge "$OUT"/parts/*.json --out "$OUT/paper003.json"
