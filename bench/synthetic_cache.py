"""A feature cache in the real schema without the models: stage 2 at paper size, anywhere.

    python bench/synthetic_cache.py --rows N --out PATH [--config configs/lidit-1b.yaml] [--set KEY=VALUE]
                                    [--hidden 4096 | --hidden NAME=SIZE ...] [--tokens 120] [--prefix-tokens 32]
                                    [--channels C] [--downsample F] [--shard-rows 128] [--seed 0] [--json]

Writes, through the project's own writer (store/writer.py: CacheWriter, fed the rows of
embed/job.py's pipeline schema, which store/schema.py turns into the stored types), what the
real job writes for the config's encoders and codec buckets, with random values for the models:
  meta.json      per encoder the record the real job makes (every EncoderConfig field of the
                 config's encoder, so `train`'s cache check accepts the config), with
                 hidden_size, prefix_len, and model_hash "synthetic" (stage 1 will not append
                 real features to it); the codec's channels and downsampling; the buckets
  text_constants.safetensors   per encoder a random bf16 instruction prefix [P, D] and its ids,
                 and the unconditional states: [0, D] for a causal encoder (the empty caption
                 has no tokens), [2, D] for a bidirectional one (its two special tokens)
  samples.lance  N rows, one commit per `--shard-rows`: per encoder `--tokens` caption tokens of
                 random states, list<fixed_size_list<bfloat16, D>> (the encoder's store_dtype);
                 a float16 latent [C, h / F, w / F] of a bucket drawn uniformly from codec.buckets
Widths: `--hidden`, else as `python -m train.plan` finds them (the known widths of the paper's
LLMs: 4096). Channels and downsampling: the options, else the config's VAE (the paper's 16
channels, 8x, where its folder is absent). Rows already in PATH are skipped, as the real job does.

Train on it with the same config: python -m train --config CONFIG --set cache_dir=PATH --set run_dir=RUN
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `train` and `embed` packages
sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

from store import cli  # noqa: E402  (first: process defaults before torch loads)

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from embed.job import pipeline_schema  # noqa: E402
from store.config import Config, load_config  # noqa: E402
from store.schema import TORCH_OF, tensor_to_bytes  # noqa: E402
from store.writer import CacheWriter  # noqa: E402
from train.plan import codec_record, encoder_records  # noqa: E402

VOCAB = 128_256  # Llama 3's: the token ids are random too


def encoder_identities(config: Config, hidden: dict[str, int], prefix_tokens: int, tokens: int) -> list[dict]:
    """The meta.json record of each of the config's encoders, as embed/encoder.py's identity() writes it."""
    every = dataclasses.replace(config, model=dataclasses.replace(config.model, encoders=None))
    shapes = {r["name"]: r for r in encoder_records(every, hidden, prefix_tokens)}
    identities = []
    for encoder in config.encoders:
        if tokens > encoder.max_tokens:
            raise ValueError(f"--tokens {tokens} exceeds encoders.{encoder.name}.max_tokens {encoder.max_tokens}")
        prefix_len = shapes[encoder.name]["prefix_len"]
        identities.append({
            **dataclasses.asdict(encoder), "compute_dtype_requested": encoder.compute_dtype,
            "compute_dtype": "bfloat16" if encoder.compute_dtype == "auto" else encoder.compute_dtype,
            "hardware": "synthetic (bench/synthetic_cache.py)", "model_hash": "synthetic", "num_blocks": None,
            "blocks_run": None, "prefix_ids": list(range(1, prefix_len + 1)), "prefix_len": prefix_len,
            "suffix_ids": [], "hidden_size": shapes[encoder.name]["hidden_size"], "tokenizer": "synthetic",
            "vocab_size": VOCAB})
    return identities


def text_constants(identities: list[dict], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per encoder the prefix states and ids and the unconditional states and ids (embed/job.py's keys)."""
    constants = {}
    for record in identities:
        name, width, dtype = record["name"], record["hidden_size"], TORCH_OF[record["store_dtype"]]
        null_tokens = 0 if record["kind"] == "causal" else 2
        constants[f"{name}.prefix_states"] = torch.randn(record["prefix_len"], width, generator=generator).to(dtype)
        constants[f"{name}.prefix_ids"] = torch.tensor(record["prefix_ids"], dtype=torch.int32)
        constants[f"{name}.null_states"] = torch.randn(null_tokens, width, generator=generator).to(dtype)
        constants[f"{name}.null_ids"] = torch.arange(null_tokens, dtype=torch.int32)
    return constants


def shard_rows(first: int, count: int, identities: list[dict], latents: list[tuple[int, int, int]], tokens: int,
               generator: torch.Generator) -> list[dict]:
    """Rows `first` .. `first + count - 1` as the real job's pipeline hands them to the writer."""
    buckets = torch.randint(len(latents), (count,), generator=generator).tolist()
    rows = [{"id": f"synthetic-{first + i:09d}", "split": "train", "caption": f"synthetic caption {first + i}",
             "truth": None, "source": "synthetic", "reject": None, "stage": None, "pixels": None,
             "pixels_shape": None, "latent": tensor_to_bytes(torch.randn(latents[b], generator=generator).half()),
             "latent_shape": list(latents[b]), "bucket": b, "caption_encoded": True} for i, b in enumerate(buckets)]
    for record in identities:
        name, dtype = record["name"], TORCH_OF[record["store_dtype"]]
        states = torch.randn(count, tokens, record["hidden_size"], generator=generator).to(dtype)  # [rows, n, D]
        ids = torch.randint(VOCAB, (count, tokens), generator=generator, dtype=torch.int32)
        for row, row_states, row_ids in zip(rows, states, ids):
            row.update({f"{name}__ids": row_ids.tolist(), f"{name}__states": tensor_to_bytes(row_states),
                        f"{name}__ntok": tokens, f"{name}__truncated": False})
    return rows


def write_synthetic_cache(config: Config, out: str, rows: int, hidden: dict[str, int], tokens: int = 120,
                          prefix_tokens: int = 32, channels: int | None = None, downsample: int | None = None,
                          shard: int = 128, seed: int = 0, log=print) -> dict:
    """Write (or complete) the cache; returns what was written."""
    started = time.perf_counter()
    identities = encoder_identities(config, hidden, prefix_tokens, tokens)
    codec = {**codec_record(config), "kind": config.codec.kind, "synthetic": True}
    codec["channels"] = channels or codec["channels"]
    codec["downsample"] = downsample or codec["downsample"]
    latents = [(codec["channels"], h // codec["downsample"], w // codec["downsample"]) for h, w in config.codec.buckets]
    meta = {"encoders": identities, "codec": codec, "buckets": config.codec.buckets,
            "source": {"kind": "synthetic", "path": None, "world": None, "seed": seed, "tokens": tokens},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    writer = CacheWriter(out, meta)
    if not writer.has_constants():
        writer.write_constants(text_constants(identities, torch.Generator().manual_seed(seed)))
    done = len(writer.committed_ids())  # ids are numbered: a rerun continues after the rows committed
    schema = pipeline_schema(config.encoders)
    written = 0
    for first in range(done, rows, shard):
        count = min(shard, rows - first)
        # seeded by the shard's first row: a resumed run writes the rows an uninterrupted one would
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
        written += writer.append(pa.Table.from_pylist(shard_rows(first, count, identities, latents, tokens, generator),
                                                      schema=schema))
        log(f"synthetic_cache: {first + count:,} of {rows:,} rows, {written / 2**30:.2f} GiB, "
            f"{(first + count - done) / (time.perf_counter() - started):,.0f} rows/s")
    return {"rows": rows, "written_rows": max(0, rows - done), "bytes_written": written, "out": str(out),
            "seconds": time.perf_counter() - started, "latents": latents,
            "encoders": {r["name"]: {"hidden_size": r["hidden_size"], "prefix_len": r["prefix_len"]}
                         for r in identities}}


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("bench/synthetic_cache.py", __doc__.split("\n\n")[0])
    parser.set_defaults(config="configs/lidit-1b.yaml")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", required=True, help="the cache folder or object-store URI")
    parser.add_argument("--hidden", action="append", default=[], metavar="SIZE|NAME=SIZE",
                        help="encoder width (default: as python -m train.plan finds it)")
    parser.add_argument("--tokens", type=int, default=120, help="caption tokens per row and encoder")
    parser.add_argument("--prefix-tokens", type=int, default=32, help="instruction tokens of a causal encoder")
    parser.add_argument("--channels", type=int, help="latent channels (default: the codec's)")
    parser.add_argument("--downsample", type=int, help="pixels per latent cell (default: the codec's)")
    parser.add_argument("--shard-rows", type=int, default=128, help="rows per Lance commit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    config = load_config(args.config, args.overrides)
    hidden = {}
    for item in args.hidden:
        name, _, size = item.rpartition("=")
        hidden[name or "*"] = int(size)
    summary = write_synthetic_cache(config, args.out, args.rows, hidden, args.tokens, args.prefix_tokens,
                                    args.channels, args.downsample, args.shard_rows, args.seed)
    per_row = summary["bytes_written"] / max(1, summary["written_rows"])
    print(f"synthetic_cache: {summary['written_rows']:,} rows written to {args.out} in {summary['seconds']:.1f} s "
          f"({per_row / 2**20:.2f} MiB a row in Arrow); latents {summary['latents']}")
    if args.json:
        print(json.dumps({**summary, "bytes_per_row": per_row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
