"""Activation checkpointing of LI-DiT's blocks on the CPU: peak memory and step time, off against on.

Each setting trains in a fresh process (so neither inherits the other's heap), the same model,
weights and batches: TextToImageModel at a small size with the paper's token counts (16 x 32 x 32
latents, patch 2: 256 image tokens; two causal encoders of 32 prefix + 120 caption tokens), bf16
autocast, the flow objective, AdamW. After `--warmup` steps (the gradients and AdamW's moments
exist by then, and stay allocated), each timed step reads the process's resident memory before its
forward, resets the kernel's high-water mark (`/proc/self/clear_refs` 5) and reads it again after
the backward: the growth is what the forward and backward held at their peak. glibc is told to
give every block above 64 KiB back to the kernel when freed (MALLOC_MMAP_THRESHOLD_), so resident
memory follows the live tensors. The plan's count (train/plan.py, CPU autocast, plus the bf16
copies of the weights that autocast keeps for the backward) is printed beside each.

    python bench/checkpointing.py [--dim 384] [--depth 8] [--heads 6] [--batch 8] [--hidden 512]
                                  [--steps 4] [--warmup 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent  # keep bench/ from shadowing the `train` package
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from store.hardware import cpu_model  # noqa: E402
from train.diffusion import make_objective  # noqa: E402
from train.model import TextToImageModel  # noqa: E402
from train.plan import Shapes, activation_bytes  # noqa: E402

LATENT, PATCH = (16, 32, 32), 2
PREFIX, CAPTION = 32, 120
MIB = 2**20


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def shapes(args) -> Shapes:
    return Shapes(batch=args.batch, latent=LATENT, patch=PATCH, dim=args.dim, heads=args.heads, depth=args.depth,
                  mlp_ratio=4.0, encoders=((args.hidden, PREFIX, CAPTION),) * 2, refiner_depth=2, collab_depth=1,
                  gate=True, mlp_conv=False, pos_conv="dense")


def child(args) -> dict:
    """One setting, in this process: step times and the peak growth of resident memory over fwd + bwd."""
    torch.set_num_threads(args.threads)
    checkpointing = args.child == "on"
    torch.manual_seed(0)
    model = TextToImageModel(encoders=[(args.hidden, PREFIX)] * 2, in_channels=LATENT[0], patch=PATCH, dim=args.dim,
                             depth=args.depth, heads=args.heads, activation_checkpointing=checkpointing).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    objective = make_objective("flow")
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(args.batch, PREFIX + CAPTION, args.hidden, generator=generator).bfloat16()
                for _ in range(2)]  # [B, L, E] each
    masks = [torch.ones(args.batch, PREFIX + CAPTION, dtype=torch.bool)] * 2
    x0 = torch.randn(args.batch, *LATENT, generator=generator)
    times, growth = [], []
    for step in range(args.warmup + args.steps):
        x_t, t, target = objective.sample_training(x0, generator)
        started = time.perf_counter()
        before = resident_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(x_t, t, features, masks)
        objective.loss(prediction, target).backward()
        peak = resident_kib("VmHWM")
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the next step's baseline
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            growth.append((peak - before) * 1024)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return {"step_s": statistics.median(times), "peak_growth_bytes": max(growth),
            "parameters": sum(p.numel() for p in model.parameters()), "bf16_weight_copies_bytes": 2 * weights}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512, help="width of each of the two encoders' features")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    passed = [f"--{k}={getattr(args, k)}" for k in ("dim", "depth", "heads", "batch", "hidden", "steps", "warmup",
                                                    "threads")]
    results = {"cpu": cpu_model(), "torch": torch.__version__, "dim": args.dim, "depth": args.depth,
               "heads": args.heads, "batch": args.batch, "hidden": args.hidden,
               "image_tokens": shapes(args).image_tokens,
               "text_tokens": 2 * (PREFIX + CAPTION), "threads": args.threads}
    print(f"LI-DiT {args.dim} x {args.depth} ({args.heads} heads), batch {args.batch}, "
          f"{results['image_tokens']} image tokens, 2 encoders x ({PREFIX} + {CAPTION}) tokens x {args.hidden}, "
          f"bf16 autocast, {args.threads} threads, {results['cpu']}; each setting in its own process")
    print(f"{'checkpointing':<14}{'step s':>9}{'peak growth MiB':>17}{'planned MiB':>13}{'measured/planned':>18}")
    for setting in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, "--child", setting, *passed], env=env, check=True,
                              capture_output=True, text=True)
        side = json.loads(done.stdout.strip().splitlines()[-1])
        planned = sum(activation_bytes(shapes(args), setting == "on", device="cpu").values())
        planned += side["bf16_weight_copies_bytes"]
        results[f"{setting}_step_s"] = side["step_s"]
        results[f"{setting}_peak_growth_mib"] = side["peak_growth_bytes"] / MIB
        results[f"{setting}_planned_mib"] = planned / MIB
        results[f"{setting}_measured_over_planned"] = side["peak_growth_bytes"] / planned
        results["parameters"] = side["parameters"]
        print(f"{setting:<14}{side['step_s']:>9.2f}{side['peak_growth_bytes'] / MIB:>17,.0f}{planned / MIB:>13,.0f}"
              f"{results[f'{setting}_measured_over_planned']:>18.2f}", flush=True)
    results["time_on_over_off"] = results["on_step_s"] / results["off_step_s"]
    results["memory_on_over_off"] = results["on_peak_growth_mib"] / results["off_peak_growth_mib"]
    print(f"on / off: step time x{results['time_on_over_off']:.2f}, peak growth x{results['memory_on_over_off']:.2f} "
          f"({results['parameters'] / 1e6:.1f}M parameters)")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
