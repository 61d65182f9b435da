"""Benchmark: caption deduplication in stage 1, on a manifest where each caption appears 5 times.

Side by side in one run, with the default recipe's encoders (SmolLM2 + MiniLM) and pool:
  repeated: N distinct captions, each on 5 rows, shuffled (5N rows);
  distinct: 5N rows with 5N distinct captions (what every row would cost without dedup).
Both are embedded by the real Ray job into a fresh cache; printed are the encoder forwards
(`captions encoded`), the seconds, rows/s and the bytes written.

    python bench/dedup.py [--distinct 400] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `embed` package
sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_USAGE_STATS_ENABLED", "0"),
                   ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(key, value)

import numpy as np

from embed.job import run_embed, start_ray
from embed.shapes import make_scene
from store import cli
from store.config import load_config


def embed_captions(lines: list[str], root: Path, name: str):
    path = root / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    config = load_config("configs/default.yaml", [f"run_dir={root / name}", "data.source=captions",
                                                   f"data.path={path}"])
    return run_embed(config, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cli.quiet_libraries()

    # Distinct captions: shapes captions with a number, so no two are equal.
    pool = [f"{make_scene(0, i)['caption']}, scene {i}" for i in range(args.distinct * args.repeats)]
    repeated = [c for c in pool[:args.distinct] for _ in range(args.repeats)]
    np.random.default_rng(0).shuffle(repeated)
    start_ray(load_config("configs/default.yaml"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lines in (("repeated", repeated), ("distinct", pool)):
            summary = embed_captions(lines, Path(tmp), name)
            results[name] = dataclasses.asdict(summary)
            print(f"{name:<9} {summary.written:>6} rows, {summary.encoded:>6} captions encoded, "
                  f"{summary.seconds:6.1f} s, {summary.written / summary.seconds:6.1f} rows/s, "
                  f"{summary.bytes / 2**20:6.1f} MiB")
    speedup = results["distinct"]["seconds"] / results["repeated"]["seconds"]
    print(f"repeated-caption manifest embeds {speedup:.2f}x faster than all-distinct at equal rows; "
          f"encoder forwards {results['repeated']['encoded']} vs {results['distinct']['encoded']}")
    if args.json:
        print(json.dumps({"rows": len(repeated), "repeated_encoded": results["repeated"]["encoded"],
                          "distinct_encoded": results["distinct"]["encoded"],
                          "repeated_seconds": round(results["repeated"]["seconds"], 1),
                          "distinct_seconds": round(results["distinct"]["seconds"], 1),
                          "dedup_speedup": round(speedup, 2)}))


if __name__ == "__main__":
    main()
