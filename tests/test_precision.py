"""Every precision path trains, on any CPU: the host's capabilities decide nothing here.

`auto` picks a precision, an AdamW kernel and a number of DDP processes from the hardware, so
the suite on one CPU would only ever run the paths that CPU picks (that is how fused AdamW
under bf16-mixed, refused by Lightning's clipping, reached main). Here each path is asked for
by name: a tiny model trains a few steps in every combination of

- train.precision: 32-true, bf16-mixed, and 16-mixed (refused on a CPU by name; its GPU path,
  float16 autocast with a grad scaler, runs on the CPU through Lightning's own plugin),
- train.adamw_kernel: auto, fused, foreach, loop,
- train.optimizer: adamw, muon,
- train.grad_clip: off, on,
- 1 and 2 processes (DDP over gloo),

and each asserts finite losses, a lower loss on fixed draws than the untrained model's, and
gradients clipped where asked; or the refusal, naming the keys. tests/precision_cases.py runs
the cases: all of them in one process, and all of them in one pair of DDP processes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
FP16_SCALED = "16-mixed-scaler"
PRECISIONS = ("32-true", "bf16-mixed", FP16_SCALED, "16-mixed")
KERNELS = ("auto", "fused", "foreach", "loop")
OPTIMIZERS = ("adamw", "muon")
CLIP = 0.05  # below the tiny model's gradient norm, so "on" does clip
CLIPS = (0.0, CLIP)
WORLDS = (1, 2)
STEPS = 5


def case_name(precision: str, kernel: str, optimizer: str, clip: float) -> str:
    return f"{precision}-{kernel}-{optimizer}-clip{'on' if clip else 'off'}"


CASES = [dict(name=case_name(*c), precision=c[0], kernel=c[1], optimizer=c[2], clip=c[3], steps=STEPS)
         for c in itertools.product(PRECISIONS, KERNELS, OPTIMIZERS, CLIPS)]
# train.strategy fsdp (FSDP2 over the processes): on 2 processes; muon and the fused kernel are
# refused with it when the config is read
FSDP_CASES = [dict(name="fsdp-" + case_name(*c), precision=c[0], kernel=c[1], optimizer=c[2], clip=c[3],
                   steps=STEPS, strategy="fsdp")
              for c in itertools.product(("32-true", "bf16-mixed"), KERNELS, OPTIMIZERS, CLIPS)]
START = dict(name="start", precision="32-true", kernel="auto", optimizer="adamw", clip=0.0, steps=0)


@pytest.fixture(scope="module")
def matrix(tiny_cache, tmp_path_factory) -> dict[int, Path]:
    """Runs every case in one process and in two DDP processes (side by side); the result folders."""
    base = tmp_path_factory.mktemp("precision")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    running = {}
    for world in WORLDS:
        spec = base / f"cases-{world}.json"
        cases = [START, *CASES, *(FSDP_CASES if world > 1 else [])]
        spec.write_text(json.dumps({"world": world, "raw": tiny_cache, "cases": cases}))
        port = free_ports(1)[0]
        for rank in range(world):
            rank_env = dict(env, LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) if world > 1 else env
            log = open(base / f"log-{world}-{rank}.txt", "w")
            running[(world, rank)] = (subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "precision_cases.py"), str(spec), str(base / f"world{world}")],
                cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log)
    for (world, rank), (process, log) in running.items():
        try:
            code = process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timed out"
        log.close()
        assert code == 0, f"{world} process(es), rank {rank}: {code}\n" + (
            base / f"log-{world}-{rank}.txt").read_text()[-3000:]
    return {world: base / f"world{world}" for world in WORLDS}


def result(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    assert path.is_file(), f"no result for {name}"
    found = json.loads(path.read_text())
    assert "error" not in found, found.get("traceback", found["error"])
    return found


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_every_precision_trains_with_every_optimizer_setting(matrix, case, world):
    check(result(matrix[world], case["name"]), case, result(matrix[world], "start")["fixed_loss"])


@pytest.mark.parametrize("case", FSDP_CASES, ids=[c["name"] for c in FSDP_CASES])
def test_fsdp_trains_with_every_precision_and_clipping_or_refuses_by_name(matrix, case):
    found = result(matrix[2], case["name"])
    if case["optimizer"] == "muon":
        assert "train.optimizer=muon with train.strategy=fsdp" in found.get("refused", ""), found
    elif case["kernel"] == "fused":
        assert "train.adamw_kernel=fused with train.strategy=fsdp" in found.get("refused", ""), found
    else:
        check(found, case, result(matrix[2], "start")["fixed_loss"])


def check(found: dict, case: dict, start: float) -> None:
    """A finite, falling loss and gradients clipped where asked; or 16-mixed's refusal on a CPU."""
    if case["precision"] == "16-mixed":  # on a CPU Lightning would train bf16-mixed instead, silently
        assert "refused" in found, found
        assert "train.precision=16-mixed needs a GPU" in found["refused"]
        return
    assert "refused" not in found, found["refused"]
    assert found["steps"] == STEPS and found["precision"] == case["precision"]
    assert len(found["losses"]) == STEPS and all(math.isfinite(x) for x in found["losses"])
    assert math.isfinite(found["fixed_loss"]) and found["fixed_loss"] < 0.95 * start, (found["fixed_loss"], start)
    norms = [n for n in found["norms"] if math.isfinite(n)]  # a scaler's skipped step has no finite norm
    assert len(norms) >= STEPS - 2, found["norms"]
    if case["clip"]:
        assert max(norms) <= CLIP * 1.001, norms
    else:
        assert max(norms) > CLIP, norms  # so the clipped cases did clip
