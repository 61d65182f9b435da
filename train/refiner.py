"""The LLM-infused Diffuser: frozen-LLM features -> the text condition of LI-DiT.

Per encoder a LanguageTokenRefiner (bidirectional self-attention + FFN, adaptively gated by
timestep + pooled text), then a CollaborativeRefiner (each encoder's branch cross-attends to
the other encoders' tokens), then the instruction tokens are dropped and the branches are
concatenated along the token axis (PAPER.md, "The LLM-infused Diffuser").

Sequences are right-padded; masks are bool [B, L] with True = a real token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from train.layers import AdaLNZero, Attention, Mlp, RMSNorm, masked_mean, modulate

FUSIONS = ("collaborative", "concat")
FEATURE_NORMS = ("none", "rms", "layer")
COLLAB_CONDITIONS = ("branch", "mean")


#################################################################################
#                          Language token refiner                               #
#################################################################################

class LanguageTokenRefinerBlock(nn.Module):
    """Self-attention + FFN over one encoder's tokens, each branch scaled by an adaptive gate.

    Attention is FULL (bidirectional) over the real tokens, which undoes the LLM's causal
    positional bias; causal=True puts the causal mask back (the paper's ablation). The gates
    come from c [B, D] (timestep + pooled text) through a zero-initialised SiLU + Linear, so
    the block is the identity at init. gate=False: plain, ungated residual branches.
    """

    def __init__(self, dim: int, heads: int, gate: bool = True, causal: bool = False, backend: str = "sdpa"):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.gates = AdaLNZero(dim, 2) if gate else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], mask [B, L], c [B, D] -> [B, L, D]."""
        attn = self.attn(self.norm1(x), key_mask=mask, causal=self.causal)  # [B, L, D]
        if self.gates is None:
            x = x + attn
            return x + self.mlp(self.norm2(x))
        gate_attn, gate_mlp = self.gates(c)  # [B, D] each
        x = x + gate_attn.unsqueeze(1) * attn
        return x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x))


class LanguageTokenRefiner(nn.Module):
    """One encoder's refiner: [norm], Linear in_dim -> dim, then `depth` LanguageTokenRefinerBlocks.

    The blocks' conditioning is c = mean of the projected features over real tokens + the
    timestep embedding (summed element-wise, as in the paper), so the refiner is both
    context- and timestep-aware. depth=0 is the projection alone.

    feature_norm normalises each frozen feature vector before the projection: "rms" (a
    learned-scale RMSNorm, as Sana does for Gemma), "layer" (LayerNorm) or "none". A causal
    LLM's first positions carry activations hundreds of times larger than the rest
    (SmolLM2: ~22,600 against <= 600, docs/FACTS.md); without a norm they dominate c.
    """

    def __init__(self, in_dim: int, dim: int, depth: int = 2, heads: int = 8, gate: bool = True,
                 causal: bool = False, backend: str = "sdpa", feature_norm: str = "none"):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"language token refiner: feature_norm={feature_norm!r}; "
                             f"allowed: {', '.join(FEATURE_NORMS)}")
        self.input_norm = {"none": nn.Identity, "rms": RMSNorm, "layer": nn.LayerNorm}[feature_norm](
            *(() if feature_norm == "none" else (in_dim,)))
        self.input_proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([LanguageTokenRefinerBlock(dim, heads, gate, causal, backend)
                                     for _ in range(depth)])

    def refine(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, in_dim], mask [B, L], t_emb [B, D] -> (refined [B, L, D], the gates' input c [B, D])."""
        x = self.input_proj(self.input_norm(x))  # [B, L, D]
        c = masked_mean(x, mask) + t_emb  # [B, D]
        for block in self.blocks:
            x = block(x, mask, c)
        return x, c

    def forward(self, x: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x [B, L, in_dim], mask [B, L], t_emb [B, D] -> [B, L, D]."""
        return self.refine(x, mask, t_emb)[0]


#################################################################################
#                           Collaborative refiner                               #
#################################################################################

class CollaborativeRefinerBlock(nn.Module):
    """One branch's block: cross-attention from its tokens to the other branches' tokens + FFN.

    Both sub-layers are adaLN-modulated (shift, scale, gate) from c [B, D]; the modulation is
    zero-initialised, so the block is the identity at init.
    """

    def __init__(self, dim: int, heads: int, backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, heads, backend=backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN = AdaLNZero(dim, 6)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], context [B, Lo, D], context_mask [B, Lo], c [B, D] -> [B, L, D]."""
        shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = self.adaLN(c)  # [B, D] each
        attn = self.cross_attn(modulate(self.norm1(x), shift_ca, scale_ca), context=self.norm_context(context),
                               key_mask=context_mask)  # [B, L, D]
        x = x + gate_ca.unsqueeze(1) * attn
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CollaborativeRefiner(nn.Module):
    """One parallel branch per encoder; in each layer every branch reads all the others.

    All branches of a layer see the other branches' tokens from the previous layer. With a
    single branch there is nothing to attend to, so no blocks are built and it is the identity.
    """

    def __init__(self, n_branches: int, dim: int, depth: int = 1, heads: int = 8, backend: str = "sdpa"):
        super().__init__()
        self.n_branches = n_branches
        layers = depth if n_branches > 1 else 0
        self.layers = nn.ModuleList([
            nn.ModuleList([CollaborativeRefinerBlock(dim, heads, backend) for _ in range(n_branches)]) for _ in range(layers)
        ])

    def forward(self, xs: list[torch.Tensor], masks: list[torch.Tensor], cs: list[torch.Tensor]) -> list[torch.Tensor]:
        """xs: n x [B, L_i, D], masks: n x [B, L_i], cs: each branch's modulation input n x [B, D]
        -> n x [B, L_i, D]."""
        if len(xs) != self.n_branches:
            raise ValueError(f"collaborative refiner: built for {self.n_branches} branches, got {len(xs)}")
        for blocks in self.layers:
            outs = []
            for i, block in enumerate(blocks):
                context = torch.cat([x for j, x in enumerate(xs) if j != i], dim=1)  # [B, sum_{j!=i} L_j, D]
                context_mask = torch.cat([m for j, m in enumerate(masks) if j != i], dim=1)  # [B, sum_{j!=i} L_j]
                outs.append(block(xs[i], context, context_mask, cs[i]))
            xs = outs
        return xs


#################################################################################
#                           LLM-infused Diffuser                                #
#################################################################################

class LLMInfusedDiffuser(nn.Module):
    """Refine each encoder's features, fuse them, drop the instructions, concatenate.

    encoders: per frozen encoder (in_dim, prefix_len), prefix_len being the number of
    instruction tokens that precede the caption (0 for an encoder without instruction).
    fusion="collaborative" runs the CollaborativeRefiner; "concat" (the weaker baseline)
    only concatenates. collab_condition: what modulates each collaborative branch, "branch"
    (the paper: the same input as that branch's refiner gates, its pooled projected features
    + t) or "mean" (the pooled refined outputs averaged over encoders + t, one c for all).
    Padding ends up in the middle of the concatenated sequence, which is
    fine: everything downstream reads cond_mask.
    """

    def __init__(self, encoders: list[tuple[int, int]], dim: int, heads: int, refiner_depth: int = 2,
                 collab_depth: int = 1, fusion: str = "collaborative", gate: bool = True, causal: bool = False,
                 backend: str = "sdpa", feature_norm: str = "none", collab_condition: str = "branch"):
        super().__init__()
        if not encoders:
            raise ValueError("LLM-infused diffuser: needs at least one encoder")
        if fusion not in FUSIONS:
            raise ValueError(f"LLM-infused diffuser: fusion={fusion!r}; allowed: {', '.join(FUSIONS)}")
        if collab_condition not in COLLAB_CONDITIONS:
            raise ValueError(f"LLM-infused diffuser: collab_condition={collab_condition!r}; "
                             f"allowed: {', '.join(COLLAB_CONDITIONS)}")
        self.collab_condition = collab_condition
        if refiner_depth < 0 or collab_depth < 0:
            raise ValueError(f"LLM-infused diffuser: refiner_depth={refiner_depth} and "
                             f"collab_depth={collab_depth} must be >= 0")
        self.prefix_lens = [prefix_len for _, prefix_len in encoders]
        self.refiners = nn.ModuleList([
            LanguageTokenRefiner(in_dim, dim, refiner_depth, heads, gate, causal, backend, feature_norm)
            for in_dim, _ in encoders
        ])
        self.collaborative = CollaborativeRefiner(len(encoders), dim, collab_depth, heads, backend) \
            if fusion == "collaborative" else None

    def forward(self, features: list[torch.Tensor], masks: list[torch.Tensor],
                t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features: n x [B, L_i, in_dim_i], masks: n x [B, L_i], t_emb [B, D]
        -> cond [B, sum_i (L_i - prefix_len_i), D], cond_mask [B, same]."""
        if len(features) != len(self.refiners) or len(masks) != len(self.refiners):
            raise ValueError(f"LLM-infused diffuser: built for {len(self.refiners)} encoders, "
                             f"got {len(features)} feature and {len(masks)} mask tensors")
        for i, (x, prefix_len) in enumerate(zip(features, self.prefix_lens)):
            if x.shape[1] < prefix_len:
                raise ValueError(f"encoder {i}: {x.shape[1]} tokens, fewer than its {prefix_len} instruction tokens")
        refined = [refiner.refine(x, m, t_emb) for refiner, x, m in zip(self.refiners, features, masks)]
        xs, cs = [x for x, _ in refined], [c for _, c in refined]  # n x [B, L_i, D], n x [B, D]
        if self.collaborative is not None:
            if self.collab_condition == "mean":
                pooled = torch.stack([masked_mean(x, m) for x, m in zip(xs, masks)]).mean(dim=0)  # [B, D]
                cs = [pooled + t_emb] * len(xs)
            xs = self.collaborative(xs, masks, cs)
        cond = torch.cat([x[:, p:] for x, p in zip(xs, self.prefix_lens)], dim=1)  # [B, L, D]
        cond_mask = torch.cat([m[:, p:] for m, p in zip(masks, self.prefix_lens)], dim=1)  # [B, L]
        return cond, cond_mask
