"""The training data loader on paper-size rows: rows/s locally and on a local S3 server, against train.num_workers.

    python bench/loader.py [--rows 2000] [--batch 32] [--batches 24] [--workers 0 1 2]
                           [--s3-rows 400] [--s3-shard-rows 8] [--s3-batches 6] [--dir DIR] [--json]

A paper-size cache is written by bench/synthetic_cache.py (configs/lidit-1b.yaml's two causal
encoders, 4096 wide, 120 caption tokens after a 32-token prefix, random bf16; 16-channel latents in
its seven aspect buckets; ~1.9 MiB a row), locally in DIR and on a moto S3 server on 127.0.0.1
(`python -m moto.server`, as the tests' `s3` fixture starts it; the storage settings reach Lance
and fsspec through the environment, store/storage.py). Then, for each train.num_workers, the real
loader (train/data.py: `CacheDataModule(config).train_dataloader()`, batches of `--batch` rows
of one bucket, caption dropout, `CacheReader.take`) is iterated: 2 batches of warm-up (the
workers' start), then `--batches` timed. Local reads come from the page cache (the cache was
just written). Where the time goes is profiled in-process (cProfile over `--batches` batches):
Lance's `take`, the states' conversion (`states_from_column`), the padding (`assemble_text`),
the latents. The caches are deleted at the end.

The goal: 250 paper-size rows/s per training process from a local cache (about what one H100
consumes at LI-DiT-1B's size). moto is a single-process Python server, and moto 5.2.5 answers a
ranged GET by copying the whole object and slicing it (moto/s3/responses.py, `_handle_range_header`
over `key.value`), so a take's cost there grows with the data file's size: the S3 cache is written
in commits of `--s3-shard-rows` rows (8: ~15 MiB files) to keep that artifact small. Its rate says
what the code path costs against an S3 API on loopback, not what a real object store would serve.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `train` package
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from store import cli  # noqa: E402  (first: process defaults before torch loads)

import torch  # noqa: E402

from bench.synthetic_cache import write_synthetic_cache  # noqa: E402
from store.config import Config, load_config  # noqa: E402
from store.hardware import cpu_model  # noqa: E402
from store.storage import start_local_s3  # noqa: E402
from train.data import CacheDataModule, CachedBatches  # noqa: E402

PAPER_CONFIG = "configs/lidit-1b.yaml"
BUCKET = "lidit-bench"
# profile: which functions' cumulative time is reported, by (file suffix, function name)
STAGES = {"Lance take": ("lance/dataset.py", "take"), "states_from_column": ("store/schema.py", "states_from_column"),
          "assemble_text": ("store/reader.py", "assemble_text"), "latents": ("store/reader.py", "_latents")}


def config_for(cache: str, batch: int, workers: int) -> Config:
    return load_config(PAPER_CONFIG, [f"cache_dir={cache}", f"train.batch_size={batch}",
                                      f"train.num_workers={workers}"])


def rows_per_s(config: Config, batches: int) -> float:
    """The real train_dataloader (rank 0 of 1, from step 0): rows/s over `batches` after 2 of warm-up."""
    data = CacheDataModule(config)
    data.setup()
    loader = iter(data.train_dataloader())
    next(loader), next(loader)  # the workers' start and first reads
    start = time.perf_counter()
    rows = sum(len(next(loader)["latents"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    del loader  # stops the workers
    return rows / seconds


def profile(config: Config, batches: int) -> dict:
    """Cumulative seconds of each stage of CachedBatches[...] in this process, and the total."""
    data = CacheDataModule(config)
    data.setup()
    dataset = data.train_dataloader().dataset
    assert isinstance(dataset, CachedBatches)
    keys = iter(data.train_dataloader().sampler)
    dataset[next(keys)]  # opens the dataset
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(batches):
        dataset[next(keys)]
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    out = {"total_s": total}
    for label, (suffix, name) in STAGES.items():
        out[label] = sum(v[3] for (file, _, func), v in stats.items() if file.endswith(suffix) and func == name)
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port, its storage settings in this process's environment."""
    server, endpoint = start_local_s3()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server, endpoint


def measure(label: str, cache: str, batches: int, args, results: dict) -> None:
    best = 0.0
    for workers in args.workers:
        speed = rows_per_s(config_for(cache, args.batch, workers), batches)
        results[f"{label}_rows_per_s_workers_{workers}"] = speed
        best = max(best, speed)
        print(f"  {label:<6} train.num_workers={workers}: {speed:8.1f} rows/s  ({speed * args.mib_per_row:,.0f} MiB/s)",
              flush=True)
    results[f"paper_rows_per_s_{label}"] = best
    spent = profile(config_for(cache, args.batch, 0), batches)
    results[f"{label}_profile"] = spent
    shares = ", ".join(f"{k} {100 * v / spent['total_s']:.0f}%" for k, v in spent.items() if k != "total_s")
    print(f"  {label:<6} in-process, where the time goes: {shares} of {spent['total_s']:.2f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows of the local cache")
    parser.add_argument("--s3-rows", type=int, default=400, help="rows of the S3 cache (moto holds them in memory)")
    parser.add_argument("--s3-shard-rows", type=int, default=8, help="rows per commit, and per data file, on S3")
    parser.add_argument("--s3-batches", type=int, default=6, help="timed batches per setting on S3")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch: LI-DiT-1B's per-GPU batch")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="train.num_workers to compare")
    parser.add_argument("--dir", help="where the local cache goes (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    cli.quiet_libraries()
    torch.set_num_threads(2)
    results = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "batch": args.batch, "batches": args.batches,
               "rows_local": args.rows, "rows_s3": args.s3_rows, "s3_shard_rows": args.s3_shard_rows,
               "s3_batches": args.s3_batches}
    paper = load_config(PAPER_CONFIG)
    work = Path(tempfile.mkdtemp(prefix="lidit-loader-", dir=args.dir))
    server = None
    try:
        print(f"writing {args.rows:,} paper-size rows to {work} ...", flush=True)
        local = write_synthetic_cache(paper, str(work / "cache"), args.rows, {}, log=lambda _: None)
        args.mib_per_row = local["bytes_written"] / local["rows"] / 2**20
        results["mib_per_row"] = args.mib_per_row
        print(f"  {local['seconds']:.0f} s, {args.mib_per_row:.2f} MiB a row; encoders {local['encoders']}", flush=True)
        print(f"loader, batches of {args.batch} rows, {args.batches} timed after 2 of warm-up, {cpu_model()}:")
        measure("local", str(work / "cache"), args.batches, args, results)
        shutil.rmtree(work / "cache")
        server, endpoint = start_moto()
        uri = f"s3://{BUCKET}/cache"
        print(f"writing {args.s3_rows:,} rows to {uri} on moto at {endpoint} ...", flush=True)
        remote = write_synthetic_cache(paper, uri, args.s3_rows, {}, shard=args.s3_shard_rows, log=lambda _: None)
        print(f"  {remote['seconds']:.0f} s", flush=True)
        measure("s3", uri, args.s3_batches, args, results)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    goal = results["paper_rows_per_s_local"] >= 250
    print(f"best: {results['paper_rows_per_s_local']:.0f} rows/s local ({'meets' if goal else 'below'} the goal of "
          f"250), {results['paper_rows_per_s_s3']:.0f} rows/s on moto S3")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
