"""Reading a cache for training and sampling: random-access batches as padded tensors.

`CacheReader.take(rows)` returns, per encoder, the full instructed token sequence
(the shared prefix states, then the row's caption states) right-padded into
`[B, L, D]` with a bool mask (True = a real token), and the latents of one bucket
stacked into `[B, C, h, w]`.

Lance is not fork-safe (docs/FACTS.md): the dataset is opened lazily, in the process that
first reads it, and reopened if the reader finds itself in a forked child.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np
import torch
from safetensors.torch import load

from store.schema import states_from_column
from store.storage import location
from store.writer import CONSTANTS_FILE, META_FILE, SAMPLES, identity_diff, read_meta


class CacheError(ValueError):
    """The cache is missing, incomplete, or does not match what the caller expects."""


@dataclass
class TextFeatures:
    states: torch.Tensor  # [B, L, D] prefix + caption, right-padded
    mask: torch.Tensor  # [B, L] bool, True = a real token
    prefix_len: int  # leading instruction tokens (dropped after the collaborative refiner)


def assemble_text(prefix: torch.Tensor, captions: list[torch.Tensor], multiple: int = 1) -> TextFeatures:
    """Prefix [P, D] + per-row caption states [n_i, D] -> padded [B, P + max n_i, D], the length
    rounded up to a multiple of `multiple` (a compiled model then sees a few shapes, not one per batch)."""
    batch, p = len(captions), prefix.shape[0]
    longest = p + max((c.shape[0] for c in captions), default=0)
    longest = -(-longest // multiple) * multiple
    states = torch.zeros(batch, longest, prefix.shape[1], dtype=prefix.dtype)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    for i, c in enumerate(captions):
        n = p + c.shape[0]
        states[i, :p] = prefix
        states[i, p:n] = c
        mask[i, :n] = True
    return TextFeatures(states, mask, p)


class CacheReader:
    def __init__(self, root: str | Path, encoders: list[str] | None = None):
        self.root = location(root)
        meta = read_meta(self.root)
        if meta is None:
            raise CacheError(f"no cache at {self.root} (missing {META_FILE}); run `make embed` first")
        if not (self.root / SAMPLES).exists():
            raise CacheError(f"cache at {self.root} has no samples yet (no {SAMPLES})")
        self.meta = meta
        by_name = {e["name"]: e for e in self.meta["encoders"]}
        names = encoders if encoders is not None else list(by_name)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CacheError(f"cache at {self.root} has no encoder(s) {missing}; it has {list(by_name)}")
        self.encoders = [by_name[n] for n in names]
        constants = load((self.root / CONSTANTS_FILE).read_bytes())
        self.prefix = {e["name"]: constants[f"{e['name']}.prefix_states"] for e in self.encoders}
        self.null = {e["name"]: constants[f"{e['name']}.null_states"] for e in self.encoders}
        self._dataset = None
        self._pid = None

    @property
    def dataset(self) -> lance.LanceDataset:
        if self._dataset is None or self._pid != os.getpid():
            self._dataset = lance.dataset(str(self.root / SAMPLES))
            self._pid = os.getpid()
        return self._dataset

    def __getstate__(self):  # a DataLoader worker reopens the dataset itself
        state = dict(self.__dict__)
        state["_dataset"] = None
        return state

    def __len__(self) -> int:
        return self.dataset.count_rows()

    def check_matches(self, expected: list[dict]) -> None:
        """Refuse a cache built with other encoders, layers, instructions or sizes."""
        by_name = {e["name"]: e for e in self.meta["encoders"]}
        problems = []
        for want in expected:
            have = by_name.get(want["name"])
            if have is None:
                problems.append(f"encoder {want['name']!r} is not in the cache")
                continue
            keys = set(want) & {"path", "layer", "instruction", "chat_template", "system_prompt",
                                "template_suffix", "hidden_size",
                                "kind", "store_dtype", "max_tokens", "model_hash", "final_norm"}
            problems += identity_diff({k: have.get(k) for k in keys}, {k: want[k] for k in keys},
                                      f"encoders.{want['name']}.")
        if problems:
            raise CacheError(f"cache at {self.root} does not match the config:\n  " + "\n  ".join(problems))

    def column(self, name: str) -> np.ndarray:
        """One small column for every row, in row order (for splits, buckets, sampling)."""
        table = self.dataset.to_table(columns=[name])
        return table.column(name).to_numpy(zero_copy_only=False)

    def take(self, rows, drop_text=None, with_latents: bool = True, pad_multiple: int = 1) -> dict:
        """A batch for `rows` (row indices); rows flagged in `drop_text` get the null text; each
        encoder's text is padded to a multiple of `pad_multiple` tokens."""
        rows = [int(r) for r in rows]
        columns = ["id", "caption"]
        for e in self.encoders:
            columns.append(f"{e['name']}__states")
        if with_latents:
            columns += ["latent", "latent_shape", "bucket"]
        # Lance takes rows in file order faster (paper-size rows: ~30%, docs/BENCHMARKS.md); the batch
        # keeps the order asked for: the i-th row asked for is row at[i] of the table
        order = np.argsort(rows, kind="stable")
        table = self.dataset.take([rows[i] for i in order], columns=columns)
        at = np.empty(len(rows), np.int64)
        at[order] = np.arange(len(rows))
        drop = np.zeros(len(rows), bool) if drop_text is None else np.asarray(drop_text, bool)
        ids, captions = table.column("id").to_pylist(), table.column("caption").to_pylist()
        batch = {"ids": [ids[j] for j in at], "captions": [captions[j] for j in at], "text": {}}
        for e in self.encoders:
            name = e["name"]
            flat, offsets = states_from_column(table.column(f"{name}__states"), e["store_dtype"], e["hidden_size"])
            states = [self.null[name] if drop[i] else flat[offsets[j] : offsets[j + 1]] for i, j in enumerate(at)]
            batch["text"][name] = assemble_text(self.prefix[name], states, pad_multiple)
        if with_latents:
            batch["latents"] = self._latents(table)[torch.from_numpy(at)]  # [B, C, h, w], in the order asked for
        return batch

    def _latents(self, table) -> torch.Tensor:
        shapes = table.column("latent_shape").to_pylist()
        if any(s is None for s in shapes):
            raise CacheError("a training batch holds rows without an image latent (text-only cache?)")
        if len({tuple(s) for s in shapes}) != 1:
            raise CacheError(f"a batch must hold one bucket; got latent shapes {sorted(set(map(tuple, shapes)))}")
        column = table.column("latent").combine_chunks()
        start, end = column.offsets[0].as_py(), column.offsets[-1].as_py()
        flat = column.values.slice(start, end - start).to_numpy(zero_copy_only=False)
        return torch.from_numpy(flat.astype(np.float32)).view(len(shapes), *shapes[0])  # [B, C, h, w]
