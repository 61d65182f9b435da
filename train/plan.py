"""`python -m train.plan --config CONFIG [--strategy ddp|fsdp] [--gpus N] [--json]`: bytes per GPU of a training.

Nothing is trained or allocated: the model is built on the meta device through the project's
own classes (`TextToImageModel(**build_kwargs(...))`, as train/module.py builds it), its
parameters are counted, and the activations are counted from the config's tensor shapes.

States, P parameters, N GPUs (FSDP: `fully_shard` on every LI-DiT, refiner and collaborative
block and on the root, bf16 parameters and fp32 gradient reduction):
    part                        DDP (replicated)   FSDP (sharded over N)
    weights, fp32               4 P                4 P / N
    gradients, fp32             4 P                4 P / N
    DDP's all-reduce buckets    4 P                -      (torch DDP copies the gradients into its
                                                           buckets unless gradient_as_bucket_view)
    AdamW: 2 fp32 moments       8 P                8 P / N
    EMA, fp32                   4 P                4 P / N
    bf16 weight copies          2 P                2 (P_root + 2 P_unit) + 4 P_unit
DDP's bf16 copies are autocast's casts, which the Linears keep for the backward. FSDP gathers
one unit (the largest block, P_unit) at a time and prefetches the next, keeps the root's
parameters (P_root: all outside the blocks) gathered, and holds one unit's fp32 gradients
before their reduce-scatter.

Activations: the tensors that autograd saves for the backward under bf16 autocast, read off
the layers (train/lidit.py, train/refiner.py, train/layers.py), for b rows per GPU:
    N image tokens = (H / (downsample * patch)) * (W / (downsample * patch)), at the largest bucket
    T text tokens LI-DiT attends to = sum of the encoders' caption tokens (the prefix is dropped)
    L_i = P_i + C_i tokens of encoder i (instruction prefix + caption), E_i its width
    D width, H heads, r = mlp_ratio, d = depth; n, s as below
  LI-DiT block  b D [N (6n + 2s + 48 + 4r) + 14 T] + 8 b H N
    6n: each of the 3 sub-layers keeps its norm's input and the modulated norm output;
    2s + 28, self-attention: the q and kv Linears' bf16 inputs (2s), q- and k-RMSNorm's fp32
    input and normalised value (8 + 8), q and k in bf16 (2 + 2), the kv output holding v (4),
    the attention's output (2), the projection's output the gate multiplies (2);
    16, cross-attention on the image side: q's input, RMSNorm, q, output, gated output;
    14 per text token, its k-RMSNorm (8), k (2), kv output (4) (the text itself is shared);
    4 + 4r, MLP: fc1's input (2), GELU's input and output (2r + 2r), gated output (2);
    8 b H N: the two attentions' fp32 log-sum-exp. (+2r with model.mlp_conv: the conv's input.)
  checkpointed  d 2 b N D + one LI-DiT block: the blocks keep only their bf16 inputs, and the
                backward recomputes one block at a time
  refiner block b D L_i (2n + 2s + 48) + 4 b H L_i per block, and 2 b L_i E_i (the bf16
                features the input projection keeps)
  collaborative b D [L_i (4n + 36) + Lo_i (n + 16)] + 4 b H L_i per branch, Lo_i = sum of the
                other branches' L_j (the keys it attends to)
  stem, head    b D N (4n + 4 + 2n + 2) + 16 b C H W: the position ResBlock (+4 with a separable
                conv), the final layer, the latents, prediction and target
n = bytes of a norm's saved input and output: 4 on a GPU (CUDA autocast runs LayerNorm and
GroupNorm in fp32), 2 on a CPU (its autocast keeps them bf16); s = bf16 copies of a normed
input that the q and kv Linears keep: 2 on a GPU (each casts the fp32 norm output itself), 1 on
a CPU (they share one bf16 tensor). For LI-DiT at r = 4: 92 bytes per image token and unit of
width on a GPU, 78 on a CPU. Left out: per-row vectors (timestep, modulation), the backward's
own temporaries (about one block's worth), the allocator's fragmentation, the CUDA context.
tests/test_plan.py checks the count against autograd's saved tensors on the CPU; bench/checkpointing.py
against a measured peak.

Encoder widths (the cache's meta.json is read when it exists; else, per encoder): `--hidden-size
NAME=SIZE` (or one SIZE for all), the model folder's config.json, then KNOWN_HIDDEN_SIZES by the
folder's name. Prefix lengths come from the cache, else `--prefix-tokens` (32: the paper's
instruction with a BOS, as bench/train.py assumes); caption lengths are encoder.max_tokens (the
longest a batch can pad to). A VAE without a local config.json is taken as the paper's: 16
channels, 8x. "Fits" means at most `--usable` (0.9) of `--gpu-gib` (80): the rest for the CUDA
context, communication buffers and fragmentation; no gradient accumulation.
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from store.config import Config, ConfigError, load_config
from store.writer import read_meta
from train.model import TextToImageModel, build_kwargs

# Widths of well-known text encoders, by model folder name (lower case) or embedded name.
KNOWN_HIDDEN_SIZES = {
    "meta-llama-3-8b": 4096, "meta-llama-3-8b-instruct": 4096, "llama-3.1-8b": 4096, "llama-3.1-8b-instruct": 4096,
    "qwen1.5-7b": 4096, "qwen1.5-7b-chat": 4096, "qwen2.5-7b-instruct": 3584,
    "t5-v1_1-xxl": 4096, "flan-t5-xxl": 4096,
    "embedded:smollm2": 576, "embedded:minilm": 384, "embedded:gemma3": 640,
}
PAPER_VAE = {"channels": 16, "downsample": 8}
GIB = 2**30


class PlanError(ConfigError):
    """The plan lacks a shape it cannot read from the config; the message says how to give it."""


@dataclass(frozen=True)
class Shapes:
    """What the activation count reads: the per-GPU batch and the tensor shapes of one training step."""

    batch: int  # rows per GPU
    latent: tuple[int, int, int]  # [C, h, w] of the largest bucket
    patch: int
    dim: int
    heads: int
    depth: int
    mlp_ratio: float
    encoders: tuple[tuple[int, int, int], ...]  # (width E_i, prefix P_i, caption C_i) of each encoder read
    refiner_depth: int
    collab_depth: int  # 0 without the collaborative refiner
    gate: bool
    mlp_conv: bool
    pos_conv: str

    @property
    def image_tokens(self) -> int:
        return (self.latent[1] // self.patch) * (self.latent[2] // self.patch)

    @property
    def text_tokens(self) -> int:
        return sum(caption for _, _, caption in self.encoders)


def _hidden_size(encoder, given: dict[str, int], cached: dict | None) -> int:
    if encoder.name in given or "*" in given:
        return given.get(encoder.name, given.get("*"))
    if cached is not None:
        return cached["hidden_size"]
    folder = Path(encoder.path).expanduser()
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config") or config  # a multimodal checkpoint: its language model
        for key in ("hidden_size", "d_model", "n_embd"):
            if key in config:
                return int(config[key])
    name = encoder.path if encoder.path.startswith("embedded:") else folder.name
    if name.lower() in KNOWN_HIDDEN_SIZES:
        return KNOWN_HIDDEN_SIZES[name.lower()]
    raise PlanError(f"encoders.{encoder.name}: no width for {encoder.path!r} (no cache, no config.json there, not in "
                    f"train/plan.py's KNOWN_HIDDEN_SIZES); pass --hidden-size {encoder.name}=SIZE")


def local_cache_meta(config: Config) -> dict | None:
    """The meta.json of the config's cache, if it is a local folder that holds one."""
    path = config.cache_path
    return read_meta(path) if isinstance(path, Path) and (path / "meta.json").is_file() else None


def encoder_records(config: Config, given: dict[str, int] | None = None, prefix_tokens: int = 32) -> list[dict]:
    """Per encoder the model reads: width, prefix and caption tokens, from the cache where there is one."""
    cached = {e["name"]: e for e in (local_cache_meta(config) or {}).get("encoders", [])}
    names = config.model.encoders or [e.name for e in config.encoders]
    by_name = {e.name: e for e in config.encoders}
    records = []
    for name in names:
        encoder = by_name[name]
        causal_prefix = encoder.kind == "causal" and bool(encoder.instruction or encoder.chat_template)
        specials = 2 if encoder.kind == "bidirectional" else 0  # BERT's [CLS]/[SEP], T5's </s>
        record = {"name": name, "caption_tokens": encoder.max_tokens + specials,
                  "hidden_size": _hidden_size(encoder, given or {}, cached.get(name)),
                  "prefix_len": cached[name]["prefix_len"] if name in cached
                  else (prefix_tokens if causal_prefix else 0)}
        records.append(record)
    return records


def codec_record(config: Config) -> dict:
    """The latent channels and downsampling: the cache's, a local VAE's config.json, or the paper's VAE."""
    meta = local_cache_meta(config)
    if meta is not None:
        return meta["codec"]
    if config.codec.kind == "pixel":
        return {"channels": 3, "downsample": 1}
    folder = Path(config.codec.path).expanduser()
    if (folder / "config.json").is_file():
        vae = json.loads((folder / "config.json").read_text())
        return {"channels": int(vae["latent_channels"]), "downsample": 2 ** (len(vae["block_out_channels"]) - 1)}
    return dict(PAPER_VAE)


def meta_model(config: Config, records: list[dict], codec: dict) -> TextToImageModel:
    """The config's model on the meta device: real parameter shapes, no memory."""
    with torch.device("meta"):
        return TextToImageModel(**build_kwargs(config.model, records, codec))


def shapes_for(config: Config, records: list[dict], codec: dict, gpus: int) -> Shapes:
    if config.train.batch_size % gpus:
        raise PlanError(f"train.batch_size {config.train.batch_size} cannot be shared evenly by {gpus} GPUs")
    down = codec["downsample"]
    unit = down * config.model.patch  # pixels per image token along each side
    h, w = max(config.codec.buckets, key=lambda b: (b[0] // unit) * (b[1] // unit))
    m = config.model
    return Shapes(batch=config.train.batch_size // gpus, latent=(codec["channels"], h // down, w // down),
                  patch=m.patch, dim=m.dim, heads=m.heads, depth=m.depth, mlp_ratio=m.mlp_ratio,
                  encoders=tuple((r["hidden_size"], r["prefix_len"], r["caption_tokens"]) for r in records),
                  refiner_depth=m.refiner_depth,
                  collab_depth=m.collab_depth if m.fusion == "collaborative" and len(records) > 1 else 0,
                  gate=m.gate, mlp_conv=m.mlp_conv, pos_conv=m.pos_conv)


def activation_bytes(s: Shapes, checkpointing: bool, device: str = "cuda") -> dict[str, int]:
    """The bytes saved for the backward at the end of the forward pass, by part (the docstring's formula)."""
    n, copies = (4, 2) if device == "cuda" else (2, 1)
    b, D, H, N, T, r = s.batch, s.dim, s.heads, s.image_tokens, s.text_tokens, s.mlp_ratio
    gated = 0 if s.gate else 4  # an ungated refiner block keeps no branch output for its gates
    block = b * D * (N * (6 * n + 2 * copies + 48 + 4 * r + (2 * r if s.mlp_conv else 0)) + 14 * T) + 8 * b * H * N
    blocks = s.depth * 2 * b * N * D + block if checkpointing else s.depth * block
    lengths = [prefix + caption for _, prefix, caption in s.encoders]
    refiners = 0
    for (width, _, _), L in zip(s.encoders, lengths):
        refiners += 2 * b * L * width  # the input projection's bf16 features
        refiners += s.refiner_depth * (b * D * L * (2 * n + 2 * copies + 48 - gated) + 4 * b * H * L)
        others = sum(lengths) - L
        refiners += s.collab_depth * (b * D * (L * (4 * n + 36) + others * (n + 16)) + 4 * b * H * L)
    C, h, w = s.latent
    position = 4 * n + 4 + (4 if s.pos_conv == "separable" else 0)
    ends = b * D * N * (position + 2 * n + 2) + 16 * b * C * h * w
    return {"LI-DiT blocks": int(blocks), "refiners": int(refiners), "stem and head": int(ends)}


def parameter_counts(model: TextToImageModel) -> dict[str, int]:
    """All parameters, LI-DiT's and the refiners', the largest FSDP unit's (LI-DiT, refiner and
    collaborative blocks are units) and the root's (everything outside the units)."""
    units = list(model.dit.blocks) + [blk for refiner in model.diffuser.refiners for blk in refiner.blocks]
    if model.diffuser.collaborative is not None:
        units += [blk for layer in model.diffuser.collaborative.layers for blk in layer]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    sizes = [count(unit) for unit in units]
    return {"total": count(model), "dit": count(model.dit), "refiners": count(model.diffuser),
            "largest_unit": max(sizes, default=0), "root": count(model) - sum(sizes)}


def state_bytes(counts: dict[str, int], strategy: str, gpus: int) -> dict[str, int]:
    """Weights, gradients, buckets, optimizer, EMA and bf16 copies per GPU (the docstring's table)."""
    shard = gpus if strategy == "fsdp" else 1
    P, largest_unit, root = counts["total"], counts["largest_unit"], counts["root"]
    return {"weights (fp32)": 4 * P // shard, "gradients (fp32)": 4 * P // shard,
            "DDP gradient buckets (fp32)": 4 * P if strategy == "ddp" else 0,
            "AdamW moments (2 x fp32)": 8 * P // shard, "EMA (fp32)": 4 * P // shard,
            "bf16 weight copies": 2 * P if strategy == "ddp" else 2 * (root + 2 * largest_unit) + 4 * largest_unit}


def plan(config: Config, strategy: str, gpus: int, records: list[dict], codec: dict, counts: dict) -> dict:
    """Per GPU bytes by part, with activation checkpointing off and on, for one strategy and GPU count;
    `counts`: parameter_counts of the config's model."""
    states = state_bytes(counts, strategy, gpus)
    shapes = shapes_for(config, records, codec, gpus)
    out = {"states": states}
    for checkpointing in (False, True):
        acts = activation_bytes(shapes, checkpointing)
        out["on" if checkpointing else "off"] = {"activations": acts,
                                                 "total": sum(states.values()) + sum(acts.values())}
    return out


def fewest_gpus(config: Config, strategy: str, checkpointing: bool, records: list[dict], codec: dict, counts: dict,
                budget: float) -> int | None:
    """The fewest GPUs (a divisor of train.batch_size) whose per-GPU bytes fit `budget`; None if none do."""
    batch = config.train.batch_size
    for gpus in (g for g in range(1, batch + 1) if batch % g == 0):
        if plan(config, strategy, gpus, records, codec, counts)["on" if checkpointing else "off"]["total"] <= budget:
            return gpus
    return None


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python -m train.plan", __doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: train.strategy (auto: ddp)")
    parser.add_argument("--gpus", type=int, help="GPUs sharing train.batch_size (default: train.devices, or 1)")
    parser.add_argument("--activation-checkpointing", choices=["on", "off"],
                        help="which column bytes_per_gpu takes (default: train.activation_checkpointing)")
    parser.add_argument("--hidden-size", action="append", default=[], metavar="NAME=SIZE",
                        help="an encoder's width (or one SIZE for all), where no cache or config.json tells it")
    parser.add_argument("--prefix-tokens", type=int, default=32, help="instruction tokens, where no cache tells them")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    parser.add_argument("--usable", type=float, default=0.9, help="the share of it a training may fill")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        given = {}
        for item in args.hidden_size:
            name, _, size = item.rpartition("=")
            given[name or "*"] = int(size)
        records = encoder_records(config, given, args.prefix_tokens)
        codec = codec_record(config)
        strategy = args.strategy or ("fsdp" if config.train.strategy == "fsdp" else "ddp")
        gpus = args.gpus or (config.train.devices if isinstance(config.train.devices, int) else 1)
        checkpointing = (args.activation_checkpointing or
                         ("on" if config.train.activation_checkpointing else "off")) == "on"
        counts = parameter_counts(meta_model(config, records, codec))
        plans = {s: plan(config, s, gpus, records, codec, counts) for s in ("ddp", "fsdp")}
    except (ConfigError, ValueError) as err:
        print(f"train.plan: error: {err}", file=sys.stderr)
        return 2
    budget = args.usable * args.gpu_gib * GIB
    fewest = {f"{s}_{c}": fewest_gpus(config, s, c == "on", records, codec, counts, budget)
              for s in ("ddp", "fsdp") for c in ("off", "on")}
    print(describe(config, records, codec, counts, gpus))
    print(table(plans, gpus, fewest, args))
    chosen = plans[strategy]["on" if checkpointing else "off"]
    if args.json:
        print(json.dumps({"config": args.config, "strategy": strategy, "gpus": gpus,
                          "activation_checkpointing": checkpointing, "bytes_per_gpu": chosen["total"],
                          "per_gpu_batch": config.train.batch_size // gpus,
                          "parameters": counts["total"],
                          "parts": {s: {**p["states"], **{f"activations, checkpointing {c}":
                                                          sum(p[c]["activations"].values()) for c in ("off", "on")}}
                                    for s, p in plans.items()},
                          "fewest_gpus": fewest, "gpu_gib": args.gpu_gib, "usable": args.usable}))
    return 0


def describe(config: Config, records: list[dict], codec: dict, counts: dict, gpus: int) -> str:
    s = shapes_for(config, records, codec, gpus)
    text = ", ".join(f"{r['name']} {r['prefix_len']} + {r['caption_tokens']} tokens x {r['hidden_size']}"
                     for r in records)
    return (f"{config.name}: {counts['total'] / 1e6:,.1f}M parameters (LI-DiT {counts['dit'] / 1e6:,.1f}M, refiners "
            f"{counts['refiners'] / 1e6:,.1f}M); {s.batch} rows per GPU (train.batch_size {config.train.batch_size} "
            f"/ {gpus} GPUs)\n  latent {' x '.join(map(str, s.latent))} -> {s.image_tokens} image tokens (patch "
            f"{s.patch}); text: {text}")


def table(plans: dict, gpus: int, fewest: dict, args) -> str:
    head = f"{'per GPU, GiB':<36}{'DDP':>12}{f'FSDP / {gpus}':>14}"
    rows = [head, "-" * len(head)]
    gib = lambda v: f"{v / GIB:,.2f}"  # noqa: E731
    for part in plans["ddp"]["states"]:
        rows.append(f"{part:<36}{gib(plans['ddp']['states'][part]):>12}{gib(plans['fsdp']['states'][part]):>14}")
    for c in ("off", "on"):
        for part in plans["ddp"][c]["activations"]:
            label = f"activations, {part}, ckpt {c}"
            rows.append(f"{label:<36}{gib(plans['ddp'][c]['activations'][part]):>12}"
                        f"{gib(plans['fsdp'][c]['activations'][part]):>14}")
    for c in ("off", "on"):
        rows.append(f"{f'total, activation checkpointing {c}':<36}{gib(plans['ddp'][c]['total']):>12}"
                    f"{gib(plans['fsdp'][c]['total']):>14}")
    for c in ("off", "on"):
        cells = [str(fewest[f"{s}_{c}"]) if fewest[f"{s}_{c}"] else "none" for s in ("ddp", "fsdp")]
        rows.append(f"{f'fewest {args.gpu_gib:g} GiB GPUs, ckpt {c}':<36}{cells[0]:>12}{cells[1]:>14}")
    rows.append(f"(fits: <= {args.usable:g} x {args.gpu_gib:g} GiB; GPU counts divide train.batch_size, "
                "no gradient accumulation)")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
