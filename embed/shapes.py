"""The synthetic shapes world: captions with exact ground truth, and their renderings.

A scene is a few flat-coloured circles, squares and upward triangles on a dark background,
with a caption that names them. Everything the caption claims is true in the rendering
(colours, shapes, sizes, counts, relations with a clear margin), so a scorer can be checked
against ground truth before it judges generated images.

A scene is a pure function of (seed, index): any worker can make any row without
coordination. The ground truth is a JSON-serialisable dict:

    caption, kind, height, width,
    objects:   [{shape, color, size, box: [x0, y0, x1, y1] (x1, y1 exclusive), mention}]
    mentions:  [{shape, color, size or None, count, word}]  in caption order;
               word = index of the mention's first word in caption.split()
    relations: [{a, rel, b}]  a and b index mentions; rel in RELATIONS

A drawn object fills its box tightly: its pixels touch all four sides.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Saturated colours, pairwise >= 100 apart in RGB and far from the background, so
# nearest-colour classification stays unambiguous for blurred or noisy samples.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (250, 240, 60),
    "purple": (160, 50, 210),
    "orange": (255, 140, 0),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_FRACTIONS = {"small": 0.25, "large": 0.44}  # box side / shorter image side: 8 and 14 px at 32
MIN_SIDE = 20  # small = 5 px; at 16 (small = 4 px) circles and triangles blur together
GAP = 2  # minimum pixels between any two objects' boxes

KIND_PROBABILITIES = {
    "single": 0.25,
    "two_objects": 0.15,
    "relation": 0.20,
    "counting": 0.15,
    "attributes": 0.25,
}
RELATIONS = {  # relation -> its words in a caption
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}  # each relation turned around
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# Placement: candidate positions drawn at once per object, a few rounds per object, a few
# layouts per scene (the later ones with every object small); then fail loudly.
CANDIDATES = 32
ROUNDS = 4
LAYOUTS = 6


def size_px(height: int, width: int) -> dict[str, int]:
    """Box side in pixels of each size name; scales with the shorter image side."""
    side = min(height, width)
    if side < MIN_SIDE:
        raise ValueError(f"image {height}x{width}: the shapes world needs sides >= {MIN_SIDE}")
    return {name: round(fraction * side) for name, fraction in SIZE_FRACTIONS.items()}


def world_spec(height: int, width: int) -> dict:
    """Everything a scorer needs to know about the world; stored with the cache metadata."""
    return {
        "height": height,
        "width": width,
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "background": list(BACKGROUND),
        "shapes": list(SHAPES),
        "sizes": size_px(height, width),
        "gap": GAP,
        "relations": list(RELATIONS),
    }


# ---------------------------------------------------------------------------------------
# Content: what the caption will say
# ---------------------------------------------------------------------------------------


def _mention(color: str, shape: str, size: str | None = None, count: int = 1) -> dict:
    return {"shape": shape, "color": color, "size": size, "count": count}


def _compose(rng: np.random.Generator, kind: str) -> tuple[list[dict], list[dict]]:
    """Mentions and relations for one scene; a named size is provisional until layout."""
    colors, shapes = list(PALETTE), list(SHAPES)

    def pick_colors(n: int) -> list[str]:
        return [colors[i] for i in rng.permutation(len(colors))[:n]]

    def pick_shape() -> str:
        return shapes[rng.integers(len(shapes))]

    def maybe_size() -> str | None:
        return SIZES[rng.integers(2)] if rng.random() < 0.5 else None

    if kind == "single":
        return [_mention(pick_colors(1)[0], pick_shape(), maybe_size())], []
    if kind == "two_objects":
        return [_mention(c, pick_shape()) for c in pick_colors(2)], []
    if kind == "relation":
        mentions = [_mention(c, pick_shape(), maybe_size()) for c in pick_colors(2)]
        rel = list(RELATIONS)[rng.integers(len(RELATIONS))]
        return mentions, [{"a": 0, "rel": rel, "b": 1}]
    if kind == "counting":
        return [_mention(pick_colors(1)[0], pick_shape(), None, int(rng.integers(2, 5)))], []
    if kind == "attributes":
        # Distinct colours: each colour names one object, so each pair is scored for binding.
        return [_mention(c, pick_shape()) for c in pick_colors(int(rng.integers(2, 5)))], []
    raise ValueError(f"unknown scene kind {kind!r}; allowed: {list(KIND_PROBABILITIES)}")


def _caption(kind: str, mentions: list[dict], relations: list[dict]) -> tuple[str, list[int]]:
    """The caption and, per mention, the index of its first word in caption.split()."""
    words: list[str] = []
    starts: list[int] = []

    def add(mention: dict) -> None:
        starts.append(len(words))
        count = mention["count"]
        adjectives = [mention["size"]] if mention["size"] is not None else []
        adjectives.append(mention["color"])
        if count > 1:
            words.append(COUNT_WORDS[count])
        else:
            words.append("an" if adjectives[0][0] in "aeiou" else "a")
        words.extend(adjectives)
        words.append(mention["shape"] if count == 1 else mention["shape"] + "s")

    if kind == "relation":
        add(mentions[0])
        words.extend(RELATIONS[relations[0]["rel"]].split())
        add(mentions[1])
    else:  # "a, b, c and d"
        for i, mention in enumerate(mentions):
            if i > 0 and i == len(mentions) - 1:
                words.append("and")
            add(mention)
            if i < len(mentions) - 2:
                words[-1] += ","
    return " ".join(words), starts


# ---------------------------------------------------------------------------------------
# Layout: where the objects go
# ---------------------------------------------------------------------------------------


def _place_free(rng: np.random.Generator, sides: list[int], height: int,
                width: int) -> list[list[int]] | None:
    """Boxes [n, 4] for squares of the given sides, GAP apart, by rejection; None if stuck."""
    boxes = np.empty((0, 4), dtype=np.int64)
    for side in sides:
        for _ in range(ROUNDS):
            x = rng.integers(0, width - side + 1, CANDIDATES)[:, None]
            y = rng.integers(0, height - side + 1, CANDIDATES)[:, None]
            apart = (
                (x + side + GAP <= boxes[:, 0])
                | (boxes[:, 2] + GAP <= x)
                | (y + side + GAP <= boxes[:, 1])
                | (boxes[:, 3] + GAP <= y)
            ).all(axis=1)  # [CANDIDATES]
            if apart.any():
                i = int(np.argmax(apart))
                box = [int(x[i, 0]), int(y[i, 0]), int(x[i, 0]) + side, int(y[i, 0]) + side]
                boxes = np.vstack([boxes, box])
                break
        else:
            return None
    return boxes.tolist()


def _place_pair(rng: np.random.Generator, sides: list[int], rel: str, height: int,
                width: int) -> list[list[int]]:
    """Boxes for `a rel b`, separated along the relation's axis by >= GAP, with the offset
    between centres mostly along that axis (across-axis offset <= half the along-axis one),
    so the relation is clearly true and not also another one."""
    horizontal = rel in ("left of", "right of")
    a_first = rel in ("left of", "above")  # a has the smaller coordinate along the axis
    along, across = (width, height) if horizontal else (height, width)
    s1, s2 = sides if a_first else sides[::-1]
    lo1 = int(rng.integers(0, along - s1 - GAP - s2 + 1))
    lo2 = int(rng.integers(lo1 + s1 + GAP, along - s2 + 1))
    spread = ((lo2 + s2 / 2) - (lo1 + s1 / 2)) / 2
    cross1 = int(rng.integers(0, across - s1 + 1))
    centre1 = cross1 + s1 / 2
    low = max(0, int(np.ceil(centre1 - spread - s2 / 2)))
    high = min(across - s2, int(np.floor(centre1 + spread - s2 / 2)))
    cross2 = int(rng.integers(low, high + 1))
    boxes = []
    for lo, cross, side in ((lo1, cross1, s1), (lo2, cross2, s2)):
        x0, y0 = (lo, cross) if horizontal else (cross, lo)
        boxes.append([x0, y0, x0 + side, y0 + side])
    return boxes if a_first else boxes[::-1]


def _layout(rng: np.random.Generator, relations: list[dict], sizes: list[str], height: int,
            width: int) -> tuple[list[list[int]], list[str]]:
    """Boxes and final size names of the objects; sizes shrink to small when they do not fit."""
    px = size_px(height, width)
    if relations:
        rel = relations[0]["rel"]
        along = width if rel in ("left of", "right of") else height
        if px[sizes[0]] + GAP + px[sizes[1]] > along:
            sizes = ["small", "small"]
        return _place_pair(rng, [px[s] for s in sizes], rel, height, width), sizes
    for attempt in range(LAYOUTS):
        if attempt == LAYOUTS // 2:
            sizes = ["small"] * len(sizes)
        boxes = _place_free(rng, [px[s] for s in sizes], height, width)
        if boxes is not None:
            return boxes, sizes
    raise RuntimeError(f"could not place {len(sizes)} objects in a {height}x{width} image")


MIRRORED = {  # each axis's mirror (left-right, top-bottom) turns its own relations around, keeps the others
    "horizontal": {rel: OPPOSITE[rel] for rel in ("left of", "right of")},
    "vertical": {rel: OPPOSITE[rel] for rel in ("above", "below")},
}
MIRROR_AXES = tuple(MIRRORED)


def mirror_scene(scene: dict, axis: str) -> dict:
    """`scene` with its layout mirrored across the image's vertical midline ("horizontal":
    left and right swap) or horizontal midline ("vertical": top and bottom swap), and its
    caption told the same way: "a left of b" becomes "a right of b" and "a above b" becomes
    "a below b"; every other caption stays as it was. The objects are drawn upright again,
    so a triangle still points up: the mirror of a layout, not of the pixels (for "horizontal"
    the two are the same image, every shape being symmetric left to right).

    With its mirror, a relation scene has a twin with the same objects and the opposite
    relation word, so where its objects go cannot be told from their colours and shapes
    alone (without twins a model fits training layouts that way, docs/RESULTS.md, session 16).
    """
    if axis not in MIRRORED:
        raise ValueError(f"unknown mirror axis {axis!r}; allowed: {list(MIRROR_AXES)}")
    height, width = scene["height"], scene["width"]
    objects = []
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        box = [width - x1, y0, width - x0, y1] if axis == "horizontal" else [x0, height - y1, x1, height - y0]
        objects.append({**obj, "box": box})
    relations = [{**r, "rel": MIRRORED[axis].get(r["rel"], r["rel"])} for r in scene["relations"]]
    mentions = [dict(m) for m in scene["mentions"]]
    caption, starts = _caption(scene["kind"], mentions, relations)
    for mention, start in zip(mentions, starts):
        mention["word"] = start
    return {**scene, "caption": caption, "objects": objects, "mentions": mentions, "relations": relations}


def make_scene(seed: int, index: int, height: int = 32, width: int = 32) -> dict:
    """The ground truth of scene `index` of the world drawn with `seed` (see module doc)."""
    rng = np.random.default_rng([seed, index])
    kinds = list(KIND_PROBABILITIES)
    kind = kinds[rng.choice(len(kinds), p=list(KIND_PROBABILITIES.values()))]
    mentions, relations = _compose(rng, kind)
    owners = [m for m, mention in enumerate(mentions) for _ in range(mention["count"])]
    sizes = [mentions[m]["size"] or SIZES[rng.integers(2)] for m in owners]
    boxes, sizes = _layout(rng, relations, sizes, height, width)
    for m, size in zip(owners, sizes):
        if mentions[m]["size"] is not None:
            mentions[m]["size"] = size  # a named size that had to shrink is named as drawn
    caption, starts = _caption(kind, mentions, relations)
    for mention, start in zip(mentions, starts):
        mention["word"] = start
    objects = [
        {"shape": mentions[m]["shape"], "color": mentions[m]["color"], "size": size, "box": box,
         "mention": m}
        for m, size, box in zip(owners, sizes, boxes)
    ]
    return {
        "caption": caption,
        "kind": kind,
        "height": height,
        "width": width,
        "objects": objects,
        "mentions": mentions,
        "relations": relations,
    }


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """[side, side] bool: the pixels a shape covers in its box, no anti-aliasing."""
    centres = np.arange(side) + 0.5
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":  # pixel centres inside the inscribed circle
        d = centres - side / 2
        mask = d[:, None] ** 2 + d[None, :] ** 2 <= (side / 2) ** 2
    elif shape == "triangle":  # apex up, base on the bottom row
        # Row r is about r + 1/2 wide, rounded to the side's parity so that it is centred;
        # the apex row keeps one or two pixels so the shape touches the top of its box.
        parity = side % 2
        widths = 2 * np.round((np.arange(side) + 0.5 - parity) / 2) + parity
        widths = np.maximum(widths, 2 - parity)
        mask = np.abs(centres[None, :] - side / 2) <= widths[:, None] / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPES)}")
    mask.flags.writeable = False  # shared by the cache
    return mask


def render(scene: dict) -> np.ndarray:
    """The scene as flat colours on the background: uint8 [H, W, 3]."""
    image = np.empty((scene["height"], scene["width"], 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        image[y0:y1, x0:x1][shape_mask(obj["shape"], x1 - x0)] = PALETTE[obj["color"]]
    return image
