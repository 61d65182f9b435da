"""What a relation is worth at t = 1, where the input is pure noise and a model can only draw
what its caption says. On the held-out relation scenes of a shapes cache, the x0 error (the
training loss at t = 1, in the cache's pixel latents) of three predictors that need no
network, each painting the named colours over the black background:

  - evenly: each colour spread over the whole image, as much of it as its box covers on
    average (no idea where anything goes);
  - where objects go, relation unknown: each mention's mean box occupancy over all relation scenes;
  - told the relation: each mention's mean box occupancy in the scenes of that relation,
    and the same told the reversed relation ("left of" <-> "right of", "above" <-> "below").

Told minus reversed is the most a model's `relation_gain` (train/matrix.py) at t = 1 could
show from box positions alone; compare a run's own loss at t = 1 with these three.

    python bench/relation_oracle.py [--cache runs/default/cache] [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embed.shapes import OPPOSITE, PALETTE  # noqa: E402
from store.reader import CacheReader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="runs/default/cache")
    parser.add_argument("--rows", type=int, default=512, help="the first N held-out rows (as relation_gain)")
    args = parser.parse_args()
    reader = CacheReader(args.cache)
    if reader.meta["source"]["kind"] != "shapes" or reader.meta["codec"]["kind"] != "pixel":
        raise SystemExit(f"{args.cache}: needs a shapes cache with the pixel codec")
    split = reader.column("split")
    scenes = [json.loads(t) for t in reader.dataset.to_table(columns=["truth"]).column("truth").to_pylist()]
    height, width = scenes[0]["height"], scenes[0]["width"]

    occupancy = {(rel, m): np.zeros((height, width)) for rel in OPPOSITE for m in (0, 1)}
    count = dict.fromkeys(OPPOSITE, 0)
    for scene, part in zip(scenes, split):
        if part != "train" or not scene["relations"]:
            continue
        rel = scene["relations"][0]["rel"]
        count[rel] += 1
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            occupancy[(rel, obj["mention"])][y0:y1, x0:x1] += 1
    told = {key: grid / count[key[0]] for key, grid in occupancy.items()}
    blind = {m: sum(occupancy[(rel, m)] for rel in OPPOSITE) / sum(count.values()) for m in (0, 1)}
    colour = {name: np.array(rgb) / 127.5 - 1.0 for name, rgb in PALETTE.items()}  # the pixel codec's scale

    def paint(scene: dict, maps: dict) -> np.ndarray:
        image = np.full((3, height, width), -1.0)
        for m, mention in enumerate(scene["mentions"]):
            image += maps[m][None] * (colour[mention["color"]] + 1.0)[:, None, None]
        return image

    rows = [i for i in np.flatnonzero(split == "eval")[: args.rows].tolist() if scenes[i]["relations"]]
    x0 = np.concatenate([reader.take(rows[s:s + 64])["latents"].numpy() for s in range(0, len(rows), 64)])
    losses = {}
    for label, maps_of in (
        ("evenly", lambda s: {m: np.full((height, width), blind[m].mean()) for m in (0, 1)}),
        ("where objects go, relation unknown", lambda s: blind),
        ("told the relation", lambda s: {m: told[(s["relations"][0]["rel"], m)] for m in (0, 1)}),
        ("told it reversed", lambda s: {m: told[(OPPOSITE[s["relations"][0]["rel"]], m)] for m in (0, 1)}),
    ):
        predicted = np.stack([paint(scenes[i], maps_of(scenes[i])) for i in rows])
        losses[label] = float(((x0 - predicted) ** 2).mean())
    print(f"{len(rows)} held-out relation scenes of {args.cache} ({sum(count.values())} training ones); "
          "x0 error at t = 1 of painting the named colours:")
    for label, loss in losses.items():
        print(f"  {label:36s} {loss:.4f}")
    print(f"  the relation's worth (reversed - told) {losses['told it reversed'] - losses['told the relation']:.4f}")


if __name__ == "__main__":
    main()
