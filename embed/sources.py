"""Data sources: what to embed, listed cheaply in the driver and loaded in Ray tasks.

- shapes:   the synthetic world (embed/shapes.py), `num_train` + `num_eval` scenes;
- folder:   images with same-stem `.txt` captions (the layout most trainers use);
- manifest: a `.jsonl` or `.parquet` file with `image` (path) and `caption` columns and
            an optional `id`; relative image paths are resolved against the manifest;
- captions: text only, a `.txt` (one caption a line) or `.jsonl` (`caption`, optional `id`).

`list_items` returns small dicts (id, split, where to find caption and image). `load_item`
turns one into a sample or a rejection with its reason; bad input never stops the job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from embed import shapes
from embed.codecs import assign_bucket, fit_to_bucket
from store.config import Config

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
EVAL_SEED_OFFSET = 1_000_003  # the held-out split draws from its own random stream


class SourceError(ValueError):
    """The source as a whole is unusable (wrong path, unreadable manifest)."""


def list_items(config: Config) -> list[dict]:
    data = config.data
    if data.source == "shapes":
        # A scene's mirrors follow it, so equal captions (every mirror but a turned relation's)
        # meet in one encoder call and are encoded once.
        items = [{"id": f"shapes-train-{i:07d}" + (f"-{axis}" if axis else ""), "split": "train",
                  "scene": [config.seed, i], **({"mirror": axis} if axis else {})}
                 for i in range(data.num_train) for axis in [None, *data.mirror]]
        items += [{"id": f"shapes-eval-{i:07d}", "split": "eval", "scene": [config.seed + EVAL_SEED_OFFSET, i]}
                  for i in range(data.num_eval)]
        return items
    path = Path(data.path).expanduser()
    if not path.exists():
        raise SourceError(f"data.path does not exist: {path}")
    if data.source == "folder":
        return _list_folder(path)
    if data.source == "manifest":
        return _list_manifest(path, need_image=True)
    return _list_manifest(path, need_image=False)


def _list_folder(root: Path) -> list[dict]:
    if not root.is_dir():
        raise SourceError(f"data.path {root} is not a folder")
    items = []
    files = sorted(p for p in root.rglob("*") if p.is_file())
    images = {p.with_suffix(""): p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    texts = {p.with_suffix(""): p for p in files if p.suffix == ".txt"}
    for stem in sorted(set(images) | set(texts)):
        items.append({"id": str(stem.relative_to(root)), "split": "train",
                      "image": str(images[stem]) if stem in images else None,
                      "caption_file": str(texts[stem]) if stem in texts else None,
                      "need_image": True})
    if not items:
        raise SourceError(f"data.path {root} holds no images or captions")
    return items


def _list_manifest(path: Path, need_image: bool) -> list[dict]:
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".txt"):
        rows = []
        for n, raw in enumerate(path.read_bytes().splitlines()):
            if not raw.strip():
                continue
            if path.suffix == ".txt":
                caption, error = _decode(raw)
                rows.append({"id": f"line-{n:08d}", "caption": caption,
                             "error": error and f"line {n + 1}: {error}"})
                continue
            try:
                rows.append(json.loads(raw))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                rows.append({"id": f"line-{n:08d}", "error": f"line {n + 1}: not valid JSON ({err})"})
            rows[-1].setdefault("id", f"line-{n:08d}")
    else:
        raise SourceError(f"{path}: a manifest must be .jsonl or .parquet (captions may be .txt)")
    items = []
    for n, row in enumerate(rows):
        image = row.get("image")
        if image is not None and not Path(image).is_absolute():
            image = str(path.parent / image)
        items.append({"id": str(row.get("id") or image or f"row-{n:08d}"), "split": row.get("split", "train"),
                      "caption": row.get("caption"),
                      "image": image, "need_image": need_image, "error": row.get("error")})
    return items


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"caption is not valid UTF-8 ({err.reason} at byte {err.start})"


def _caption(item: dict, max_chars: int | None = None) -> tuple[str | None, str | None]:
    """(caption, rejection reason); `max_chars`: data.max_caption_chars."""
    text = item.get("caption")
    if item.get("caption_file"):
        text, error = _decode(Path(item["caption_file"]).read_bytes())
        if error:
            return None, error
    if text is None:
        return None, "missing caption"
    if not isinstance(text, str):
        return None, f"caption is not text: {type(text).__name__}"
    text = text.strip()
    if not text:
        return None, "empty caption"
    # A long caption is kept: each encoder truncates it at its max_tokens and flags the row.
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]  # the stored caption is exactly the text that was encoded
    return text, None


def _image(item: dict, config: Config) -> tuple[np.ndarray | None, int | None, str | None]:
    """(pixels fitted to their bucket, bucket index, rejection reason)."""
    path = item.get("image")
    if path is None:
        return None, None, "missing image"
    if not Path(path).is_file():
        return None, None, f"image file not found: {path}"
    limit = config.data.max_image_pixels
    # PIL's own guard raises on open, above 2 x its limit, without saying the size; this
    # function's check below replaces it (data.max_image_pixels), before anything is decoded.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
            if limit and width * height > limit:
                return None, None, (f"image too large: {width}x{height} = {width * height:,} pixels > "
                                    f"data.max_image_pixels {limit:,}: {path}")
            opened.load()
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return None, None, f"corrupt image {path}: {err}"
    except Exception as err:  # noqa: BLE001  anything else one file can raise (PIL's decompression bomb, ...)
        return None, None, f"unreadable image {path}: {type(err).__name__}: {err}"
    side = config.data.min_image_side
    if min(image.size) < side:
        return None, None, f"image too small: {image.width}x{image.height} < {side} px"
    buckets = config.codec.buckets
    bucket = assign_bucket(image.height, image.width, buckets)
    return fit_to_bucket(image, buckets[bucket]), bucket, None


def reject_duplicate_ids(items: list[dict]) -> list[dict]:
    """The items with every repeat of an id after its first turned into a rejection.

    A repeat keeps a row of its own in the rejects table, under `<id>#duplicate-<n>`: the first
    copy's id stays free until its own row is committed, so a run killed in between loses
    neither, and a rerun lists and rejects the same repeats (already committed: skipped)."""
    seen: dict[str, int] = {}
    repeats: dict[str, int] = {}
    out = []
    for n, item in enumerate(items):
        first = seen.setdefault(item["id"], n)
        if first == n:
            out.append(item)
            continue
        repeat = repeats[item["id"]] = repeats.get(item["id"], 0) + 1
        where = item.get("image") or item.get("caption_file") or f"entry {n + 1}"
        out.append({"id": f"{item['id']}#duplicate-{repeat}", "split": item.get("split", "train"),
                    "duplicate_of": item["id"], "image": item.get("image"),
                    "error": f"duplicate id: {item['id']!r} of entry {n + 1} ({where}) was first given to entry "
                             f"{first + 1}, which is kept"})
    return out


def load_item(item: dict, config: Config) -> dict:
    """One listed item -> {id, split, caption, truth, pixels, bucket, reject, stage}."""
    out = {"id": item["id"], "split": item.get("split", "train"), "caption": None, "truth": None,
           "pixels": None, "bucket": None, "reject": None, "stage": "read",
           "source": item.get("image") or item.get("caption_file") or ""}
    if item.get("error"):
        out["reject"] = item["error"]
        return out
    if "scene" in item:
        seed, index = item["scene"]
        scene = shapes.make_scene(seed, index, config.data.height, config.data.width)
        mirror = item.get("mirror")
        if mirror:
            scene = shapes.mirror_scene(scene, mirror)
        out.update(caption=scene["caption"], truth=json.dumps(scene), pixels=shapes.render(scene),
                   bucket=assign_bucket(config.data.height, config.data.width, config.codec.buckets),
                   source=f"shapes:{seed}:{index}" + (f":{mirror}" if mirror else ""))
        return out
    caption, reason = _caption(item, config.data.max_caption_chars)
    out["caption"] = caption
    if reason is None and item.get("need_image"):
        out["pixels"], out["bucket"], reason = _image(item, config)
    out["reject"] = reason
    return out
