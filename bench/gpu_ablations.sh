#!/usr/bin/env bash
# Part of the ablation matrix (configs/matrices/ablations.yaml) on one GPU: the recipes named,
# every seed asked for, all at once (one 1-thread process each; the trainer is host-bound on a
# GPU, docs/BENCHMARKS.md, so many runs share one device well). Each run is the matrix's own
# (same steps, batch, seeds and scoring) except:
#   - train.precision is 32-true, what `auto` picks on a CPU without AMX, so a GPU run and a
#     CPU run of the matrix compute in the same precision;
#   - train.max_minutes caps each training at MAX_MINUTES; a capped run records its steps in
#     result.json and must be rerun (delete its folder) before docs/ABLATIONS.md counts it.
# The runs' result.json, eval/, logs/ and matrix.log are packed into OUT/ablations-gpu.tgz; unpack
# it at the project root and `python -m train.matrix configs/matrices/ablations.yaml` skips them.
#
#   bash bench/gpu_ablations.sh OUT MAX_MINUTES RECIPE...
#
# Needs the ablation cache at runs/ablations/cache with (at least) the recipes' encoders. PY picks
# the interpreter (default python3); SEEDS the seeds (default: the file's, 0 and 1), e.g. SEEDS="2 3" for
# more seeds of close calls; JOBS the runs at once (default: all of them, every seed of every recipe).
# MAX_MINUTES is a whole number; the matrix gets two more minutes to score before it is stopped.
set -u
usage="usage: bash bench/gpu_ablations.sh OUT MAX_MINUTES RECIPE..."
mkdir -p "${1:?$usage}" runs
OUT=$(cd "$1" && pwd)
MINUTES=${2:?$usage}
shift 2
PY=${PY:-python3}
matrix=runs/ablations-gpu-matrix.yaml
sed -e "s/^  train.max_minutes: null.*/  train.max_minutes: $MINUTES/" \
    -e "s/^set:$/set:\n  train.precision: 32-true/" configs/matrices/ablations.yaml > "$matrix"
grep -q "train.max_minutes: $MINUTES" "$matrix" && grep -q "train.precision: 32-true" "$matrix" \
  || { echo "bench/gpu_ablations.sh: could not set the cap and the precision in $matrix" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
read -r -a seeds <<< "${SEEDS:-0 1}"
started=$SECONDS
timeout $(( MINUTES * 60 + 120 )) $PY -m train.matrix "$matrix" --jobs "${JOBS:-$(( $# * ${#seeds[@]} ))}" \
  --seeds "${seeds[@]}" --only "$@" \
  > "$OUT/matrix.log" 2>&1
echo "train.matrix exited $? after $(( SECONDS - started )) s" | tee -a "$OUT/summary.txt"
tail -25 "$OUT/matrix.log" >> "$OUT/summary.txt"
cd runs/matrices/ablations && tar czf "$OUT/ablations-gpu.tgz" --ignore-failed-read \
  */result.json */eval */logs */matrix.log 2>> "$OUT/summary.txt"
echo "bench/gpu_ablations.sh: done in $SECONDS s; results in $OUT" | tee -a "$OUT/summary.txt"
