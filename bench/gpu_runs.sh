#!/usr/bin/env bash
# Several trainings side by side on one GPU, each scored at its end by ShapeEval on all 512
# held-out prompts (EMA weights, 20 Heun steps, the config's CFG: what `make eval` computes,
# from the cached text). The trainer is bound by the host on a GPU (docs/BENCHMARKS.md), so
# one device holds several runs at about the speed of one. docs/RESULTS.md's GPU curves came
# from it.
#
#   bash bench/gpu_runs.sh OUT MAX_MINUTES "NAME CONFIG [KEY=VALUE ...]" ...
#
# Each quoted spec is one run: its name (runs/NAME), its config file and its own overrides.
# Every run also gets COMMON's overrides (below; fp32 as `auto` picks on a CPU without native
# bf16, so GPU and CPU runs compute alike; the default's cache) and train.max_minutes=MAX_MINUTES, which stops a
# run partway down its cosine and says so in its log. Needs the default cache (`make embed`).
# Writes OUT/summary.txt (each run's steps, seconds and scores), OUT/smi.csv (the GPU's load
# every 15 s) and OUT/runs.tgz (each run's train.log and logs/). KEEP names runs whose EMA
# weights come back too, as OUT/NAME.weights.tgz.NN parts of at most 15 MB (join them with
# `cat NAME.weights.tgz.* | tar xz -C runs/NAME`). PY picks the interpreter (default python3).
# A run still going GRACE seconds (default 150) after its cap is killed, so the script always ends
# and packs what it has.
set -u
usage='usage: bash bench/gpu_runs.sh OUT MAX_MINUTES "NAME CONFIG [KEY=VALUE ...]" ...'
mkdir -p "${1:?$usage}"
OUT=$(cd "$1" && pwd)
MINUTES=${2:?$usage}
shift 2
PY=${PY:-python3}
COMMON=${COMMON:-cache_dir=runs/default/cache train.precision=32-true train.devices=1 train.num_workers=1 train.eval_every=100000000 train.eval_rows=512 train.eval_steps=20}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$OUT/smi.csv" 2>&1 &
smi=$!

run() {  # one spec: NAME CONFIG [KEY=VALUE ...]
  local name config started=$SECONDS flags=() kv
  read -r name config rest <<< "$1"
  for kv in $COMMON train.max_minutes="$MINUTES" $rest; do flags+=(--set "$kv"); done
  mkdir -p "runs/$name"
  OMP_NUM_THREADS=${THREADS:-2} timeout $(( ${MINUTES%.*} * 60 + ${GRACE:-150} )) $PY -m train --config "$config" --set name="$name" "${flags[@]}" \
    > "runs/$name/train.log" 2>&1
  local rc=$?
  { echo "== $name ($config $rest): train exited $rc after $(( SECONDS - started )) s"
    grep -E '^train: [0-9]+ steps|stopped' "runs/$name/train.log"
    grep -A9 'ShapeEval at step' "runs/$name/train.log" | tail -8; } > "runs/$name/summary.txt"
}

pids=()
for spec in "$@"; do run "$spec" & pids+=($!); done
wait "${pids[@]}"
kill "$smi" 2>/dev/null
names=()
for spec in "$@"; do read -r name _ <<< "$spec"; names+=("$name"); cat "runs/$name/summary.txt" >> "$OUT/summary.txt"; done
tar czf "$OUT/runs.tgz" -C runs --ignore-failed-read $(for n in "${names[@]}"; do echo "$n/train.log $n/logs"; done) \
  2>> "$OUT/summary.txt"
for name in ${KEEP:-}; do
  tar czf - -C "runs/$name" checkpoints/model.json checkpoints/ema.safetensors checkpoints/text_constants.safetensors \
    | split -b 15M -d - "$OUT/$name.weights.tgz."
done
echo "bench/gpu_runs.sh: done in $SECONDS s; results in $OUT" | tee -a "$OUT/summary.txt"
