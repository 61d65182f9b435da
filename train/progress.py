"""Progress a user can watch: ShapeEval during training, and loss and score curves.

Every `train.eval_every` steps (and at the last), the EMA weights sample a fixed set of the
cache's held-out rows (split "eval", never trained on), `train.eval_rows` of them balanced
over the scene kinds, with `make eval`'s sampler (sample.solver, sample.steps unless
train.eval_steps is set, CFG and its interval), and ShapeEval (sample/shapeeval.py, as `make
eval` scores) gives the overall score with its standard error: `eval/overall` and
`eval/overall_se` and `eval/<category>` are logged beside the loss in the CSV and
TensorBoard logs. Under DDP every process samples its share of the rows, and rank 0 scores
them all. The text comes from the cache, so no LLM is loaded. `<run>/logs/curves.png` plots
the loss and the score (with its +-2 standard-error band) against steps and against wall
time (evaluation time left out); it is redrawn at every evaluation and at the end, from
`<run>/logs/curves.json` (the loss every `train.log_every` steps), which a resumed run extends.

The standard error: the rows are a stratified sample (an equal number from each scene kind),
and the overall score is a sum of per-image terms (each image counts 1/n_c / 6 towards each
category c it is scored in), so its variance is the sum over kinds of n_k times the variance
of those terms within kind k.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import defaultdict

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sample.generate import generate, load_codec
from sample.shapeeval import CATEGORIES, format_table, shapeeval
from sample.text import CachedText
from store.config import Config
from store.reader import CacheReader
from store.storage import write_atomic


class LiveModel:
    """What `generate` reads from exported weights, taken from the module being trained."""

    def __init__(self, module, reader: CacheReader):
        by_name = {e["name"]: e for e in reader.meta["encoders"]}
        self.model, self.config, self.objective = module.ema, module.config, module.objective
        self.cache_meta, self.encoders = reader.meta, [by_name[n] for n in module.encoder_names]
        self.prefix, self.null = reader.prefix, reader.null


class TrainingProgress(L.Callback):
    def __init__(self, config: Config, reader: CacheReader):
        self.config, self.reader = config, reader
        self.history_path = config.run_path / "logs" / "curves.json"
        self.scores = config.train.eval_every > 0 and reader.meta["source"]["kind"] == "shapes"
        self.history: dict = {"loss": [], "eval": []}
        self.started = self.offset = 0.0
        self.eval_set = None
        self.eval_seconds = 0.0  # spent evaluating, in this process: not training time (TrainingTimeCap)
        self.scored_step: int | None = None  # the step last evaluated
        self.last_table: str | None = None  # the last evaluation's ShapeEval table, for the summary

    # -- the record ---------------------------------------------------------------------

    def on_train_start(self, trainer, module) -> None:
        if self.scores:  # every process samples its share of the evaluation rows
            self.eval_set = self._eval_set(module, trainer.global_rank, trainer.world_size)
        if trainer.global_rank != 0:
            return
        if trainer.global_step > 0 and self.history_path.is_file():  # a resumed run extends its record
            self.history = json.loads(self.history_path.read_text())
            kept = [p for p in self.history["loss"] if p[0] <= trainer.global_step]
            self.history["loss"] = kept
            self.history["eval"] = [e for e in self.history["eval"] if e["step"] <= trainer.global_step]
            self.offset = kept[-1][1] if kept else 0.0
        self.started = time.time()

    def _wall(self) -> float:
        return self.offset + time.time() - self.started

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.global_rank == 0 and step % self.config.train.log_every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.history["loss"].append([step, round(self._wall(), 2), float(loss)])
        if self.scores and step % self.config.train.eval_every == 0:
            self._evaluate(trainer, module, step)
            self.scored_step = step

    def on_train_end(self, trainer, module) -> None:
        step = trainer.global_step
        if self.scores and self.scored_step != step:  # every rank: it samples its share
            self._evaluate(trainer, module, step)
        if trainer.global_rank == 0:
            self._save()

    # -- ShapeEval ----------------------------------------------------------------------

    def _eval_set(self, module, rank: int, world: int) -> dict:
        """What every evaluation reuses: the rows (this process's share), their captions, scenes
        and cached text, the live EMA model and the codec."""
        rows = balanced_rows(self.reader, self.config.train.eval_rows)
        share = -(-len(rows) // world)  # contiguous shares: each image gets the noise it gets in one process
        mine = rows[rank * share:(rank + 1) * share]
        table = self.reader.dataset.take(mine, columns=["caption", "truth"]) if mine else None
        captions = table.column("caption").to_pylist() if mine else []
        row_of_caption = dict(zip(captions, mine))  # equal captions: one set of features
        live = LiveModel(module, self.reader)
        return {"first": rank * share, "captions": captions,
                "scenes": [json.loads(t) for t in table.column("truth").to_pylist()] if mine else [],
                "text": CachedText(self.reader, row_of_caption, module.encoder_names),
                "live": live, "codec": load_codec(live, module.device)}

    def _evaluate(self, trainer, module, step: int) -> None:
        started = time.time()
        try:
            self._score(trainer, module, step)
        finally:
            self.eval_seconds += time.time() - started

    @torch.no_grad()
    def _score(self, trainer, module, step: int) -> None:
        started, wall = time.time(), self._wall()
        world = self.reader.meta["source"]["world"]
        s = self.config.sample
        e = self.eval_set
        steps = self.config.train.eval_steps or s.steps
        images = np.zeros((0, world["height"], world["width"], 3), dtype=np.uint8)  # more processes than rows
        if e["captions"]:
            images = generate(e["live"], e["captions"], steps=steps, cfg_scale=s.cfg_scale,
                              cfg_interval=s.cfg_interval, solver=s.solver, seed=s.seed, height=world["height"],
                              width=world["width"], batch_size=max(s.batch_size, len(e["captions"])),
                              first_index=e["first"], progress=False, text=e["text"], codec=e["codec"],
                              precision=s.precision)
        scenes = e["scenes"]
        if trainer.world_size > 1:  # rank 0 scores every process's share
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, (images, scenes))
            images = np.concatenate([share[0] for share in shares])
            scenes = [scene for share in shares for scene in share[1]]
        if trainer.global_rank != 0:
            return
        result = shapeeval(images, scenes, world)
        se = standard_error(images, scenes, world, result)
        self.last_table = (f"ShapeEval at step {step}: {result['overall']:.3f} +- {se:.3f} (standard error; "
                           f"{len(images)} held-out prompts, {steps} {s.solver} steps, CFG {s.cfg_scale}):\n"
                           f"{format_table(result)}")
        metrics = {"eval/overall": result["overall"], "eval/overall_se": se,
                   **{f"eval/{c}": result["categories"][c] for c in CATEGORIES if c in result["categories"]}}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history["eval"].append({"step": step, "wall_s": round(wall, 2), **metrics,
                                     "seconds": round(time.time() - started, 1)})
        self.offset -= time.time() - started  # evaluation time is not training time
        print(f"train: step {step}: ShapeEval {result['overall']:.3f} +- {se:.3f} on {len(images)} held-out "
              f"prompts ({time.time() - started:.0f} s)", flush=True)
        self._save()

    def _save(self) -> None:
        write_atomic(self.history_path, json.dumps(self.history).encode())
        write_atomic(self.config.run_path / "logs" / "curves.png", plot_curves(self.history))


class TrainingTimeCap(L.Callback):
    """Stops training once it has trained train.max_minutes, in-training evaluations not counted
    (`progress`, when given, says how long they took), so a cap buys the same steps whether or
    not the run is scored as it goes. The minutes trained carry over a resume (the checkpoint
    holds them). Under DDP rank 0's clock decides for every process."""

    def __init__(self, minutes: float, progress: TrainingProgress | None = None):
        self.limit, self.progress = 60.0 * minutes, progress
        self.before = 0.0  # seconds trained before this run (a resume)
        self.started: float | None = None
        self.evaluated_at_start = 0.0

    def _evaluated(self) -> float:
        return self.progress.eval_seconds if self.progress is not None else 0.0

    def trained_seconds(self) -> float:
        if self.started is None:
            return self.before
        return self.before + time.time() - self.started - (self._evaluated() - self.evaluated_at_start)

    def on_train_start(self, trainer, module) -> None:
        self.started, self.evaluated_at_start = time.time(), self._evaluated()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.broadcast(self.trained_seconds() >= self.limit):
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"trained_seconds": self.trained_seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict.get("trained_seconds", 0.0))


def balanced_rows(reader: CacheReader, rows: int) -> list[int]:
    """The first rows // kinds held-out rows of each scene kind (in row order), kinds in a fixed
    order: the same set at every evaluation and in every run on the cache."""
    held_out = np.flatnonzero(reader.column("split") == "eval").tolist()
    kinds = [json.loads(t)["kind"] for t in reader.dataset.take(held_out, columns=["truth"]).column("truth").to_pylist()]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for row, kind in zip(held_out, kinds):
        by_kind[kind].append(row)
    each = max(1, rows // max(1, len(by_kind)))
    return sorted(row for kind in sorted(by_kind) for row in by_kind[kind][:each])


def standard_error(images, scenes: list[dict], world: dict, result: dict) -> float:
    """The standard error of `result["overall"]` over a sample stratified by scene kind.

    overall = mean over categories c of (images of c passing / n_c), so each image adds
    x_ic / (C n_c) over the categories it is scored in; the images of one kind are a sample of
    that kind, so Var(overall) = sum over kinds k of n_k Var_k(term). Each image's x_ic comes
    from ShapeEval itself, scoring that image alone."""
    categories = result["categories"]
    counts = result["counts"]
    terms: dict[str, list[float]] = defaultdict(list)
    for image, scene in zip(images, scenes):
        alone = shapeeval(image[None], [scene], world)["categories"]
        terms[scene["kind"]].append(sum(alone[c] / counts[c] for c in alone) / len(categories))
    variance = sum(len(t) * float(np.var(t, ddof=1)) for t in terms.values() if len(t) > 1)
    return math.sqrt(variance)


def plot_curves(history: dict) -> bytes:
    """PNG: loss (left axis, log scale) and ShapeEval overall (right axis) against steps (left
    panel) and wall-clock minutes of training (right panel)."""
    width, height, margin = 1000, 380, 60
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    loss = np.array(history["loss"], dtype=float).reshape(-1, 3)
    evals = history["eval"]
    panel_w = (width - 3 * margin) // 2
    if len(loss):
        window = max(1, min(25, len(loss) // 5))  # a moving average over about a fifth of the record, at most 25
        smooth = np.convolve(loss[:, 2], np.ones(window) / window, mode="valid")
        lo, hi = np.log10(max(smooth.min(), 1e-6)), np.log10(max(smooth.max(), 1e-6))
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 0.1 else (lo, hi)
    for panel, (column, label) in enumerate(((0, "step"), (1, "minutes of training"))):
        left, top, plot_h = margin + panel * (panel_w + margin), 40, height - 110
        draw.rectangle([left, top, left + panel_w, top + plot_h], outline="black")
        if not len(loss):
            continue
        scale, key = (60.0, "wall_s") if column == 1 else (1.0, "step")
        xs = loss[:, column] / scale
        x_max = max([xs.max(), 1e-9] + [e[key] / scale for e in evals])

        def x_at(x: float) -> float:
            return left + panel_w * x / x_max

        offset = len(loss) - len(smooth)
        points = [(x_at(x), top + plot_h * (1 - (np.log10(max(y, 1e-6)) - lo) / (hi - lo)))
                  for x, y in zip(xs[offset:], smooth)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        if evals:
            score = [(x_at(e[key] / scale), top + plot_h * (1 - e["eval/overall"])) for e in evals]
            if len(score) > 1:
                draw.line(score, fill=(214, 39, 40), width=2)
            for p, e in zip(score, evals):
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(214, 39, 40))
                band = 2 * plot_h * e.get("eval/overall_se", 0.0)  # +-2 standard errors (older records: none)
                draw.line([(p[0], max(top, p[1] - band)), (p[0], min(top + plot_h, p[1] + band))],
                          fill=(214, 39, 40), width=1)
        for tick in (0.0, 0.5, 1.0):
            y = top + plot_h * (1 - tick)
            draw.text((left + panel_w + 4, y), f"{tick:.1f}", fill=(214, 39, 40), font=font, anchor="lm")
            draw.text((left - 4, y), f"{10 ** (lo + tick * (hi - lo)):.3f}", fill=(31, 119, 180), font=font,
                      anchor="rm")
        draw.text((left + panel_w / 2, top + plot_h + 8), f"{label} (0 to {x_max:,.1f})", fill="black", font=font,
                  anchor="mt")
    draw.text((width / 2, 12), "training loss (blue, smoothed, log scale) and ShapeEval overall on held-out "
              "prompts (red, 0-1, bars: +-2 standard errors)", fill="black", font=font, anchor="mt")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()
