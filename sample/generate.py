"""Prompts to images: online prompt features, seeded noise, a guided ODE solve, the decoder.

    prompts -> PromptFeatures (cond) + null text (uncond) -> one doubled batch per encoder
    noise (seed + index) -> solver over classifier_free_guidance(model) -> codec.decode

Image i of a call starts from noise drawn on the CPU by
`torch.Generator().manual_seed(seed + first_index + i)`, so an image depends only on its
prompt, the seed and its index: not on the batch it shared, the batch size or the device.

`unconditional_only` gives both halves of the doubled batch the unconditional text: the
images of a model that ignores its prompt, with the same noise (the floor reference).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from embed.codecs import make_codec
from sample.layouts import make_grid
from sample.solvers import SOLVERS, classifier_free_guidance, sample
from sample.text import PromptFeatures, doubled_batch
from store.config import Config
from store.hardware import detect, sample_precision


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # sample.precision, "auto" resolved


class SampleError(ValueError):
    """A sampling request the exported model cannot serve (size, solver, codec)."""


def resolve_precision(requested: str, device: str | torch.device) -> str:
    """sample.precision with "auto" resolved for `device`: "bf16", "fp16" or "fp32"."""
    return sample_precision(requested, detect(str(device)))


def default_size(config: Config) -> tuple[int, int]:
    """(height, width): sample.height/width, else the first codec bucket."""
    bucket = config.codec.buckets[0]
    return config.sample.height or bucket[0], config.sample.width or bucket[1]


def check_request(exported, solver: str, height: int, width: int) -> None:
    """Refuse a solver that does not fit the objective, or a size the patches do not tile."""
    objective = exported.objective.name
    if solver not in SOLVERS[objective]:
        raise SampleError(f"solver {solver!r} does not fit the model's objective {objective!r}; "
                          f"allowed: {', '.join(SOLVERS[objective])}")
    unit = exported.config.model.patch * exported.cache_meta["codec"]["downsample"]
    if height < unit or width < unit or height % unit or width % unit:
        raise SampleError(f"height x width {height}x{width}: both must be positive multiples of "
                          f"patch ({exported.config.model.patch}) x codec downsample "
                          f"({exported.cache_meta['codec']['downsample']}) = {unit}")


def latent_shape(exported, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent the codec decodes to height x width pixels."""
    codec = exported.cache_meta["codec"]
    return codec["channels"], height // codec["downsample"], width // codec["downsample"]


def initial_noise(shape: tuple[int, ...], seed: int, indices: range) -> torch.Tensor:
    """[len(indices), *shape] standard normal; row i is drawn from seed + indices[i] alone."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


def load_codec(exported, device: str | torch.device = "cpu"):
    """The codec of the config, checked against the one the cache was built with."""
    codec = make_codec(exported.config.codec, device=str(device))
    cached = exported.cache_meta["codec"]
    if (codec.channels, codec.downsample) != (cached["channels"], cached["downsample"]):
        raise SampleError(f"codec {exported.config.codec.kind!r} gives {codec.channels} channels at "
                          f"{codec.downsample}x down, but the model was trained on latents with "
                          f"{cached['channels']} channels at {cached['downsample']}x down")
    return codec


def generate(exported, prompts: list[str], *, steps: int, cfg_scale: float, solver: str, seed: int,
             height: int, width: int, batch_size: int, cfg_interval: tuple[float, float] = (0.0, 1.0),
             unconditional_only: bool = False,
             progress: bool = True, first_index: int = 0, text: PromptFeatures | None = None,
             codec=None, precision: str = "fp32") -> np.ndarray:
    """Images for `prompts`: uint8 [N, height, width, 3].

    `first_index` numbers the first image (its noise seed is seed + first_index), so a long
    job can run in calls. `text` and `codec` are built from `exported` when None; pass them
    to reuse the loaded encoders and decoder across calls.
    """
    check_request(exported, solver, height, width)
    if batch_size < 1:
        raise SampleError(f"batch_size must be >= 1, got {batch_size}")
    model = exported.model
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    if text is None:
        text = PromptFeatures(exported.encoders, exported.prefix, exported.null, device=str(device),
                              load_encoders=not unconditional_only)
    codec = codec or load_codec(exported, device)
    shape = latent_shape(exported, height, width)
    images = []
    bar = tqdm(total=len(prompts), unit="image", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            uncond = text.null(len(chunk))
            cond = uncond if unconditional_only else text.encode(chunk)
            doubled = [doubled_batch(c, u) for c, u in zip(cond, uncond)]
            states = [f.states.to(device) for f in doubled]  # n x [2B, L_i, D_i]
            masks = [f.mask.to(device) for f in doubled]  # n x [2B, L_i] bool

            def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                rows = x.shape[0]  # 2B guided; B, the conditional rows alone, outside cfg_interval
                with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.float32),
                                    enabled=precision in AUTOCAST):
                    return model(x, t, [s[:rows] for s in states], [m[:rows] for m in masks]).float()  # fp32

            first = first_index + start
            noise = initial_noise(shape, seed, range(first, first + len(chunk))).to(device)  # [B, C, h, w]
            guided = classifier_free_guidance(denoiser, cfg_scale, tuple(cfg_interval))
            latents = sample(exported.objective.name, solver, guided, exported.objective, noise, steps)
            images.append(codec.decode(latents))  # [B, H, W, 3] uint8
            bar.update(len(chunk))
    bar.close()
    return np.concatenate(images) if images else np.zeros((0, height, width, 3), np.uint8)


def image_grid(images, cols: int) -> np.ndarray:
    """Images [H, W, 3] in rows of `cols` (row-major); the last row is filled with black."""
    images = list(images)
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    blank = np.zeros_like(images[0])
    return make_grid(images + [blank] * (rows * cols - len(images)), rows, cols)
