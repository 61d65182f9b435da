"""The whole denoiser: LLM-infused Diffuser (prompt side) + LI-DiT (image side).

Both share one width `dim` and one timestep embedder (owned by LI-DiT): the refiners'
gates and the DiT's modulation see the same t_emb.

`prediction="sample"` (config `model.prediction`, flow only) makes LI-DiT's head predict the
clean image x0 and returns the velocity it implies (train/diffusion.py: velocity_from_sample):
every caller (the loss, the held-out loss, the solvers) still gets a velocity, so the loss is
JiT's "x-prediction, v-loss" (Li & He 2025).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from store.config import ModelConfig
from train.diffusion import velocity_from_sample
from train.layers import AdaLNZero, RMSNorm
from train.lidit import LIDiT
from train.refiner import LLMInfusedDiffuser


PREDICTIONS = ("velocity", "sample")


class TextToImageModel(nn.Module):
    """features of the frozen encoders + noisy latents x_t + t -> the objective's prediction.

    encoders: per frozen encoder (feature width, number of instruction tokens before the caption).
    activation_checkpointing: recompute LI-DiT's blocks in the backward pass (config
    `train.activation_checkpointing`; a way of training, so not part of `build_kwargs`).
    """

    def __init__(self, encoders: list[tuple[int, int]], in_channels: int, patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, refiner_depth: int = 2, collab_depth: int = 1,
                 fusion: str = "collaborative", gate: bool = True, causal: bool = False,
                 backend: str = "sdpa", feature_norm: str = "none", collab_condition: str = "branch",
                 mlp_conv: bool = False, rope: bool = False, prediction: str = "velocity",
                 abs_pos: bool = False, pooled_text: bool = True, pos_conv: str = "dense",
                 activation_checkpointing: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.diffuser = LLMInfusedDiffuser(encoders, dim, heads, refiner_depth, collab_depth, fusion, gate, causal,
                                           backend, feature_norm, collab_condition)
        self.dit = LIDiT(in_channels, patch, dim, depth, heads, mlp_ratio, backend=backend, mlp_conv=mlp_conv,
                         rope=rope, abs_pos=abs_pos, pooled_text=pooled_text, pos_conv=pos_conv,
                         activation_checkpointing=activation_checkpointing)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The whole model's initialisation, in one place (as DiT's `initialize_weights`).

        - Linear and Conv2d weights and biases: PyTorch's defaults (Kaiming-uniform with
          a = sqrt(5); bias uniform in +-1/sqrt(fan_in)), drawn when each layer is built.
        - Norms: weight 1, bias 0 (RMSNorm, GroupNorm; the LayerNorms have no affine).
        - Zero, so that every residual branch adds nothing and LI-DiT's head outputs exactly 0
          at init (a velocity of 0; with prediction="sample" a clean image of 0, so the model
          returns x_t / t): every AdaLNZero (LI-DiT's adaLN, the final layer's shift/scale, the
          refiners' adaptive gates, the collaborative refiner's modulation), LI-DiT's output
          Linear, and the last layer of the convolutional position ResBlock's second conv.
        The building blocks already zero their own parts (each is the identity on its own,
        which the tests check); restating it here changes no value and draws no random number.
        """
        for module in self.modules():
            if isinstance(module, AdaLNZero):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
            elif isinstance(module, (RMSNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in (self.dit.final_layer.linear, self.dit.pos_embed.last_conv):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, features: list[torch.Tensor],
                masks: list[torch.Tensor]) -> torch.Tensor:
        """x [B, C, H, W], t [B] float (0..1000), features: n x [B, L_i, in_dim_i], masks: n x [B, L_i] bool
        -> [B, C_out, H, W]."""
        features = [f.to(x.dtype) for f in features]  # the cache stores bf16; compute in x's dtype
        t_emb = self.dit.timestep_embedding(t)  # [B, D]
        cond, cond_mask = self.diffuser(features, masks, t_emb)  # [B, L, D], [B, L]
        out = self.dit(x, t, cond, cond_mask, t_emb=t_emb)  # [B, C, H, W]
        return out if self.prediction == "velocity" else velocity_from_sample(x, out, t)


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
        "feature_norm": model.feature_norm,
        "collab_condition": model.collab_condition,
        "mlp_conv": model.mlp_conv,
        "rope": model.rope,
        "prediction": model.prediction,
        "abs_pos": model.abs_pos,
        "pooled_text": model.pooled_text,
        "pos_conv": model.pos_conv,
    }
