"""A curriculum (`train.stages`): its trainings in order, each in a process of its own.

    python -m train --config configs/long.yaml                  # every stage not yet done
    python -m train --config configs/long.yaml --stage polish   # one stage (name or number)

Each stage runs as `python -m train --stage N` in a fresh process. Lightning's DDP processes
rerun the command line of the training that starts them, so each sees exactly one training,
and a stage reads the weights of the stage before only once every process of that stage has
ended. A stage whose folder holds weights exported at its last step is done and skipped, once
they are checked to be this stage's recipe and to have started from the weights the stage
before holds now (retrain stage 2 and stages 3 and 4 train again); an interrupted stage
resumes from its last.ckpt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from store.config import Config, ConfigError, config_differences, load_config, stage_configs

# train keys that say how a stage runs, not what it trains: a done stage is still done
# after they change (its weights are what the recipe asks for)
HOW_IT_RUNS = {"max_minutes", "eval_every", "eval_rows", "eval_steps", "log_every", "checkpoint_every",
               "num_workers", "devices", "accelerator", "precision", "strategy", "compile",
               "adamw_kernel"}


def stage_names(config: Config) -> list[str]:
    return [stage["name"] for stage in config.train.stages]


def pick_stage(config: Config, which: str) -> int:
    """The index of the stage `which` names, by its name or its number (from 1)."""
    names = stage_names(config)
    if not names:
        raise ConfigError(f"--stage {which}: {config.name}'s config has no train.stages")
    if which in names:
        return names.index(which)
    if which.isdigit() and 1 <= int(which) <= len(names):
        return int(which) - 1
    raise ConfigError(f"--stage {which}: no such stage; the stages are "
                      + ", ".join(f"{i} {name}" for i, name in enumerate(names, 1)))


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """What differs between two `Config.to_dict()`s in what the weights were trained with:
    the seed, the model, the encoders' features and the train keys but HOW_IT_RUNS. A key
    `saved` lacks is a switch added since, not a difference."""
    seed = saved.get("seed", now["seed"])
    differ = [f"seed: {seed!r} there, {now['seed']!r} here"] if seed != now["seed"] else []
    return differ + config_differences(saved, now, ("model", "train"), skip=HOW_IT_RUNS)


def stage_done(stage: Config, label: str = "this stage", number: int | None = None) -> tuple[int | None, bool]:
    """(the step a stage's exported weights were written at if it trained to its end, else
    None; whether those weights are stale: the weights it started from have changed since,
    so it must train again from the start). Refused, naming what differs, if they were
    trained with another recipe: a later stage would build on them."""
    from train.export import ema_digest  # not at the top: this module is imported before torch

    model_json = stage.run_path / "checkpoints" / "model.json"
    if not model_json.is_file():
        return None, False
    info = json.loads(model_json.read_text())
    if int(info["step"]) < stage.train.steps:
        return None, False  # stopped early (max_minutes, a crash): it resumes from its last.ckpt
    if differ := recipe_differences(info["config"], stage.to_dict()):
        alone = f"`--stage {number} --fresh`" if number else "--stage and --fresh"
        raise ConfigError(f"{label}: {stage.run_path} holds a finished training of another recipe ("
                          + "; ".join(differ) + f"). Train under another name (--set name=...), retrain it with "
                          f"{alone} (the stages after it then train again), or retrain every stage with --fresh")
    started = info.get("runtime", {}).get("init_from_ema_sha256")
    now = ema_digest(stage.train.init_from) if stage.train.init_from else None
    return int(info["step"]), started is not None and now is not None and started != now


def stage_plan(config: Config, fresh: bool = False, last: int | None = None):
    """Yield (number, name, label, stage config, done, stale) for each stage of `config` up to
    number `last` (default: all), label as "stage 2/4 (keep)", done and stale as `stage_done` says
    (None, False with `fresh`). Lazy on purpose: a stage is judged only once the stages before
    it have trained, so that one retrained makes the next one stale."""
    stages = stage_configs(config)
    for number, (stage, name) in enumerate(zip(stages[:last], stage_names(config)), 1):
        label = f"stage {number}/{len(stages)} ({name})"
        yield (number, name, label, stage, *((None, False) if fresh else stage_done(stage, label, number)))


def run_curriculum(config_path: str | Path, overrides: list[str], fresh: bool = False, last: int | None = None,
                   log=print) -> list[dict]:
    """Train the stages of the config at `config_path` (with `overrides`) in order, up to stage
    number `last` (default: all), skipping the done ones (all are retrained with `fresh`).
    Returns a record per stage; a stage that fails raises ConfigError, what ran before kept."""
    records = []
    for number, name, label, stage, done, stale in stage_plan(load_config(config_path, overrides), fresh, last):
        batch, steps = stage.train.batch_size, stage.train.steps
        record = {"stage": name, "steps": steps, "of": steps, "batch_size": batch, "samples": steps * batch,
                  "run_dir": str(stage.run_path), "seconds": None}  # steps: trained; of: asked
        if done is not None and not stale:
            log(f"train: {label}: done before ({done} steps in {stage.run_path}); skipped")
            records.append(record)
            continue
        start = f", from the weights of {stage.train.init_from}" if stage.train.init_from else ""
        again = " (again: the weights it started from have changed since it trained)" if stale else ""
        log(f"train: {label}: {steps:,} steps of {batch} ({steps * batch:,} samples) in {stage.run_path}{start}{again}")
        command = [sys.executable, "-m", "train", "--config", str(config_path)]
        command += [arg for item in overrides for arg in ("--set", item)] + ["--stage", str(number)]
        started = time.time()
        code = subprocess.call(command + (["--fresh"] if fresh or stale else []))
        if code != 0:
            raise ConfigError(f"{label} failed (exit code {code}); the stages before it are kept: rerun the same "
                              "command to skip them and resume this one from its last.ckpt")
        record["seconds"] = round(time.time() - started, 1)
        reached = json.loads((stage.run_path / "checkpoints" / "model.json").read_text())["step"]
        record.update(steps=reached, samples=reached * batch)
        if reached < steps:  # its train.max_minutes: what follows builds on a stage cut short
            log(f"train: {label} stopped at step {reached:,} of {steps:,} (train.max_minutes); the next stage "
                "starts from there, and a rerun finishes it and trains the stages after it again")
        records.append(record)
    return records


def summary(records: list[dict], final: Config) -> str:
    """The lines a curriculum ends with: each stage's samples, time and folder, and the weights."""
    samples = sum(r["samples"] for r in records)
    trained = [r for r in records if r["seconds"] is not None]
    lines = [f"train: curriculum of {len(records)} stages, {samples:,} samples in all; {len(trained)} trained "
             f"here in {sum(r['seconds'] for r in trained):,.0f} s, {len(records) - len(trained)} done before"]
    width = max(len(r["stage"]) for r in records)
    for number, r in enumerate(records, 1):
        took = f"{r['seconds']:7,.0f} s" if r["seconds"] is not None else "   before"
        short = f" (of {r['of']:,}: train.max_minutes)" if r["steps"] < r["of"] else ""
        lines.append(f"  {number} {r['stage']:<{width}}  {r['steps']:>6,} x {r['batch_size']:<4} "
                     f"{r['samples']:>9,} samples {took}  {r['run_dir']}{short}")
    lines.append(f"  the last stage's weights are in {final.run_path / 'checkpoints'}: "
                 "`make sample` and `make eval` with this config read them")
    return "\n".join(lines)
