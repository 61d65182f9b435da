"""`python -m sample --config configs/default.yaml`: images from the exported model.

Plain mode renders prompts (--prompt, --prompts-file, else the config's sample.prompts)
to <out>/<i:04d>.png, with the prompt, seed and settings in the PNG's text chunks, and
<out>/grid.png. Benchmark modes (--geneval FILE, --t2i-compbench FILE, --dpg-bench DIR)
write the folder the official scorer reads (sample/layouts.py). Unset options come from
the config's `sample` section.
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from embed.codecs import CodecError
from embed.encoder import EncoderError
from sample.generate import (SampleError, check_request, default_size, generate, image_grid, load_codec,
                             resolve_precision)
from sample.layouts import LayoutError, make_layout, save_png
from sample.text import PromptFeatureError, PromptFeatures
from store.config import ConfigError, load_config
from store.storage import location
from train.export import ExportError, load_exported

ERRORS = (ConfigError, ExportError, SampleError, LayoutError, PromptFeatureError, EncoderError, CodecError)
BENCHMARKS = ("geneval", "t2i-compbench", "dpg-bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.config_parser("python -m sample", __doc__)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--checkpoint", type=location, help="exported weights (default: <run>/checkpoints)")
    parser.add_argument("--out", type=location, help="default: <run>/samples, or <run>/bench/<name>")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    parser.add_argument("--solver")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench = parser.add_mutually_exclusive_group()
    bench.add_argument("--geneval", type=Path, metavar="FILE", help="evaluation_metadata.jsonl")
    bench.add_argument("--t2i-compbench", type=Path, metavar="FILE", help="one <category>_val.txt")
    bench.add_argument("--dpg-bench", type=Path, metavar="DIR", help="the folder of <id>.txt prompts")
    parser.add_argument("--limit", type=int, help="only the first K prompts")
    parser.add_argument("--images-per-prompt", type=int, help="default: 1, or the benchmark's usual")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace, config) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise SampleError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = prompts or list(config.sample.prompts)
    if not prompts:
        raise SampleError("no prompts: pass --prompt or --prompts-file, or set sample.prompts in the config")
    return prompts[:args.limit] if args.limit else prompts


def render_plain(render, prompts: list[str], per_prompt: int, out: Path, metadata: dict) -> int:
    """<out>/<i:04d>.png for each image (prompt-major) and <out>/grid.png; returns images."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    images = render(expanded, first_index=0, progress=True)
    for i, (prompt, image) in enumerate(zip(expanded, images)):
        save_png(out / f"{i:04d}.png", image, {"prompt": prompt, "index": i, **metadata})
    cols = per_prompt if per_prompt > 1 else math.ceil(math.sqrt(len(images)))
    save_png(out / "grid.png", image_grid(images, cols), {"prompts": expanded, **metadata})
    return len(images)


def render_benchmark(render, layout, limit: int | None, batch_size: int, metadata: dict) -> int:
    """The layout's jobs, a batch of whole jobs per call; returns images."""
    jobs = layout.prompts(limit)
    total, first = sum(j.num_images for j in jobs), 0
    with tqdm(total=total, unit="image") as bar:
        while jobs:
            group = [jobs.pop(0)]
            while jobs and sum(j.num_images for j in group) + jobs[0].num_images <= batch_size:
                group.append(jobs.pop(0))
            prompts = [j.prompt for j in group for _ in range(j.num_images)]
            images = render(prompts, first_index=first, progress=False)
            for job in group:
                layout.write(job, list(images[:job.num_images]), {"first_index": first, **metadata})
                images, first = images[job.num_images:], first + job.num_images
            bar.update(len(prompts))
    return total


def sampling_settings(args: argparse.Namespace, config) -> dict:
    """generate()'s keyword settings: the command line's, else the config's ("auto" resolved)."""
    s = config.sample
    height, width = default_size(config)
    return {"steps": args.steps or s.steps, "cfg_scale": s.cfg_scale if args.cfg is None else args.cfg,
            "cfg_interval": list(s.cfg_interval),
            "solver": args.solver or s.solver, "seed": s.seed if args.seed is None else args.seed,
            "height": args.height or height, "width": args.width or width,
            "batch_size": args.batch_size or s.batch_size, "precision": resolve_precision(s.precision, args.device)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.quiet_libraries()
    started = time.time()
    benchmark = next((name for name in BENCHMARKS if getattr(args, name.replace("-", "_"))), None)
    try:
        config = load_config(args.config, args.overrides)
        settings = sampling_settings(args, config)
        ema = config.sample.use_ema and not args.raw
        exported = load_exported(args.checkpoint or config.run_path / "checkpoints", ema=ema)
        exported.model.to(args.device)
        check_request(exported, settings["solver"], settings["height"], settings["width"])
        if benchmark:
            out = args.out or config.run_path / "bench" / benchmark
            layout = make_layout(benchmark, getattr(args, benchmark.replace("-", "_")), out, args.images_per_prompt)
        else:
            out = args.out or config.run_path / "samples"
            prompts = read_prompts(args, config)
        text = PromptFeatures(exported.encoders, exported.prefix, exported.null, device=args.device)
        codec = load_codec(exported, args.device)
        metadata = {"seed": settings["seed"], "weights": "ema" if ema else "raw", "train_step": exported.step,
                    "settings": {k: v for k, v in settings.items() if k not in ("seed", "batch_size")}}

        def render(prompts: list[str], first_index: int, progress: bool):
            return generate(exported, prompts, **settings, first_index=first_index, progress=progress,
                            text=text, codec=codec)

        if benchmark:
            count = render_benchmark(render, layout, args.limit, settings["batch_size"], metadata)
        else:
            count = render_plain(render, prompts, args.images_per_prompt or 1, out, metadata)
    except ERRORS as err:
        print(f"sample: error: {err}", file=sys.stderr)
        return 2
    where = f"the {benchmark} layout in {out}" if benchmark else f"{out} (and {out / 'grid.png'})"
    print(f"sample: {count} images ({settings['height']}x{settings['width']}, {settings['solver']} "
          f"{settings['steps']} steps, cfg {settings['cfg_scale']}, {settings['precision']}, {metadata['weights']} weights of step "
          f"{exported.step}) in {time.time() - started:.1f} s -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
