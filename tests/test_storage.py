"""Caches and runs on object storage: a real S3 API (moto's server) on loopback.

Embed to S3, check the cache there, train from it, resume from an S3 checkpoint, sample
from the exported S3 weights; a driver killed mid-run on S3 leaves exactly one row per id
after a rerun; and no credential reaches any object written.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pandas as pd
import pytest
import yaml

from conftest import tiny_raw_config
from embed.job import run_embed
from sample.__main__ import main as sample_main
from store.check import check_cache
from store.config import Config, build, load_config, validate
from store.reader import CacheReader
from store.storage import RemotePath, location
from train.export import load_exported
from train.run import run_train

ROOT = Path(__file__).resolve().parents[1]


def bucket_objects() -> dict[str, bytes]:
    fs = location("s3://lidit").fs
    return {key: fs.cat_file(key) for key in fs.find("lidit")}


def test_remote_path_reads_writes_and_joins_like_a_path(s3):
    root = location("s3://lidit/paths")
    assert isinstance(root, RemotePath) and str(root / "a" / "b.txt") == "s3://lidit/paths/a/b.txt"
    assert (root / "a" / "b.txt").parent == root / "a" and (root / "a" / "b.txt").name == "b.txt"
    assert not (root / "a" / "b.txt").exists()
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a" / "b.txt").read_text() == "hello" and (root / "a" / "b.txt").is_file()
    assert (root / "a").exists() and not (root / "a").is_file()
    assert location("runs/x") == Path("runs/x")


@pytest.mark.slow
def test_embed_check_train_resume_and_sample_on_s3(s3, tmp_path, llama_dir, local_ray):
    raw = tiny_raw_config(tmp_path, llama_dir)
    raw["run_dir"] = "s3://lidit/run"
    # Credentials through the config's storage section too: they must reach no object.
    raw["storage"] = {"endpoint": s3, "access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                      "secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    config = load_config(config_path)
    assert str(config.cache_path) == "s3://lidit/run/cache"

    summary = run_embed(config, progress=False)
    assert summary.written == 56 and summary.cache == "s3://lidit/run/cache"
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists(), "nothing may land on local disk"
    reader = CacheReader(config.cache_path)
    assert len(reader) == 56
    assert check_cache("s3://lidit/run/cache", recompute=2, log=lambda *_: None)["problems"] == []

    logs: list[str] = []
    first = run_train(config, progress=False, log=logs.append)
    assert first["steps"] == 8 and not any("resuming" in line for line in logs)
    assert location("s3://lidit/run/checkpoints/last.ckpt").is_file()
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=12))
    second = run_train(longer, progress=False, log=logs.append)
    assert "train: resuming from s3://lidit/run/checkpoints/last.ckpt (step 8)" in logs and second["steps"] == 12
    logged = pd.read_csv(io.BytesIO(location("s3://lidit/run/logs/metrics.csv").read_bytes()))["step"]
    assert (logged.min(), logged.max()) == (0, 11)  # the first part's rows survive the resume
    assert load_exported("s3://lidit/run/checkpoints").step == 12
    assert location("s3://lidit/run/logs/metrics.csv").is_file()
    assert location("s3://lidit/run/tensorboard").exists()

    assert sample_main(["--config", str(config_path), "--steps", "2"]) == 0
    samples = location("s3://lidit/run/samples")
    assert (samples / "0000.png").is_file() and (samples / "grid.png").is_file()

    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    objects = bucket_objects()
    assert any(key.endswith("model.json") for key in objects) and any(key.endswith(".ckpt") for key in objects)
    leaked = [key for key, data in objects.items() if any(secret in data for secret in secrets)]
    assert leaked == [], f"credentials written into {leaked}"


@pytest.mark.slow
def test_killed_driver_then_rerun_on_s3_leaves_exactly_one_row_per_id(s3, tmp_path, llama_dir):
    """The driver, the only writer, killed mid-run: the rerun skips every committed id.
    (A local cache takes the same path; tests/test_job.py kills an encoder actor there.)"""
    n = 600
    (tmp_path / "captions.txt").write_text("".join(f"a red circle number {i}\n" for i in range(n)))
    raw = tiny_raw_config(tmp_path, llama_dir)
    raw.update(run_dir="s3://lidit/killed", data={"source": "captions", "path": str(tmp_path / "captions.txt")})
    raw["embed"].update(shard_rows=32, batch_size=8)  # a commit to moto takes about a second
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    samples = "s3://lidit/killed/cache/samples.lance"
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the storage variables of the s3 fixture
    command = [sys.executable, "-m", "embed", "--config", str(config_path), "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not location(samples).exists():
        time.sleep(0.2)
    time.sleep(0.5)  # a few shards in, mid-shard
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray workers it started
    proc.wait()
    partial = lance.dataset(samples).count_rows()
    assert 0 < partial < n, "kill the run mid-way"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = lance.dataset(samples).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert f"skipped {partial} already committed" in result.stdout


def test_storage_section_never_reaches_a_recorded_config(tmp_path, llama_dir):
    raw = tiny_raw_config(tmp_path, llama_dir)
    raw["storage"] = {"endpoint": "http://127.0.0.1:9", "secret_access_key": "do-not-record"}
    config = build(Config, raw, "")
    validate(config)
    assert "storage" not in config.to_dict() and "do-not-record" not in repr(config.to_dict())


def test_only_the_endpoint_and_region_are_passed_to_other_nodes(s3):
    from store.storage import storage_env

    passed = storage_env()
    assert passed["AWS_ENDPOINT_URL"] == s3 and passed["AWS_REGION"] == "us-east-1"
    assert "AWS_SECRET_ACCESS_KEY" not in passed and "AWS_ACCESS_KEY_ID" not in passed
