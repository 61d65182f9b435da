"""Progress a user can watch: ShapeEval during training, and loss and score curves.

Every `train.eval_every` steps, rank 0 samples a fixed set of the cache's held-out rows
(split "eval", never trained on) with the EMA weights and scores them with ShapeEval
(sample/shapeeval.py, as `make eval` does), logging `eval/overall` and `eval/<category>`
beside the loss in the CSV and TensorBoard logs. The text comes from the cache, so no LLM
is loaded. `<run>/logs/curves.png` plots the loss and the score against steps and against
wall time (evaluation time left out); it is redrawn at every evaluation and at the end, from
`<run>/logs/curves.json` (the loss every `train.log_every` steps), which a resumed run extends.
"""

from __future__ import annotations

import io
import json
import time

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
        self.last_table: str | None = None  # the last evaluation's ShapeEval table, for the summary

    # -- the record ---------------------------------------------------------------------

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_rank != 0:
            return
        if trainer.global_step > 0 and self.history_path.is_file():  # a resumed run extends its record
            self.history = json.loads(self.history_path.read_text())
            kept = [p for p in self.history["loss"] if p[0] <= trainer.global_step]
            self.history["loss"] = kept
            self.history["eval"] = [e for e in self.history["eval"] if e["step"] <= trainer.global_step]
            self.offset = kept[-1][1] if kept else 0.0
        self.started = time.time()
        if self.scores:
            self.eval_set = self._eval_set(module)

    def _wall(self) -> float:
        return self.offset + time.time() - self.started

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        if step % self.config.train.log_every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.history["loss"].append([step, round(self._wall(), 2), float(loss)])
        if self.scores and step % self.config.train.eval_every == 0:
            self._evaluate(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank != 0:
            return
        step = trainer.global_step
        if self.scores and not any(e["step"] == step for e in self.history["eval"]):
            self._evaluate(trainer, module, step)
        self._save()

    # -- ShapeEval ----------------------------------------------------------------------

    def _eval_set(self, module) -> dict:
        """What every evaluation reuses: the rows, their captions, scenes and cached text,
        the live EMA model and the codec."""
        rows = np.flatnonzero(self.reader.column("split") == "eval")[: self.config.train.eval_rows].tolist()
        table = self.reader.dataset.take(rows, columns=["caption", "truth"])
        captions = table.column("caption").to_pylist()
        row_of_caption = dict(zip(captions, rows))  # equal captions: one set of features
        live = LiveModel(module, self.reader)
        return {"captions": captions, "scenes": [json.loads(t) for t in table.column("truth").to_pylist()],
                "text": CachedText(self.reader, row_of_caption, module.encoder_names),
                "live": live, "codec": load_codec(live, module.device)}

    @torch.no_grad()
    def _evaluate(self, trainer, module, step: int) -> None:
        started, wall = time.time(), self._wall()
        world = self.reader.meta["source"]["world"]
        s = self.config.sample
        e = self.eval_set
        images = generate(e["live"], e["captions"], steps=self.config.train.eval_steps, cfg_scale=s.cfg_scale,
                          cfg_interval=s.cfg_interval,
                          solver=s.solver, seed=s.seed, height=world["height"], width=world["width"],
                          batch_size=max(s.batch_size, len(e["captions"])), progress=False, text=e["text"],
                          codec=e["codec"], precision=s.precision)
        result = shapeeval(images, e["scenes"], world)
        self.last_table = f"ShapeEval at step {step} ({len(images)} held-out prompts):\n{format_table(result)}"
        metrics = {"eval/overall": result["overall"],
                   **{f"eval/{c}": result["categories"][c] for c in CATEGORIES if c in result["categories"]}}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history["eval"].append({"step": step, "wall_s": round(wall, 2), **metrics,
                                     "seconds": round(time.time() - started, 1)})
        self.offset -= time.time() - started  # evaluation time is not training time
        self._save()

    def _save(self) -> None:
        write_atomic(self.history_path, json.dumps(self.history).encode())
        write_atomic(self.config.run_path / "logs" / "curves.png", plot_curves(self.history))


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
            for p in score:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(214, 39, 40))
        for tick in (0.0, 0.5, 1.0):
            y = top + plot_h * (1 - tick)
            draw.text((left + panel_w + 4, y), f"{tick:.1f}", fill=(214, 39, 40), font=font, anchor="lm")
            draw.text((left - 4, y), f"{10 ** (lo + tick * (hi - lo)):.3f}", fill=(31, 119, 180), font=font,
                      anchor="rm")
        draw.text((left + panel_w / 2, top + plot_h + 8), f"{label} (0 to {x_max:,.1f})", fill="black", font=font,
                  anchor="mt")
    draw.text((width / 2, 12), "training loss (blue, smoothed, log scale) and ShapeEval overall on held-out "
              "prompts (red, 0-1)", fill="black", font=font, anchor="mt")
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return encoded.getvalue()
