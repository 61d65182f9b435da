"""Benchmark of stage 2: training from the feature cache against encoding captions online.

Side by side in one run; each training side runs in its own spawned process, so the online
side's LLM does not inflate the cached side's peak RSS. Both use the real Trainer
(`make_trainer`: the config's precision, grad clipping, EMA) and the same batches and weights:
  1. cached: on the real `CacheDataModule`;  2. online: the prompt encoders recorded in the
  cache's metadata run on the batch's captions in every step (a trainer without a cache);
  3. the same ratio estimated from FLOPs for lidit-1b with LLaMA3-8B + Qwen1.5-7B;
  4. `loader_over_step`: the data module's samples/s over the cached training step's;
  5. `auto_over_best_fixed`: train.precision "auto" over the faster of 32-true and bf16-mixed,
     each timed as `python -m train` runs it (the config's DDP processes; `--precision-only`
     runs this part alone, `--set` changes the config, e.g. the long recipe's batch of 128);
  6. `train_flops_fraction`: the cached training step's model FLOPs per second over this
     CPU's matmul rate in the precision it trained in (2048x2048, the same threads), both
     measured in this run. The step's FLOPs are counted op by op on one real batch with
     torch's FlopCounterMode, forward + backward: every matmul 2*m*n*k (and twice that for
     its two gradients), attention 4*B*H*Lq*Lk*d forward and 8*B*H*Lq*Lk*d backward
     (registered here for the CPU SDPA kernels, which the counter does not know); the
     optimizer, norms, activations and softmax are left out.

    python bench/train.py [--config configs/default.yaml] [--steps 30] [--warmup 5] [--batches 50]
                          [--precision-steps 100] [--precision-repeats 2] [--precision-only]
                          [--set KEY=VALUE] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# `python bench/train.py` puts bench/ first on sys.path, where this file would shadow the `train` package.
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(key, value)

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from sample.text import PromptFeatures  # noqa: E402
from store.config import Config, load_config  # noqa: E402
from store.hardware import detect, train_precision, train_processes  # noqa: E402
from store.reader import CacheReader  # noqa: E402
from train.run import make_trainer, open_cache, resolve_precision  # noqa: E402
from train.data import BucketBatchSampler, CacheDataModule, rows_and_dropout  # noqa: E402
from train.layers import AdaLNZero, TimestepEmbedder  # noqa: E402
from train.model import TextToImageModel, build_kwargs, count_parameters  # noqa: E402
from train.module import LIDiTModule  # noqa: E402
from bench.threads import matmul_gflops  # noqa: E402

# Part 3's assumptions (lidit-1b, PAPER.md).
LLM_PARAMS = {"LLaMA3-8B": 8.0e9, "Qwen1.5-7B": 7.7e9}  # whole checkpoints, embeddings included
LLM_BLOCKS = 32  # each; layer -3 runs the first 30
PREFIX_TOKENS, CAPTION_TOKENS = 32, 120  # instruction, caption (run together: no prefix reuse)
IMAGE_TOKENS = (256 // 8 // 2) ** 2  # 256 px, 8x VAE, patch 2
ASSUMPTIONS = {"llm_params": LLM_PARAMS, "llm_blocks_run": f"{LLM_BLOCKS - 2} of {LLM_BLOCKS}",
               "text_tokens_per_llm": f"{PREFIX_TOKENS} instruction + {CAPTION_TOKENS} caption, no prefix reuse",
               "image_tokens": IMAGE_TOKENS, "flops": "LLM forward 2*N*T, DiT training step 6*N*T; attention "
               "scores and once-per-sample modulation left out"}


def setup_process() -> None:
    """Threads and quiet logs, in the parent and in every spawned side."""
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)


# -- 1-2. the two training sides ---------------------------------------------------------------

class OnlineModule(LIDiTModule):
    """LIDiTModule whose text features are computed by the frozen prompt encoders in every step."""

    def __init__(self, config: dict, reader: CacheReader):
        super().__init__(config, reader.meta)
        records = {e["name"]: e for e in reader.meta["encoders"]}
        # Sampling's online path (not submodules: the encoders stay frozen, out of the optimiser
        # and the EMA), with the cache's own prefix states.
        self.text = PromptFeatures([records[n] for n in self.encoder_names], reader.prefix, reader.null)

    def _inputs(self, batch: dict) -> tuple[list, list]:
        texts = self.text.encode(batch["captions"])  # per encoder [B, L, D]
        return [t.states for t in texts], [t.mask for t in texts]


class CaptionBatches(Dataset):
    """dataset[sampler key] -> captions and latents, no cached text: what an online trainer reads."""

    def __init__(self, config: Config):
        self.reader = CacheReader(config.cache_path, encoders=[])  # no encoder: no states read
        self.caption_dropout, self.seed = config.train.caption_dropout, config.seed

    def __getitem__(self, key: list[int] | tuple[list[int], int, int]) -> dict:
        # The same draw as CachedBatches; a dropped caption is the empty one (the cache's null text).
        rows, drop = rows_and_dropout(key, self.caption_dropout, self.seed)
        batch = self.reader.take(rows)
        return {"captions": ["" if d else c for c, d in zip(batch["captions"], drop)], "latents": batch["latents"]}


class StepClock(L.Callback):
    """Wall time from the end of the last warm-up step to the end of the last step (data included)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def caption_error(module: OnlineModule, reader: CacheReader, rows: list[int]) -> float:
    """Max rel-L2 of online caption states against the cache's, over encoders (prefix excluded)."""
    cached = reader.take(rows, with_latents=False)
    states, masks = module._inputs({"captions": cached["captions"]})
    errors = []
    for name, online, mask in zip(module.encoder_names, states, masks):
        ref, p = cached["text"][name], cached["text"][name].prefix_len
        if not torch.equal(mask, ref.mask):
            raise RuntimeError(f"{name}: online token counts differ from the cache's")
        online, ref = online[:, p:][mask[:, p:]].float(), ref.states[:, p:][mask[:, p:]].float()  # [tokens, D]
        errors.append(((online - ref).norm() / ref.norm()).item())
    return max(errors)


def measure_side(config_path: str, side: str, steps: int, warmup: int, overrides: tuple = ()) -> dict:
    """Train `warmup + steps` steps of one side in this (spawned) process; samples/s and peak RSS."""
    setup_process()
    # One process: a DDP launch from here would re-run this script (part 7 times the processes).
    config = load_config(config_path, [*overrides, "train.devices=1"])
    reader = open_cache(config)
    L.seed_everything(config.seed, verbose=False)  # the same initial weights on both sides
    data = CacheDataModule(config)
    result = {}
    if side == "cached":
        module = LIDiTModule(config.to_dict(), reader.meta)
    else:
        module = OnlineModule(config.to_dict(), reader)
        data.setup()
        sampler = BucketBatchSampler(data.buckets, config.train.batch_size, config.seed)
        result["online_vs_cache_rel_l2"] = caption_error(module, reader, next(iter(sampler))[0])
        data = DataLoader(CaptionBatches(config), sampler=sampler, batch_size=None)
    clock = StepClock(warmup)
    # callbacks= replaces make_trainer's checkpoint callback and logger=False its loggers: nothing is written.
    trainer = make_trainer(config, config.run_path / "checkpoints", progress=False, max_steps=warmup + steps,
                           max_time=None, logger=False, callbacks=[clock], enable_checkpointing=False)
    trainer.fit(module, data)
    if trainer.global_step != warmup + steps:
        raise RuntimeError(f"{side}: trained {trainer.global_step} of {warmup + steps} steps")
    result["samples_per_s"] = steps * config.train.batch_size / (clock.end - clock.start)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["parameters"] = module.num_parameters()
    result["precision"] = str(trainer.precision)
    return result


# -- 6. model FLOPs of a training step -----------------------------------------------------------

def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode torch's CPU SDPA kernels (it counts them as 0 FLOPs otherwise)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        batch, heads, lq, d = query
        return 4 * batch * heads * lq * key[-2] * d  # Q K^T and P V

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        batch, heads, lq, d = query
        return 8 * batch * heads * lq * key[-2] * d  # dV, dP, dQ, dK; no recomputation counted


def step_flops(config: Config) -> dict:
    """Model FLOPs of one training step at the config's batch size, counted on a real batch."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_attention_flops()
    reader = open_cache(config)
    L.seed_everything(config.seed, verbose=False)
    module = LIDiTModule(config.to_dict(), reader.meta)
    data = CacheDataModule(config)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    x_t, t, target = module.objective.sample_training(batch["latents"], torch.Generator().manual_seed(0))
    features, masks = module._inputs(batch)
    with FlopCounterMode(display=False) as counter:
        module.objective.loss(module.model(x_t, t, features, masks), target).backward()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    return {"step_flops": counter.get_total_flops(), "step_attention_flops": attention}


def in_own_process(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def rotated(settings: tuple, round_: int) -> tuple:
    """`settings` starting `round_` places later: over the rounds of an alternating comparison,
    no setting always runs first or right after the same (slow) one."""
    k = round_ % len(settings)
    return settings[k:] + settings[:k]


# -- 7. the processes: `python -m train` as a user runs it ----------------------------------------

def train_command_seconds(config_path: str, devices: str, steps: int, out: Path, overrides: tuple = ()) -> float:
    """Wall seconds of `python -m train` for `steps` steps with train.devices=`devices` and the
    `overrides` (KEY=VALUE; no in-training evaluation, nothing kept)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # auto chooses the threads
    command = [sys.executable, "-m", "train", "--config", config_path, "--fresh", "--set", f"run_dir={out}",
               "--set", f"cache_dir={load_config(config_path).cache_path.resolve()}", "--set", f"train.steps={steps}",
               "--set", "train.eval_every=0", "--set", f"train.devices={devices}", "--set", "train.max_minutes=null"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def processes_samples_per_s(config_path: str, devices: str, steps: int, warmup: int, batch: int,
                            overrides: tuple = ()) -> float:
    """samples/s of the training command over its steps after the first `warmup`, read from the
    run's own clock (logs/curves.json: the wall time of every 5th step), so start-up, the DDP
    launch, checkpoint and export stay out of it. (Timing a short run and a long one and taking
    the difference moved by +-30% between two runs of the same command on a 2-core machine.)"""
    with tempfile.TemporaryDirectory() as out:
        run = Path(out) / "run"
        train_command_seconds(config_path, devices, warmup + steps, run, (*overrides, "train.log_every=5"))
        walls = [(step, wall) for step, wall, _ in json.loads((run / "logs" / "curves.json").read_text())["loss"]
                 if step >= warmup]
    (first, start), (last, end) = walls[0], walls[-1]
    return (last - first) * batch / (end - start)


# -- 3. FLOP estimate for lidit-1b --------------------------------------------------------------

def lidit_1b_flops() -> dict:
    """Training FLOPs per sample: DiT step (6 * params * tokens) vs the two LLMs' forward (2 * ...)."""
    config = load_config("configs/lidit-1b.yaml")
    kwargs = build_kwargs(config.model, [{"hidden_size": 4096, "prefix_len": PREFIX_TOKENS}] * 2, {"channels": 16})
    with torch.device("meta"):
        model = TextToImageModel(**kwargs)
    # Modulation and timestep MLPs run once per sample, not per token: left out (negligible).
    per_sample = {id(p) for m in model.modules() if isinstance(m, (AdaLNZero, TimestepEmbedder))
                  for p in m.parameters()}
    if model.dit.text_pool is not None:  # model.pooled_text
        per_sample |= {id(p) for p in model.dit.text_pool.parameters()}

    def count(params) -> int:
        return sum(p.numel() for p in params if id(p) not in per_sample)

    text_kv = count(p for block in model.dit.blocks for p in block.cross_attn.kv.parameters())
    refiners = count(model.diffuser.parameters())  # each branch over its prefix + caption tokens
    image = count(model.dit.parameters()) - text_kv
    dit = 6 * (image * IMAGE_TOKENS + text_kv * 2 * CAPTION_TOKENS + refiners * (PREFIX_TOKENS + CAPTION_TOKENS))
    run = (LLM_BLOCKS - 2) / LLM_BLOCKS
    llm = sum(2 * params * run * (PREFIX_TOKENS + CAPTION_TOKENS) for params in LLM_PARAMS.values())
    crude = 6 * count_parameters(kwargs) * IMAGE_TOKENS  # every parameter over every image token
    return {"lidit_1b_parameters": count_parameters(kwargs), "lidit_1b_dit_tflop_per_sample": dit / 1e12,
            "lidit_1b_llm_tflop_per_sample": llm / 1e12, "cached_over_online_lidit_1b_flops": (dit + llm) / dit,
            "cached_over_online_lidit_1b_flops_all_params": (crude + llm) / crude}


# -- 4. the data module alone -------------------------------------------------------------------

def loader_samples_per_s(config: Config, batches: int) -> float:
    """The real train_dataloader (no trainer attached: rank 0 of 1, from step 0)."""
    data = CacheDataModule(config)
    data.setup()
    loader = iter(data.train_dataloader())
    next(loader), next(loader)  # warm-up
    start = time.perf_counter()
    rows = sum(len(next(loader)["latents"]) for _ in range(batches))
    return rows / (time.perf_counter() - start)


# -- the run ------------------------------------------------------------------------------------

def parts_1_to_5(args, config: Config, cached: dict, report, results: dict) -> None:
    """The cached and online sides, the lidit-1b estimate, the loader, and the precisions."""
    batch = config.train.batch_size
    online = in_own_process(measure_side, args.config, "online", args.steps, args.warmup)
    results["parameters"] = cached["parameters"]
    report("1. cached: Trainer on CacheDataModule", "cached_samples_per_s", cached["samples_per_s"], "samples/s",
           f"({cached['parameters'] / 1e6:.1f}M parameters)")
    report("   peak RSS", "cached_peak_mb", cached["peak_mb"], "MB")
    report("2. online: prompt encoders in every step", "online_samples_per_s", online["samples_per_s"], "samples/s")
    report("   peak RSS", "online_peak_mb", online["peak_mb"], "MB")
    report("   online vs cached caption states, rel L2", "online_vs_cache_rel_l2_pct",
           100 * online["online_vs_cache_rel_l2"], "%", "(worst encoder, one batch)")
    report("   cached_over_online", "cached_over_online", cached["samples_per_s"] / online["samples_per_s"], "x",
           "(goal >= 10)")

    results.update(lidit_1b_flops())
    print(f"3. lidit-1b ({results['lidit_1b_parameters'] / 1e9:.2f}B) + LLaMA3-8B + Qwen1.5-7B, per sample:")
    for label, key, unit, note in (
            ("   DiT training step (refiners included)", "lidit_1b_dit_tflop_per_sample", "TFLOP", ""),
            ("   two LLMs' forward to layer -3", "lidit_1b_llm_tflop_per_sample", "TFLOP", ""),
            ("   cached_over_online_lidit_1b_flops", "cached_over_online_lidit_1b_flops", "x", "= (DiT + LLMs) / DiT"),
            ("   same, all parameters over image tokens", "cached_over_online_lidit_1b_flops_all_params", "x",
             "(a lower bound)")):
        report(label, key, results[key], unit, note)

    report("4. loader: CacheDataModule.train_dataloader", "loader_samples_per_s",
           loader_samples_per_s(config, args.batches), "samples/s", f"({args.batches} batches of {batch})")
    report("   loader_over_step", "loader_over_step", results["loader_samples_per_s"] / cached["samples_per_s"], "x",
           "(goal >= 5)")
    precision_part(args, config, report, results)


def precision_part(args, config: Config, report, results: dict) -> None:
    """5. train.precision "auto" against each fixed choice, timed as it trains: `python -m train`
    with the config's train.devices (DDP processes on a CPU), after --warmup steps. auto
    and the fixed value it resolves to are the same computation, so their ratio is 1 but for
    noise: the runs alternate in rotating order and each label keeps its best of --precision-repeats."""
    hardware = detect("auto")
    batch = config.train.batch_size
    print(f"5. precision on {hardware.describe()}; auto resolves to {train_precision('auto', hardware)}; "
          f"`python -m train`, train.devices={config.train.devices}, {args.precision_steps} steps after "
          f"{args.warmup}, best of {args.precision_repeats}")
    best: dict[str, float] = {}
    for round_ in range(args.precision_repeats):
        for label in rotated(("auto", "32-true", "bf16-mixed"), round_):
            overrides = (*args.overrides, f"train.precision={label}")
            speed = processes_samples_per_s(args.config, str(config.train.devices), args.precision_steps,
                                            args.warmup, batch, overrides)
            print(f"   train.precision={label}: {speed:.1f} samples/s", flush=True)
            best[label] = max(best.get(label, 0.0), speed)
    for label, speed in best.items():
        report(f"   train.precision={label}", f"precision_{label}_samples_per_s", speed, "samples/s",
               f"(best of {args.precision_repeats} x {args.precision_steps} steps)")
    fastest_fixed = max(best["32-true"], best["bf16-mixed"])
    report("   auto_over_best_fixed", "auto_over_best_fixed", best["auto"] / fastest_fixed, "x", "(goal >= 0.95)")
    results["cpu"], results["auto_precision"] = hardware.describe(), train_precision("auto", hardware)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    parser.add_argument("--batches", type=int, default=50, help="batches for the loader alone")
    parser.add_argument("--precision-steps", type=int, default=100,
                        help="timed steps per precision in part 5 (bf16 on an AVX2-only CPU: seconds a step)")
    parser.add_argument("--precision-only", action="store_true", help="run part 5 alone, then the JSON line")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for part 5's runs, e.g. --set train.batch_size=128")
    parser.add_argument("--precision-repeats", type=int, default=2, help="runs per precision in part 5 (best kept)")
    parser.add_argument("--process-steps", type=int, default=150, help="timed steps per command in part 7")
    parser.add_argument("--process-repeats", type=int, default=2, help="runs per setting in part 7 (best kept)")
    parser.add_argument("--processes-only", action="store_true", help="run parts 6 and 7 alone")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    os.chdir(ROOT)  # configs and run folders are relative to the repository
    setup_process()
    config = load_config(args.config, args.overrides if args.precision_only else [])
    if not (config.cache_path / "meta.json").is_file():
        print(f"bench/train.py: no cache at {config.cache_path}; run make embed first", file=sys.stderr)
        return 2
    batch = config.train.batch_size
    results: dict = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "batch_size": batch,
                     "threads": torch.get_num_threads(), "assumptions": ASSUMPTIONS}

    def report(label: str, key: str, value: float, unit: str, note: str = "") -> None:
        results[key] = value
        print(f"{label:<48} {value:>12,.2f} {unit:<11} {note}", flush=True)

    print(f"{args.config}: cache {config.cache_path} ({len(CacheReader(config.cache_path))} rows), batch {batch}, "
          f"{args.steps} steps after {args.warmup} warm-up, {results['threads']} threads, "
          f"precision {config.train.precision}")
    if args.precision_only:
        precision_part(args, config, report, results)
        if args.json:
            print(json.dumps(results))
        return 0
    cached = in_own_process(measure_side, args.config, "cached", args.steps, args.warmup)
    if not args.processes_only:
        parts_1_to_5(args, config, cached, report, results)

    results.update(step_flops(config))
    dtype = torch.bfloat16 if "bf16" in cached["precision"] else torch.float32
    matmul = matmul_gflops(dtype) * 1e9
    model_rate = results["step_flops"] * cached["samples_per_s"] / batch
    print(f"6. one training step at batch {batch}: {results['step_flops'] / 1e9:.2f} GFLOP forward + backward "
          f"({100 * results['step_attention_flops'] / results['step_flops']:.0f}% attention)")
    report("   model FLOP rate (cached side)", "model_gflops", model_rate / 1e9, "GFLOP/s",
           f"(trained in {cached['precision']})")
    report(f"   matmul 2048^2 {str(dtype).removeprefix('torch.')}", "matmul_gflops", matmul / 1e9, "GFLOP/s")
    report("   train_flops_fraction", "train_flops_fraction", model_rate / matmul, "x",
           "(goal >= 0.35; one process, all threads)")

    processes = train_processes(config.train.devices, batch, resolve_precision(config)[1])
    print(f"7. `python -m train` with train.devices=1 and ={config.train.devices} ({processes} processes here), "
          f"{args.process_steps} steps after {args.warmup}, alternating, best of {args.process_repeats}:")
    speeds: dict[str, float] = {}
    for round_ in range(args.process_repeats):
        for devices in rotated(("1", str(config.train.devices)), round_):
            speed = processes_samples_per_s(args.config, devices, args.process_steps, args.warmup, batch)
            print(f"   train.devices={devices}: {speed:.1f} samples/s", flush=True)
            speeds[devices] = max(speeds.get(devices, 0.0), speed)
    one, auto = speeds["1"], speeds[str(config.train.devices)]
    report("   one process", "command_one_process_samples_per_s", one, "samples/s")
    report(f"   train.devices={config.train.devices}", "command_devices_samples_per_s", auto, "samples/s",
           f"({processes} processes of {batch // processes} rows)")
    report("   processes_over_one", "processes_over_one", auto / one, "x")
    report("   train_flops_fraction (the command, as trained)", "train_flops_fraction_processes",
           results["step_flops"] * auto / batch / matmul, "x", "(goal >= 0.35; over the same matmul rate)")

    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
