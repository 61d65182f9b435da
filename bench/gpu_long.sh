#!/usr/bin/env bash
# The long recipe (configs/long.yaml: RoPE, lr 1e-3 cosine, 12,000 steps) on one GPU at 1x, 4x
# and 8x its samples (batch 16, 64, 128), the three side by side on the same device, each
# scored during training (all 512 held-out prompts every 3,000 steps, 20 Heun steps, as
# `make eval`) and then by `python -m sample.eval`. Each run's logs, eval/ and the training and
# eval output are packed into OUT/<name>.tgz. docs/RESULTS.md's "On a GPU" came from it.
#
#   bash bench/gpu_long.sh OUT [MAX_MINUTES] [extra --set flags for every run...]
#
# MAX_MINUTES (default 6) caps each training (train.max_minutes): a capped run stops partway
# down its cosine and says so in its log. Needs the default cache (`make embed`). PY picks the
# interpreter (default python3); EVAL_ARGS adds flags to the evaluation (e.g. "--limit 16").
set -u
OUT=${1:?usage: bash bench/gpu_long.sh OUT [MAX_MINUTES] [--set KEY=VALUE ...]}
MINUTES=${2:-6}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PY:-python3}
mkdir -p "$OUT"

run() {  # name, then --set flags of that run
  local name=$1
  shift
  local started=$SECONDS dir=runs/$name
  mkdir -p "$dir"
  $PY -m train --config configs/long.yaml --set name="$name" --set train.max_minutes="$MINUTES" \
    --set train.num_workers=3 --set train.eval_rows=512 --set train.eval_steps=20 --set train.eval_every=3000 \
    "$@" > "$dir/train.log" 2>&1
  echo "$name: train exited $? after $(( SECONDS - started )) s" | tee -a "$OUT/summary.txt"
  $PY -m sample.eval --config configs/long.yaml --set name="$name" ${EVAL_ARGS:-} > "$dir/eval.log" 2>&1
  echo "$name: eval exited $? after $(( SECONDS - started )) s" | tee -a "$OUT/summary.txt"
  tail -12 "$dir/eval.log" >> "$OUT/summary.txt"
  tar czf "$OUT/$name.tgz" -C "$dir" train.log eval.log eval logs checkpoints/model.json 2>> "$OUT/summary.txt"
}

run gpu-b16 "$@" &
run gpu-b64 --set train.batch_size=64 "$@" &
run gpu-b128 --set train.batch_size=128 "$@" &
wait
echo "bench/gpu_long.sh: done in $SECONDS s; results in $OUT" | tee -a "$OUT/summary.txt"
