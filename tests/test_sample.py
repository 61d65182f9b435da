"""Sampling: online prompt features, seeded generation, the CLI's files, ShapeEval references."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sample.__main__ import main as sample_main
from sample.eval import FAILURES, failure_reasons, held_out_rows, run_eval
from sample.generate import generate
from sample.shapeeval import shapeeval
from sample.text import PromptFeatures
from store.config import Config, build, validate
from store.reader import CacheReader
from train.export import export, load_exported
from train.module import LIDiTModule

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
SETTINGS = {"steps": 2, "cfg_scale": 3.0, "solver": "heun", "seed": 7, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def run_config(tiny_cache, tmp_path_factory) -> Path:
    """A config file for a run of its own on the session's tiny cache, with exported weights.

    The weights are random, not trained: at initialisation the zeroed gates and adaLN
    outputs make the prediction ignore the prompt, which would hide what these tests check.
    """
    raw = copy.deepcopy(tiny_cache)
    raw["cache_dir"] = f"{tiny_cache['run_dir']}/cache"
    raw["run_dir"] = str(tmp_path_factory.mktemp("sample") / "run")
    config = build(Config, raw, "")
    validate(config)
    reader = CacheReader(config.cache_path)
    torch.manual_seed(0)
    module = LIDiTModule(config.to_dict(), reader.meta)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    module.ema.load_state_dict(module.model.state_dict())
    export(module, reader, config.run_path / "checkpoints", step=0)
    path = config.run_path.parent / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def exported(run_config):
    config = build(Config, yaml.safe_load(run_config.read_text()), "")
    return load_exported(config.run_path / "checkpoints")


def test_online_prompt_features_equal_cached_features_for_the_same_caption(tiny_cache, exported):
    reader = CacheReader(f"{tiny_cache['run_dir']}/cache")
    rows = [0, 5, 17]
    cached = reader.take(rows, with_latents=False)
    text = PromptFeatures(exported.encoders, exported.prefix, exported.null)
    online = text.encode(cached["captions"])
    for name, features in zip(text.names, online):
        stored = cached["text"][name]
        assert features.prefix_len == stored.prefix_len
        assert torch.equal(features.mask, stored.mask)
        torch.testing.assert_close(features.states.float(), stored.states.float(), rtol=2**-7, atol=1e-5)


def test_sampling_is_deterministic_per_seed_and_independent_of_batch_size(exported):
    prompts = ["a red circle", "a large green square to the left of a small blue triangle", "two purple circles"]
    alone = generate(exported, prompts, **SETTINGS, batch_size=1, progress=False)
    together = generate(exported, prompts, **SETTINGS, batch_size=3, progress=False)
    assert alone.shape == (3, 32, 32, 3) and alone.dtype == np.uint8
    # Padding to the batch's longest prompt may move a float by an ulp, a pixel by one level.
    assert np.abs(alone.astype(int) - together.astype(int)).max() <= 1
    last = generate(exported, prompts[2:], **SETTINGS, batch_size=1, first_index=2, progress=False)
    assert np.array_equal(last[0], alone[2])
    reseeded = generate(exported, prompts, **{**SETTINGS, "seed": 8}, batch_size=3, progress=False)
    assert np.abs(reseeded.astype(int) - together.astype(int)).mean() > 5


def test_unconditional_only_ignores_the_prompt(exported):
    prompts = ["a red circle", "two purple circles above three orange squares"]
    same_seed = {**SETTINGS, "batch_size": 1}
    floor = [generate(exported, [p], **same_seed, unconditional_only=True, progress=False) for p in prompts]
    assert np.array_equal(floor[0], floor[1])
    guided = [generate(exported, [p], **same_seed, progress=False) for p in prompts]
    assert not np.array_equal(guided[0], guided[1]), "the prompt must matter when conditioned"


def test_guidance_outside_its_interval_is_the_conditional_prediction(exported):
    """sample.cfg_interval: Heun's 2 steps call the network at t = 1 and 0.5. An interval that
    holds neither time samples as CFG 1 does (the conditional prediction, here from a B-row call);
    one that holds t = 1 only guides that call, so its images are neither."""
    prompts = ["a red circle", "two purple circles above three orange squares"]
    unguided = generate(exported, prompts, **{**SETTINGS, "cfg_scale": 1.0}, batch_size=2, progress=False)
    never = generate(exported, prompts, **SETTINGS, cfg_interval=(0.0, 0.4), batch_size=2, progress=False)
    assert np.abs(never.astype(int) - unguided.astype(int)).max() <= 1  # a B-row call may move a float by an ulp
    guided = generate(exported, prompts, **SETTINGS, batch_size=2, progress=False)
    first_only = generate(exported, prompts, **SETTINGS, cfg_interval=(0.9, 1.0), batch_size=2, progress=False)
    assert np.abs(first_only.astype(int) - guided.astype(int)).mean() > 1
    assert np.abs(first_only.astype(int) - unguided.astype(int)).mean() > 1


def test_sample_cli_writes_pngs_with_metadata_and_a_grid(run_config, tmp_path):
    out = tmp_path / "samples"
    code = sample_main(["--config", str(run_config), "--out", str(out), "--prompt", "a red circle",
                        "--prompt", "a blue square", "--images-per-prompt", "2", "--steps", "2", "--seed", "3",
                        "--device", "cpu"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    first = Image.open(out / "0002.png")
    assert first.size == (32, 32)
    assert first.text["prompt"] == "a blue square"
    assert first.text["seed"] == "3" and first.text["index"] == "2"
    assert json.loads(first.text["settings"])["steps"] == 2
    assert Image.open(out / "grid.png").size == (64, 64)  # 2 prompts x 2 images


def test_sample_cli_refuses_a_size_the_patches_do_not_tile(run_config, tmp_path, capsys):
    code = sample_main(["--config", str(run_config), "--out", str(tmp_path), "--height", "36", "--device", "cpu"])
    assert code == 2
    assert "multiples of patch (8)" in capsys.readouterr().err


@pytest.mark.skipif(not (BENCHMARKS / "geneval").is_dir(), reason=f"no benchmark prompts at {BENCHMARKS}")
def test_geneval_layout_from_the_real_prompt_file(run_config, tmp_path):
    source = BENCHMARKS / "geneval" / "evaluation_metadata.jsonl"
    code = sample_main(["--config", str(run_config), "--geneval", str(source), "--out", str(tmp_path),
                        "--limit", "2", "--images-per-prompt", "2", "--steps", "2", "--device", "cpu"])
    assert code == 0
    lines = source.read_text(encoding="utf-8").splitlines()[:2]
    for index, line in enumerate(lines):
        folder = tmp_path / f"{index:05d}"
        assert (folder / "metadata.jsonl").read_text(encoding="utf-8") == line + "\n"
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        image = Image.open(folder / "samples" / "0001.png")
        assert image.text["prompt"] == json.loads(line)["prompt"]
        assert image.text["first_index"] == str(2 * index)


def test_eval_scores_model_floor_and_ceiling_and_the_ceiling_is_perfect(run_config, tmp_path):
    config = build(Config, yaml.safe_load(run_config.read_text()), "")
    result = run_eval(config, out=tmp_path, limit=6, progress=False)
    assert result["scores"]["ceiling"]["overall"] == 1.0  # the renderings themselves
    for name in ("model", "floor"):  # an 8-step model need not beat its floor; both are scored
        assert 0.0 <= result["scores"][name]["overall"] <= 1.0
    assert set(json.loads((tmp_path / "shapeeval.json").read_text())) >= {"model", "floor", "ceiling"}
    for name in ("table.txt", "positional_bias.json", "positional_bias.png", "grid.png", "grid_captions.txt"):
        assert (tmp_path / name).is_file(), name
    assert len((tmp_path / "grid_captions.txt").read_text().splitlines()) == 6
    failures = json.loads((tmp_path / "failures.json").read_text())
    assert sum(entry["images"] for entry in failures.values()) == 6
    with np.load(tmp_path / "images.npz", allow_pickle=False) as saved:  # re-scorable without sampling
        assert saved["images"].shape == (6, 32, 32, 3) and len(saved["captions"]) == 6
        scenes = [json.loads(t) for t in saved["truth"]]
        rescored = shapeeval(saved["images"], scenes, json.loads(str(saved["world"])))
    reader = CacheReader(config.cache_path)
    assert scenes == held_out_rows(reader, load_exported(config.run_path / "checkpoints"), 6)[2]
    assert rescored["overall"] == result["scores"]["model"]["overall"]


def test_eval_reads_the_cached_text_and_loads_no_llm(run_config, tmp_path, monkeypatch):
    # A training node may hold the cache and the weights but not the LLMs (the GPU run of
    # docs/RESULTS.md, session 7): eval must not build a prompt encoder.
    import sample.text

    def refuse(record, device):
        raise AssertionError(f"eval loaded the prompt encoder {record['name']}")

    monkeypatch.setattr(sample.text, "encoder_from_record", refuse)
    config = build(Config, yaml.safe_load(run_config.read_text()), "")
    result = run_eval(config, out=tmp_path, limit=4, progress=False, references=("model",))
    assert result["rows"] == 4 and 0.0 <= result["scores"]["model"]["overall"] <= 1.0


def test_failure_reasons_name_what_broke_each_image():
    from embed.shapes import make_scene, render, world_spec

    world = world_spec(32, 32)
    scenes = [make_scene(3, i) for i in range(300)]
    truth = failure_reasons([render(s) for s in scenes], scenes, world)
    assert all(entry["failed"] == 0 for entry in truth.values())  # the renderings pass
    blank = np.zeros((32, 32, 3), np.uint8)
    empty = failure_reasons([blank] * len(scenes), scenes, world)
    assert all(entry["failed"] == entry["images"] == entry["reasons"]["no such colour"] for entry in empty.values())
    # Two objects of different shapes drawn with their shapes swapped: each colour carries the
    # other mention's shape; a single object redrawn as another shape has a wrong shape
    pairs = [s for s in scenes if s["kind"] == "two_objects" and s["mentions"][0]["shape"] != s["mentions"][1]["shape"]]
    swapped = [{**s, "objects": [{**o, "shape": s["objects"][1 - i]["shape"]} for i, o in enumerate(s["objects"])]}
               for s in pairs]
    assert failure_reasons([render(s) for s in swapped], pairs, world)["two_objects"]["reasons"] == {
        **dict.fromkeys(FAILURES, 0), "another mention's shape": len(pairs)}
    singles = [s for s in scenes if s["kind"] == "single"]
    reshaped = [{**s, "objects": [{**o, "shape": "square" if o["shape"] != "square" else "circle"} for o in s["objects"]]}
                for s in singles]
    single = failure_reasons([render(s) for s in reshaped], singles, world)["single_object"]
    assert single["reasons"]["wrong shape"] == single["failed"] == len(singles)
    # Mirrored left-right, "left of" becomes "right of" and vertical relations still hold
    horizontal = [s for s in scenes if s["kind"] == "relation" and s["relations"][0]["rel"] in ("left of", "right of")]
    vertical = [s for s in scenes if s["kind"] == "relation" and s["relations"][0]["rel"] in ("above", "below")]
    mirrored = failure_reasons([render(s)[:, ::-1] for s in horizontal + vertical], horizontal + vertical, world)
    position = mirrored["position"]
    assert position["reasons"]["relation reversed"] == len(horizontal) > 0
    assert position["failed"] == len(horizontal)  # triangles point up: mirroring keeps every shape
    # Transposed, a horizontal relation becomes a vertical one
    transposed = failure_reasons([render(s).transpose(1, 0, 2) for s in horizontal], horizontal, world)
    assert transposed["position"]["reasons"]["relation other axis"] > 0
    assert sum(transposed["position"]["reasons"].values()) == transposed["position"]["failed"]
    assert set(transposed["position"]["reasons"]) == set(FAILURES)


def test_every_sampling_precision_runs_on_any_cpu_and_stays_near_fp32(exported):
    """sample.precision is picked by the hardware under auto; each value is run here by name."""
    prompts = ["a red circle", "two purple circles"]
    images = {p: generate(exported, prompts, **SETTINGS, batch_size=2, progress=False, precision=p)
              for p in ("fp32", "bf16", "fp16")}
    for precision, found in images.items():
        assert found.shape == (2, 32, 32, 3) and found.dtype == np.uint8, precision
        if precision != "fp32":  # the same images up to the autocast's rounding
            assert np.abs(found.astype(int) - images["fp32"].astype(int)).mean() < 3, precision
