#!/usr/bin/env bash
# Part of a recipe matrix on one GPU: the recipes named, every seed, all at once (one 1-thread
# process each; the trainer is host-bound on a GPU, docs/BENCHMARKS.md, so many runs share one
# device well). MATRIX picks the file (default: the paper's ablations, configs/matrices/ablations.yaml;
# configs/matrices/demo-recipe.yaml is the demo's recipe study). Each run is the matrix's own
# (same steps, batch, seeds and scoring) except:
#   - train.precision is 32-true, what `auto` picks on a CPU without AMX, so a GPU run and a
#     CPU run of the matrix compute in the same precision;
#   - train.max_minutes caps each training at MAX_MINUTES; a capped run records its steps in
#     result.json and must be rerun (delete its folder) before a report counts it.
# The runs' result.json, eval/, logs/ and matrix.log are packed into OUT/<matrix name>-gpu.tgz; unpack
# it in runs/matrices/<matrix name>/ and `python -m train.matrix MATRIX` skips them.
#
#   [MATRIX=...] [SEEDS="2 3"] bash bench/gpu_ablations.sh OUT MAX_MINUTES RECIPE...
#
# Needs the matrix's cache (the ablations: runs/ablations/cache with the recipes' encoders; the demo
# recipe study: runs/default/cache). PY picks the interpreter (default python3); SEEDS the seeds
# (default: the file's, and a recipe's own where it names them), e.g. SEEDS="2 3" for more seeds of
# close calls; JOBS the runs at once (default: all of them). MAX_MINUTES is a whole number; the
# matrix gets two more minutes to score before it is stopped.
set -u
usage="usage: [MATRIX=FILE] bash bench/gpu_ablations.sh OUT MAX_MINUTES RECIPE..."
mkdir -p "${1:?$usage}" runs
OUT=$(cd "$1" && pwd)
MINUTES=${2:?$usage}
shift 2
PY=${PY:-python3}
source=${MATRIX:-configs/matrices/ablations.yaml}
name=$(sed -n 's/^name: *\([^ #]*\).*/\1/p' "$source")
matrix=runs/$name-gpu-matrix.yaml
sed -e "s/^  train.max_minutes: null.*/  train.max_minutes: $MINUTES/" \
    -e "s/^set:$/set:\n  train.precision: 32-true/" "$source" > "$matrix"
grep -q "train.max_minutes: $MINUTES" "$matrix" && grep -q "train.precision: 32-true" "$matrix" \
  || { echo "bench/gpu_ablations.sh: could not set the cap and the precision in $matrix" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
seeds=()
[ -n "${SEEDS:-}" ] && read -r -a seeds <<< "$SEEDS" && seeds=(--seeds "${seeds[@]}")
runs=$($PY -c "import sys; from train.matrix import load_matrix
print(len(load_matrix(sys.argv[1], sys.argv[2].split(), [int(s) for s in sys.argv[3].split()] or None).runs))" \
  "$matrix" "$*" "${SEEDS:-}") || exit 2
started=$SECONDS
timeout $(( MINUTES * 60 + 120 )) $PY -m train.matrix "$matrix" --jobs "${JOBS:-$runs}" "${seeds[@]}" --only "$@" \
  > "$OUT/matrix.log" 2>&1
echo "train.matrix exited $? after $(( SECONDS - started )) s ($runs runs)" | tee -a "$OUT/summary.txt"
tail -25 "$OUT/matrix.log" >> "$OUT/summary.txt"
cd "runs/matrices/$name" && tar czf "$OUT/$name-gpu.tgz" --ignore-failed-read \
  */result.json */eval */logs */matrix.log 2>> "$OUT/summary.txt"
echo "bench/gpu_ablations.sh: done in $SECONDS s; results in $OUT" | tee -a "$OUT/summary.txt"
