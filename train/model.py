"""The whole denoiser: LLM-infused Diffuser (prompt side) + LI-DiT (image side).

Both share one width `dim` and one timestep embedder (owned by LI-DiT): the refiners'
gates and the DiT's modulation see the same t_emb.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from store.config import ModelConfig
from train.lidit import LIDiT
from train.refiner import LLMInfusedDiffuser


class TextToImageModel(nn.Module):
    """features of the frozen encoders + noisy latents x_t + t -> the objective's prediction.

    encoders: per frozen encoder (feature width, number of instruction tokens before the caption).
    """

    def __init__(self, encoders: list[tuple[int, int]], in_channels: int, patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, refiner_depth: int = 2, collab_depth: int = 1,
                 fusion: str = "collaborative", gate: bool = True, causal: bool = False,
                 learn_sigma: bool = False, backend: str = "sdpa"):
        super().__init__()
        self.diffuser = LLMInfusedDiffuser(encoders, dim, heads, refiner_depth, collab_depth, fusion, gate, causal)
        self.dit = LIDiT(in_channels, patch, dim, depth, heads, mlp_ratio, learn_sigma=learn_sigma, backend=backend)

    def forward(self, x: torch.Tensor, t: torch.Tensor, features: list[torch.Tensor],
                masks: list[torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W], t [B] float (0..1000), features: n x [B, L_i, in_dim_i], masks: n x [B, L_i] bool
        -> [B, C_out, H, W]."""
        features = [f.to(x.dtype) for f in features]  # the cache stores bf16; compute in x's dtype
        t_emb = self.dit.timestep_embedding(t)  # [B, D]
        cond, cond_mask = self.diffuser(features, masks, t_emb)  # [B, L, D], [B, L]
        return self.dit(x, t, cond, cond_mask, t_emb=t_emb)


def count_parameters(build_kwargs: dict) -> int:
    """Parameters of TextToImageModel(**build_kwargs), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TextToImageModel(**build_kwargs)
    return sum(p.numel() for p in model.parameters())


def build_kwargs(model: ModelConfig, encoders: list[dict], codec: dict) -> dict:
    """TextToImageModel arguments from the model config and the cache's metadata.

    `encoders` are the cache's encoder records (hidden_size, prefix_len) in the order the
    model consumes them; `codec` gives the latent channels.
    """
    return {
        "encoders": [(e["hidden_size"], e["prefix_len"]) for e in encoders],
        "in_channels": codec["channels"],
        "patch": model.patch,
        "dim": model.dim,
        "depth": model.depth,
        "heads": model.heads,
        "mlp_ratio": model.mlp_ratio,
        "refiner_depth": model.refiner_depth,
        "collab_depth": model.collab_depth,
        "fusion": model.fusion,
        "gate": model.gate,
        "causal": model.causal_refiner,
        "backend": model.attention_backend,
    }
