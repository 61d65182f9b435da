"""A two-node Ray cluster on one machine, with the cache and the run on (local) S3.

The head is started with `ray start --head`; a second node joins with `ray start
--address`, its own temp directory, and a custom resource no other node has. The encoder
actors ask for that resource, so they can only run on the second node, and the driver
(on the head) writes the cache to S3: no worker relies on the driver's file system. Then
Ray Train trains two DDP workers from the S3 cache and writes its checkpoints there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_ports, tiny_raw_config
from store.reader import CacheReader
from store.storage import location
from train.export import load_exported

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def start_node(env: dict, head_port: int, head: bool, extra: list[str]) -> tuple[subprocess.Popen, int | None]:
    """One `ray start --block` node in its own process group, every port explicit and free,
    its own temp directory; returns it and, for the head, its dashboard port."""
    ports = free_ports(8)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    common = [f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
              f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
              f"--node-manager-port={ports[4]}", f"--object-manager-port={ports[5]}", f"--temp-dir={temp}",
              "--disable-usage-stats", "--block"]
    if head:
        args = ["--head", f"--port={head_port}", f"--dashboard-port={ports[6]}", "--include-dashboard=true",
                f"--ray-client-server-port={ports[7]}"]
    else:
        args = [f"--address=127.0.0.1:{head_port}"]
    node = subprocess.Popen([RAY, "start", *args, *common, *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return node, ports[6] if head else None


def submit(env: dict, dashboard: int, command: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard is still coming up."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                               "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}}),
                               "--", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=400, check=False)
        output = done.stderr + done.stdout
        if done.returncode == 0 or time.time() > deadline or not (
                "Connection refused" in output or "try again" in output):
            return done
        time.sleep(2)


def wait_for_nodes(env: dict, dashboard: int, count: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        listed = subprocess.run([RAY, "list", "nodes", "--address", f"http://127.0.0.1:{dashboard}", "--format",
                                 "json"], env=env, capture_output=True, text=True, check=False)
        alive = json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []
        if sum(n["state"] == "ALIVE" for n in alive) >= count:  # before any: "No resource in the cluster"
            return
        time.sleep(1)
    raise TimeoutError(f"{count} Ray nodes did not come up")


@pytest.mark.slow
def test_embed_submit_and_ray_train_on_a_two_node_cluster_with_the_cache_on_s3(s3, tmp_path, llama_dir):
    raw = tiny_raw_config(tmp_path, llama_dir)
    raw["run_dir"] = "s3://lidit/cluster"
    raw["embed"].update(actors=1, resources={"llm_node": 1})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    # Both nodes get the storage variables (as a real cluster's nodes would from their
    # environment or role); token auth off for a throwaway loopback cluster.
    # `python` on the cluster is this environment's, as in an activated virtual environment.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    head_port = free_ports(1)[0]
    head, dashboard = start_node(env, head_port, head=True, extra=["--num-cpus=2"])
    nodes = [head]
    try:
        second, _ = start_node(env, head_port, head=False, extra=["--num-cpus=2", '--resources={"llm_node": 1}'])
        nodes.append(second)
        wait_for_nodes(env, dashboard, 2)

        embed = subprocess.run(["make", "embed-submit", f"CONFIG={config_path}", "ARGS=--quiet"], cwd=ROOT,
                               env=dict(env, RAY_ADDRESS=f"http://127.0.0.1:{dashboard}"), capture_output=True,
                               text=True, timeout=600, check=False)
        assert embed.returncode == 0, embed.stdout[-3000:] + embed.stderr[-3000:]
        assert "succeeded" in embed.stdout
        assert len(CacheReader("s3://lidit/cluster/cache")) == 56

        train = submit(env, dashboard, [sys.executable, "-m", "train.ray_train", "--config", str(config_path),
                                        "--workers", "2"])
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert load_exported("s3://lidit/cluster/checkpoints").step == raw["train"]["steps"]
        assert location("s3://lidit/cluster/checkpoints/last.ckpt").is_file()
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
