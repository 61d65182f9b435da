"""Writing a cache: create or reopen, append shards exactly once, record rejects.

Layout of a cache directory:
    meta.json                  table metadata (encoders, codec, source); written once
    text_constants.safetensors per encoder: instruction-prefix states, unconditional states
    samples.lance/             one row per accepted sample (store/schema.py)
    rejects.lance/             one row per rejected input, with its stage and reason

The root is a local folder or an object-store URI (store/storage.py). Each `append` is
one Lance commit. A commit is atomic, so a run killed at any moment
leaves whole shards only; a rerun skips every id already committed (in samples or in
rejects) and so never writes a row twice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lance
import pyarrow as pa
import torch
from safetensors.torch import save

from store.config import EncoderConfig
from store.schema import FORMAT_VERSION, REJECTS_SCHEMA, samples_schema, to_store_table
from store.storage import location, write_atomic

META_FILE = "meta.json"
CONSTANTS_FILE = "text_constants.safetensors"
SAMPLES = "samples.lance"
REJECTS = "rejects.lance"
# Lance storage format 2.0 scanned faster than the default here (docs/FACTS.md).
WRITE_OPTIONS = {"data_storage_version": "2.0"}


class CacheMismatch(ValueError):
    """A cache exists at this path but was built with a different configuration."""


def identity_diff(have: dict, want: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two metadata trees (ignoring volatile keys)."""
    volatile = {"created", "rows", "path", "hardware"}  # hardware: where it ran, not what
    diffs = []
    for key in sorted(set(have) | set(want)):
        if key in volatile:
            continue
        a, b = have.get(key), want.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += identity_diff(a, b, where + ".")
        elif isinstance(a, list) and isinstance(b, list) and a and isinstance(a[0], dict):
            if len(a) != len(b):
                diffs.append(f"{where}: {len(a)} entries in the cache, {len(b)} in the config")
            for i, (x, y) in enumerate(zip(a, b)):
                diffs += identity_diff(x, y, f"{where}[{i}].")
        elif a != b:
            diffs.append(f"{where}: cache has {a!r}, config wants {b!r}")
    return diffs


def read_meta(root: str | Path) -> dict | None:
    """The metadata of the cache at `root`, or None where there is no cache yet."""
    meta_path = location(root) / META_FILE
    return with_encoder_defaults(json.loads(meta_path.read_text())) if meta_path.is_file() else None


def with_encoder_defaults(meta: dict) -> dict:
    """`meta` whose encoder records hold every EncoderConfig field: a record written before a
    field existed gets that field's default (what the code did then), so adding a field
    does not make every older cache mismatch."""
    defaults = {f.name: f.default for f in dataclasses.fields(EncoderConfig) if f.default is not dataclasses.MISSING}
    return {**meta, "encoders": [{**defaults, **record} for record in meta.get("encoders", [])]}


class CacheWriter:
    def __init__(self, root: str | Path, meta: dict):
        self.root = location(root)
        self.meta = {"format_version": FORMAT_VERSION, **meta}
        self.encoders = self.meta["encoders"]
        existing = read_meta(self.root)
        if existing is not None:
            diffs = identity_diff(existing, self.meta)
            if diffs:
                raise CacheMismatch(
                    f"cache at {self.root} was built with another configuration; "
                    "use a new run_dir or delete it. Differences:\n  " + "\n  ".join(diffs)
                )
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.root / META_FILE, json.dumps(self.meta, indent=2).encode())
        self.schema = samples_schema(self.encoders)

    @property
    def samples_uri(self) -> str:
        return str(self.root / SAMPLES)

    @property
    def rejects_uri(self) -> str:
        return str(self.root / REJECTS)

    def committed_ids(self) -> set[str]:
        """Ids already in the cache, accepted or rejected: a rerun skips them."""
        done: set[str] = set()
        for uri in (self.samples_uri, self.rejects_uri):
            if location(uri).exists():
                done.update(lance.dataset(uri).to_table(columns=["id"]).column("id").to_pylist())
        return done

    def has_constants(self) -> bool:
        return (self.root / CONSTANTS_FILE).is_file()

    def write_constants(self, tensors: dict[str, torch.Tensor]) -> None:
        """Per-encoder `{name}.prefix_states` and `{name}.null_states` (and their ids)."""
        write_atomic(self.root / CONSTANTS_FILE, save({k: v.contiguous() for k, v in tensors.items()}))

    def append(self, batch: pa.Table) -> int:
        """Commit one shard of accepted pipeline rows; returns the bytes written."""
        if batch.num_rows == 0:
            return 0
        table = to_store_table(batch, self.encoders)
        mode = "append" if location(self.samples_uri).exists() else "create"
        lance.write_dataset(table, self.samples_uri, schema=self.schema, mode=mode, **WRITE_OPTIONS)
        return table.nbytes

    def append_rejects(self, rejects: list[dict]) -> None:
        if not rejects:
            return
        table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)
        mode = "append" if location(self.rejects_uri).exists() else "create"
        lance.write_dataset(table, self.rejects_uri, schema=REJECTS_SCHEMA, mode=mode, **WRITE_OPTIONS)

