"""The shapes world: deterministic scenes whose captions are true of their renderings."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from embed.shapes import (
    BACKGROUND,
    COUNT_WORDS,
    GAP,
    KIND_PROBABILITIES,
    PALETTE,
    SHAPES,
    make_scene,
    mirror_scene,
    render,
    world_spec,
)

SCENES = [make_scene(11, i) for i in range(1000)]


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_scenes_are_deterministic_by_seed_and_index():
    assert make_scene(3, 17) == make_scene(3, 17)
    assert np.array_equal(render(make_scene(3, 17)), render(make_scene(3, 17)))
    captions = {make_scene(3, i)["caption"] for i in range(50)}
    assert len(captions) > 40
    assert [make_scene(4, i)["caption"] for i in range(20)] != [make_scene(3, i)["caption"] for i in range(20)]


def test_scenes_and_world_are_json_serialisable():
    scene = make_scene(0, 1)
    assert json.loads(json.dumps(scene)) == scene
    world = world_spec(32, 32)
    assert json.loads(json.dumps(world)) == world


def test_palette_colours_are_far_from_each_other_and_from_background():
    colours = [*PALETTE.values(), BACKGROUND]
    assert len(PALETTE) >= 6
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(colours, 2)) >= 100


def test_sizes_scale_with_image_size():
    assert world_spec(32, 32)["sizes"] == {"small": 8, "large": 14}
    assert world_spec(64, 64)["sizes"] == {"small": 16, "large": 28}
    with pytest.raises(ValueError, match="sides >= 20"):
        world_spec(16, 16)


def test_captions_cover_all_kinds_in_their_proportions():
    kinds = Counter(scene["kind"] for scene in SCENES)
    for kind, p in KIND_PROBABILITIES.items():
        assert abs(kinds[kind] / len(SCENES) - p) < 0.05, (kind, kinds)


def test_objects_do_not_overlap_and_fit_in_image():
    for scene in SCENES:
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= scene["width"] and 0 <= y0 < y1 <= scene["height"]
        for a, b in itertools.combinations([o["box"] for o in scene["objects"]], 2):
            apart = a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]
            assert apart, scene


def test_relations_are_geometrically_true():
    relations = [s for s in SCENES if s["kind"] == "relation"]
    assert {s["relations"][0]["rel"] for s in relations} == {"left of", "right of", "above", "below"}
    for scene in relations:
        rel = scene["relations"][0]
        (a,) = [o["box"] for o in scene["objects"] if o["mention"] == rel["a"]]
        (b,) = [o["box"] for o in scene["objects"] if o["mention"] == rel["b"]]
        first, second = (a, b) if rel["rel"] in ("left of", "above") else (b, a)
        axis = 0 if rel["rel"] in ("left of", "right of") else 1
        assert first[axis + 2] + GAP <= second[axis], scene  # separated along the axis
        along = _centre(second)[axis] - _centre(first)[axis]
        across = abs(_centre(second)[1 - axis] - _centre(first)[1 - axis])
        assert across <= along / 2, scene


def test_mention_words_point_at_each_mentions_phrase():
    for scene in SCENES:
        words = scene["caption"].split()
        for mention in scene["mentions"]:
            phrase = words[mention["word"] : mention["word"] + 4]
            article = COUNT_WORDS.get(mention["count"], "a")
            assert phrase[0] in (article, "an")
            assert mention["color"] in phrase
            assert any(w.startswith(mention["shape"]) for w in phrase)
            assert (mention["size"] in phrase) if mention["size"] else not {"small", "large"} & set(phrase)


def test_every_object_belongs_to_its_mention():
    for scene in SCENES:
        for m, mention in enumerate(scene["mentions"]):
            drawn = [o for o in scene["objects"] if o["mention"] == m]
            assert len(drawn) == mention["count"]
            assert all(o["color"] == mention["color"] and o["shape"] == mention["shape"] for o in drawn)
            assert mention["size"] is None or all(o["size"] == mention["size"] for o in drawn)


def test_counting_captions_write_two_to_four_objects_as_words():
    counting = [s for s in SCENES if s["kind"] == "counting"]
    assert {s["mentions"][0]["count"] for s in counting} == {2, 3, 4}
    for scene in counting:
        count = scene["mentions"][0]["count"]
        assert scene["caption"].startswith(COUNT_WORDS[count] + " ")
        assert scene["caption"].endswith("s")


def test_attribute_captions_list_distinct_colours():
    attributes = [s for s in SCENES if s["kind"] == "attributes"]
    assert {len(s["mentions"]) for s in attributes} == {2, 3, 4}
    for scene in attributes:
        colours = [m["color"] for m in scene["mentions"]]
        assert len(set(colours)) == len(colours)


def test_render_uses_only_flat_world_colours():
    allowed = {tuple(c) for c in [*PALETTE.values(), BACKGROUND]}
    for scene in SCENES[:200]:
        image = render(scene)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert {tuple(p) for p in image.reshape(-1, 3)} <= allowed


def test_each_drawn_object_fills_its_box_tightly():
    for scene in [s for s in SCENES if s["kind"] == "single"]:
        (obj,) = scene["objects"]
        ys, xs = np.nonzero((render(scene) == PALETTE[obj["color"]]).all(axis=-1))
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == obj["box"]


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_render_at_larger_resolutions(shape):
    scene = next(s for i in range(200) if (s := make_scene(5, i, 64, 64))["kind"] == "single"
                 and s["objects"][0]["shape"] == shape)
    x0, y0, x1, y1 = scene["objects"][0]["box"]
    assert x1 - x0 == world_spec(64, 64)["sizes"][scene["objects"][0]["size"]]
    assert (render(scene)[y0:y1, x0:x1] != BACKGROUND).any(axis=-1).mean() > 0.45


@pytest.mark.parametrize("axis", ["horizontal", "vertical"])
def test_a_mirrored_scene_is_true_of_its_rendering_and_turns_only_its_axiss_relations(axis):
    from sample.shapeeval import score_scene

    world = world_spec(32, 32)
    turned = {"horizontal": {"left of": "right of", "right of": "left of"},
              "vertical": {"above": "below", "below": "above"}}[axis]
    kept = changed = true = 0
    for scene in SCENES[:300]:
        mirrored = mirror_scene(scene, axis)
        image = render(mirrored)
        if axis == "horizontal":  # every shape is symmetric left to right: the same as flipping the pixels
            assert np.array_equal(image, render(scene)[:, ::-1])
        correct = score_scene(image, mirrored, world)["correct"]  # the scorer's own verdict
        true += correct
        rel = scene["relations"][0]["rel"] if scene["relations"] else None
        if rel in turned:  # the twin: same objects, the opposite word, and the old caption is false of it
            assert mirrored["relations"][0]["rel"] == turned[rel]
            assert mirrored["caption"] == scene["caption"].replace(rel.split()[0], turned[rel].split()[0])
            assert not (correct and score_scene(image, scene, world)["correct"])
            changed += 1
        else:  # every other caption is still true, word for word
            assert mirrored["caption"] == scene["caption"] and mirrored["mentions"] == scene["mentions"]
            kept += 1
    assert changed > 20 and kept > 200
    assert true >= 0.98 * 300  # as for unmirrored ground truth (tests/test_shapeeval.py)
    assert mirror_scene(mirror_scene(SCENES[5], axis), axis) == SCENES[5]
    with pytest.raises(ValueError, match="unknown mirror axis 'diagonal'"):
        mirror_scene(SCENES[5], "diagonal")
