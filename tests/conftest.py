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


# Tiny configs for each decoder family the encoder supports. A sliding window of 8 is
# shorter than the instruction prefix, so the shared-prefix cache crosses the window.
CAUSAL_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # also Qwen2.5: same architecture
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                "layer_types": ["sliding_attention", "full_attention"] * 2}),
}


def make_causal_model(folder: Path, arch: str = "llama", add_bos: bool = True, layers: int = 4,
                      head_dim: int | None = None) -> Path:
    """`head_dim`: vLLM's CPU attention takes multiples of 32 only; 32 means 2 heads of 32."""
    import torch
    import transformers

    tokenizer = _bpe_tokenizer(folder, add_bos)
    config_name, model_name, extra = CAUSAL_FAMILIES[arch]
    heads = 4
    if head_dim is not None:
        heads = 64 // head_dim
        extra = {**extra, "head_dim": head_dim}
        if "query_pre_attn_scalar" in extra:
            extra["query_pre_attn_scalar"] = head_dim
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{k: v[:layers] if k == "layer_types" else v for k, v in extra.items()})
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(folder)
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


def make_t5_model(folder: Path) -> Path:
    """A T5 checkpoint, encoder and decoder, as PixArt's T5-XXL ships; a SentencePiece-like
    unigram tokenizer that appends </s> and adds no BOS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=1,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def make_gemma3_multimodal_model(folder: Path) -> Path:
    """Gemma 3 as its 4B-and-up checkpoints ship: a language model beside a vision tower."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = _bpe_tokenizer(folder, add_bos=True)
    n = len(tokenizer)
    text = CAUSAL_FAMILIES["gemma3"][2]
    config = Gemma3Config(
        text_config={"vocab_size": n + 3, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": tokenizer.pad_token_id,
                     **text},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4, image_token_index=n, boi_token_index=n + 1, eoi_token_index=n + 2)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def fixed_draw_loss(model, objective, batch, encoders, seed=0) -> float:
    """The objective's loss on fixed noise and timesteps: comparable across checkpoints."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x_t, t, target = objective.sample_training(batch["latents"], generator)
    features = [batch["text"][n].states for n in encoders]
    masks = [batch["text"][n].mask for n in encoders]
    with torch.no_grad():
        return objective.loss(model(x_t, t, features, masks), target).item()


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (another Ray on this machine holds the defaults)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


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
def family_dir(models_dir):
    """Builds (once per session) the tiny model of a decoder family: family_dir("gemma2")."""
    def build(arch: str) -> Path:
        folder = models_dir / f"family-{arch}"
        if not (folder / "config.json").is_file():
            if arch == "gemma3-multimodal":
                make_gemma3_multimodal_model(folder)
            else:
                make_causal_model(folder, arch, add_bos=not arch.startswith("qwen"))
        return folder
    return build


@pytest.fixture(scope="session")
def t5_dir(models_dir) -> Path:
    return make_t5_model(models_dir / "t5")


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


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on loopback: moto's server mode, with a bucket "lidit". The storage
    variables are set in this process's environment (as `storage:` would set them) and
    restored after; yields the endpoint URL."""
    pytest.importorskip("moto")
    import boto3

    from store.storage import start_local_s3

    server, endpoint = start_local_s3()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "lidit-test-key",
           "AWS_SECRET_ACCESS_KEY": "lidit-test-secret", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="lidit")
    yield endpoint
    server.kill()
    server.wait()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
