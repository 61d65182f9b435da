"""Image codecs: pixels <-> latents, and aspect-ratio buckets.

- `PixelCodec` (default): lossless; pixels scaled to [-1, 1] and laid out as a [3, H, W]
  latent. No weights, so the embedded default runs anywhere.
- `VAECodec`: a diffusers `AutoencoderKL` from a local folder (the paper's kind: 16
  channels, 8x down), with its scaling and shift factors recorded in the cache.

Images go to the bucket nearest their aspect ratio and are resized to cover it and
centre-cropped (RAPHAEL-style bucketing, PAPER.md "multi-scale training").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from store.config import CodecConfig


class CodecError(ValueError):
    """The codec cannot be built as configured."""


def assign_bucket(height: int, width: int, buckets: list[list[int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space) to the image's."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: list[int]) -> np.ndarray:
    """Resize to cover (h, w), then centre-crop: uint8 [h, w, 3]."""
    h, w = bucket
    scale = max(h / image.height, w / image.width)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.convert("RGB")
    if size != (image.width, image.height):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.uint8)


class PixelCodec:
    """Lossless: uint8 [B, H, W, 3] <-> float [B, 3, H, W] in [-1, 1] (exact in float16)."""

    channels = 3
    downsample = 1

    def encode(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0  # [B, 3, H, W]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = ((latents.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]

    def identity(self) -> dict:
        return {"kind": "pixel", "channels": 3, "downsample": 1, "scale": "x / 127.5 - 1"}


class VAECodec:
    """diffusers AutoencoderKL: latent = (mean(encode(x)) - shift) * scale."""

    def __init__(self, path: str, device: str = "cpu"):
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise CodecError("codec.kind 'vae' needs diffusers: pip install -e '.[vae]'") from err
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise CodecError(f"codec.path {folder} is not a diffusers AutoencoderKL folder (no config.json)")
        self.path = folder
        self.device = torch.device(device)
        self.vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
        config = self.vae.config
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        x = PixelCodec().encode(images).to(self.device)  # [B, 3, H, W] in [-1, 1]
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean - self.shift) * self.scale).float().cpu()  # [B, C, H/8, W/8]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents.to(self.device) / self.scale + self.shift).sample
        return PixelCodec().decode(x)

    def identity(self) -> dict:
        from embed.encoder import content_hash

        return {"kind": "vae", "path": str(self.path), "model_hash": content_hash(self.path),
                "channels": self.channels, "downsample": self.downsample,
                "scaling_factor": self.scale, "shift_factor": self.shift}


def make_codec(config: CodecConfig, device: str = "cpu"):
    if config.kind == "pixel":
        return PixelCodec()
    return VAECodec(config.path, device=device)
