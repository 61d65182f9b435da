#!/usr/bin/env bash
# The long recipe (configs/long-plain.yaml) on one GPU at 1x, 4x and 8x its samples (batch 16, 64,
# 128), the three side by side on the same device through bench/gpu_runs.sh, each scored at
# its end on all 512 held-out prompts (20 Heun steps, what `make eval` computes) and every
# 3,000 steps on the way. docs/RESULTS.md's "On a GPU" (session 7) came from it, when it ran
# `python -m sample.eval` after each training instead of the end-of-run score.
#
#   bash bench/gpu_long.sh OUT [MAX_MINUTES] [KEY=VALUE overrides for every run...]
#
# MAX_MINUTES (default 6) caps each training (train.max_minutes): a capped run stops partway
# down its cosine and says so in its log. Needs the default cache (`make embed`). Precision is
# the config's (`auto`), as session 7 ran it; OUT/summary.txt and OUT/runs.tgz as gpu_runs.sh.
set -u
OUT=${1:?usage: bash bench/gpu_long.sh OUT [MAX_MINUTES] [KEY=VALUE ...]}
MINUTES=${2:-6}
shift $(( $# >= 2 ? 2 : 1 ))
export COMMON=${COMMON:-train.num_workers=3 train.eval_rows=512 train.eval_steps=20 train.eval_every=3000}
exec bash "$(dirname "$0")/gpu_runs.sh" "$OUT" "$MINUTES" "gpu-b16 configs/long-plain.yaml $*" \
  "gpu-b64 configs/long-plain.yaml train.batch_size=64 $*" "gpu-b128 configs/long-plain.yaml train.batch_size=128 $*"
