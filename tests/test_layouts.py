"""Benchmark output layouts, built from the real prompt files in ../shared/benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sample.layouts import LayoutError, make_grid, make_layout, save_png

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
SIZE = 8  # image side in pixels

# Only the tests that read the real prompt files need them (they live beside the project).
needs_benchmarks = pytest.mark.skipif(
    not BENCHMARKS.is_dir(), reason=f"benchmark prompt files not found at {BENCHMARKS}"
)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


@needs_benchmarks
def test_geneval_folders_hold_the_source_metadata_line_and_numbered_samples(tmp_path):
    source = BENCHMARKS / "geneval" / "evaluation_metadata.jsonl"
    layout = make_layout("geneval", source, tmp_path, images_per_prompt=2)
    jobs = layout.prompts(limit=3)
    for job in jobs:
        layout.write(job, images(2))

    source_lines = source.read_text(encoding="utf-8").splitlines()[:3]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"{i:05d}/{name}" for i in range(3)
                       for name in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")]
    for index, line in enumerate(source_lines):
        metadata = (tmp_path / f"{index:05d}" / "metadata.jsonl").read_text(encoding="utf-8")
        assert metadata == line + "\n"
        assert jobs[index].prompt == json.loads(line)["prompt"]


@needs_benchmarks
def test_t2i_compbench_names_carry_the_prompt_and_a_running_counter(tmp_path):
    source = BENCHMARKS / "t2i-compbench" / "color_val.txt"
    layout = make_layout("t2i-compbench", source, tmp_path, images_per_prompt=2)
    jobs = layout.prompts(limit=3)
    for job in jobs:
        layout.write(job, images(2))

    prompts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()[:3]]
    expected = sorted(f"{prompts[n // 2]}_{n:06d}.png" for n in range(6))
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == expected
    assert sorted(name.split("_")[0] for name in names) == sorted(p for p in prompts for _ in "ab")


@needs_benchmarks
def test_dpg_bench_writes_one_2x2_grid_per_prompt_named_by_id(tmp_path):
    source = BENCHMARKS / "dpg-bench" / "prompts"
    layout = make_layout("dpg-bench", source, tmp_path)
    job = layout.prompts(limit=1)[0]
    tiles = images(4)
    (path,) = layout.write(job, tiles)

    assert path == tmp_path / "0.png" and [p.name for p in tmp_path.iterdir()] == ["0.png"]
    assert job.prompt == (source / "0.txt").read_text(encoding="utf-8").strip()
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.array_equal(grid[SIZE:, :SIZE], tiles[2])  # row-major: third tile bottom-left


def test_make_grid_places_images_row_major():
    tiles = images(6)
    grid = make_grid(tiles, rows=2, cols=3)
    assert grid.shape == (2 * SIZE, 3 * SIZE, 3)
    assert np.array_equal(grid[SIZE:, 2 * SIZE:], tiles[5])


def test_png_text_metadata_round_trips(tmp_path):
    path = tmp_path / "image.png"
    image = images(1)[0]
    save_png(path, image, {"prompt": "a red cube", "seed": 7, "settings": {"cfg": 4.0}})
    with Image.open(path) as saved:
        assert saved.text == {"prompt": "a red cube", "seed": "7", "settings": '{"cfg": 4.0}'}
        assert np.array_equal(np.asarray(saved), image)


@needs_benchmarks
def test_limit_takes_the_first_prompts_in_file_order(tmp_path):
    layout = make_layout("dpg-bench", BENCHMARKS / "dpg-bench" / "prompts", tmp_path)
    assert [job.destination.name for job in layout.prompts(limit=3)] == ["0.png", "1.png", "2.png"]


@needs_benchmarks
def test_wrong_benchmark_name_or_prompt_path_is_rejected(tmp_path):
    with pytest.raises(LayoutError, match="allowed: geneval, t2i-compbench, dpg-bench"):
        make_layout("parti", BENCHMARKS, tmp_path)
    with pytest.raises(LayoutError, match="does not exist"):
        make_layout("geneval", BENCHMARKS / "missing.jsonl", tmp_path)
    with pytest.raises(LayoutError, match="not a .jsonl file"):
        make_layout("geneval", BENCHMARKS / "t2i-compbench" / "color_val.txt", tmp_path)
    with pytest.raises(LayoutError, match="not a folder of <id>.txt"):
        make_layout("dpg-bench", BENCHMARKS / "geneval", tmp_path)


@needs_benchmarks
def test_a_job_with_the_wrong_number_of_images_is_rejected(tmp_path):
    source = BENCHMARKS / "t2i-compbench" / "color_val.txt"
    layout = make_layout("t2i-compbench", source, tmp_path, images_per_prompt=2)
    with pytest.raises(LayoutError, match="expected 2 images, got 1"):
        layout.write(layout.prompts(limit=1)[0], images(1))
