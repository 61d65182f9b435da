"""Pieces shared by the language token refiner, the collaborative refiner and LI-DiT.

Written once and used everywhere: RMSNorm, the attention mask helper (with its guard for
fully padded rows), attention with QK-norm, the MLP, adaLN-Zero modulation and the
timestep embedder. Masks are bool tensors with True = a real token.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "xformers")


#################################################################################
#                               Small functions                                 #
#################################################################################

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, L, D] scaled and shifted per sample by shift, scale [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over the real tokens of mask [B, L] -> [B, D]; zeros for a row with none."""
    # where(), not a product, so padding values never enter; the sum runs in fp32.
    total = torch.where(mask.unsqueeze(-1), x, 0).sum(dim=1, dtype=torch.float32)  # [B, D]
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    return (total / count).to(x.dtype)


def attention_bias(
    q_len: int, key_mask: torch.Tensor | None, causal: bool, device: torch.device | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which keys each query may attend to, as SDPA's boolean mask (True = may attend).

    key_mask [B, Lk] (True = real token) or None; causal additionally hides later tokens
    (self-attention only, so Lk == q_len). Returns (allowed, has_keys):
      allowed  [B|1, 1, Lq|1, Lk] bool, or None when every key is visible to every query;
      has_keys [B|1, 1, Lq|1, 1] bool, False for a query that has no key to attend to.

    The guard: a query whose keys are ALL masked (an empty text condition, a fully padded
    sequence) gives a softmax over only -inf logits, i.e. 0/0 = NaN, and that NaN reaches the
    gradients of every weight even if the row is later discarded. Such rows are therefore
    opened to all keys here, which keeps the softmax finite, and the caller replaces their
    outputs by exact zeros using `has_keys`: a query with nothing to look at receives nothing.
    """
    if key_mask is None and not causal:
        return None, None
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, :]  # [B, 1, 1, Lk]
        device = key_mask.device
    if causal:
        if key_mask is not None and key_mask.shape[1] != q_len:
            raise ValueError(f"causal attention needs as many keys as queries, got {key_mask.shape[1]} vs {q_len}")
        lower = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()  # [Lq, Lk]
        allowed = lower[None, None] if allowed is None else allowed & lower  # [B, 1, Lq, Lk]
    has_keys = allowed.any(dim=-1, keepdim=True)  # [B|1, 1, Lq|1, 1]
    return allowed | ~has_keys, has_keys


ROPE_BASE = 100.0  # small grids (8x8 tokens here): base 10,000 would leave most frequencies near 0


def rope_quarter(head_dim: int) -> int:
    """The frequencies per axis of a 2-D rotary embedding of width head_dim; refuses a width not divisible by 4."""
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding: head_dim {head_dim} is not divisible by 4")
    return head_dim // 4


def axial_freqs(quarter: int, device=None) -> torch.Tensor:
    """[quarter] frequencies ROPE_BASE^(-i / quarter), per axis, of rope_2d and sincos_2d."""
    return ROPE_BASE ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)


def rope_2d(h: int, w: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary embedding of an h x w token grid (row-major): (cos, sin), each [h * w, head_dim].

    Rotate-half layout: channel pair (j, j + head_dim / 2) turns by angle_j. The first quarter
    of the pairs turns with the token's row, the second with its column, at frequencies
    ROPE_BASE^(-i / quarter). A query at (r, c) and a key at (r', c') then score as a
    function of (r - r', c - c') alone: relative position, at any grid size.
    """
    quarter = rope_quarter(head_dim)
    freqs = axial_freqs(quarter, device)  # [quarter]
    rows = torch.arange(h, dtype=torch.float32, device=device).repeat_interleave(w)  # [N]
    cols = torch.arange(w, dtype=torch.float32, device=device).repeat(h)  # [N]
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # [N, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [N, head_dim]
    return angles.cos(), angles.sin()


SINCOS_GRID = 16  # abs_pos: coordinates are fractions of the image, in units of a 16-token grid


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """A fixed 2-D sine-cosine table of absolute positions for an h x w token grid (row-major): [h * w, dim].

    DiT's table, but of each token centre's fraction of the image ((i + 0.5) / h), so a token
    at the left of the picture reads the same at every grid size. Half the channels carry the
    row, half the column, each as sin and cos at ROPE_BASE^(-i / quarter) radians per unit of a
    SINCOS_GRID-token grid.
    """
    if dim % 4:
        raise ValueError(f"abs_pos: model.dim {dim} must be divisible by 4 (sin and cos of rows and columns)")
    quarter = dim // 4
    freqs = axial_freqs(quarter, device)  # [quarter]
    rows = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h * SINCOS_GRID
    cols = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w * SINCOS_GRID
    rows, cols = rows.repeat_interleave(w)[:, None] * freqs, cols.repeat(h)[:, None] * freqs  # [N, quarter]
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1)  # [N, dim]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, L, H, Dh] rotated by rope = (cos, sin) [L, Dh], in fp32, returned in x's dtype."""
    cos, sin = (r[None, :, None, :] for r in rope)  # [1, L, 1, Dh]
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


#################################################################################
#                                 Layers                                        #
#################################################################################

class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with QK-norm: self-attention, or cross-attention to `context`.

    Queries come from x; keys and values from x (self) or from context (cross). QK-norm is an
    RMSNorm over each head's queries and keys, which bounds the attention logits (paper: used
    in both self- and cross-attention of LI-DiT). `rope` (self-attention only): the rotary
    embedding of the query/key positions (`rope_2d`), applied after QK-norm.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, backend: str = "sdpa"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: dim={dim} is not divisible by heads={heads}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention: backend={backend!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
        if backend == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ImportError("attention backend 'xformers' needs the xformers package "
                              "(pip install '.[gpu]'); use backend='sdpa' otherwise")
        self.heads = heads
        self.head_dim = dim // heads
        self.backend = backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, Lq, D], context [B, Lk, Dc] or None (self), key_mask [B, Lk] -> [B, Lq, D]."""
        source = x if context is None else context
        B, Lq, D = x.shape
        Lk = source.shape[1]
        q = self.q_norm(self.q(x).view(B, Lq, self.heads, self.head_dim))  # [B, Lq, H, Dh]
        k, v = self.kv(source).view(B, Lk, 2, self.heads, self.head_dim).unbind(dim=2)  # [B, Lk, H, Dh] each
        k = self.k_norm(k)
        if rope is not None:
            if context is not None:
                raise ValueError("attention: a rotary embedding needs self-attention (query and key positions)")
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        allowed, has_keys = attention_bias(Lq, key_mask, causal, device=x.device)
        if self.backend == "xformers":
            out = self._xformers(q, k, v, allowed)  # [B, Lq, H, Dh]
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
            ).transpose(1, 2)  # [B, Lq, H, Dh]
        out = self.proj(out.reshape(B, Lq, D))  # [B, Lq, D]
        if has_keys is not None:
            out = torch.where(has_keys[:, 0], out, 0)  # rows with no key get exact zeros (see attention_bias)
        return out

    def _xformers(self, q, k, v, allowed):
        """memory_efficient_attention on [B, L, H, Dh]; the bool mask becomes an additive bias."""
        import xformers.ops

        bias = None
        if allowed is not None:
            B, Lq, H, _ = q.shape
            Lk = k.shape[1]
            # xformers wants the bias materialised per head, its rows 8-aligned in memory.
            padded = math.ceil(Lk / 8) * 8
            bias = torch.zeros(B, H, Lq, padded, dtype=q.dtype, device=q.device)[..., :Lk]
            bias.masked_fill_(~allowed, float("-inf"))
        return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=bias)


class Mlp(nn.Module):
    """Transformer FFN: Linear -> GELU (tanh approximation, as DiT) -> Linear.

    conv=True adds local mixing on an image's token grid: a depthwise 3x3 convolution over
    the hidden features between the two Linears (as Sana's Mix-FFN), so each token's FFN
    also sees its 8 neighbours; forward then needs the grid size `hw`.
    """

    def __init__(self, dim: int, hidden_ratio: float = 4.0, conv: bool = False):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden) if conv else None
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """x [B, N, D] (N = h * w on a grid when conv) -> [B, N, D]."""
        x = self.fc1(x)  # [B, N, hidden]
        if self.conv is not None:
            if hw is None or hw[0] * hw[1] != x.shape[1]:
                raise ValueError(f"Mlp with conv: {x.shape[1]} tokens do not form the grid {hw}")
            grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)  # [B, hidden, h, w]
            x = self.conv(grid).flatten(2).transpose(1, 2)  # [B, N, hidden]
        return self.fc2(self.act(x))


class AdaLNZero(nn.Module):
    """Modulation: c [B, D] -> `n` vectors [B, D] (shifts, scales, gates) via SiLU + Linear.

    The Linear is zero-initialised, so every shift, scale and gate starts at 0: a gated
    residual branch then adds nothing and its block is exactly the identity at init.
    """

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n, dim=-1)  # n x [B, D]


class TimestepEmbedder(nn.Module):
    """Float timesteps [B] in [0, 1000) (both objectives' scale) -> [B, D]: sinusoidal
    features, then a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] float -> [B, freq_dim] cos/sin features (GLIDE/DiT convention), fp32."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)  # [half]
        args = t.float()[:, None] * freqs[None]  # [B, half]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2 * half]
        if self.freq_dim % 2:
            features = F.pad(features, (0, 1))
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))  # [B, D]
