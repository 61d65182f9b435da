"""Benchmark of the training step's speed levers, side by side in one run (issue "Training that learns").

The default model's training step (fwd + bwd + AdamW, the loss of `train.objective`) on
real cached batches, as a bare loop, against one lever at a time:
  - the Lightning step (`make_trainer`) around the same model: the framework's overhead;
  - AdamW's implementations: for-loop (torch's CPU default before `train.adamw_kernel`),
    foreach, fused; and the optimizer step alone, timed apart over the model's parameters;
  - Muon for the hidden matrices (`train.optimizer: muon`, train/optim.py): its Newton-Schulz cost;
  - torch.compile (inductor) of the model, its compile time reported apart;
  - the batch size (16, 32, 64): samples/s;
  - torch threads (1 against the machine's cores);
  - the LI-DiT FFN's depthwise conv (`model.mlp_conv`), as the recipe study pays for it;
  - the head's other prediction (`model.prediction`: velocity against sample);
and then, since the bare loop runs fp32 whatever the CPU, the Lightning step (what `make
train` runs, at the precision `auto` resolves to) against itself with one lever at a time:
batch 16 and 64, each fixed precision (32-true, bf16-mixed), the position ResBlock's
depthwise-separable convolutions (`model.pos_conv: separable`), and AdamW as a for-loop
(`train.adamw_kernel: loop`; `auto`, the reference, is fused on a CPU).
Each variant runs `--steps` timed steps after `--warmup` untimed ones, in its own spawned
process (so one variant's threads or compiled code cannot leak into the next). A discarded
first run warms the page cache; the reference is timed first and again last.

    python bench/levers.py [--config configs/default.yaml] [--steps 15] [--warmup 3] [--lightning-only] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.train import in_own_process, measure_side, setup_process  # noqa: E402


def bare_loop(config_path: str, steps: int, warmup: int, optimizer: str = "default", compiled: bool = False,
              threads: int | None = None, overrides: tuple = ()) -> dict:
    """samples/s of a plain fwd + bwd + optimizer loop on the default data and model.

    optimizer: AdamW's "default" (for-loop), "foreach" or "fused", or "muon" (train/optim.py)."""
    import lightning as L
    import torch

    from store.config import load_config
    from train.data import CacheDataModule
    from train.module import LIDiTModule
    from train.optim import adamw_options, build_optimizer
    from train.run import open_cache

    setup_process()
    if threads:
        torch.set_num_threads(threads)
    config = load_config(config_path, list(overrides))
    reader = open_cache(config)
    L.seed_everything(config.seed, verbose=False)
    module = LIDiTModule(config.to_dict(), reader.meta)
    model, objective = module.model, module.objective
    data = CacheDataModule(config)
    data.setup()
    batches = iter(data.train_dataloader())
    if optimizer == "muon":
        opt = build_optimizer(model, dataclasses.replace(config.train, optimizer="muon"))
    else:
        kwargs = {} if optimizer == "default" else adamw_options(optimizer, list(model.parameters()))
        opt = torch.optim.AdamW(model.parameters(), lr=config.train.lr, **kwargs)
    compile_seconds = None
    if compiled:
        start = time.perf_counter()
        model.compile()
    generator = torch.Generator().manual_seed(0)
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(batches)
        x_t, t, target = objective.sample_training(batch["latents"], generator)
        features, masks = module._inputs(batch)
        loss = objective.loss(model(x_t, t, features, masks), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        opt.step()
        if compiled and step == 0:
            compile_seconds = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * config.train.batch_size / elapsed, "compile_seconds": compile_seconds,
            "threads": torch.get_num_threads()}


def optimizer_alone(config_path: str, steps: int = 50, threads: int = 1) -> dict:
    """Milliseconds per AdamW step over the default model's parameters, for each kernel (the
    gradients random, the step alone: no forward, no backward). One thread, as each DDP
    process trains on a CPU."""
    import torch

    from store.config import load_config
    from train.module import LIDiTModule
    from train.optim import adamw_options
    from train.run import open_cache

    setup_process()
    torch.set_num_threads(threads)
    config = load_config(config_path)
    params = list(LIDiTModule(config.to_dict(), open_cache(config).meta).model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    times = {}
    for kernel in ("loop", "foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, config.train.adam_beta2),
                                **adamw_options(kernel, params))
        for _ in range(5):
            opt.step()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times[kernel] = (time.perf_counter() - start) / steps * 1000
    return {"ms": times, "tensors": len(params), "parameters": sum(p.numel() for p in params)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    parser.add_argument("--lightning-only", action="store_true", help="skip the bare-loop part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.chdir(ROOT)
    from store.hardware import detect

    cores = os.cpu_count() or 1
    print(f"{args.config}: {args.steps} timed steps after {args.warmup}, on {detect('cpu').describe()}, "
          f"{cores} cores")
    results: dict = {"config": args.config, "steps": args.steps, "cpu": detect("cpu").describe()}
    alone = in_own_process(optimizer_alone, args.config)
    results["adamw_step_ms"] = alone["ms"]
    print(f"AdamW's step alone ({alone['tensors']} tensors, {alone['parameters'] / 1e6:.1f}M parameters, 1 thread): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in alone["ms"].items())
          + f"; fused is {alone['ms']['loop'] / alone['ms']['fused']:.1f}x the for-loop")
    if not args.lightning_only:
        bare_part(args, cores, results)
    lightning_part(args, results)
    if args.json:
        print(json.dumps(results))
    return 0


def bare_part(args, cores: int, results: dict) -> None:
    """The fp32 bare loop against one lever at a time; ratios `*_over_bare`."""
    # The first process reads the cache from disk; a discarded run warms the page cache, and the
    # reference is timed first and last (their mean is the reference; both are printed).
    in_own_process(bare_loop, args.config, 2, 1)
    first = in_own_process(bare_loop, args.config, args.steps, args.warmup)["samples_per_s"]
    base = first

    def report(label: str, key: str, speed: float, note: str = "") -> None:
        results[key] = speed / base
        print(f"{label:<44} {speed:>8.1f} samples/s {speed / base:>6.2f}x  {note}", flush=True)

    print(f"{'bare loop, AdamW for-loop (the reference)':<44} {base:>8.1f} samples/s {1.0:>6.2f}x")
    lightning = in_own_process(measure_side, args.config, "cached", args.steps, args.warmup)["samples_per_s"]
    report("Lightning step (make_trainer)", "lightning_over_bare", lightning)
    for optimizer in ("foreach", "fused"):
        speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, optimizer)["samples_per_s"]
        report(f"AdamW {optimizer}", f"adamw_{optimizer}_over_bare", speed)
    speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, "muon")["samples_per_s"]
    report("Muon + AdamW (train.optimizer: muon)", "muon_over_bare", speed)
    compiled = in_own_process(bare_loop, args.config, args.steps, args.warmup, "default", True)
    report("torch.compile (inductor)", "compile_over_bare", compiled["samples_per_s"],
           f"(first step incl. compiling: {compiled['compile_seconds']:.0f} s)")
    results["compile_seconds"] = compiled["compile_seconds"]
    from store.config import load_config

    config = load_config(args.config)
    asked = config.train.batch_size
    for batch in (16, 64):
        speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, "default", False, None,
                               (f"train.batch_size={batch}",))["samples_per_s"]
        report(f"batch {batch} (the config's {asked})", f"batch_{batch}_over_bare", speed)
    if cores > 1:
        speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, "default", False, 1)["samples_per_s"]
        report(f"1 thread (default {cores})", "one_thread_over_bare", speed)
    speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, "default", False, None,
                           ("model.mlp_conv=true",))["samples_per_s"]
    report("model.mlp_conv: true", "mlp_conv_over_bare", speed)
    other = "velocity" if config.model.prediction == "sample" else "sample"
    speed = in_own_process(bare_loop, args.config, args.steps, args.warmup, "default", False, None,
                           (f"model.prediction={other}",))["samples_per_s"]
    report(f"model.prediction: {other}", "prediction_over_bare", speed)
    last = in_own_process(bare_loop, args.config, args.steps, args.warmup)["samples_per_s"]
    base = results["bare_samples_per_s"] = (first + last) / 2
    print(f"reference again, last: {last:.1f} samples/s (first {first:.1f}); the ratios above are over the "
          f"first, the JSON's over their mean {base:.1f}")
    for key in [k for k in results if k.endswith("_over_bare")]:
        results[key] *= first / base


def lightning_part(args, results: dict) -> None:
    """The Lightning step at `auto` precision against one lever at a time; `*_over_lightning`."""
    from store.config import load_config
    from store.hardware import detect, train_precision

    auto = train_precision(load_config(args.config).train.precision, detect("auto"))
    print(f"the Lightning step, precision {auto} (auto), {args.steps} timed steps after {args.warmup}:")
    in_own_process(measure_side, args.config, "cached", 2, 1)  # warms the page cache
    first = in_own_process(measure_side, args.config, "cached", args.steps, args.warmup)["samples_per_s"]
    print(f"{'Lightning step (the reference)':<44} {first:>8.1f} samples/s {1.0:>6.2f}x", flush=True)
    speeds = {}
    for label, key, overrides in (
            ("batch 16", "batch_16", ("train.batch_size=16",)),
            ("batch 64", "batch_64", ("train.batch_size=64",)),
            ("train.precision: 32-true", "fp32", ("train.precision=32-true",)),
            ("train.precision: bf16-mixed", "bf16", ("train.precision=bf16-mixed",)),
            ("model.pos_conv: separable", "pos_separable", ("model.pos_conv=separable",)),
            ("train.adamw_kernel: loop", "adamw_loop", ("train.adamw_kernel=loop",))):
        if key == "bf16" and "bf16" not in auto:
            print(f"{label:<44} skipped: no native bf16 here (bench/train.py part 5 times it)")
            continue
        speeds[key] = in_own_process(measure_side, args.config, "cached", args.steps, args.warmup,
                                     overrides)["samples_per_s"]
        print(f"{label:<44} {speeds[key]:>8.1f} samples/s {speeds[key] / first:>6.2f}x", flush=True)
    last = in_own_process(measure_side, args.config, "cached", args.steps, args.warmup)["samples_per_s"]
    base = results["lightning_samples_per_s"] = (first + last) / 2
    results["lightning_precision"] = auto
    print(f"reference again, last: {last:.1f} samples/s (first {first:.1f}); the JSON's ratios are over their "
          f"mean {base:.1f}")
    for key, speed in speeds.items():
        results[f"{key}_over_lightning"] = speed / base


if __name__ == "__main__":
    sys.exit(main())
