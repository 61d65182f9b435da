"""Threads and OpenMP wait policy, idle and beside a busy neighbour: where the defaults come from.

For the two hot loops, the prompt encoder (SmolLM2, the default's compute dtype, batches of
64) and the training step (the default model, batch 32, forward + backward + AdamW, the
default's precision), each setting runs in a fresh process (the wait policy is read when
the OpenMP runtime loads) with the machine idle, then beside one process spinning:
  threads 1 and 2 (= cores here), OMP_WAIT_POLICY unset (libgomp spins, then sleeps) or PASSIVE.

    python bench/threads.py [--captions 512] [--steps 6] [--json]
(needs runs/default/cache for the training step: make embed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(1, None), (2, None), (2, "PASSIVE")]  # (threads, OMP_WAIT_POLICY)


def matmul_gflops(dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of a size x size matmul in this process's threads, over about `seconds` (bf16 on
    an AVX2-only CPU takes ~20 s a product, so the repetitions follow the first product's time)."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    start = time.perf_counter()
    a @ b
    reps = max(1, min(10, int(seconds / (time.perf_counter() - start))))
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * size**3 / (time.perf_counter() - start) / 1e9


def encode_rate(threads: int, captions: int) -> float:
    import torch

    from embed.encoder import PromptEncoder
    from embed.shapes import make_scene
    from store.config import load_config

    torch.set_num_threads(threads)
    encoder = PromptEncoder(load_config("configs/default.yaml").encoders[0])
    texts = [make_scene(0, i)["caption"] for i in range(captions)]
    encoder.encode(texts[:64], batch_size=64)
    start = time.perf_counter()
    encoder.encode(texts, batch_size=64)
    return captions / (time.perf_counter() - start)


def train_rate(threads: int, steps: int) -> float:
    import torch

    from sample.generate import AUTOCAST, resolve_precision
    from store.config import load_config
    from train.data import CacheDataModule
    from train.module import LIDiTModule
    from train.run import open_cache

    torch.set_num_threads(threads)
    config = load_config("configs/default.yaml")
    module = LIDiTModule(config.to_dict(), open_cache(config).meta)
    data = CacheDataModule(config)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    features, masks = module._inputs(batch)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    autocast = AUTOCAST.get(resolve_precision("auto", "cpu"))  # what train.precision "auto" runs
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        x_t, t, target = module.objective.sample_training(batch["latents"], torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            prediction = module.model(x_t, t, features, masks)
        module.objective.loss(prediction, target).backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * config.train.batch_size / (time.perf_counter() - start)


def in_fresh_process(loop: str, threads: int, policy: str | None, amount: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", loop, "--threads", str(threads),
                          "--amount", str(amount)], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def busy_neighbour():
    """One other process spinning for the duration (a user's machine always has neighbours)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["encode", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--amount", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        rate = encode_rate if args.worker == "encode" else train_rate
        print(rate(args.threads, args.amount))
        return 0
    from store.hardware import detect

    results: dict = {"cpu": detect("cpu").describe(), "cores": os.cpu_count()}
    print(f"{results['cpu']}, {results['cores']} cores")
    for loop, amount, unit in (("encode", args.captions, "captions/s"), ("train", args.steps, "samples/s")):
        for threads, policy in SETTINGS:
            label = f"{loop} threads={threads} OMP_WAIT_POLICY={policy or 'unset'}"
            idle = in_fresh_process(loop, threads, policy, amount)
            with busy_neighbour():
                busy = in_fresh_process(loop, threads, policy, amount)
            key = f"{loop}_{threads}t_{(policy or 'spin').lower()}"
            results.update({f"{key}_idle": idle, f"{key}_busy": busy})
            print(f"{label:<45} idle {idle:8.1f}  busy {busy:8.1f} {unit:<11} busy/idle {busy / idle:.2f}", flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
