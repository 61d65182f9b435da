"""bench/synthetic_cache.py: the real schema, written by the real writer; `python -m train` trains on it."""

import dataclasses

import lance
import pytest
import torch
import numpy as np
import yaml
from lance.arrow import BFloat16Type
from safetensors.torch import load_file

from bench.synthetic_cache import main as synthetic_cache
from store.config import load_config
from store.reader import CacheReader
from store.schema import samples_schema
from store.writer import CONSTANTS_FILE, SAMPLES
from train.__main__ import main as python_m_train
from train.run import open_cache

HIDDEN, TOKENS, PREFIX, ROWS = 64, 8, 4, 24
CONFIG = {  # two causal encoders whose models exist nowhere: the cache stands in for them
    "name": "tiny-synthetic",
    "data": {"source": "manifest", "path": "pairs.parquet"},
    "encoders": [{"name": "llm_a", "path": "/models/llm-a", "kind": "causal", "layer": -3, "max_tokens": 16},
                 {"name": "llm_b", "path": "/models/llm-b", "kind": "causal", "layer": -3, "max_tokens": 16}],
    "codec": {"kind": "vae", "path": "/models/vae-16ch", "buckets": [[32, 32], [32, 48]]},
    "model": {"dim": 32, "depth": 1, "heads": 2, "patch": 2, "refiner_depth": 1, "collab_depth": 1},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "precision": "32-true", "log_every": 1,
              "checkpoint_every": 1},
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(config path, cache folder) of a synthetic cache written once for this module."""
    root = tmp_path_factory.mktemp("synthetic")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run_dir": str(root / "run")}))
    cache = root / "cache"
    assert synthetic_cache(["--config", str(path), "--rows", str(ROWS), "--out", str(cache), "--hidden", str(HIDDEN),
                            "--tokens", str(TOKENS), "--prefix-tokens", str(PREFIX), "--shard-rows", "10"]) == 0
    return path, cache


def test_states_are_stored_as_the_real_job_stores_them(written):
    path, cache = written
    reader = CacheReader(cache)
    expected = samples_schema(reader.meta["encoders"])
    stored = lance.dataset(str(cache / SAMPLES)).schema
    for name in ("llm_a", "llm_b"):
        states = stored.field(f"{name}__states").type  # list<fixed_size_list<bfloat16, D>>
        assert states == expected.field(f"{name}__states").type
        assert isinstance(states.value_type.value_type, BFloat16Type) and states.value_type.list_size == HIDDEN
    assert stored.names == expected.names and len(reader) == ROWS


def test_the_training_reader_opens_it_and_assembles_prefix_and_caption(written):
    path, cache = written
    config = load_config(path, [f"cache_dir={cache}"])
    reader = open_cache(config)  # the check `train` runs against the config's encoders
    buckets = reader.column("bucket")
    batch = reader.take(np.flatnonzero(buckets == buckets[0])[:3])  # a training batch holds one bucket
    constants = load_file(cache / CONSTANTS_FILE)
    for name in ("llm_a", "llm_b"):
        text = batch["text"][name]
        assert text.states.shape == (3, PREFIX + TOKENS, HIDDEN) and text.states.dtype == torch.bfloat16
        assert text.mask.all() and text.prefix_len == PREFIX
        assert torch.equal(text.states[1, :PREFIX], constants[f"{name}.prefix_states"])  # the shared prefix
        assert constants[f"{name}.null_states"].shape == (0, HIDDEN)  # a causal encoder's empty caption
    shapes = {tuple(s) for s in reader.column("latent_shape")}
    assert shapes == {(16, 4, 4), (16, 4, 6)}  # the paper's 16 channels, 8x, in both buckets


def test_python_m_train_trains_on_it(written, tmp_path):
    path, cache = written
    run = tmp_path / "run"
    assert python_m_train(["--config", str(path), "--set", f"cache_dir={cache}", "--set", f"run_dir={run}"]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "ema.safetensors").is_file()


def test_a_rerun_writes_only_the_rows_not_yet_written(written, tmp_path):
    path, cache = written
    copy = tmp_path / "cache"
    options = ["--config", str(path), "--out", str(copy), "--hidden", str(HIDDEN), "--tokens", str(TOKENS),
               "--prefix-tokens", str(PREFIX)]
    assert synthetic_cache([*options, "--rows", "6"]) == 0
    assert synthetic_cache([*options, "--rows", "10"]) == 0
    reader = CacheReader(copy)
    ids = list(reader.column("id"))
    assert len(ids) == 10 == len(set(ids))
    config = dataclasses.replace(load_config(path), cache_dir=str(copy))
    assert open_cache(config).meta["encoders"] == CacheReader(cache).meta["encoders"]


def test_take_returns_the_rows_in_the_order_asked_for(written):
    path, cache = written
    reader = CacheReader(cache)
    buckets = reader.column("bucket")
    same = [int(r) for r in np.flatnonzero(buckets == buckets[0])]
    rows = [same[3], same[0], same[2], same[0]]  # out of file order, one row twice
    batch = reader.take(rows, drop_text=[False, False, True, False])
    assert batch["ids"] == [f"synthetic-{r:09d}" for r in rows]
    for i, row in enumerate(rows):
        alone = reader.take([row])
        torch.testing.assert_close(batch["latents"][i], alone["latents"][0], rtol=0, atol=0)
        for name in ("llm_a", "llm_b"):
            expected = reader.null[name] if i == 2 else alone["text"][name].states[0, PREFIX:]
            got = batch["text"][name].states[i, PREFIX:][batch["text"][name].mask[i, PREFIX:]]
            assert torch.equal(got, expected)
