"""Benchmark: the vLLM backend against the transformers backend, side by side in one run.

Both encode the same shapes captions with SmolLM2-135M at layer -3 (the default recipe's
LLM), in the compute dtype "auto" picks here, in alternating rounds (best of `--repeats`
each), and the largest feature difference between them is printed as a check. Runs where
vLLM runs: in .venv-vllm on a CPU (`make install-vllm`), or a GPU environment with
`--device cuda`. `bench/embed.py` calls it when .venv-vllm exists.

    .venv-vllm/bin/python bench/vllm.py [--n 512] [--repeats 2] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `embed` package
sys.path[:] = [str(BENCH_DIR.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(key, value)

import torch

from embed.encoder import build_encoder
from embed.shapes import make_scene
from store.config import load_config

BATCH = 64


def captions_per_s(encoder, captions: list[str]) -> float:
    start = time.perf_counter()
    encoder.encode(captions, batch_size=BATCH)
    return len(captions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="captions per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each backend counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    import transformers
    import vllm

    base = next(e for e in load_config("configs/default.yaml").encoders if e.name == "smollm2")
    captions = [make_scene(0, i)["caption"] for i in range(args.n)]
    encoders = {backend: build_encoder(dataclasses.replace(base, backend=backend), device=args.device)
                for backend in ("transformers", "vllm")}
    hardware = encoders["vllm"].hardware.describe()
    dtype = encoders["vllm"].compute_dtype_name
    print(f"{hardware}; compute dtype {dtype} (auto); vllm {vllm.__version__}, transformers {transformers.__version__}")

    check = [encoders[b].encode(captions[:BATCH], batch_size=BATCH) for b in encoders]
    max_diff = max((a.states.float() - b.states.float()).abs().max().item() for a, b in zip(*check))
    scale = max(a.states.float().abs().max().item() for a in check[0])
    best = {b: 0.0 for b in encoders}
    for _ in range(args.repeats):
        for backend, encoder in encoders.items():
            best[backend] = max(best[backend], captions_per_s(encoder, captions))
    for backend, value in best.items():
        print(f"  {backend:<13} {value:8.1f} captions/s  ({args.n} captions, batches of {BATCH})")
    ratio = best["vllm"] / best["transformers"]
    print(f"  vllm_over_transformers {ratio:.2f}; largest feature difference {max_diff:.4g} at |x| up to {scale:.4g}")
    if args.json:
        print(json.dumps({"hardware": hardware, "compute_dtype": dtype, "n": args.n,
                          "transformers_captions_per_s": round(best["transformers"], 2),
                          "vllm_captions_per_s": round(best["vllm"], 2),
                          "vllm_over_transformers": round(ratio, 3), "max_feature_diff": max_diff,
                          "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
