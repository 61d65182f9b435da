"""The LightningDataModule over the feature cache: one aspect-ratio bucket per batch.

Batch k of training is a pure function of (seed, k): the sampler shuffles each bucket's
rows per epoch, cuts them into batches of `train.batch_size` rows (the global batch),
and shuffles the batch order. Under DDP every rank takes its own contiguous share of the
same batch k, so N processes train on exactly the rows one process would. It starts at
the trainer's restored global step, so a resumed run sees exactly the batches an
uninterrupted run would have seen.

Caption dropout (for classifier-free guidance) swaps a row's caption states for the
stored unconditional ones; which rows drop is a function of (seed, the global batch's rows).

Workers open the Lance dataset themselves (CacheReader reopens after a process change)
and read only the rows of their batches; they start with `spawn`, since Lance is not
fork-safe (docs/FACTS.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from store.config import Config
from store.reader import CacheReader


# A compiled model is specialised to its input shapes: the text is padded to a multiple of this
# many tokens, so a run compiles for a few lengths instead of recompiling at every new one.
COMPILED_PAD = 16


def share(rows: list | np.ndarray, rank: int, world_size: int) -> list | np.ndarray:
    """Rank `rank`'s contiguous share of a global batch's rows or per-row values (it divides evenly)."""
    size = len(rows) // world_size
    return rows[rank * size : (rank + 1) * size]


class BucketBatchSampler(Sampler[tuple[list[int], int, int]]):
    """Infinite stream of same-bucket global batches; batch k depends only on (seed, k).

    Yields (the global batch's rows, rank, world_size): CachedBatches reads the rank's share."""

    def __init__(self, buckets: dict[int, np.ndarray], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: Callable[[], int] = lambda: 0):
        if batch_size % world_size:
            raise ValueError(f"a batch of {batch_size} rows cannot be shared evenly by {world_size} processes")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step
        self.buckets = {b: rows for b, rows in buckets.items() if len(rows) >= batch_size}
        if not self.buckets:
            sizes = {b: len(r) for b, r in buckets.items()}
            raise ValueError(f"no bucket holds a full batch of {batch_size} rows (rows per bucket: {sizes})")
        self.steps_per_epoch = sum(len(rows) // batch_size for rows in self.buckets.values())

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for bucket in sorted(self.buckets):
            rows = rng.permutation(self.buckets[bucket])
            usable = len(rows) // self.batch_size * self.batch_size
            batches += list(rows[:usable].reshape(-1, self.batch_size))
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[tuple[list[int], int, int]]:
        step = self.start_step()
        epoch, position = divmod(step, self.steps_per_epoch)
        while True:
            batches = self.epoch_batches(epoch)
            for batch in batches[position:]:
                yield [int(r) for r in batch], self.rank, self.world_size
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:  # "infinite": training length is set by max_steps
        return 1 << 40


def caption_dropout_mask(rows: list[int], probability: float, seed: int) -> np.ndarray:
    """Which rows of a batch train on the unconditional text: a function of (seed, rows)."""
    # 7919 (a prime) tags this stream apart from the sampler's [seed, epoch] stream; the batch's
    # first rows identify it, so a resumed run drops the same captions as an uninterrupted one.
    rng = np.random.default_rng([seed, 7919, *rows[:4], len(rows)])
    return rng.random(len(rows)) < probability


def rows_and_dropout(key: list[int] | tuple[list[int], int, int], probability: float,
                     seed: int) -> tuple[list[int], np.ndarray]:
    """The rows a sampler key asks this rank for, and which of them train on the unconditional
    text. `key`: (the global batch's rows, rank, world_size), or a whole batch's rows; the
    dropout is drawn over the global batch, so every process count drops the same rows."""
    rows, rank, world_size = key if isinstance(key, tuple) else (key, 0, 1)
    return share(rows, rank, world_size), share(caption_dropout_mask(rows, probability, seed), rank, world_size)


class CachedBatches(Dataset):
    """dataset[rows] or dataset[(rows, rank, world_size)] -> one training batch (reader.take),
    the rank's share of the global batch `rows`, with seeded caption dropout."""

    def __init__(self, reader: CacheReader, caption_dropout: float, seed: int, pad_multiple: int = 1):
        self.reader, self.caption_dropout, self.seed = reader, caption_dropout, seed
        self.pad_multiple = pad_multiple

    def __getitem__(self, key: list[int] | tuple[list[int], int, int]) -> dict:
        rows, drop = rows_and_dropout(key, self.caption_dropout, self.seed)
        batch = self.reader.take(rows, drop_text=drop, pad_multiple=self.pad_multiple)
        batch.pop("ids")
        batch.pop("captions")
        return batch


def repeat_kinds(rows: np.ndarray, reader: CacheReader, repeats: dict[str, int]) -> np.ndarray:
    """`rows` with each shapes-world row of a kind in `repeats` listed that many times (0 drops
    it): an epoch then holds each such scene as often, so the mix of kinds a run trains on
    changes while every batch stays a function of (seed, step)."""
    if not repeats:
        return rows
    if reader.meta["source"]["kind"] != "shapes":
        raise ValueError(f"train.repeat_kinds needs a shapes cache (scene kinds); this one is "
                         f"{reader.meta['source']['kind']!r}")
    truth = reader.column("truth")
    times = np.array([repeats.get(json.loads(truth[r])["kind"], 1) for r in rows])  # [len(rows)]
    return np.repeat(rows, times)


class CacheDataModule(L.LightningDataModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.reader: CacheReader | None = None
        self.buckets: dict[int, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.reader is not None:
            return
        self.reader = CacheReader(self.config.cache_path, encoders=self.config.model.encoders)
        split = self.reader.column("split")
        bucket = self.reader.column("bucket")
        train = np.flatnonzero((split == "train") & ~np.isnan(bucket.astype(float)))
        train = repeat_kinds(train, self.reader, self.config.train.repeat_kinds)
        self.buckets = {int(b): train[bucket[train] == b] for b in np.unique(bucket[train])}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = BucketBatchSampler(
            self.buckets, self.config.train.batch_size, self.config.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            start_step=(lambda: trainer.global_step) if trainer else (lambda: 0),
        )
        workers = self.config.train.num_workers
        return DataLoader(
            CachedBatches(self.reader, self.config.train.caption_dropout, self.config.seed,
                          pad_multiple=COMPILED_PAD if self.config.train.compile != "off" else 1),
            sampler=sampler, batch_size=None, num_workers=workers,
            multiprocessing_context="spawn" if workers else None,
            persistent_workers=workers > 0,
        )
