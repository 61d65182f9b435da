"""`python -m sample.eval --config configs/default.yaml`: ShapeEval with a floor and a ceiling.

On the cache's held-out rows (split "eval", never trained on), three sets of images are
scored the same way, by `shapeeval` and `positional_bias` (sample/shapeeval.py):

- model:   one image per caption, generated with the config's sample settings;
- floor:   the same noise with the unconditional text only: a model that ignores its prompt;
- ceiling: the rows' own ground-truth renderings, decoded from the cached latents: what a
           perfect generator scores (below 1 only where the codec or the scorer loses).

Images are generated at the world's size, since each scene is judged at its own size. The
captions' text features are the cache's own (`make embed` wrote them with the same prompt
encoder that `make sample` runs), so no LLM is loaded and `make eval` runs wherever training
runs, with or without the LLM packages.
Writes shapeeval.json, table.txt, positional_bias.json, positional_bias.png, failures.json
(why the model's images failed, per category), images.npz (the model's images, captions,
ground-truth scenes and world, to re-score or inspect without the cache or sampling again),
grid.png (the first 32 generated images) and grid_captions.txt to <run>/eval.
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from embed.codecs import CodecError
from embed.encoder import EncoderError
from sample.generate import SampleError, generate, image_grid, load_codec, resolve_precision
from sample.layouts import save_png
from sample.shapeeval import BIAS_EDGES, CATEGORIES, detect_objects, positional_bias, score_scene, shapeeval
from sample.text import CachedText, PromptFeatureError
from store.config import Config, ConfigError, load_config
from store.reader import CacheError, CacheReader
from store.storage import location
from train.export import ExportError, load_exported

REFERENCES = ("model", "floor", "ceiling")
GRID_IMAGES, GRID_COLUMNS = 32, 8


def held_out_rows(reader: CacheReader, exported, limit: int | None) -> tuple[list[int], list[str], list[dict]]:
    """Row indices, captions and ground-truth scenes of the eval split (first `limit` rows)."""
    for key in ("encoders", "codec", "source"):
        if reader.meta[key] != exported.cache_meta[key]:
            raise CacheError(f"cache at {reader.root}: its {key!r} differ from those of the cache the "
                             "model was trained on; evaluate on the training cache")
    if reader.meta["source"]["kind"] != "shapes":
        raise CacheError(f"ShapeEval needs a shapes cache; {reader.root} holds {reader.meta['source']['kind']!r}")
    rows = np.flatnonzero(reader.column("split") == "eval")[:limit].tolist()
    if not rows:
        raise CacheError(f"cache at {reader.root} has no held-out rows (split 'eval')")
    table = reader.dataset.take(rows, columns=["caption", "truth"])
    return rows, table.column("caption").to_pylist(), [json.loads(t) for t in table.column("truth").to_pylist()]


def ground_truth_images(reader: CacheReader, rows: list[int], codec, batch_size: int) -> np.ndarray:
    """The cached latents of `rows`, decoded: uint8 [N, H, W, 3]."""
    images = []
    for start in range(0, len(rows), batch_size):
        latents = reader.take(rows[start:start + batch_size])["latents"]  # [B, C, h, w]
        images.append(codec.decode(latents))
    return np.concatenate(images)


def comparison_table(scores: dict, biases: dict) -> str:
    """Categories and position bins as rows, the scored sets (model / floor / ceiling) as columns."""
    names = [name for name in REFERENCES if name in scores]
    header = "".join(f"{name:>9}" for name in names)
    ceiling = scores[names[-1]]  # every set scores the same scenes: any gives the counts
    lines = [f"{'category':<20}{header}{'images':>9}"]
    for category in [c for c in CATEGORIES if c in ceiling["categories"]]:
        values = "".join(f"{scores[name]['categories'][category]:>9.3f}" for name in names)
        lines.append(f"{category:<20}{values}{ceiling['counts'][category]:>9d}")
    values = "".join(f"{scores[name]['overall']:>9.3f}" for name in names)
    lines += [f"{'overall':<20}{values}{ceiling['images']:>9d}", "",
              f"{'binding by position':<20}{header}{'mentions':>9}"]
    for i, bin_ in enumerate(biases[names[-1]]["bins"]):
        lo, hi = bin_["range"]
        span = f"[{lo:.2f}, {hi:.2f}" + ("]" if hi == BIAS_EDGES[-1] else ")")
        means = [biases[name]["bins"][i]["mean"] for name in names]
        values = "".join(f"{'-':>9}" if m is None else f"{m:>9.3f}" for m in means)
        lines.append(f"{span:<20}{values}{bin_['count']:>9d}")
    return "\n".join(lines)


# Why an image failed, the first reason that applies. A named object is missing: its colour is
# nowhere among the detected shapes ("no such colour"), or it is, but only with the shape another
# mention names ("another mention's shape": the shapes of the prompt bound to the wrong colours)
# or with a shape no mention names ("wrong shape"). Then a wrong count, a wrong named size, and a
# stated relation that does not hold, split by what holds instead between the named objects: the
# opposite relation, one on the other axis, or neither.
FAILURES = ("no such colour", "another mention's shape", "wrong shape", "count", "size",
            "relation reversed", "relation other axis", "relation unclear")
CATEGORY_OF = {"single": "single_object", "two_objects": "two_objects", "counting": "counting",
               "relation": "position", "attributes": "color_attribution"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OTHER_AXIS = {"left of": ("above", "below"), "right of": ("above", "below"),
              "above": ("left of", "right of"), "below": ("left of", "right of")}


def _missing_reason(mention: dict, scene: dict, objects: list[dict]) -> str:
    """Why no detected object has the mention's colour and shape."""
    shapes = {o["shape"] for o in objects if o["color"] == mention["color"]}
    if not shapes:
        return "no such colour"
    named = {m["shape"] for m in scene["mentions"] if m["color"] != mention["color"]}
    return "another mention's shape" if shapes & named else "wrong shape"


def _relation_verdict(rel: str, relation: dict, scene: dict, world: dict, image) -> bool:
    """Whether `rel` holds between the objects `relation` names (the scene with `rel` swapped in)."""
    swapped = {**scene, "relations": [{**relation, "rel": rel}]}
    return any(score_scene(image, swapped, world)["relations"])


def failure_reasons(images, scenes, world: dict) -> dict:
    """Per ShapeEval category, how many images failed and the first reason each failed
    (FAILURES); the scorer's own verdicts (`score_scene`), so the failures add up to
    (1 - score) x images. "colors" is left out: it re-scores single and two-object images.

    Returns {category: {"images": n, "failed": k, "reasons": {reason: count}}}."""
    out = {name: {"images": 0, "failed": 0, "reasons": dict.fromkeys(FAILURES, 0)}
           for name in CATEGORY_OF.values()}
    for image, scene in zip(images, scenes):
        image = np.asarray(image)
        verdict = score_scene(image, scene, world)
        entry = out[CATEGORY_OF[scene["kind"]]]
        entry["images"] += 1
        mentions = verdict["mentions"]
        bound = all(m["bound"] for m in mentions)
        ok = bound if scene["kind"] == "attributes" else verdict["correct"]
        if ok:
            continue
        entry["failed"] += 1
        if not bound:
            objects = [o for o in detect_objects(image, world) if o["shape"] is not None]  # as score_scene
            first = next(m for m, v in zip(scene["mentions"], mentions) if not v["bound"])
            reason = _missing_reason(first, scene, objects)
        elif not all(m["count_ok"] for m in mentions):
            reason = "count"
        elif any(m["size_ok"] is False for m in mentions):
            reason = "size"
        else:
            relation = scene["relations"][verdict["relations"].index(False)]
            rel = relation["rel"]
            if _relation_verdict(OPPOSITE[rel], relation, scene, world, image):
                reason = "relation reversed"
            elif any(_relation_verdict(r, relation, scene, world, image) for r in OTHER_AXIS[rel]):
                reason = "relation other axis"
            else:
                reason = "relation unclear"
        entry["reasons"][reason] += 1
    return {name: entry for name, entry in out.items() if entry["images"]}


def failure_table(failures: dict) -> str:
    """Failed images per category and their first reasons, as counts."""
    short = {"no such colour": "no colour", "another mention's shape": "its shape", "wrong shape": "bad shape",
             "relation reversed": "reversed", "relation other axis": "other axis", "relation unclear": "unclear"}
    names = [short.get(r, r) for r in FAILURES]
    lines = [f"{'why images failed':<20}{'failed':>9}" + "".join(f"{n:>11}" for n in names)]
    for category, entry in failures.items():
        counts = "".join(f"{entry['reasons'][r]:>11d}" for r in FAILURES)
        lines.append(f"{category:<20}{entry['failed']:>5d}/{entry['images']:<3d}{counts}")
    return "\n".join(lines)


CURVE_COLORS = {"model": (31, 119, 180), "floor": (150, 150, 150), "ceiling": (44, 160, 44)}
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot_bias(biases: dict, path: Path) -> None:
    """A line plot: binding accuracy (y) per position bin (x), one line per named curve
    ({name: {"bins": [{"range", "mean"}, ...]}}, in order; model/floor/ceiling keep their colours)."""
    names = list(biases)
    colors = {name: CURVE_COLORS.get(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(names)}
    width, height, left, right, top, bottom = 600, 360, 60, 150, 40, 60
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    bins = biases[names[0]]["bins"]
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(i: int, value: float) -> tuple[float, float]:
        return left + plot_w * (i + 0.5) / len(bins), top + plot_h * (1 - value)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = at(0, tick)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick:.2f}", fill="black", font=font, anchor="rm")
    for i, bin_ in enumerate(bins):
        lo, hi = bin_["range"]
        draw.text((at(i, 0)[0], top + plot_h + 8), f"{lo:.2f}-{hi:.2f}", fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for k, name in enumerate(names):
        points = [at(i, b["mean"]) if b["mean"] is not None else None for i, b in enumerate(biases[name]["bins"])]
        for a, b in zip(points, points[1:]):
            if a and b:
                draw.line([a, b], fill=colors[name], width=2)
        for p in filter(None, points):
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colors[name])
        y = top + 10 + 18 * k
        draw.line([(width - right + 12, y), (width - right + 32, y)], fill=colors[name], width=2)
        draw.text((width - right + 38, y), name, fill="black", font=font, anchor="lm")
    draw.text((width / 2, 12), "attribute binding by where the mention starts", fill="black", font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 14), "mention start / caption length (words)", fill="black",
              font=font, anchor="mb")
    draw.text((8, top - 22), "binding accuracy", fill="black", font=font)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    path.write_bytes(encoded.getvalue())


def run_eval(config: Config, checkpoint: Path | None = None, out: Path | None = None, limit: int | None = None,
             device: str = "cpu", progress: bool = True, references: tuple[str, ...] = REFERENCES) -> dict:
    """Score `references` (model, floor, ceiling) on the held-out rows; write the files; return the scores."""
    unknown = set(references) - set(REFERENCES)
    if "model" not in references or unknown:
        raise ValueError(f"eval: references {references}: must include 'model', allowed: {', '.join(REFERENCES)}")
    exported = load_exported(checkpoint or config.run_path / "checkpoints", ema=config.sample.use_ema)
    exported.model.to(device)
    reader = CacheReader(config.cache_path, encoders=[e["name"] for e in exported.encoders])
    rows, captions, scenes = held_out_rows(reader, exported, limit)
    world = reader.meta["source"]["world"]
    s = config.sample
    settings = {"steps": s.steps, "cfg_scale": s.cfg_scale, "cfg_interval": list(s.cfg_interval),
                "solver": s.solver, "seed": s.seed,
                "height": world["height"], "width": world["width"], "batch_size": s.batch_size,
                "precision": resolve_precision(s.precision, device)}
    codec = load_codec(exported, device)
    # The held-out captions' states as `make embed` wrote them: no LLM runs here (sample/text.py)
    text = CachedText(reader, dict(zip(captions, rows)), [e["name"] for e in exported.encoders])
    make = {
        "model": lambda: generate(exported, captions, **settings, progress=progress, codec=codec, text=text),
        "floor": lambda: generate(exported, captions, **settings, unconditional_only=True, progress=progress,
                                  codec=codec, text=text),
        "ceiling": lambda: ground_truth_images(reader, rows, codec, s.batch_size),
    }
    images = {name: make[name]() for name in REFERENCES if name in references}
    scores = {name: shapeeval(images[name], scenes, world) for name in images}
    biases = {name: positional_bias(images[name], scenes, world) for name in images}
    failures = failure_reasons(images["model"], scenes, world)

    out = location(out or config.run_path / "eval")
    out.mkdir(parents=True, exist_ok=True)
    about = {**settings, "weights": "ema" if config.sample.use_ema else "raw", "train_step": exported.step,
             "rows": len(rows)}
    (out / "shapeeval.json").write_text(json.dumps({**scores, "settings": about}, indent=2))
    (out / "positional_bias.json").write_text(json.dumps(biases, indent=2))
    (out / "failures.json").write_text(json.dumps(failures, indent=2))
    saved = io.BytesIO()  # through write_bytes, as every file here: `out` may be on object storage
    np.savez_compressed(saved, images=images["model"], captions=np.array(captions),
                        truth=np.array([json.dumps(scene) for scene in scenes]), world=json.dumps(world))
    (out / "images.npz").write_bytes(saved.getvalue())
    table = comparison_table(scores, biases) + "\n\n" + failure_table(failures)
    (out / "table.txt").write_text(table + "\n")
    plot_bias(biases, out / "positional_bias.png")
    shown = images["model"][:GRID_IMAGES]
    save_png(out / "grid.png", image_grid(shown, GRID_COLUMNS), {"settings": about})
    (out / "grid_captions.txt").write_text("".join(f"{i:2d}: {c}\n" for i, c in enumerate(captions[:len(shown)])))
    return {"scores": scores, "biases": biases, "failures": failures, "table": table, "out": out,
            "rows": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python -m sample.eval", __doc__)
    parser.add_argument("--limit", type=int, help="only the first N held-out rows")
    parser.add_argument("--checkpoint", type=location, help="exported weights (default: <run>/checkpoints)")
    parser.add_argument("--out", type=location, help="default: <run>/eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    started = time.time()
    try:
        config = load_config(args.config, args.overrides)
        result = run_eval(config, args.checkpoint, args.out, args.limit, args.device)
    except (ConfigError, ExportError, CacheError, SampleError, PromptFeatureError, EncoderError, CodecError) as err:
        print(f"eval: error: {err}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"\neval: {result['rows']} held-out captions in {time.time() - started:.1f} s; "
          f"scores, table, positional-bias plot and a grid in {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
