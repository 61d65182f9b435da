"""The vLLM backend equals the transformers backend: same layer, no final norm, same rows.

vLLM runs in its own environment (.venv-vllm, `make install-vllm`, which `make test` runs);
one subprocess there encodes every case, and each test compares its case here, with the
transformers backend of the project's own environment as the reference.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_causal_model
from embed.encoder import PromptEncoder
from store.config import EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CAPTIONS = [
    "a red circle",
    "a large green square to the left of a small blue triangle",
    'two "quoted" 3 shapes\nwith a newline, émoji 🟥 and 中文',
    "",
]
# (family, chat template, layer, store dtype). Gemma 2's sliding window (8 tokens) is
# shorter than the shared prefix; the chat template adds suffix ids to every row.
CASES = [("llama", False, -3, "float32"), ("llama", True, -3, "float32"), ("qwen2", False, -3, "float32"),
         ("gemma2", False, -3, "float32"), ("llama", False, -2, "bfloat16")]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: run `make install-vllm`"),
]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """Every case's encoder fields and the features vLLM wrote for it."""
    root = tmp_path_factory.mktemp("vllm")
    models = {arch: make_causal_model(root / arch, arch, add_bos=arch != "qwen2", head_dim=32)
              for arch in {case[0] for case in CASES}}
    encoders = [{"name": "llm", "path": str(models[arch]), "layer": layer, "chat_template": chat,
                 "compute_dtype": "float32", "store_dtype": store} for arch, chat, layer, store in CASES]
    (root / "request.json").write_text(json.dumps({"encoders": encoders, "captions": CAPTIONS}))
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_features.py"), str(root / "request.json"),
                          str(root)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    features = []
    for case in range(len(CASES)):
        with safe_open(str(root / f"{case}.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            features.append(tensors | {"meta": f.metadata()})
    return encoders, features


@pytest.mark.parametrize("case", [i for i, c in enumerate(CASES) if c[3] == "float32"],
                         ids=[f"{c[0]}-chat{c[1]}" for c in CASES if c[3] == "float32"])
def test_vllm_features_equal_the_transformers_backend(case, vllm_run):
    """fp32 compute, fp32 storage: equal to float rounding, ids and prefix included."""
    encoders, features = vllm_run
    got, reference = features[case], PromptEncoder(EncoderConfig(**encoders[case]))
    assert got["meta"]["blocks_run"] == str(reference.blocks) == "2"
    assert got["prefix_ids"].tolist() == reference.prefix_ids
    torch.testing.assert_close(got["prefix_states"], reference.prefix_states, rtol=1e-4, atol=1e-5)
    for i, out in enumerate(reference.encode(CAPTIONS)):
        assert got[f"ids.{i}"].tolist() == out.ids.tolist(), CAPTIONS[i]
        # fp32 rounding scales with the activations: Gemma 2's reach |x| ~ 6, where vLLM's AVX-512
        # kernels differed from transformers by up to 2.3e-5 (the AVX2 ones by less).
        scale = max(1.0, out.states.abs().max().item()) if out.states.numel() else 1.0
        torch.testing.assert_close(got[f"states.{i}"], out.states, rtol=1e-4, atol=1e-5 * scale, msg=CAPTIONS[i])


def test_vllm_bf16_storage_is_within_bf16_rounding_of_the_fp32_reference(vllm_run):
    encoders, features = vllm_run
    case = next(i for i, c in enumerate(CASES) if c[3] == "bfloat16")
    got = features[case]
    reference = PromptEncoder(EncoderConfig(**{**encoders[case], "store_dtype": "float32"}))
    assert got["meta"]["blocks_run"] == str(reference.blocks) == "3"
    for i, out in enumerate(reference.encode(CAPTIONS)):
        assert got[f"states.{i}"].dtype == torch.bfloat16
        torch.testing.assert_close(got[f"states.{i}"].float(), out.states, rtol=2**-8, atol=1e-6)
