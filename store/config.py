"""The typed configuration tree, loaded from one YAML file per recipe.

The config is the contract between the stages, like the store itself: `embed` reads
`data`, `encoders`, `codec` and `embed`; `train` reads `model` and `train` and checks the
cache against `encoders`; `sample` reads `sample`. It lives in `store/` because every
stage already depends on the store and none may import a later stage.

Defaults are the paper's where the paper gives one (PAPER.md). Validation happens once,
at load time, with messages that name the key and the allowed values.

Plain dataclasses, not pydantic (measured 2026-11-25): a pydantic port of the checks would
drop about 50 of these lines (`build`, `_coerce`, `RANGES`), but its errors span several
lines without the allowed keys (a formatter restores one line), its import adds 0.23 s to
every process and Ray worker, and the 15 `dataclasses.replace/asdict/fields` call sites
would each change.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from store.storage import RemotePath, apply_storage, location

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # a number YAML 1.1 left as a string

PAPER_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)


# Which ODE solvers fit which training objective (sampling checks against this one table).
SOLVERS_FOR_OBJECTIVE = {"flow": ("euler", "heun"), "eps": ("ddim", "dpmpp")}


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclass
class DataConfig:
    source: Literal["shapes", "folder", "manifest", "captions"] = "shapes"
    path: str | None = None  # folder / manifest (.jsonl or .parquet) / captions (.txt or .jsonl)
    num_train: int = 6000  # shapes only
    num_eval: int = 512  # shapes only: held-out split, never trained on
    height: int = 32  # shapes only: image size in pixels
    width: int = 32
    min_image_side: int = 16  # real images smaller than this are rejected
    # real images with more pixels than this are rejected from their header, before decoding
    # (a small PNG can declare 20,000 x 10,000 pixels); 0: no limit. 64M: 8,192 x 8,192
    max_image_pixels: int = 64 * 1024 * 1024
    # Optional guard against malformed input (a whole document in a caption field): a longer
    # caption is cut to this many characters before tokenising, bounding the tokenizer's work
    # and the row's size. The row is kept; the encoders still truncate at max_tokens and flag it.
    max_caption_chars: int | None = None
    # shapes only: each training scene is also listed mirrored across these axes ("horizontal":
    # left-right, "vertical": top-bottom), its relation words turned to match (embed/shapes.py:
    # mirror_scene). A relation scene then has a twin with the opposite relation word.
    mirror: list[str] = field(default_factory=list)


@dataclass
class EncoderConfig:
    name: str
    path: str  # local HF directory, a .gguf file, or "embedded:smollm2" / "embedded:minilm"
    kind: Literal["causal", "bidirectional"] = "causal"
    layer: int = -3  # output of this block; negative counts from the end (-3: paper's choice)
    instruction: str | None = PAPER_INSTRUCTION  # bidirectional encoders: none (load_config)
    chat_template: bool = False  # wrap instruction + caption in the tokenizer's chat template
    # chat_template only: a system message before the instruction (None: the template's own default)
    system_prompt: str | None = None
    # chat_template only: the template's tokens after the caption (end of turn, assistant header):
    # "keep" them in the condition, or "drop" them so the condition ends with the caption
    template_suffix: Literal["keep", "drop"] = "keep"
    max_tokens: int = 128  # caption tokens kept; longer captions are truncated and flagged
    # forward dtype; "auto": bf16 where the hardware runs it natively, else fp32 (store/hardware.py)
    compute_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    store_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    backend: Literal["transformers", "vllm"] = "transformers"
    # apply the model's final norm to the last layer's output (layer -1 only): PixArt's T5 and
    # Sana's Gemma features. The paper's intermediate layers never pass through it.
    final_norm: bool = False


@dataclass
class CodecConfig:
    kind: Literal["pixel", "vae"] = "pixel"
    path: str | None = None  # diffusers AutoencoderKL directory, for kind "vae"
    # (height, width) in pixels; images go to the bucket nearest their aspect ratio.
    buckets: list[list[int]] = field(default_factory=lambda: [[32, 32]])


@dataclass
class EmbedConfig:
    ray_address: str | None = None  # None: start a local Ray (or use RAY_ADDRESS when set)
    actors: int = 2  # encoder actors in the pool
    threads_per_actor: int = 1  # processes, not threads: a neighbour slows one actor, not a whole team
    gpus_per_actor: float = 0.0
    # Ray custom resources each encoder actor needs, e.g. {llm_node: 1}: pins the LLMs to the
    # nodes that declare them (`ray start --resources '{"llm_node": 8}'`)
    resources: dict[str, float] = field(default_factory=dict)
    batch_size: int = 64  # captions per encoder call (sorted by length inside)
    shard_rows: int = 512  # rows per Lance commit: the unit of resumption
    caption_memo_mib: float = 256.0  # per actor: recently encoded captions, looked up when met again
    device: str = "cpu"


@dataclass
class ModelConfig:
    encoders: list[str] | None = None  # which cached encoders condition the model (None: all)
    dim: int = 256
    depth: int = 6
    heads: int = 4
    patch: int = 4
    mlp_ratio: float = 4.0
    refiner_depth: int = 2  # paper: 2 (ablation 0-3)
    collab_depth: int = 1  # paper: 1
    fusion: Literal["collaborative", "concat"] = "collaborative"
    gate: bool = True  # adaptive gate in the language token refiner
    causal_refiner: bool = False  # ablation: put the causal mask back into the refiner
    attention_backend: Literal["sdpa", "xformers"] = "sdpa"
    # normalise each frozen feature vector before a refiner's projection (train/refiner.py)
    feature_norm: Literal["none", "rms", "layer"] = "none"
    # what modulates each collaborative-refiner branch: "branch" (paper: its own gate input), "mean"
    collab_condition: Literal["branch", "mean"] = "branch"
    mlp_conv: bool = False  # a depthwise 3x3 conv on the token grid inside each LI-DiT FFN
    rope: bool = False  # a 2-D rotary position embedding in LI-DiT's self-attention (not in the paper)
    # a fixed 2-D sine-cosine table of each token's place in the image, added before the blocks (DiT's;
    # not in the paper, whose only position signal is the convolutional ResBlock)
    abs_pos: bool = False
    # the position ResBlock's two 3x3 convs: "dense" (paper) or "separable" (depthwise 3x3 + 1x1, a ninth
    # of their cost; not in the paper)
    pos_conv: Literal["dense", "separable"] = "dense"
    # LI-DiT's adaLN input: timestep + a Linear of the mean text token (paper), or, false, the
    # timestep alone, so the text reaches the image only through the cross-attention
    pooled_text: bool = True
    # what LI-DiT's head outputs (flow only): "velocity" (SD3), or "sample", the clean image x0,
    # turned into the velocity (x_t - x0) / t inside the model, so the loss and the solvers are
    # unchanged (JiT, Li & He 2025: "Back to Basics: Let Denoising Generative Models Denoise")
    prediction: Literal["velocity", "sample"] = "velocity"


@dataclass
class TrainConfig:
    objective: Literal["flow", "eps"] = "flow"
    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"  # flow: how training draws t
    # logit-normal t = sigmoid(mean + std * N(0, 1)), t = 1 is noise: mean > 0 trains more on noisy times
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # flow: this share of the training times redrawn from U(high_t_from, 1), near pure noise
    # (where the layout is decided); 0: the draws above, unchanged
    high_t_share: float = 0.0
    high_t_from: float = 0.9
    schedule: Literal["linear", "cosine"] = "linear"  # eps: the noise schedule (DiT's linear, or cosine)
    steps: int = 3000
    batch_size: int = 32  # the global batch: N processes (train.devices) take batch_size / N rows each
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.95 is common for transformers)
    # "adamw", or "muon": Muon for the 2-D hidden weights, AdamW for the rest (train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float | None = None  # Muon's lr (its update matched to AdamW's RMS); None: train.lr
    muon_momentum: float = 0.95
    # AdamW's implementation (the same update): "fused" (one kernel over all tensors), "foreach",
    # "loop" (one parameter at a time); "auto": fused where torch has the kernel, under every
    # precision and with clipping; under the strategy fsdp, torch's own default
    adamw_kernel: Literal["auto", "fused", "foreach", "loop"] = "auto"
    warmup_steps: int = 200
    # after warm-up: "constant", or "cosine" from lr down to lr * lr_final over train.steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final: float = 0.0  # cosine: the last step's lr as a fraction of train.lr
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # probability of training on the unconditional text
    # shapes world: each training row of a scene kind appears this many times per epoch, e.g.
    # {relation: 2} (kinds: single, two_objects, relation, counting, attributes); others once
    repeat_kinds: dict[str, int] = field(default_factory=dict)
    # Lightning precision; "auto": bf16-mixed on a bf16 GPU, 16-mixed on an older GPU, 32-true on
    # every CPU (store/hardware.py: train_precision). 16-mixed needs a GPU
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    # "ddp" (every process holds the whole model), or "fsdp": FSDP2, the weights, gradients,
    # optimizer state and EMA split over the processes (LIDiTModule.configure_model); "auto": ddp
    # when there are several processes
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # processes (DDP) sharing each batch; "auto": one per GPU, or on a CPU one per core up to
    # one per 8 rows of the batch (store/hardware.py: train_processes)
    devices: int | Literal["auto"] = 1
    accelerator: str = "auto"
    num_workers: int = 0
    # torch.compile the model for training (inductor; the text is padded to a multiple of 16
    # tokens so that few shapes compile): "off", or a torch.compile mode
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    # keep only each LI-DiT block's inputs in the forward pass and recompute the rest in the backward
    # (torch.utils.checkpoint): the blocks' activations shrink to ~2 bytes per image token and width
    # each, for one more forward of the blocks (train/plan.py; docs/SCALE.md)
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    log_every: int = 50
    # stop early (and checkpoint) after this many minutes of training; in-training scoring is not
    # counted, and a resume goes on from the checkpoint's minutes (train/progress.py: TrainingTimeCap)
    max_minutes: float | None = None
    # start from another run's exported EMA weights (its run folder or checkpoints folder, or a
    # URI): a fine-tune or a curriculum's next stage. Fresh optimizer, schedule and EMA warm-up;
    # the model must build the same. A run that resumes from its own last.ckpt ignores it
    init_from: str | None = None
    # every N steps and at the last, ShapeEval of the EMA weights on `eval_rows` held-out rows of a
    # shapes cache, balanced over the scene kinds, with its standard error, logged beside the loss
    # (train/progress.py); 0: no scores, curves of the loss only. 120 rows: a standard error of at
    # most 0.05 whatever the scores (about 0.04 at the demo's)
    eval_every: int = 0
    eval_rows: int = 120
    eval_steps: int | None = None  # sampling steps of those evaluations; None: sample.steps, as make eval
    # a curriculum in one config: trainings run in order, each a `name` and the train keys it
    # changes from the stage before (stage_configs); [] : one training
    stages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SampleConfig:
    solver: Literal["euler", "heun", "ddim", "dpmpp"] = "heun"
    steps: int = 30
    cfg_scale: float = 4.0
    # guidance only while the time t is inside [low, high] (t = 1 noise, 0 data; for eps, the DDPM
    # step / 1000); elsewhere the conditional prediction alone, at half the cost (Kynkäänniemi et
    # al. 2024, "Applying Guidance in a Limited Interval"; JiT guides t_noise <= 0.9)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    seed: int = 0
    batch_size: int = 16
    height: int | None = None  # default: the first codec bucket
    width: int | None = None
    use_ema: bool = True
    # denoiser autocast; "auto": bf16 with native bf16, fp16 on older GPUs, else fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    prompts: list[str] = field(default_factory=list)


@dataclass
class StorageConfig:
    """Object-store access for URIs in run_dir / cache_dir (store/storage.py). Each value, when
    set, is exported to the environment variable S3 clients read; unset values leave the
    environment's. Prefer the environment (or an instance role) for the two keys: a YAML
    file is easy to commit by mistake. Never recorded in metadata or checkpoints."""
    endpoint: str | None = None  # AWS_ENDPOINT_URL: MinIO, Ceph, R2, a local moto server
    region: str | None = None  # AWS_REGION
    access_key_id: str | None = None  # AWS_ACCESS_KEY_ID
    secret_access_key: str | None = None  # AWS_SECRET_ACCESS_KEY
    session_token: str | None = None  # AWS_SESSION_TOKEN


@dataclass
class Config:
    name: str
    encoders: list[EncoderConfig]
    run_dir: str | None = None  # default: runs/<name>
    cache_dir: str | None = None  # default: <run_dir>/cache; ablations can share one cache
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def run_path(self) -> Path | RemotePath:
        """A local Path, or a RemotePath for an object-store URI (store/storage.py)."""
        return location(self.run_dir or f"runs/{self.name}")

    @property
    def cache_path(self) -> Path | RemotePath:
        return location(self.cache_dir) if self.cache_dir else self.run_path / "cache"

    def to_dict(self) -> dict:
        """Everything but `storage`: this is what checkpoints, model.json and Ray workers
        get, and credentials must reach none of them (workers get the environment)."""
        raw = dataclasses.asdict(self)
        del raw["storage"]
        return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML recipe; `overrides` are "a.b=value" strings (YAML values).

    Its `storage:` section, if any, is exported to this process's environment."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _load_yaml_with_base(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(raw, key.split("."), yaml.safe_load(value))
    raw.setdefault("name", path.stem)
    for encoder in raw.get("encoders") or []:
        if isinstance(encoder, dict) and encoder.get("kind") == "bidirectional":
            # The paper's instruction is the default for causal LLMs only: a bidirectional
            # encoder (the T5 role) takes none, so it gets none unless one is asked for.
            encoder.setdefault("instruction", None)
    config = build(Config, raw, "")
    validate(config)
    apply_storage(config.storage)  # object-store settings reach this process's S3 clients
    return config


def _load_yaml_with_base(path: Path, seen: tuple = ()) -> dict:
    """A recipe may start from another: `base: default.yaml` (relative to this file).
    Mappings merge key by key; lists and values replace the base's; `name` is not inherited."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} not found at {base_path}")
    inherited = _load_yaml_with_base(base_path, seen + (path.resolve(),))
    inherited.pop("name", None)  # a recipe's name (and so its run_dir) is its own
    return _merge(inherited, raw)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(raw: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        if key.isdigit() and isinstance(raw, list):
            raw = raw[int(key)]
        else:
            raw = raw.setdefault(key, {})
    last = keys[-1]
    if last.isdigit() and isinstance(raw, list):
        raw[int(last)] = value
    else:
        raw[last] = value


def build(cls, raw, where: str):
    """Build dataclass `cls` from plain YAML data, checking names, types and choices."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
    return cls(**values)


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first option that takes the value; the last one's error
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, key)
    if origin is Literal:
        if value is False and "off" in args:  # YAML reads a bare `off` (train.compile=off) as false
            return "off"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 4e-3 as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if not config.encoders:
        raise ConfigError("encoders: at least one encoder is required")
    names = [e.name for e in config.encoders]
    if len(set(names)) != len(names):
        raise ConfigError(f"encoders: names must be unique, got {names}")
    for i, enc in enumerate(config.encoders):
        if not enc.name.isidentifier():
            raise ConfigError(f"encoders[{i}].name: {enc.name!r} must be an identifier")
        if enc.layer == 0:
            raise ConfigError(f"encoders[{i}].layer: 0 is the embedding layer, not a block")
        if enc.kind == "bidirectional" and (enc.instruction or enc.chat_template):
            raise ConfigError(
                f"encoders[{i}]: a bidirectional encoder takes no instruction or chat "
                "template (its prefix cannot be shared; the paper's T5 role has none)"
            )
        if not enc.chat_template and (enc.system_prompt is not None or enc.template_suffix != "keep"):
            raise ConfigError(f"encoders[{i}]: system_prompt and template_suffix apply to the chat "
                              "template; set chat_template: true")
        if enc.backend == "vllm" and (enc.kind != "causal" or enc.final_norm):
            raise ConfigError(
                f"encoders[{i}].backend: 'vllm' serves causal LLMs at an intermediate or last layer "
                "without the final norm; use 'transformers' for bidirectional encoders and final_norm"
            )
        if enc.max_tokens < 1:
            raise ConfigError(f"encoders[{i}].max_tokens: must be >= 1")
    if config.model.encoders is not None:
        missing = sorted(set(config.model.encoders) - set(names))
        if missing or not config.model.encoders:
            raise ConfigError(f"model.encoders: {missing or '[]'} not among encoders {names}")
    for key, value in (("model.refiner_depth", config.model.refiner_depth),
                       ("model.collab_depth", config.model.collab_depth)):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if config.model.dim % config.model.heads:
        raise ConfigError(f"model.dim {config.model.dim} is not divisible by model.heads")
    if config.model.rope and (config.model.dim // config.model.heads) % 4:
        raise ConfigError(f"model.rope: the head width model.dim / model.heads = "
                          f"{config.model.dim // config.model.heads} must be divisible by 4")
    if config.model.abs_pos and config.model.dim % 4:
        raise ConfigError(f"model.abs_pos: model.dim {config.model.dim} must be divisible by 4")
    for i, bucket in enumerate(config.codec.buckets):
        if len(bucket) != 2 or min(bucket) < 1:
            raise ConfigError(f"codec.buckets[{i}]: expected [height, width], got {bucket}")
    if config.codec.kind == "vae" and not config.codec.path:
        raise ConfigError("codec.path: required for codec.kind 'vae'")
    if config.data.source != "shapes" and not config.data.path:
        raise ConfigError(f"data.path: required for data.source {config.data.source!r}")
    if config.model.prediction == "sample" and config.train.objective != "flow":
        raise ConfigError(f"model.prediction: 'sample' needs train.objective 'flow', got {config.train.objective!r}")
    allowed = SOLVERS_FOR_OBJECTIVE[config.train.objective]
    if config.sample.solver not in allowed:
        raise ConfigError(
            f"sample.solver: {config.sample.solver!r} does not fit train.objective "
            f"{config.train.objective!r}; allowed: {list(allowed)}"
        )
    from embed.shapes import KIND_PROBABILITIES, MIRROR_AXES  # the shapes world's scene kinds and mirrors (numpy only)

    for kind, times in config.train.repeat_kinds.items():
        if kind not in KIND_PROBABILITIES:
            raise ConfigError(f"train.repeat_kinds: unknown scene kind {kind!r}; allowed: {list(KIND_PROBABILITIES)}")
        if times < 0:
            raise ConfigError(f"train.repeat_kinds.{kind}: must be >= 0, got {times}")
    if config.train.repeat_kinds and config.data.source != "shapes":
        raise ConfigError(f"train.repeat_kinds: needs data.source shapes (scene kinds), got {config.data.source!r}")
    unknown = [axis for axis in config.data.mirror if axis not in MIRROR_AXES]
    if unknown or len(set(config.data.mirror)) != len(config.data.mirror):
        raise ConfigError(f"data.mirror: {config.data.mirror}; allowed: each of {list(MIRROR_AXES)} at most once")
    if config.data.mirror and config.data.source != "shapes":
        raise ConfigError(f"data.mirror: needs data.source shapes (a scene to mirror), got {config.data.source!r}")
    if not 0.0 <= config.train.caption_dropout < 1.0:
        raise ConfigError("train.caption_dropout: must be in [0, 1)")
    for key, low in RANGES:
        number = _dotted(config, key)
        if isinstance(number, (int, float)) and number < low:  # None and "auto" have no range
            raise ConfigError(f"{key}: must be >= {low}, got {number}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {config.train.ema_decay}")
    if config.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {config.train.lr}")
    if not 0.0 <= config.train.lr_final <= 1.0:
        raise ConfigError(f"train.lr_final: must be in [0, 1] (a fraction of train.lr), got {config.train.lr_final}")
    devices = config.train.devices
    if devices != "auto" and config.train.batch_size % devices:
        raise ConfigError(f"train.batch_size: {config.train.batch_size} rows cannot be shared evenly by "
                          f"train.devices={devices} processes")
    low_high = config.sample.cfg_interval
    if len(low_high) != 2 or not 0.0 <= low_high[0] < low_high[1] <= 1.0:
        raise ConfigError(f"sample.cfg_interval: expected [low, high] with 0 <= low < high <= 1, got {low_high}")
    if config.train.logit_std <= 0:
        raise ConfigError(f"train.logit_std: must be > 0, got {config.train.logit_std}")
    if not 0.0 <= config.train.high_t_share <= 1.0:
        raise ConfigError(f"train.high_t_share: must be in [0, 1], got {config.train.high_t_share}")
    if not 0.0 <= config.train.high_t_from < 1.0:
        raise ConfigError(f"train.high_t_from: must be in [0, 1), got {config.train.high_t_from}")
    if not 0.0 <= config.train.adam_beta2 < 1.0:
        raise ConfigError(f"train.adam_beta2: must be in [0, 1), got {config.train.adam_beta2}")
    if config.train.muon_lr is not None and config.train.muon_lr <= 0:
        raise ConfigError(f"train.muon_lr: must be > 0 (or null for train.lr), got {config.train.muon_lr}")
    if not 0.0 <= config.train.muon_momentum < 1.0:
        raise ConfigError(f"train.muon_momentum: must be in [0, 1), got {config.train.muon_momentum}")
    if config.train.strategy == "fsdp" and config.train.optimizer == "muon":
        raise ConfigError("train.optimizer=muon with train.strategy=fsdp: Muon orthogonalises whole weight "
                          "matrices, and FSDP gives each process a shard of them; use train.optimizer=adamw")
    if config.train.strategy == "fsdp" and config.train.adamw_kernel == "fused":
        raise ConfigError("train.adamw_kernel=fused with train.strategy=fsdp: the fused kernel is not used on "
                          "sharded parameters here; use train.adamw_kernel=auto (torch's default) or foreach")
    if config.train.max_minutes is not None and config.train.max_minutes <= 0:
        raise ConfigError(f"train.max_minutes: must be > 0 (or null for no cap), got {config.train.max_minutes}")
    stage_configs(config)  # each stage builds and validates as a config of its own


# (key, lowest allowed value): the plain numeric ranges
RANGES = [
    ("train.steps", 0), ("train.batch_size", 1), ("train.warmup_steps", 0), ("train.grad_clip", 0.0),
    ("train.weight_decay", 0.0), ("train.devices", 1), ("train.num_workers", 0), ("train.checkpoint_every", 1),
    ("train.log_every", 1), ("train.eval_every", 0), ("train.eval_rows", 1), ("train.eval_steps", 1),
    ("sample.steps", 1), ("sample.batch_size", 1), ("sample.cfg_scale", 0.0),
    ("embed.actors", 1), ("embed.threads_per_actor", 1), ("embed.gpus_per_actor", 0.0), ("embed.batch_size", 1),
    ("embed.shard_rows", 1), ("embed.caption_memo_mib", 0.0),
    ("data.max_caption_chars", 1), ("data.max_image_pixels", 0), ("data.num_train", 0), ("data.num_eval", 0),
    ("data.height", 1), ("data.width", 1),
    ("model.dim", 1), ("model.depth", 1), ("model.heads", 1), ("model.patch", 1), ("model.mlp_ratio", 0.0)]


def _dotted(config: Config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def stage_configs(config: Config) -> list[Config]:
    """The trainings of a curriculum (`train.stages`), in order, each a whole config; a config
    without stages is its own one training.

    A stage is a `name` and the train keys it changes: stage 1 changes the config's `train`,
    every later stage the stage before's (mappings such as repeat_kinds merge key by key, as
    with `base:`). Each stage starts from the EMA weights of the stage before (the first from
    `train.init_from`, if set) unless it names its own `init_from`, with a fresh optimizer,
    schedule and EMA warm-up. Every stage but the last trains in <run>/stages/<i>-<name>; the
    last in the run folder itself, where `sample` and `eval` read a run's weights."""
    if not config.train.stages:
        return [config]
    whole = dataclasses.asdict(config)
    train = {key: value for key, value in whole["train"].items() if key != "stages"}
    configs: list[Config] = []
    names: list[str] = []
    for i, stage in enumerate(config.train.stages, 1):
        where = f"train.stages[{i - 1}]"
        stage = dict(stage)
        name = stage.pop("name", None)
        if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: required, a folder name (letters, digits, _ . -), got {name!r}")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} names an earlier stage too; stage names must be unique")
        names.append(name)
        if "stages" in stage:
            raise ConfigError(f"{where}: a stage cannot have stages of its own")
        before = whole["train"]["init_from"] if i == 1 else str(configs[-1].run_path)
        init_from = stage.pop("init_from", before)  # never inherited: each stage says where it starts
        train = _merge(train, stage)
        raw = {**whole, "train": {**train, "init_from": init_from}}
        last = i == len(config.train.stages)
        raw["run_dir"] = str(config.run_path) if last else str(config.run_path / "stages" / f"{i}-{name}")
        try:
            built = build(Config, raw, "")
            validate(built)
        except ConfigError as err:
            raise ConfigError(f"{where} ({name}): {err}") from None
        configs.append(built)
    return configs


def config_from_dict(raw: dict) -> Config:
    """A Config rebuilt from `Config.to_dict()` output (a checkpoint, a Ray worker), validated."""
    config = build(Config, raw, "")
    validate(config)
    return config


def encoder_features(raw: dict, names: list[str] | None = None) -> list[tuple]:
    """What makes the features of a config's encoders (a `Config.to_dict()` output): (name,
    path, layer) of each of `names`, or of every encoder in order. Weights trained on one
    list mean nothing read from another, though they load without an error."""
    by_name = {e["name"]: e for e in raw.get("encoders", [])}
    return [(n, by_name[n]["path"], by_name[n]["layer"]) for n in (list(by_name) if names is None else names)]


def config_differences(saved: dict, now: dict, sections: tuple[str, ...] = ("model",), skip=frozenset(),
                       places: tuple[str, str] = ("there", "here")) -> list[str]:
    """What differs between two `Config.to_dict()`s in the keys of `sections` but `skip`, and in
    the encoders' features, each said as "key: saved-value PLACE, now-value PLACE". A key `saved`
    lacks is a switch added since, whose default builds what it was trained with: no difference."""
    was, is_ = places
    differ = [f"{section}.{key}: {value!r} {was}, {now[section][key]!r} {is_}"
              for section in sections for key, value in saved.get(section, {}).items()
              if key in now[section] and key not in skip and now[section][key] != value]
    if "encoders" in saved and encoder_features(saved) != encoder_features(now):
        differ.append(f"encoders: {encoder_features(saved)} {was}, {encoder_features(now)} {is_}")
    return differ
