"""Trains a few steps of the tiny model for each case of the precision matrix, in one process.

    python tests/precision_cases.py CASES.json OUT_DIR

Run by tests/test_precision.py: once alone, and once as each of two DDP processes started
with LOCAL_RANK / WORLD_SIZE / MASTER_PORT set, so Lightning joins them instead of launching
its own and one pair of processes trains every case in turn (a launch per case would cost
the suite minutes). CASES.json holds the tiny cache's raw config and the cases. For each
case, rank 0 writes OUT_DIR/<case>.json: the logged losses, the largest gradient norm an
optimizer step saw (after clipping) and the loss of the trained weights on fixed draws, or
the refusal's message.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import cli  # noqa: E402,F401  (process defaults before torch loads)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from store.config import Config, ConfigError, build, validate  # noqa: E402
from store.reader import CacheReader  # noqa: E402
from train.export import load_exported  # noqa: E402
from train.run import run_train  # noqa: E402
from tests.conftest import fixed_draw_loss  # noqa: E402

# The GPU's 16-mixed (autocast to float16 and a grad scaler), run on the CPU through the
# plugin Lightning builds for it on a GPU: train.precision=16-mixed itself is refused on a CPU.
FP16_SCALED = "16-mixed-scaler"


class GradNorms(L.Callback):
    """Records the global norm of the gradients each optimizer step applied (after clipping:
    Lightning's step runs the backward inside, so they are read once the step is done)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, module) -> None:
        def record(optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                total = torch.nn.utils.get_total_norm(grads)  # sharded (fsdp): a DTensor over the shards
                self.norms.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))

        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(record)


def case_config(raw: dict, case: dict, out: Path, world: int) -> Config:
    raw = copy.deepcopy(raw)
    raw["cache_dir"] = f"{raw['run_dir']}/cache"
    raw["run_dir"] = str(out / f"run-{case['name']}")
    precision = "32-true" if case["precision"] == FP16_SCALED else case["precision"]
    raw["train"].update(steps=case["steps"], batch_size=8, devices=world, accelerator="cpu", precision=precision,
                        adamw_kernel=case["kernel"], optimizer=case["optimizer"], grad_clip=case["clip"],
                        strategy=case.get("strategy", "auto"),
                        warmup_steps=1, lr=3e-3, caption_dropout=0.0, checkpoint_every=1000, eval_every=0)
    config = build(Config, raw, "")
    validate(config)
    return config


def run_case(raw: dict, case: dict, out: Path, world: int, batch: dict) -> dict:
    try:
        config = case_config(raw, case, out, world)
    except ConfigError as err:
        return {"refused": str(err)}
    norms = GradNorms()

    def prepare(trainer: L.Trainer) -> L.Trainer:
        trainer.callbacks.append(norms)
        return trainer

    overrides = {}
    if case["precision"] == FP16_SCALED:
        overrides = {"precision": None, "plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))]}
    try:
        summary = run_train(config, fresh=True, progress=False, prepare=prepare, log=lambda _: None, **overrides)
    except ConfigError as err:
        return {"refused": str(err)}
    result = {"rank": summary["rank"], "steps": summary["steps"], "norms": norms.norms,
              "precision": summary["precision"] if not overrides else FP16_SCALED}
    if summary["rank"] == 0:
        import pandas as pd

        metrics = config.run_path / "logs" / "metrics.csv"  # none after 0 steps
        logged = pd.read_csv(metrics).dropna(subset=["train/loss"]) if metrics.is_file() else {"train/loss": []}
        result["losses"] = list(logged["train/loss"])
        trained = load_exported(config.run_path / "checkpoints", ema=False)  # the live weights, not the EMA
        result["fixed_loss"] = fixed_draw_loss(trained.model, trained.objective, batch,
                                               [e["name"] for e in trained.encoders])
    return result


def main(cases_path: str, out_dir: str) -> int:
    spec = json.loads(Path(cases_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = spec["world"]
    raw = spec["raw"]
    torch.set_num_threads(1)
    batch = CacheReader(f"{raw['run_dir']}/cache").take(range(48))
    for case in spec["cases"]:
        try:
            result = run_case(raw, case, out, world, batch)
        except Exception as err:  # recorded: the test names the case and shows the error
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        if os.environ.get("LOCAL_RANK", "0") == "0":
            (out / f"{case['name']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
