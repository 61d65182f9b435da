"""LI-DiT: a DiT with cross-attention to the text condition, QK-norm and a conv position embedding.

Data flow: latents [B, C, H, W] -> PatchEmbed -> ConvPositionEmbedding (a ResBlock on the
token grid, no position table, so any H, W divisible by the patch works) -> LIDiTBlocks
(self-attention, cross-attention to the text, FFN, all adaLN-modulated by timestep + pooled
text) -> FinalLayer -> unpatchify.

`rope=True` (config `model.rope`, not in the paper) adds a 2-D rotary embedding to the
self-attention's queries and keys: attention then knows the relative offset of two tokens,
which the convolutions alone give only within their few-token receptive field.
`abs_pos=True` (config `model.abs_pos`, not in the paper; DiT's own position signal) adds a
fixed sine-cosine table of each token's place in the image to the tokens before the blocks:
every token then knows where it is, not only tokens within the convolutions' reach of a border.
`pooled_text=False` (config `model.pooled_text`, an ablation; the paper has the pooled text)
modulates with the timestep alone: the text then reaches the image tokens only through the
cross-attention, where each token picks its own words, instead of also through one mean of the
caption added to every token's scale and shift.
`pos_conv="separable"` (config `model.pos_conv`, not in the paper) makes each of the position
ResBlock's two 3x3 convolutions depthwise-separable: about a ninth of their multiply-adds, which
in the default model are 16% of the forward pass.
`activation_checkpointing=True` (config `train.activation_checkpointing`) runs each block under
`torch.utils.checkpoint` while training: the forward keeps only the blocks' inputs and the
backward recomputes one block at a time, the same values for one more forward of the blocks
(train/plan.py counts the bytes).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from train.layers import (AdaLNZero, Attention, Mlp, TimestepEmbedder, masked_mean, modulate, rope_2d,
                          rope_quarter, sincos_2d)

#################################################################################
#                       Patchify and position embedding                          #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping patches: [B, C, H, W] -> token grid [B, D, H/p, W/p]."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {self.patch}")
        return self.proj(x)  # [B, D, h, w]


class ConvPositionEmbedding(nn.Module):
    """A convolutional ResBlock on the token grid: position from the convolutions' zero padding.

    x + conv(SiLU(GN(conv(SiLU(GN(x)))))). No position table, so the same weights serve every
    resolution and aspect ratio. The second conv is zero-initialised (as ADM's ResBlocks), so
    the block starts as the identity and learns how much position to add.

    conv="dense" (the paper's): each conv a full 3x3, 9 D^2 multiply-adds a token. "separable"
    (config `model.pos_conv`, not in the paper): each a depthwise 3x3 then a pointwise 1x1
    (MobileNet's), D^2 + 9 D a token, about a ninth; the same 2-token reach from a border.
    """

    def __init__(self, dim: int, conv: str = "dense"):
        super().__init__()
        if conv not in POS_CONVS:
            raise ValueError(f"conv={conv!r}; allowed: {', '.join(POS_CONVS)}")
        groups = math.gcd(32, dim)  # 32 groups, or the largest power of two below that divides dim
        self.norm1 = nn.GroupNorm(groups, dim, eps=1e-6)
        self.conv1 = _grid_conv(dim, conv)
        self.norm2 = nn.GroupNorm(groups, dim, eps=1e-6)
        self.conv2 = _grid_conv(dim, conv)
        self.act = nn.SiLU()
        nn.init.zeros_(self.last_conv.weight)
        nn.init.zeros_(self.last_conv.bias)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The layer that writes the residual branch, zero at init."""
        return self.conv2[-1] if isinstance(self.conv2, nn.Sequential) else self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # [B, D, h, w]
        h = self.conv2(self.act(self.norm2(h)))  # [B, D, h, w]
        return x + h


POS_CONVS = ("dense", "separable")


def _grid_conv(dim: int, conv: str) -> nn.Module:
    """A 3x3 convolution on the token grid, [B, D, h, w] -> [B, D, h, w]: dense or depthwise-separable."""
    if conv == "dense":
        return nn.Conv2d(dim, dim, kernel_size=3, padding=1)
    return nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim), nn.Conv2d(dim, dim, kernel_size=1))


#################################################################################
#                                 LI-DiT blocks                                 #
#################################################################################

class LIDiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, FFN; adaLN-Zero from c (9 vectors).

    Each sub-layer: x + gate * sublayer(modulate(norm(x), shift, scale)). The adaLN Linear is
    zero-initialised, so every gate starts at 0 and the block is the identity at init.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, backend: str = "sdpa", mlp_conv: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, heads, backend=backend)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio, conv=mlp_conv)
        self.adaLN = AdaLNZero(dim, 9)

    def forward(self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                hw: tuple[int, int] | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """x [B, N, D], c [B, D], cond [B, L, Dt], cond_mask [B, L] -> [B, N, D]; hw: the token grid;
        rope: the grid's rotary embedding for the self-attention, or None."""
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN(c)  # [B, D] each
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa), rope=rope)
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), shift_ca, scale_ca),
                                                       context=cond, key_mask=cond_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp), hw)
        return x


class FinalLayer(nn.Module):
    """adaLN shift/scale + Linear to patch * patch * out_channels; all zero-initialised."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = AdaLNZero(dim, 2)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        nn.init.zeros_(self.linear.weight)  # the network predicts exactly 0 at init
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c)  # [B, D] each
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p * p * C_out]


#################################################################################
#                                    LI-DiT                                     #
#################################################################################

class LIDiT(nn.Module):
    """Diffusion transformer conditioned on a text token sequence (the LLM-infused Diffuser's output).

    The condition tokens are `dim` wide (the refiners' output). The modulation input is
    c = t_emb + Linear(masked_mean(cond)): timestep and pooled text, as in the paper
    (pooled_text=False: c = t_emb).
    Owns the TimestepEmbedder; `timestep_embedding(t)` lends it to the refiners.
    """

    def __init__(self, in_channels: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 backend: str = "sdpa", mlp_conv: bool = False, rope: bool = False,
                 abs_pos: bool = False, pooled_text: bool = True, pos_conv: str = "dense",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if rope:
            rope_quarter(dim // heads)  # refuse a head width the rotary embedding cannot split, at build time
        if abs_pos:
            sincos_2d(1, 1, dim)  # and a width the sine-cosine table cannot split
        self.rope = rope
        self.abs_pos = abs_pos
        self.head_dim = dim // heads
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch = patch
        self.x_embedder = PatchEmbed(in_channels, dim, patch)
        self.pos_embed = ConvPositionEmbedding(dim, pos_conv)
        self.t_embedder = TimestepEmbedder(dim)
        self.text_pool = nn.Linear(dim, dim) if pooled_text else None
        self.blocks = nn.ModuleList([
            LIDiTBlock(dim, heads, mlp_ratio, backend=backend, mlp_conv=mlp_conv)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(dim, patch, self.out_channels)

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] float (0..1000) -> [B, D]."""
        return self.t_embedder(t)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h * w, p * p * C] -> [B, C, h * p, w * p]."""
        p, C = self.patch, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor,
                t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] float, cond [B, L, Dt], cond_mask [B, L] -> [B, C_out, H, W].

        t_emb: timestep_embedding(t) if the caller already computed it (the refiners use it too).
        """
        x = self.pos_embed(self.x_embedder(x))  # [B, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, N = h * w, D]
        if self.abs_pos:
            x = x + sincos_2d(h, w, x.shape[-1], device=x.device).to(x.dtype)  # [N, D], broadcast over B
        if t_emb is None:
            t_emb = self.timestep_embedding(t)  # [B, D]
        c = t_emb  # [B, D]
        if self.text_pool is not None:
            c = c + self.text_pool(masked_mean(cond, cond_mask))
        rope = rope_2d(h, w, self.head_dim, device=x.device) if self.rope else None  # 2 x [N, Dh]
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:  # keep the block's inputs only; its activations are recomputed in backward
                x = checkpoint(block, x, c, cond, cond_mask, (h, w), rope, use_reentrant=False)  # [B, N, D]
            else:
                x = block(x, c, cond, cond_mask, (h, w), rope)  # [B, N, D]
        x = self.final_layer(x, c)  # [B, N, p * p * C_out]
        return self.unpatchify(x, h, w)  # [B, C_out, H, W]
