"""`python -m train --config configs/default.yaml`: train refiners + LI-DiT from the cache.

No LLM is loaded: the text side reads the cached features. A rerun resumes from
`<run>/checkpoints/last.ckpt` (use --fresh to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from store.config import Config, ConfigError, load_config
from store.reader import CacheError, CacheReader
from train.data import CacheDataModule
from train.export import export
from train.module import LIDiTModule


def open_cache(config: Config) -> CacheReader:
    """The cache, checked against the config's encoders (refused with a clear message)."""
    reader = CacheReader(config.cache_path, encoders=config.model.encoders)
    used = set(config.model.encoders or [e.name for e in config.encoders])
    reader.check_matches([dataclasses.asdict(e) for e in config.encoders if e.name in used])
    return reader


def make_trainer(config: Config, checkpoint_dir: Path, progress: bool = True, **overrides) -> L.Trainer:
    train = config.train
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", every_n_train_steps=train.checkpoint_every,
                                 save_top_k=1, enable_version_counter=False)
    loggers = [CSVLogger(config.run_path, name="logs", version="", flush_logs_every_n_steps=10),
               TensorBoardLogger(config.run_path, name="tensorboard", version="")]
    kwargs = dict(
        max_steps=train.steps, precision=train.precision, accelerator=train.accelerator, devices=train.devices,
        strategy=train.strategy, gradient_clip_val=train.grad_clip, logger=loggers,
        # tqdm, not rich: it also prints readable periodic lines when stdout is a log file
        callbacks=[checkpoint] + ([TQDMProgressBar(refresh_rate=10)] if progress else []),
        log_every_n_steps=train.log_every, enable_progress_bar=progress, limit_val_batches=0,
        num_sanity_val_steps=0, enable_model_summary=progress, use_distributed_sampler=False,
        max_time=timedelta(minutes=train.max_minutes) if train.max_minutes else None,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def run_train(config: Config, fresh: bool = False, progress: bool = True,
              prepare: Callable[[L.Trainer], L.Trainer] | None = None, **trainer_overrides) -> dict:
    """Train (resuming from last.ckpt unless `fresh`), checkpoint, and export the weights.

    `prepare` adapts the trainer before fitting (Ray Train's `prepare_trainer`); the
    overrides replace make_trainer's arguments (devices, strategy, plugins, ...).
    """
    started = time.time()
    reader = open_cache(config)
    checkpoint_dir = config.run_path / "checkpoints"
    resume = checkpoint_dir / "last.ckpt"
    L.seed_everything(config.seed, verbose=False)  # the initial weights
    module = LIDiTModule(config.to_dict(), reader.meta)
    trainer = make_trainer(config, checkpoint_dir, progress, **trainer_overrides)
    if prepare is not None:
        trainer = prepare(trainer)
    trainer.fit(module, CacheDataModule(config), ckpt_path=str(resume) if resume.is_file() and not fresh else None,
                weights_only=True)  # our checkpoints hold tensors and plain types only: no pickle
    # A full checkpoint (optimizer state: resumable). Under DDP it is a collective that
    # every rank must call; rank 0 writes it.
    trainer.save_checkpoint(resume, weights_only=False)
    if trainer.global_rank == 0:
        export(module, reader, checkpoint_dir, trainer.global_step)
    losses = trainer.logged_metrics
    return {"steps": trainer.global_step, "seconds": time.time() - started, "checkpoints": str(checkpoint_dir),
            "loss": float(losses["train/loss"]) if "train/loss" in losses else None,
            "parameters": module.num_parameters(), "logs": str(config.run_path / "logs")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing last.ckpt")
    args = parser.parse_args(argv)
    # The EMA copy is in eval mode on purpose; the LeafSpec notice is Lightning's own.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    try:
        config = load_config(args.config, args.overrides)
        summary = run_train(config, fresh=args.fresh)
    except (ConfigError, CacheError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    print(f"train: {summary['steps']} steps in {summary['seconds']:.0f} s, last loss {summary['loss']:.4f}, "
          f"{summary['parameters'] / 1e6:.1f}M parameters")
    print(f"  checkpoint and safetensors weights in {summary['checkpoints']}; loss curve in {summary['logs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
