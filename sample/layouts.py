"""Benchmark-ready output folders: prompts in, PNGs out, in each official scorer's layout.

The prompt files are read where they lie (../shared/benchmarks/, see its README); they
are never copied. The caller renders the images; a layout only says which prompts to
render, how many images each, and where they go:

- GenEval: evaluation_metadata.jsonl -> <out>/<index:05d>/metadata.jsonl (the prompt's
  line, verbatim) and <out>/<index:05d>/samples/<k:04d>.png.
- T2I-CompBench: one <category>_val.txt -> <out>/samples/{prompt}_{NNNNNN}.png, NNNNNN a
  running counter over all images (the scorer recovers the prompt with split('_')[0]).
  Use one <out> per category.
- DPG-Bench: a folder of <id>.txt -> <out>/<id>.png, one 2x2 grid of 4 images per prompt.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


class LayoutError(ValueError):
    """A benchmark name, prompt file or image batch does not fit the layout."""


@dataclass(frozen=True)
class Job:
    """One prompt to render: its text, how many images, and where they go."""

    prompt: str
    num_images: int
    index: int  # 0-based position in the prompt file (after sorting, for DPG-Bench)
    destination: Path  # GenEval: the prompt's folder; T2I-CompBench: samples/; DPG: <id>.png
    metadata_line: str = ""  # GenEval only: the prompt's JSON line, written back verbatim


def check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise LayoutError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")


def save_png(path: Path, image: np.ndarray, text_metadata: dict) -> None:
    """Write image [H, W, 3] uint8 as PNG; metadata go into tEXt chunks (non-strings as JSON)."""
    check_image(image)
    info = PngInfo()
    for key, value in text_metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.getvalue())  # a local file or an object-store URI (store/storage.py)


def make_grid(images: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """rows * cols images [H, W, 3], row-major -> one grid [rows * H, cols * W, 3]."""
    if len(images) != rows * cols:
        raise LayoutError(f"a {rows}x{cols} grid needs {rows * cols} images, got {len(images)}")
    for image in images:
        check_image(image)
    if len({image.shape for image in images}) != 1:
        raise LayoutError(f"grid images differ in size: {sorted({i.shape for i in images})}")
    grid_rows = [np.concatenate(images[r * cols:(r + 1) * cols], axis=1) for r in range(rows)]
    return np.concatenate(grid_rows, axis=0)


def read_lines(path: Path) -> list[str]:
    """Non-empty lines without surrounding whitespace (the T2I-CompBench files use CRLF)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise LayoutError(f"{path}: no prompts")
    empty = [n + 1 for n, line in enumerate(lines) if not line]
    if empty:
        raise LayoutError(f"{path}: empty line(s) {empty[:5]} among the prompts")
    return lines


class BenchmarkLayout(ABC):
    """Where one benchmark's scorer expects each prompt's images."""

    def __init__(self, prompt_path: Path, out_dir: Path, images_per_prompt: int) -> None:
        if images_per_prompt < 1:
            raise LayoutError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        self.prompt_path, self.out_dir = Path(prompt_path), Path(out_dir)
        self.images_per_prompt = images_per_prompt

    @abstractmethod
    def prompts(self, limit: int | None = None) -> list[Job]:
        """The jobs of the first `limit` prompts (all when None), in file order."""

    @abstractmethod
    def write(self, job: Job, images: list[np.ndarray], text_metadata: dict | None = None
              ) -> list[Path]:
        """Save a job's images (each [H, W, 3] uint8); returns the files written."""

    @staticmethod
    def first(items: list, limit: int | None) -> list:
        if limit is not None and limit < 1:
            raise LayoutError(f"limit must be >= 1 or None, got {limit}")
        return items[:limit]

    def check_images(self, job: Job, images: list[np.ndarray]) -> None:
        if len(images) != job.num_images:
            raise LayoutError(f"prompt {job.index}: expected {job.num_images} images, "
                              f"got {len(images)}")


class GenEvalLayout(BenchmarkLayout):
    def __init__(self, prompt_path: Path, out_dir: Path, images_per_prompt: int = 4) -> None:
        super().__init__(prompt_path, out_dir, images_per_prompt)
        if not self.prompt_path.is_file() or self.prompt_path.suffix != ".jsonl":
            raise LayoutError(f"geneval: {self.prompt_path} is not a .jsonl file "
                              "(expected evaluation_metadata.jsonl)")

    def prompts(self, limit: int | None = None) -> list[Job]:
        jobs = []
        for index, line in enumerate(self.first(read_lines(self.prompt_path), limit)):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise LayoutError(f"{self.prompt_path}:{index + 1}: not a JSON object "
                                  f"with a 'prompt' ({error})") from error
            folder = self.out_dir / f"{index:05d}"
            jobs.append(Job(prompt, self.images_per_prompt, index, folder, line))
        return jobs

    def write(self, job, images, text_metadata=None):
        self.check_images(job, images)
        job.destination.mkdir(parents=True, exist_ok=True)
        (job.destination / "metadata.jsonl").write_text(job.metadata_line + "\n", encoding="utf-8")
        paths = [job.destination / "samples" / f"{k:04d}.png" for k in range(len(images))]
        for k, (path, image) in enumerate(zip(paths, images)):
            save_png(path, image, {"prompt": job.prompt, "image": k, **(text_metadata or {})})
        return paths


class T2ICompBenchLayout(BenchmarkLayout):
    def __init__(self, prompt_path: Path, out_dir: Path, images_per_prompt: int = 10) -> None:
        super().__init__(prompt_path, out_dir, images_per_prompt)
        if not self.prompt_path.is_file() or self.prompt_path.suffix != ".txt":
            raise LayoutError(f"t2i-compbench: {self.prompt_path} is not a .txt file "
                              "(expected one <category>_val.txt)")

    def prompts(self, limit: int | None = None) -> list[Job]:
        jobs = []
        for index, prompt in enumerate(self.first(read_lines(self.prompt_path), limit)):
            # The scorer splits file names on '_'; a path separator would make a folder.
            if "_" in prompt or "/" in prompt:
                raise LayoutError(f"{self.prompt_path}:{index + 1}: prompt contains '_' or '/',"
                                  f" which the file name cannot carry: {prompt!r}")
            jobs.append(Job(prompt, self.images_per_prompt, index, self.out_dir / "samples"))
        return jobs

    def write(self, job, images, text_metadata=None):
        self.check_images(job, images)
        first = job.index * self.images_per_prompt  # running counter over all images
        paths = [job.destination / f"{job.prompt}_{first + k:06d}.png"
                 for k in range(len(images))]
        for k, (path, image) in enumerate(zip(paths, images)):
            save_png(path, image, {"prompt": job.prompt, "image": k, **(text_metadata or {})})
        return paths


def numeric_first(path: Path) -> tuple:
    """Sort key: numeric ids in number order (0, 1, 2, 10), then the others by name."""
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


class DPGBenchLayout(BenchmarkLayout):
    GRID = (2, 2)  # the scorer cuts each <id>.png into 4 images

    def __init__(self, prompt_path: Path, out_dir: Path, images_per_prompt: int = 4) -> None:
        if images_per_prompt != 4:
            raise LayoutError(f"dpg-bench: images_per_prompt must be 4 (a 2x2 grid), "
                              f"got {images_per_prompt}")
        super().__init__(prompt_path, out_dir, images_per_prompt)
        if not self.prompt_path.is_dir() or not any(self.prompt_path.glob("*.txt")):
            raise LayoutError(f"dpg-bench: {self.prompt_path} is not a folder of <id>.txt "
                              "prompts (expected dpg-bench/prompts)")

    def prompts(self, limit: int | None = None) -> list[Job]:
        files = self.first(sorted(self.prompt_path.glob("*.txt"), key=numeric_first), limit)
        jobs = []
        for index, path in enumerate(files):
            prompt = path.read_text(encoding="utf-8").strip()
            if not prompt:
                raise LayoutError(f"{path}: empty prompt")
            jobs.append(Job(prompt, 4, index, self.out_dir / f"{path.stem}.png"))
        return jobs

    def write(self, job, images, text_metadata=None):
        self.check_images(job, images)
        save_png(job.destination, make_grid(images, *self.GRID),
                 {"prompt": job.prompt, **(text_metadata or {})})
        return [job.destination]


LAYOUTS = {"geneval": GenEvalLayout, "t2i-compbench": T2ICompBenchLayout,
           "dpg-bench": DPGBenchLayout}


def make_layout(name: str, prompt_path: str | Path, out_dir: str | Path,
                images_per_prompt: int | None = None) -> BenchmarkLayout:
    """The layout for a benchmark name; images_per_prompt defaults to the benchmark's usual."""
    if name not in LAYOUTS:
        raise LayoutError(f"benchmark={name!r}; allowed: {', '.join(LAYOUTS)}")
    if not Path(prompt_path).exists():
        raise LayoutError(f"{name}: prompt path {prompt_path} does not exist")
    if images_per_prompt is None:
        return LAYOUTS[name](Path(prompt_path), Path(out_dir))
    return LAYOUTS[name](Path(prompt_path), Path(out_dir), images_per_prompt)
