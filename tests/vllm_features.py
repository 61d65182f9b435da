"""Runs in .venv-vllm (`make install-vllm`): the vLLM backend's features, written to safetensors.

    .venv-vllm/bin/python tests/vllm_features.py REQUEST.json OUT_DIR

REQUEST.json holds the captions and a list of EncoderConfig field sets; case i is written
to OUT_DIR/i.safetensors. The test in the project's own environment compares the files
with its transformers backend (tests/test_vllm.py).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from embed.encoder import build_encoder
from store.config import EncoderConfig

request = json.loads(Path(sys.argv[1]).read_text())
for case, fields in enumerate(request["encoders"]):
    encoder = build_encoder(EncoderConfig(**fields, backend="vllm"))
    tensors = {"prefix_ids": torch.tensor(encoder.prefix_ids, dtype=torch.int32),
               "prefix_states": encoder.prefix_states}
    for i, out in enumerate(encoder.encode(request["captions"], batch_size=2)):
        tensors[f"ids.{i}"] = torch.from_numpy(out.ids)
        tensors[f"states.{i}"] = out.states
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(sys.argv[2]) / f"{case}.safetensors"),
              metadata={"compute_dtype": encoder.compute_dtype_name, "blocks_run": str(encoder.blocks)})
    del encoder
