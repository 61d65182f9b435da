"""Running a training: the cache check, the Trainer, fit, checkpoint and export.

The library behind `python -m train`, Ray Train's workers (train/ray_train.py) and the
benchmarks. No LLM is loaded: the text side reads the cached features.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from store.config import Config, ConfigError, config_differences
from store.hardware import Hardware, detect, train_precision, train_processes
from store.reader import CacheReader
from store.storage import RemotePath
from train.data import CacheDataModule
from train.export import ema_digest, export, init_from_exported
from train.module import LIDiTModule
from train.progress import TrainingProgress, TrainingTimeCap


def open_cache(config: Config) -> CacheReader:
    """The cache, checked against the config's encoders (refused with a clear message)."""
    reader = CacheReader(config.cache_path, encoders=config.model.encoders)
    used = set(config.model.encoders or [e.name for e in config.encoders])
    reader.check_matches([dataclasses.asdict(e) for e in config.encoders if e.name in used])
    return reader


def resolve_precision(config: Config, accelerator: str | None = None) -> tuple[str, Hardware]:
    """The Lightning precision this process trains in ("auto" resolved) and the hardware."""
    accelerator = accelerator or config.train.accelerator
    hardware = detect("cpu" if accelerator == "cpu" else "auto")
    return train_precision(config.train.precision, hardware), hardware


def check_combination(config: Config, precision: str, hardware: Hardware) -> None:
    """Refuse, before anything is built, what cannot run on this hardware, naming the keys.

    Every combination of train.precision, train.adamw_kernel, train.grad_clip, train.optimizer
    and train.strategy that can work does (tests/test_precision.py trains each one); the
    combinations refused whatever the hardware are refused when the config is read
    (store/config.py: validate)."""
    train = config.train
    if hardware.device == "cpu" and precision == "16-mixed":
        raise ConfigError("train.precision=16-mixed needs a GPU: on a CPU (train.accelerator "
                          f"{train.accelerator!r} runs on {hardware.describe()}) Lightning would train in "
                          "bf16-mixed instead without a word; use bf16-mixed, 32-true or auto")


# what decides the stream of batches: a resume with other values works, but no longer
# reproduces the uninterrupted run (said when it resumes)
STREAM_KEYS = (("seed",), ("train", "batch_size"), ("train", "repeat_kinds"))


def check_resumable(checkpoint: Path | RemotePath, config: Config) -> tuple[int, list[str]]:
    """The step a last.ckpt resumes from, and what of STREAM_KEYS changed since; refused, with
    what differs, if the config no longer builds its model or its optimizer.

    Otherwise the resume dies deep in load_state_dict with one size mismatch per tensor:
    what a user sees after the default model changed under an old runs/<name>."""
    # A local file is memory-mapped: only the hyper-parameters are read here, and fit reads
    # the tensors once (an object-store checkpoint has to be fetched whole).
    source = checkpoint if isinstance(checkpoint, Path) else io.BytesIO(checkpoint.read_bytes())
    whole = torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(checkpoint, Path))
    saved = whole.get("hyper_parameters", {}).get("config", {})
    now = config.to_dict()
    differ = config_differences(saved, now, ("model",), places=("in the checkpoint", "now"))
    optimizer = saved.get("train", {}).get("optimizer", "adamw")  # AdamW before the switch existed
    if optimizer != now["train"]["optimizer"]:  # its state would not load into the other optimizer
        differ.append(f"train.optimizer: {optimizer!r} in the checkpoint, {now['train']['optimizer']!r} now")
    if differ:
        raise ConfigError(f"cannot resume from {checkpoint}: it was trained with another model or optimizer ("
                          + "; ".join(differ) + "). Train under another name (--set name=...), "
                          "or start over with --fresh (the checkpoint is then overwritten)")
    stream = []
    for path in STREAM_KEYS:
        was, now_value = saved, now
        for key in path:
            was, now_value = (was or {}).get(key), now_value[key]
        if was is not None and was != now_value:  # None: saved before the key existed
            stream.append(f"{'.'.join(path)}: {was!r} in the checkpoint, {now_value!r} now")
    return int(whole.get("global_step", 0)), stream


class _ResumedMetrics(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts: on a resume that
    lost the curve before the checkpoint. This one keeps the rows logged before step
    `resume_step` (the later ones are logged again) and their columns."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self.resume_step is None or not self._fs.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(row["step"]) < self.resume_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # appended to; a new column rewrites the file with the rows kept


class ResumingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume from `resume_step` (`_ResumedMetrics`)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedMetrics(self.log_dir, self.resume_step)
        return self._experiment


def sharded_strategy(processes: int | str, strategy_class: type | None = None):
    """train.strategy fsdp: Lightning's ModelParallelStrategy (or `strategy_class`, a subclass
    of it: Ray Train's), every process a data-parallel shard (no tensor parallelism).
    Checkpoints are whole (gathered to rank 0, one file, as under DDP): they resume on any
    number of processes, and `check_resumable` reads them; the optimizer state is gathered
    too, so one is about 16 bytes a parameter."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return (strategy_class or ModelParallelStrategy)(data_parallel_size=processes, tensor_parallel_size=1,
                                                     save_distributed_checkpoint=False)


def make_trainer(config: Config, checkpoint_dir: Path | RemotePath, progress: bool = True,
                 reader: CacheReader | None = None, resume_step: int | None = None, **overrides) -> L.Trainer:
    """The Trainer for `config`; `overrides` replace its arguments. `precision` "auto" resolves here.
    With the run's `reader`, it also draws the progress curves and scores (train/progress.py);
    with `resume_step` (a resume), logs/metrics.csv keeps the rows logged before that step."""
    train = config.train
    precision, hardware = resolve_precision(config, overrides.get("accelerator"))
    processes = train_processes(train.devices, train.batch_size, hardware)
    strategy = "ddp" if processes > 1 and train.strategy == "auto" else train.strategy
    if strategy == "fsdp":  # FSDP2 (LIDiTModule.configure_model shards); it trains on CPU processes too
        strategy = sharded_strategy(processes)
    # the scores and curves as it trains, and the cap on minutes of training (scoring not counted)
    watchers: list[L.Callback] = [TrainingProgress(config, reader)] if reader is not None else []
    if train.max_minutes:
        watchers.append(TrainingTimeCap(train.max_minutes, watchers[0] if watchers else None))
    checkpoint = ModelCheckpoint(dirpath=str(checkpoint_dir), filename="last", every_n_train_steps=train.checkpoint_every,
                                 save_top_k=1, enable_version_counter=False)
    # Lightning writes checkpoints and logs through fsspec: a run_dir URI works as is.
    loggers = [ResumingCSVLogger(str(config.run_path), name="logs", version="", flush_logs_every_n_steps=10,
                                 resume_step=resume_step),
               TensorBoardLogger(str(config.run_path), name="tensorboard", version="")]
    kwargs = dict(
        max_steps=train.steps, precision=precision, accelerator=train.accelerator, devices=processes,
        strategy=strategy, gradient_clip_val=train.grad_clip, logger=loggers,
        # tqdm, not rich: it also prints readable periodic lines when stdout is a log file
        callbacks=[checkpoint] + ([TQDMProgressBar(refresh_rate=10)] if progress else []) + watchers,
        log_every_n_steps=train.log_every, enable_progress_bar=progress, limit_val_batches=0,
        num_sanity_val_steps=0, enable_model_summary=progress, use_distributed_sampler=False,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def run_train(config: Config, fresh: bool = False, progress: bool = True,
              prepare: Callable[[L.Trainer], L.Trainer] | None = None, log=print, **trainer_overrides) -> dict:
    """Train (resuming from last.ckpt unless `fresh`), checkpoint, and export the weights.

    `prepare` adapts the trainer before fitting (Ray Train's `prepare_trainer`); the
    overrides replace make_trainer's arguments (devices, strategy, plugins, ...).
    """
    started = time.time()
    reader = open_cache(config)
    precision, hardware = resolve_precision(config, trainer_overrides.get("accelerator"))
    check_combination(config, precision, hardware)
    trainer_overrides.setdefault("precision", precision)
    why = (" (a CPU trains the models it can hold faster in fp32)"
           if config.train.precision == "auto" and hardware.device == "cpu" and hardware.native_bf16 else "")
    if rank_zero_only.rank == 0:  # the DDP processes Lightning starts run this too
        log(f"train: precision {precision} (asked: {config.train.precision}) on {hardware.describe()}{why}")
    checkpoint_dir = config.run_path / "checkpoints"
    resume = checkpoint_dir / "last.ckpt"
    L.seed_everything(config.seed, verbose=False)  # the initial weights
    module = LIDiTModule(config.to_dict(), reader.meta)
    resuming = not fresh and resume.is_file()
    resume_step, stream_changes = check_resumable(resume, config) if resuming else (None, [])
    if config.train.init_from and not resuming:
        source, step = init_from_exported(module, config.train.init_from)
        if rank_zero_only.rank == 0:
            log(f"train: starting from the EMA weights in {source} (its step {step}); "
                "a fresh optimizer, schedule and EMA warm-up")
    trainer = make_trainer(config, checkpoint_dir, progress, reader=reader, resume_step=resume_step,
                           **trainer_overrides)
    if rank_zero_only.rank == 0 and "devices" not in trainer_overrides:
        processes, batch = trainer.world_size, config.train.batch_size
        log(f"train: {processes} process{'es' if processes > 1 else ''} (train.devices: {config.train.devices}), "
            f"{batch // processes} rows each of every batch of {batch}")
    if prepare is not None:
        trainer = prepare(trainer)
    if resuming and rank_zero_only.rank == 0:
        log(f"train: resuming from {resume} (step {resume_step})"
            + (f"; train.init_from ({config.train.init_from}) is not read again" if config.train.init_from else ""))
        if stream_changes:
            log("train: the batches from here on differ from an uninterrupted run's ("
                + "; ".join(stream_changes) + ")")
    trainer.fit(module, CacheDataModule(config), ckpt_path=str(resume) if resuming else None,
                weights_only=True)  # our checkpoints hold tensors and plain types only: no pickle
    # A full checkpoint (optimizer state: resumable). Under DDP it is a collective that
    # every rank must call; rank 0 writes it.
    trainer.save_checkpoint(str(resume), weights_only=False)
    states = module.full_state_dicts()  # sharded: a collective, on every rank
    if trainer.global_rank == 0:
        runtime = {"train_precision": precision, "hardware": hardware.describe()}
        if config.train.init_from:  # which weights it started from: a curriculum's stage after them
            runtime["init_from_ema_sha256"] = ema_digest(config.train.init_from)  # is stale once they change
        export(module, reader, checkpoint_dir, trainer.global_step, runtime=runtime, states=states)
    progress_callback = next((c for c in trainer.callbacks if isinstance(c, TrainingProgress)), None)
    losses = trainer.logged_metrics
    return {"rank": trainer.global_rank, "steps": trainer.global_step, "seconds": time.time() - started, "checkpoints": str(checkpoint_dir),
            "loss": float(losses["train/loss"]) if "train/loss" in losses else None,
            "parameters": module.num_parameters(), "logs": str(config.run_path / "logs"), "precision": precision,
            "shapeeval": progress_callback.last_table if progress_callback else None}
