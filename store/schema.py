"""The store's schema: one row per sample, one caption, features of every encoder.

A row holds only what depends on its caption. Per encoder `e`:
    e__ids        list<int32>                       caption-dependent token ids
    e__states     list<fixed_size_list<T, D>>       [n_tokens, D] hidden states, no padding
    e__ntok       int32                             n_tokens
    e__truncated  bool                              the caption was cut at max_tokens
T is bfloat16 (lance.arrow.BFloat16Type) by default, or float16 / float32.
Shared per table (in `text_constants.safetensors` beside it): each causal encoder's
instruction-prefix states and the unconditional (empty-caption) states.

Image columns, null for text-only rows:
    latent        list<float16>   the codec's latent [C, h, w], flattened
    latent_shape  list<int32>     [C, h, w]
    bucket        int16           index into the codec's bucket list
Other columns: id (string, unique), split ("train" / "eval"), caption, truth (JSON).

Between pipeline stages, states and latents travel as raw little-endian bytes (binary
columns): plain Arrow types that every Ray Data operator handles. `to_store_table`
turns them into the nested types above without copying the values twice.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from lance.arrow import BFloat16Type

FORMAT_VERSION = 1
NUMPY_OF = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}
TORCH_OF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def value_type(dtype: str) -> pa.DataType:
    return BFloat16Type() if dtype == "bfloat16" else pa.from_numpy_dtype(NUMPY_OF[dtype])


def samples_schema(encoders: list[dict]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("truth", pa.string()),
    ]
    for enc in encoders:
        e, dim = enc["name"], enc["hidden_size"]
        fields += [
            pa.field(f"{e}__ids", pa.list_(pa.int32())),
            pa.field(f"{e}__states", pa.list_(pa.list_(value_type(enc["store_dtype"]), dim))),
            pa.field(f"{e}__ntok", pa.int32()),
            pa.field(f"{e}__truncated", pa.bool_()),
        ]
    fields += [
        pa.field("latent", pa.list_(pa.float16())),
        pa.field("latent_shape", pa.list_(pa.int32())),
        pa.field("bucket", pa.int16()),
    ]
    return pa.schema(fields)


REJECTS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("source", pa.string()),
])


def tensor_to_bytes(x: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (bf16 viewed as uint16, since numpy has no bfloat16)."""
    x = x.contiguous().cpu()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy().tobytes()


def _nested_states(column: pa.Array, ntok: np.ndarray, dim: int, dtype: str) -> pa.Array:
    """binary rows of [n_i, D] values -> list<fixed_size_list<T, D>> (null where binary is null)."""
    raw = b"".join(v if v is not None else b"" for v in column.to_pylist())
    flat = np.frombuffer(raw, dtype=NUMPY_OF[dtype])
    if dtype == "bfloat16":
        storage = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2), len(flat), [None, pa.py_buffer(flat.tobytes())])
        values = pa.ExtensionArray.from_storage(BFloat16Type(), storage)
    else:
        values = pa.array(flat)
    rows = pa.FixedSizeListArray.from_arrays(values, dim)
    offsets = np.concatenate([[0], np.cumsum(ntok)]).astype(np.int32)
    mask = pa.array(column.is_null().to_numpy(zero_copy_only=False))
    return pa.ListArray.from_arrays(pa.array(offsets), rows, mask=mask)


def to_store_table(batch: pa.Table, encoders: list[dict]) -> pa.Table:
    """Pipeline batch (binary states and latents) -> a table in `samples_schema`."""
    schema = samples_schema(encoders)
    columns = {}
    for name in ("id", "split", "caption", "truth"):
        columns[name] = batch.column(name).combine_chunks().cast(pa.string())
    for enc in encoders:
        e = enc["name"]
        ntok = batch.column(f"{e}__ntok").to_numpy(zero_copy_only=False).astype(np.int64)
        columns[f"{e}__ids"] = batch.column(f"{e}__ids").combine_chunks().cast(pa.list_(pa.int32()))
        columns[f"{e}__states"] = _nested_states(
            batch.column(f"{e}__states").combine_chunks(), ntok, enc["hidden_size"], enc["store_dtype"]
        )
        columns[f"{e}__ntok"] = pa.array(ntok.astype(np.int32))
        columns[f"{e}__truncated"] = batch.column(f"{e}__truncated").combine_chunks().cast(pa.bool_())
    latent = batch.column("latent").combine_chunks()
    shapes = batch.column("latent_shape").combine_chunks().cast(pa.list_(pa.int32()))
    sizes = np.array([int(np.prod(s)) if s is not None else 0 for s in shapes.to_pylist()], np.int64)
    raw = b"".join(v if v is not None else b"" for v in latent.to_pylist())
    flat = pa.array(np.frombuffer(raw, dtype=np.float16))
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    columns["latent"] = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(latent.is_null().to_numpy(zero_copy_only=False)))
    columns["latent_shape"] = shapes
    columns["bucket"] = batch.column("bucket").combine_chunks().cast(pa.int16())
    return pa.table([columns[f.name] for f in schema], schema=schema)


def states_from_column(column, dtype: str, dim: int) -> tuple[torch.Tensor, np.ndarray]:
    """list<fixed_size_list<T, D>> -> (flat [sum n_i, D] tensor, row offsets [B+1])."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    child = column.values.slice(start, end - start).flatten()  # [(end-start) * D] values
    if dtype == "bfloat16":
        storage = child.storage  # fixed_size_binary(2), possibly sliced
        raw = np.frombuffer(storage.buffers()[1], dtype=np.int16)
        flat = torch.from_numpy(raw[storage.offset : storage.offset + len(storage)].copy()).view(torch.bfloat16)
    else:
        flat = torch.from_numpy(child.to_numpy(zero_copy_only=False).copy())
    return flat.view(-1, dim), offsets - start
