"""`python -m train.matrix configs/matrices/recipe.yaml`: train and score a matrix of recipes.

A matrix file names a base config, the overrides every run shares (the compute budget),
the seeds, and the recipes, each a set of overrides and/or its own config file:

    name: recipe                    # runs go to runs/matrices/<name>/<recipe>-s<seed>
    base: configs/default.yaml
    seeds: [0, 1]
    jobs: 2                         # runs at once; each gets cores / jobs threads
    eval_rows: 256                  # held-out prompts each run is scored on
    set: {train.max_minutes: 10, train.steps: 100000, train.eval_every: 0}
    recipes:
      baseline: {seeds: [0, 1, 2]}    # a recipe's own seeds (`--seeds` overrides every recipe's)
      feature-norm: {model.feature_norm: rms}
      llm-alone: {config: configs/ablations/llm-alone.yaml}

Each (recipe, seed) trains with `python -m train`'s code and is scored by `make eval`'s code
(sample/eval.py: ShapeEval and the positional-bias bins, model and ceiling), in its own
process, with its log in `<run>/matrix.log`. It is resumable at two levels: a run with a
`result.json` is skipped, and an interrupted run resumes from its `last.ckpt`. All records
go to `runs/matrices/<name>/results.json`, one per (recipe, seed): recipe, seed, steps, wall
time, per-category scores, bias bins, the held-out loss at fixed times and noise (the same
draws for every run: `heldout_loss`), the CPU and the precision.
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from store.config import Config, ConfigError, load_config, stage_configs
from train.curriculum import run_curriculum


@dataclass
class Run:
    recipe: str
    seed: int
    config: str  # the recipe's config file
    overrides: list[str]  # KEY=VALUE, the matrix's then the recipe's, then run_dir and seed

    @property
    def key(self) -> str:
        return f"{self.recipe}-s{self.seed}"


@dataclass
class Matrix:
    name: str
    runs: list[Run]  # the ones asked for (--only, --seeds)
    recipes: list[str]  # every recipe of the file, in its order
    jobs: int
    eval_rows: int
    out: Path

    def run_dir(self, run: Run) -> Path:
        return self.out / run.key


def _overrides(values: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def load_matrix(path: str | Path, only: list[str] | None = None, seeds: list[int] | None = None) -> Matrix:
    """Parse and check a matrix file: every recipe's config must load (errors name the recipe)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"matrix file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"name", "base", "seeds", "jobs", "eval_rows", "set", "recipes", "out"}
    if unknown := set(raw) - allowed:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if not raw.get("recipes"):
        raise ConfigError(f"{path}: no recipes")
    name = raw.get("name", path.stem)
    out = Path(raw.get("out", f"runs/matrices/{name}"))
    shared = _overrides(raw.get("set") or {})
    runs = []
    for recipe, spec in raw["recipes"].items():
        if only and recipe not in only:
            continue
        spec = dict(spec or {})
        config = spec.pop("config", raw.get("base", "configs/default.yaml"))
        own_seeds = spec.pop("seeds", None)  # a recipe's own seeds (more for a baseline), else the file's
        for seed in seeds if seeds is not None else own_seeds or raw.get("seeds", [0]):
            run = Run(recipe, int(seed), str(config), shared + _overrides(spec))
            run.overrides += [f"run_dir={out / run.key}", f"seed={seed}"]
            try:
                load_config(run.config, run.overrides)
            except ConfigError as err:
                raise ConfigError(f"{path}: recipe {recipe!r}: {err}") from None
            runs.append(run)
    if only and (missing := set(only) - {r.recipe for r in runs}):
        raise ConfigError(f"{path}: no recipes named {sorted(missing)}")
    return Matrix(name, runs, list(raw["recipes"]), int(raw.get("jobs", 1)), int(raw.get("eval_rows", 256)), out)


# -- one run (in its own process) --------------------------------------------------------

HELDOUT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def heldout_loss(config: Config, rows: int, batch_size: int = 64, seed: int = 0, split: str = "eval",
                 times: tuple[float, ...] = HELDOUT_TIMES, text: str = "caption") -> float:
    """The exported EMA model's training loss on the first `rows` held-out rows, at fixed
    times (HELDOUT_TIMES) and fixed noise: the same draws for every recipe and seed, so two
    runs compare without the noise of random timesteps (a low-variance companion to ShapeEval).

    split="train": the same measure on the first training rows (the gap to "eval" is the
    overfitting); `times`: other fixed times t (1 = noise), e.g. one at a time; text="null":
    the rows' own captions replaced by the unconditional text (CFG's other half), on the same
    draws, so the null loss minus the caption loss is what the caption tells the model."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; allowed: train, eval")
    if text not in ("caption", "null"):
        raise ValueError(f"text={text!r}; allowed: caption, null")
    import numpy as np
    import torch

    from sample.text import PromptFeatures
    from store.reader import CacheReader
    from train.export import load_exported

    exported = load_exported(config.run_path / "checkpoints", ema=True)
    names = [e["name"] for e in exported.encoders]
    unconditional = (PromptFeatures(exported.encoders, exported.prefix, exported.null, load_encoders=False)
                     if text == "null" else None)
    reader = CacheReader(config.cache_path, encoders=[] if unconditional else names)  # null: no text to read
    held_out = np.flatnonzero(reader.column("split") == split)[:rows].tolist()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        batch = reader.take(held_out[start:start + batch_size])
        x0 = batch["latents"]
        texts = unconditional.null(len(x0)) if unconditional else [batch["text"][n] for n in names]
        total += sum(_losses_at_times(exported, x0, texts, times, generator)) * len(x0)
        count += len(x0) * len(times)
    return total / count


def _losses_at_times(exported, x0, texts, times, generator) -> list[float]:
    """The exported model's mean loss on `x0` with `texts`, at each fixed time, the noise drawn
    from `generator` in order (so equal generators give equal draws)."""
    import torch

    features, masks = [f.states for f in texts], [f.mask for f in texts]
    losses = []
    with torch.no_grad():
        for t in times:
            noise = torch.randn(x0.shape, generator=generator)
            x_t, t_net, target = exported.objective.at_times(x0, torch.full((len(x0),), t), noise)
            losses.append(exported.objective.loss(exported.model(x_t, t_net, features, masks), target).item())
    return losses


def reverse_relations(caption: str, relations: list[dict]) -> str:
    """The caption with each relation turned around ("to the left of" <-> "to the right of",
    "above" <-> "below"): the same objects, the opposite arrangement."""
    from embed.shapes import OPPOSITE, RELATIONS

    reversed_caption = caption
    for relation in relations:
        words, turned = f" {RELATIONS[relation['rel']]} ", f" {RELATIONS[OPPOSITE[relation['rel']]]} "
        if words not in reversed_caption:
            raise ValueError(f"caption {caption!r} does not say {words.strip()!r}")
        reversed_caption = reversed_caption.replace(words, turned, 1)
    return reversed_caption


def relation_gain(config: Config, rows: int, times: tuple[float, ...] = HELDOUT_TIMES, batch_size: int = 64,
                  seed: int = 0, split: str = "eval") -> dict:
    """What the relation words tell the exported EMA model. On the held-out scenes with a
    relation among the first `rows`, the loss with each caption's relation reversed
    (`reverse_relations`) minus the loss with the caption itself, at each fixed time, on the same
    noise; both captions are encoded by the run's own encoders, as at sampling. About 0: the
    model draws the same arrangement whichever way the caption puts it (position at chance);
    above 0: the words steer the layout. Returns {"scenes", "caption": {t: loss},
    "gain": {t: reversed - caption}}. split="train": the same on the first training rows, the
    scenes the model was fitted to."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; allowed: train, eval")
    import numpy as np
    import torch

    from sample.text import PromptFeatures
    from store.reader import CacheReader
    from train.export import load_exported

    exported = load_exported(config.run_path / "checkpoints", ema=True)
    reader = CacheReader(config.cache_path, encoders=[])  # both captions are encoded afresh: read the images only
    if reader.meta["source"]["kind"] != "shapes":
        raise ValueError(f"relation_gain needs a shapes cache; {config.cache_path} holds {reader.meta['source']['kind']!r}")
    held_out = np.flatnonzero(reader.column("split") == split)[:rows].tolist()
    table = reader.dataset.take(held_out, columns=["caption", "truth"])
    scenes = [(row, caption, json.loads(truth)["relations"]) for row, caption, truth
              in zip(held_out, table.column("caption").to_pylist(), table.column("truth").to_pylist())]
    scenes = [(row, caption, reverse_relations(caption, relations)) for row, caption, relations in scenes if relations]
    if not scenes:
        raise ValueError(f"none of the first {rows} {split} scenes has a relation")
    prompts = PromptFeatures(exported.encoders, exported.prefix, exported.null)
    sums = {which: [0.0] * len(times) for which in ("caption", "reversed")}
    generators = {which: torch.Generator().manual_seed(seed) for which in sums}  # the same draws for both captions
    for start in range(0, len(scenes), batch_size):
        part = scenes[start:start + batch_size]
        x0 = reader.take([s[0] for s in part])["latents"]
        for which, column in (("caption", 1), ("reversed", 2)):
            losses = _losses_at_times(exported, x0, prompts.encode([s[column] for s in part]), times, generators[which])
            sums[which] = [total + loss * len(part) for total, loss in zip(sums[which], losses)]
    n = len(scenes)
    return {"scenes": n, "caption": {t: c / n for t, c in zip(times, sums["caption"])},
            "gain": {t: (r - c) / n for t, r, c in zip(times, sums["reversed"], sums["caption"])}}


def train_and_score(config: Config, eval_rows: int) -> dict:
    """Train one run (resuming), score it on `eval_rows` held-out prompts; the run's record."""
    from sample.eval import run_eval
    from store.hardware import detect
    from train.run import run_train

    summary = run_train(config, progress=False)
    result = run_eval(config, limit=eval_rows, progress=False, references=("model", "ceiling"))
    curves = json.loads((config.run_path / "logs" / "curves.json").read_text())
    held_out = heldout_loss(config, eval_rows)
    model, bias = result["scores"]["model"], result["biases"]["model"]
    return {
        "steps": summary["steps"],
        "train_seconds": curves["loss"][-1][1] if curves["loss"] else round(summary["seconds"], 1),
        "overall": model["overall"], "categories": model["categories"], "counts": model["counts"],
        "images": model["images"],
        "ceiling": result["scores"]["ceiling"]["overall"],
        "bias_bins": [{"range": b["range"], "mean": b["mean"], "count": b["count"]} for b in bias["bins"]],
        "final_loss": summary["loss"], "heldout_loss": held_out, "parameters": summary["parameters"],
        "precision": summary["precision"], "hardware": detect("auto").describe(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def run_one(matrix_path: str, recipe: str, seed: int) -> int:
    matrix = load_matrix(matrix_path, only=[recipe], seeds=[seed])
    run = next(r for r in matrix.runs if r.seed == seed)
    config = load_config(run.config, run.overrides)
    stages = stage_configs(config)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    started = time.time()
    # a curriculum (train.stages): the stages before the last in processes of their own, as
    # `python -m train` runs them (skipped once done), the last one here, trained and scored
    earlier = run_curriculum(run.config, run.overrides, last=len(stages) - 1) if len(stages) > 1 else []
    record = {"recipe": run.recipe, "seed": run.seed, "config": run.config, "overrides": run.overrides[:-2],
              **train_and_score(stages[-1], matrix.eval_rows)}
    if earlier:
        record["earlier_stages"] = earlier
    record["wall_seconds"] = round(time.time() - started, 1)  # this process: (the rest of) training + scoring
    (config.run_path / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


# -- the matrix --------------------------------------------------------------------------

def collect(matrix: Matrix) -> list[dict]:
    """Every finished run's record in the matrix's folder (also those --only or --seeds left
    out this time), in the file's recipe order, then by seed."""
    records = [json.loads(p.read_text()) for p in matrix.out.glob("*/result.json")]
    records = [r for r in records if r["recipe"] in matrix.recipes]
    return sorted(records, key=lambda r: (matrix.recipes.index(r["recipe"]), r["seed"]))


def backfill(matrix: Matrix) -> None:
    """Add what finished runs recorded before it existed: `heldout_loss` (from their exported
    weights) and the category `counts` (from their eval/shapeeval.json)."""
    for run in matrix.runs:
        path = matrix.run_dir(run) / "result.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if "counts" in record and "heldout_loss" in record:
            continue
        if "counts" not in record:
            record["counts"] = json.loads((matrix.run_dir(run) / "eval" / "shapeeval.json").read_text())["model"]["counts"]
        if "heldout_loss" not in record:
            record["heldout_loss"] = heldout_loss(load_config(run.config, run.overrides), matrix.eval_rows)
            print(f"  {run.key}: held-out loss {record['heldout_loss']:.4f} added", flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def summary_table(records: list[dict]) -> str:
    """One line per recipe: seeds, mean overall, its range over seeds, mean steps."""
    by_recipe: dict[str, list[dict]] = {}
    for record in records:
        by_recipe.setdefault(record["recipe"], []).append(record)
    lines = [f"{'recipe':<28}{'seeds':>6}{'overall':>9}{'min':>7}{'max':>7}{'steps':>7}{'held-out loss':>15}"]
    for recipe, group in by_recipe.items():
        scores = [r["overall"] for r in group]
        steps = sum(r["steps"] for r in group) / len(group)
        losses = [r["heldout_loss"] for r in group if "heldout_loss" in r]
        loss = f"{sum(losses) / len(losses):>15.4f}" if losses else f"{'-':>15}"
        lines.append(f"{recipe:<28}{len(group):>6}{sum(scores) / len(scores):>9.3f}{min(scores):>7.3f}"
                     f"{max(scores):>7.3f}{steps:>7.0f}{loss}")
    return "\n".join(lines)


def run_matrix(matrix: Matrix, matrix_path: str, jobs: int | None = None) -> list[dict]:
    jobs = max(1, jobs or matrix.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [r for r in matrix.runs if not (matrix.run_dir(r) / "result.json").is_file()]
    done = len(matrix.runs) - len(todo)
    print(f"matrix {matrix.name}: {len(matrix.runs)} runs, {done} already finished, {len(todo)} to go; "
          f"{jobs} at a time with {threads} threads each; results in {matrix.out}", flush=True)
    running: list[tuple[Run, subprocess.Popen, float]] = []
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            folder = matrix.run_dir(run)
            folder.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            with open(folder / "matrix.log", "a") as log:  # the child keeps its own descriptor
                process = subprocess.Popen([sys.executable, "-m", "train.matrix", matrix_path, "--one", run.recipe,
                                            str(run.seed)], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((run, process, time.time()))
            print(f"  started {run.key} (log: {folder / 'matrix.log'})", flush=True)
        time.sleep(2)
        for item in list(running):
            run, process, started = item
            if process.poll() is None:
                continue
            running.remove(item)
            done += 1
            if process.returncode == 0:
                record = json.loads((matrix.run_dir(run) / "result.json").read_text())
                print(f"  [{done}/{len(matrix.runs)}] {run.key}: overall {record['overall']:.3f} after "
                      f"{record['steps']} steps ({time.time() - started:.0f} s)", flush=True)
            else:
                failed.append(run.key)
                print(f"  [{done}/{len(matrix.runs)}] {run.key}: FAILED (exit {process.returncode}); "
                      f"see {matrix.run_dir(run) / 'matrix.log'}", flush=True)
    backfill(matrix)
    records = collect(matrix)
    (matrix.out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    print(summary_table(records))
    finished = sum((matrix.run_dir(r) / "result.json").is_file() for r in matrix.runs)
    print(f"matrix {matrix.name}: {finished} of {len(matrix.runs)} runs finished"
          + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
          + f"; records in {matrix.out / 'results.json'}")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("matrix", help="the matrix file (YAML)")
    parser.add_argument("--jobs", type=int, help="runs at once (default: the file's `jobs`)")
    parser.add_argument("--only", nargs="+", metavar="RECIPE", help="run these recipes only")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="these seeds instead of the file's")
    parser.add_argument("--one", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    try:
        if args.one:
            return run_one(args.matrix, args.one[0], int(args.one[1]))
        matrix = load_matrix(args.matrix, args.only, args.seeds)
        run_matrix(matrix, args.matrix, args.jobs)
    except ConfigError as err:
        print(f"matrix: error: {err}", file=sys.stderr)
        return 2
    return 0 if all((matrix.run_dir(r) / "result.json").is_file() for r in matrix.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
