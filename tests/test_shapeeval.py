"""ShapeEval judges objects: ground truth passes, fragments and wrong content fail."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

from embed.shapes import BACKGROUND, PALETTE, make_scene, render, world_spec
from sample.shapeeval import (
    CATEGORIES,
    detect_objects,
    format_table,
    positional_bias,
    score_scene,
    shapeeval,
)

WORLD = world_spec(32, 32)
SCENES = [make_scene(21, i) for i in range(600)]
IMAGES = [render(s) for s in SCENES]


def _of_kind(kind):
    return [s for s in SCENES if s["kind"] == kind]


def _fragmented(scene, rng):
    """Each object's pixels redrawn as 4x4 patches of its colour on a lattice spread over
    the image (one-pixel gaps, so patches never join): same colours, about the same counts."""
    image = render(scene)
    fragments = np.zeros_like(image)
    fragments[:] = BACKGROUND
    slots = [(x, y) for x in range(0, 29, 5) for y in range(0, 29, 5)]
    order = iter(rng.permutation(len(slots)))
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        pixels = int((image[y0:y1, x0:x1] == PALETTE[obj["color"]]).all(axis=-1).sum())
        for _ in range(-(-pixels // 16)):
            slot = next(order, None)
            if slot is None:
                break
            x, y = slots[slot]
            fragments[y : y + 4, x : x + 4] = PALETTE[obj["color"]]
    return fragments


def test_scorer_scores_ground_truth_renderings_at_least_98_percent():
    result = shapeeval(IMAGES, SCENES, WORLD)
    assert set(result["categories"]) == set(CATEGORIES)
    assert result["overall"] >= 0.98
    assert all(score >= 0.98 for score in result["categories"].values()), result


@pytest.mark.parametrize("height, width", [(20, 20), (32, 48), (64, 64)])
def test_scorer_passes_ground_truth_at_other_resolutions(height, width):
    world = world_spec(height, width)
    scenes = [make_scene(5, i, height, width) for i in range(150)]
    assert shapeeval([render(s) for s in scenes], scenes, world)["overall"] == 1.0


def test_detector_finds_each_rendered_object_with_its_colour_shape_size_and_box():
    for scene, image in zip(SCENES[:200], IMAGES[:200]):
        found = sorted((o["color"], o["shape"], o["size"], o["box"]) for o in detect_objects(image, WORLD))
        truth = sorted((o["color"], o["shape"], o["size"], o["box"]) for o in scene["objects"])
        assert found == truth


def test_fragmented_objects_are_not_objects():
    rng = np.random.default_rng(0)
    fragmented = [_fragmented(s, rng) for s in SCENES[:200]]
    assert all(not detect_objects(image, WORLD) for image in fragmented)
    assert shapeeval(fragmented, SCENES[:200], WORLD)["overall"] <= 0.1


def test_bars_and_l_shapes_are_not_shapes():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:4, 2:16] = PALETTE["red"]  # a bar: extreme aspect
    image[10:24, 10:13] = PALETTE["blue"]  # an L: square box, fill ~0.4, top-heavy
    image[10:13, 10:24] = PALETTE["blue"]
    assert all(o["shape"] is None for o in detect_objects(image, WORLD))


def test_blank_image_fails_every_scene():
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    assert not any(score_scene(blank, s, WORLD)["correct"] for s in SCENES[:100])


def test_wrong_colour_fails():
    for scene in SCENES[:200]:
        named = {m["color"] for m in scene["mentions"]}
        other = next(c for c in PALETTE if c not in named)
        recoloured = copy.deepcopy(scene)
        for obj in recoloured["objects"]:
            obj["color"] = other
        assert not score_scene(render(recoloured), scene, WORLD)["correct"]


def test_wrong_shape_fails():
    for scene in _of_kind("single"):
        reshaped = copy.deepcopy(scene)
        obj = reshaped["objects"][0]
        obj["shape"] = {"circle": "square", "square": "triangle", "triangle": "circle"}[obj["shape"]]
        verdict = score_scene(render(reshaped), scene, WORLD)
        assert not verdict["correct"] and not verdict["mentions"][0]["bound"]


def test_wrong_size_fails():
    sized = [s for s in _of_kind("single") if s["mentions"][0]["size"] is not None]
    assert sized
    for scene in sized:
        other = {"small": "large", "large": "small"}[scene["mentions"][0]["size"]]
        resized = copy.deepcopy(scene)
        resized["mentions"][0]["size"] = other
        verdict = score_scene(render(scene), resized, WORLD)
        assert verdict["mentions"][0]["size_ok"] is False and not verdict["correct"]


def test_wrong_count_fails():
    for scene in _of_kind("counting"):
        fewer = copy.deepcopy(scene)
        fewer["objects"].pop()
        assert not score_scene(render(fewer), scene, WORLD)["correct"]


def test_swapped_relation_fails():
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for scene in _of_kind("relation"):
        swapped = copy.deepcopy(scene)
        swapped["relations"][0]["rel"] = opposite[scene["relations"][0]["rel"]]
        verdict = score_scene(render(scene), swapped, WORLD)
        assert verdict["relations"] == [False] and not verdict["correct"]


def test_swapped_colours_fail_attribute_binding():
    for scene in _of_kind("attributes"):
        if len({m["shape"] for m in scene["mentions"]}) == 1:
            continue  # swapping colours between like shapes changes nothing
        swapped = copy.deepcopy(scene)
        colours = [o["color"] for o in swapped["objects"]]
        for obj, colour in zip(swapped["objects"], colours[1:] + colours[:1]):
            obj["color"] = colour
        result = shapeeval([render(swapped)], [scene], WORLD)
        assert result["categories"]["color_attribution"] == 0.0


def test_positional_bias_bins_cover_all_positions():
    bias = positional_bias(IMAGES, SCENES, WORLD)
    assert [b["range"] for b in bias["bins"]] == [[0.0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]]
    assert all(b["count"] > 0 and b["mean"] == 1.0 for b in bias["bins"])
    n_pairs = sum(len(s["mentions"]) for s in _of_kind("attributes"))
    assert sum(b["count"] for b in bias["bins"]) == n_pairs


def test_format_table_lists_every_category_and_bin():
    table = format_table(shapeeval(IMAGES, SCENES, WORLD), positional_bias(IMAGES, SCENES, WORLD))
    for name in (*CATEGORIES, "overall", "[0.75, 1.00]"):
        assert name in table


def test_scorer_rejects_an_image_of_the_wrong_size():
    with pytest.raises(ValueError, match="does not match"):
        score_scene(np.zeros((16, 16, 3), dtype=np.uint8), SCENES[0], WORLD)


def test_scorer_does_not_import_the_generator():
    source = Path(__file__).parents[1] / "sample" / "shapeeval.py"
    modules = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules.append(node.module or "")
    assert not any(name.split(".")[0] == "embed" for name in modules)
