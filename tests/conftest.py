"""Shared fixtures: tiny random transformers models saved locally, a local Ray.

The models are real architectures (Llama, Qwen2, BERT) built with `from_config` and
`save_pretrained`, so the real loading code runs in seconds with no download.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CORPUS = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:",
    "a large green square to the left of a small blue triangle",
    "a red circle, a blue square, a green triangle and a yellow circle",
    "two purple circles above three orange squares",
] * 5


def _bpe_tokenizer(folder: Path, add_bos: bool):
    """A byte-level BPE tokenizer trained on a few captions (a Llama-3- or SmolLM2-like tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)
    return fast


def make_causal_model(folder: Path, arch: str = "llama", add_bos: bool = True, layers: int = 4) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _bpe_tokenizer(folder, add_bos)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    return folder


def make_bidirectional_model(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from embed.encoder import resolve_model_path

    source = resolve_model_path("embedded:minilm")  # only its tokenizer files are used
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_dir) -> Path:
    return make_causal_model(models_dir / "llama", "llama", add_bos=True)


@pytest.fixture(scope="session")
def qwen_dir(models_dir) -> Path:
    return make_causal_model(models_dir / "qwen2", "qwen2", add_bos=False)


@pytest.fixture(scope="session")
def bert_dir(models_dir) -> Path:
    return make_bidirectional_model(models_dir / "bert")


@pytest.fixture(scope="session")
def local_ray():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def tiny_raw_config(tmp_path: Path, llama_dir: Path, bert_dir: Path | None = None, **sections) -> dict:
    """A complete config dict for a tiny shapes run: tiny encoders, tiny model, few rows."""
    encoders = [{"name": "llm", "path": str(llama_dir), "kind": "causal", "layer": -3,
                 "compute_dtype": "float32", "store_dtype": "bfloat16", "max_tokens": 32}]
    if bert_dir is not None:
        encoders.append({"name": "bert", "path": str(bert_dir), "kind": "bidirectional", "layer": -1,
                         "instruction": None, "compute_dtype": "float32", "store_dtype": "bfloat16"})
    raw = {
        "name": "tiny", "run_dir": str(tmp_path / "run"), "encoders": encoders,
        "data": {"source": "shapes", "num_train": 48, "num_eval": 8, "height": 32, "width": 32},
        "embed": {"actors": 1, "threads_per_actor": 1, "batch_size": 16, "shard_rows": 32},
        "codec": {"buckets": [[32, 32]]},
        "model": {"dim": 32, "depth": 1, "heads": 2, "patch": 8, "refiner_depth": 1, "collab_depth": 1},
        "train": {"steps": 8, "batch_size": 8, "warmup_steps": 2, "precision": "32-true", "log_every": 1,
                  "checkpoint_every": 4, "lr": 1e-3},
        "sample": {"steps": 2, "batch_size": 4, "prompts": ["a red circle", "a blue square"]},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return raw


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, llama_dir, bert_dir, local_ray) -> dict:
    """A shapes cache embedded once per session by the real Ray job; returns its raw config."""
    from embed.job import run_embed
    from store.config import Config, build, validate

    raw = tiny_raw_config(tmp_path_factory.mktemp("tiny"), llama_dir, bert_dir)
    config = build(Config, raw, "")
    validate(config)
    run_embed(config, progress=False)
    return raw
