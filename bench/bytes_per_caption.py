"""Bytes a cache row costs at the paper's scale, measured by writing rows in our schema.

Two encoders as in the paper (Llama-3-8B and Qwen1.5-7B, both 4096 wide, bf16 storage),
`--tokens` caption tokens each, and a 256x256 image's latent (16 x 32 x 32 fp16, the
paper's 16-channel 8x VAE). Random values, so nothing compresses that real features
would not: the figure is what the real job's Lance writer puts on disk per row.

    python bench/bytes_per_caption.py [--tokens 120] [--rows 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `embed` package
sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]

import pyarrow as pa
import torch

from embed.job import pipeline_schema
from store.config import EncoderConfig
from store.schema import tensor_to_bytes
from store.writer import SAMPLES, CacheWriter

ENCODERS = {"llama3_8b": 4096, "qwen15_7b": 4096}
LATENT = (16, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=120, help="caption tokens per encoder")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    configs = [EncoderConfig(name=name, path="-") for name in ENCODERS]
    records = [{"name": name, "hidden_size": dim, "store_dtype": "bfloat16"} for name, dim in ENCODERS.items()]
    rows = []
    for i in range(args.rows):
        row = {"id": f"row-{i:06d}", "split": "train", "caption": "x" * 600, "truth": None, "source": "",
               "reject": None, "stage": None, "pixels": None, "pixels_shape": None,
               "latent": tensor_to_bytes(torch.randn(LATENT).half()), "latent_shape": list(LATENT), "bucket": 0,
               "caption_encoded": True}
        for name, dim in ENCODERS.items():
            row[f"{name}__ids"] = list(range(args.tokens))
            row[f"{name}__states"] = tensor_to_bytes(torch.randn(args.tokens, dim).bfloat16())
            row[f"{name}__ntok"] = args.tokens
            row[f"{name}__truncated"] = False
        rows.append(row)
    with tempfile.TemporaryDirectory() as root:
        writer = CacheWriter(root, {"encoders": records, "codec": {}, "buckets": [[256, 256]]})
        writer.append(pa.Table.from_pylist(rows, schema=pipeline_schema(configs)))
        on_disk = sum(f.stat().st_size for f in (Path(root) / SAMPLES).rglob("*") if f.is_file())
    per_row = on_disk / args.rows
    states = sum(args.tokens * dim * 2 for dim in ENCODERS.values())
    ids = 4 * args.tokens * len(ENCODERS)
    latent = 2 * LATENT[0] * LATENT[1] * LATENT[2]
    print(f"{len(ENCODERS)} encoders x {args.tokens} tokens x 4096 x bf16 = {states:,} B of states per caption")
    print(f"  + token ids {ids:,} B + 256x256 latent {latent:,} B + a 600-character caption")
    print(f"measured on disk (Lance, {args.rows} rows): {per_row:,.0f} B per row = {per_row / 2**20:.2f} MiB")
    for count in (1e6, 1e8, 1e9):
        print(f"  {count:>13,.0f} captions: {per_row * count / 1e12:8.2f} TB")
    if args.json:
        print(json.dumps({"tokens": args.tokens, "states_bytes": states, "bytes_per_row": round(per_row),
                          "tb_per_100m": round(per_row * 1e8 / 1e12, 2)}))


if __name__ == "__main__":
    main()
