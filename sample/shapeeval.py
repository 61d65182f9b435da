"""ShapeEval: a GenEval-like score of generated shapes-world images, by classical analysis.

The scorer judges objects, not pixel counts: an object is a connected one-colour region of
plausible size whose bounding box is filled like a circle, a square or an upward triangle.
Scattered fragments of the right colours are not objects, so they score nothing (a colour
pixel count would flatter them; see FACTS.md on the shapes prototype).

It reads only a scene's ground truth and the world description (`world_spec` in the cache
metadata), never the generator, so it can score images from any source.

An image is correct only if everything its caption says holds (GenEval's rule): each
mentioned colour+shape is present, with its named size, exactly `count` times when a count
is named (at least once for "a"), and every relation holds between detected centres.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

# A pixel takes its nearest world colour; one farther than this fraction of the smallest
# gap between world colours from all of them is unknown. 0.75 keeps the half-way pixels of
# blurred edges (so a blurred shape keeps its outline) and noise up to sigma ~30.
COLOR_TOLERANCE = 0.75
# A world object's plausible extent, as fractions of the world's sizes (box sides, pixels).
MIN_AREA = 0.35  # of small**2: a small triangle covers ~0.53 of its box, a 4x4 patch 0.25
MAX_AREA = 2.0  # of large**2
MIN_EXTENT = 0.6  # of small, for the longer bbox side
MAX_EXTENT = 1.5  # of large
MAX_ASPECT = 1.5  # longer / shorter bbox side: the world's shapes have square boxes
# Share of the area in the lower half of the bbox: ~0.5 for circle and square, ~0.75 for
# an upward triangle. It tells triangles from blurred circles, whose fill drops toward 0.6,
# and rejects L-shapes and diagonal bars whose fill mimics a shape.
BALANCED = (0.38, 0.62)  # circle, square
# Fill ratio of the bounding box: square 1.0, circle pi/4 ~ 0.785, triangle 0.5.
SQUARE_FILL = 0.9  # balanced, fill >= this: square
CIRCLE_FILL = 0.6  # balanced, fill in [this, SQUARE_FILL): circle
TRIANGLE_FILL = (0.35, 0.72)  # bottom-heavy, fill in this range: triangle
# Relations (GenEval's rule): shrink the centre offset by this fraction of the summed box
# sides per axis, then the relation's axis must carry > half of the (unshrunk) offset.
POSITION_SLACK = 0.1
POSITION_DOMINANCE = 0.5

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
BIAS_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _classify_pixels(image: np.ndarray, world: dict) -> tuple[np.ndarray, list[str]]:
    """[H, W] int: index into the returned colour names, 0 = background, -1 = unknown."""
    names = ["background", *world["palette"]]
    colors = np.array([world["background"], *world["palette"].values()], np.float32)  # [K, 3]
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(colors, 2)]
    pixels = image.astype(np.float32)[:, :, None, :]  # [H, W, 1, 3]
    distance = np.linalg.norm(pixels - colors, axis=-1)  # [H, W, K]
    labels = distance.argmin(axis=-1)
    labels[distance.min(axis=-1) > COLOR_TOLERANCE * min(gaps)] = -1
    return labels, names


def _shape_of(region: np.ndarray) -> str | None:
    """The shape a one-colour region [h, w] (bool, its bbox) looks like, or None."""
    h, w = region.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return None
    area = region.sum()
    fill = area / (h * w)
    rows = region.sum(axis=1)
    lower = (rows[(h + 1) // 2 :].sum() + (rows[h // 2] / 2 if h % 2 else 0)) / area
    if lower >= BALANCED[1]:
        return "triangle" if TRIANGLE_FILL[0] <= fill < TRIANGLE_FILL[1] else None
    if lower < BALANCED[0]:
        return None
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return None


def detect_objects(image: np.ndarray, world: dict) -> list[dict]:
    """Connected one-colour regions of plausible size in a uint8 [H, W, 3] image.

    Each is {color, shape (None if not shape-like), size, box [x0, y0, x1, y1] (exclusive
    ends), area}. Regions too small or too large to be a world object are left out; only
    regions with a shape count as objects when scoring.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    small, large = world["sizes"]["small"], world["sizes"]["large"]
    labels, names = _classify_pixels(image, world)
    objects = []
    for k in np.unique(labels):
        if k <= 0:
            continue
        components, _ = ndimage.label(labels == k, structure=np.ones((3, 3)))  # 8-connected
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            region = components[box] == i
            area = int(region.sum())
            extent = max(region.shape)
            if not (MIN_AREA * small**2 <= area <= MAX_AREA * large**2):
                continue
            if not (MIN_EXTENT * small <= extent <= MAX_EXTENT * large):
                continue
            objects.append(
                {
                    "color": names[k],
                    "shape": _shape_of(region),
                    "size": "small" if extent < (small + large) / 2 else "large",
                    "box": [box[1].start, box[0].start, box[1].stop, box[0].stop],
                    "area": area,
                }
            )
    return objects


def _centre(obj: dict) -> np.ndarray:
    x0, y0, x1, y1 = obj["box"]
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2])


def _relation_holds(a: dict, b: dict, rel: str) -> bool:
    """Whether object a is `rel` object b (image y grows downwards)."""
    offset = _centre(a) - _centre(b)  # [2]: x, y
    norm = np.linalg.norm(offset)
    if norm == 0:
        return False
    sides = np.array([a["box"][2] - a["box"][0] + b["box"][2] - b["box"][0],
                      a["box"][3] - a["box"][1] + b["box"][3] - b["box"][1]])
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - POSITION_SLACK * sides, 0)
    dx, dy = shrunk / norm
    direction = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}
    if rel not in direction:
        raise ValueError(f"unknown relation {rel!r}; allowed: {list(direction)}")
    return bool(direction[rel] > POSITION_DOMINANCE)


def score_scene(image: np.ndarray, scene: dict, world: dict) -> dict:
    """Per-mention and per-relation verdicts for one image of one scene (see module doc)."""
    if image.shape[:2] != (scene["height"], scene["width"]):
        raise ValueError(f"image {image.shape[:2]} does not match the scene's "
                         f"{scene['height']}x{scene['width']}")
    objects = [o for o in detect_objects(image, world) if o["shape"] is not None]
    n_words = len(scene["caption"].split())
    mentions, matches = [], []
    for mention in scene["mentions"]:
        match = [o for o in objects
                 if o["color"] == mention["color"] and o["shape"] == mention["shape"]]
        count = mention["count"]
        count_ok = len(match) == count if count > 1 else len(match) >= 1  # "a": at least one
        size_ok = None
        if mention["size"] is not None:
            size_ok = any(o["size"] == mention["size"] for o in match)
        mentions.append(
            {
                "present": count_ok and size_ok is not False,
                "color_ok": any(o["color"] == mention["color"] for o in objects),
                "shape_ok": any(o["shape"] == mention["shape"] for o in objects),
                "size_ok": size_ok,
                "count_ok": count_ok,
                "bound": bool(match),
                "rel_pos": mention["word"] / n_words,
            }
        )
        matches.append(match)
    relations = [
        any(_relation_holds(a, b, r["rel"])
            for a in matches[r["a"]] for b in matches[r["b"]] if a is not b)
        for r in scene["relations"]
    ]
    correct = all(m["present"] for m in mentions) and all(relations)
    return {"mentions": mentions, "relations": relations, "correct": correct}


def _verdicts(images, scenes, world) -> list[dict]:
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    return [score_scene(np.asarray(image), scene, world) for image, scene in zip(images, scenes)]


def shapeeval(images, scenes, world: dict) -> dict:
    """GenEval-like categories, each the fraction of its images judged correct.

    Returns {"overall": mean of the categories with images, "categories": {name: score},
    "counts": {name: images}, "images": total}; a category without images is left out.
    "colors" re-scores the single and two-object images, so counts overlap.
    """
    passed: dict[str, list[bool]] = {name: [] for name in CATEGORIES}
    for scene, verdict in zip(scenes, _verdicts(images, scenes, world)):
        kind = scene["kind"]
        all_bound = all(m["bound"] for m in verdict["mentions"])
        if kind == "single":
            passed["single_object"].append(verdict["correct"])
        elif kind in ("two_objects", "counting"):
            passed[kind].append(verdict["correct"])
        elif kind == "relation":
            passed["position"].append(verdict["correct"])
        elif kind == "attributes":
            passed["color_attribution"].append(all_bound)
        else:
            raise ValueError(f"scene kind {kind!r} has no ShapeEval category")
        if kind in ("single", "two_objects"):  # GenEval "colors": the named object has its colour
            passed["colors"].append(all_bound)
    scores = {name: float(np.mean(v)) for name, v in passed.items() if v}
    return {
        "overall": float(np.mean(list(scores.values()))) if scores else float("nan"),
        "categories": scores,
        "counts": {name: len(passed[name]) for name in scores},
        "images": len(scenes),
    }


def positional_bias(images, scenes, world: dict) -> dict:
    """Attribute binding by where a mention starts in its caption ("attributes" scenes).

    Returns {"bins": [{"range": [lo, hi], "mean": fraction bound or None, "count": n}]};
    the last bin includes 1.0.
    """
    keep = [i for i, scene in enumerate(scenes) if scene["kind"] == "attributes"]
    verdicts = _verdicts([images[i] for i in keep], [scenes[i] for i in keep], world)
    lows, highs = BIAS_EDGES[:-1], BIAS_EDGES[1:]
    bound: list[list[bool]] = [[] for _ in lows]
    for verdict in verdicts:
        for mention in verdict["mentions"]:
            b = int(np.searchsorted(BIAS_EDGES, mention["rel_pos"], side="right")) - 1
            bound[min(b, len(lows) - 1)].append(mention["bound"])  # 1.0 joins the last bin
    return {
        "bins": [
            {"range": [lo, hi], "mean": float(np.mean(v)) if v else None, "count": len(v)}
            for lo, hi, v in zip(lows, highs, bound)
        ]
    }


def format_table(result: dict, bias: dict | None = None) -> str:
    """A text table of a `shapeeval` result and, optionally, a `positional_bias` result."""
    lines = [f"{'category':<20} {'score':>6} {'images':>7}"]
    for name, score in result["categories"].items():
        lines.append(f"{name:<20} {score:>6.3f} {result['counts'][name]:>7d}")
    lines.append(f"{'overall':<20} {result['overall']:>6.3f} {result['images']:>7d}")
    if bias is not None:
        lines += ["", f"{'mention starts at':<20} {'bound':>6} {'count':>7}"]
        for b in bias["bins"]:
            lo, hi = b["range"]
            span = f"[{lo:.2f}, {hi:.2f}" + ("]" if hi == BIAS_EDGES[-1] else ")")
            mean = "-" if b["mean"] is None else f"{b['mean']:.3f}"
            lines.append(f"{span:<20} {mean:>6} {b['count']:>7d}")
    return "\n".join(lines)
