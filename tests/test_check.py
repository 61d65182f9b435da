"""`store check`, and the compute dtype a cache records when the config asks for `auto`."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from embed.job import run_embed
from store.check import CheckFailed, check_cache
from store.config import Config, build, validate
from store.hardware import compute_dtype, detect
from store.writer import META_FILE, SAMPLES
from conftest import tiny_raw_config


def test_recompute_passes_for_an_fp32_forward_stored_as_bf16(tiny_cache):
    config = build(Config, tiny_cache, "")
    records = json.loads((config.cache_path / META_FILE).read_text())["encoders"]
    assert {(r["compute_dtype"], r["store_dtype"]) for r in records} == {("float32", "bfloat16")}
    report = check_cache(config.cache_path, recompute=8, log=lambda *_: None)
    assert report["problems"] == []
    assert set(report["recompute_max_abs_diff"]) == {"llm", "bert"}


def test_recompute_fails_on_a_corrupted_row(tiny_cache, tmp_path):
    source = build(Config, tiny_cache, "").cache_path
    copy = tmp_path / "cache"
    copy.mkdir()
    for path in source.iterdir():  # meta and constants as they are; the samples rewritten below
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    table = lance.dataset(str(source / SAMPLES)).to_table()
    column = table.column("llm__states").combine_chunks()  # list<fixed_size_list<bf16, D>>
    rows = column.values
    storage = np.full(len(rows.values), 0x4480, np.uint16)  # every stored value becomes 1024.0
    values = pa.ExtensionArray.from_storage(rows.values.type, pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(2), len(storage), [None, pa.py_buffer(storage.tobytes())]))
    corrupted = pa.ListArray.from_arrays(column.offsets, pa.FixedSizeListArray.from_arrays(values, rows.type.list_size))
    table = table.set_column(table.schema.get_field_index("llm__states"), "llm__states", corrupted)
    lance.write_dataset(table, str(copy / SAMPLES), schema=table.schema)
    with pytest.raises(CheckFailed, match="llm: recomputed features differ"):
        check_cache(copy, recompute=4, log=lambda *_: None)


def test_auto_records_the_resolved_and_the_requested_dtype(tmp_path, llama_dir, local_ray):
    raw = tiny_raw_config(tmp_path, llama_dir, data={"num_train": 8, "num_eval": 0})
    raw["encoders"][0]["compute_dtype"] = "auto"
    config = build(Config, raw, "")
    validate(config)
    lines = []
    run_embed(config, progress=False, log=lines.append)
    record = json.loads((Path(config.cache_path) / META_FILE).read_text())["encoders"][0]
    assert record["compute_dtype_requested"] == "auto"
    assert record["compute_dtype"] == compute_dtype("auto", detect("cpu"), frozen_llm=True)
    assert record["hardware"] == detect("cpu").describe()
    assert any(f"computes in {record['compute_dtype']} (asked: auto)" in line for line in lines)
    assert check_cache(config.cache_path, recompute=4, log=lambda *_: None)["problems"] == []


def test_a_resumed_auto_cache_keeps_its_recorded_dtype(tmp_path, llama_dir, local_ray):
    """A cache begun where `auto` meant bf16 keeps bf16 when another machine resumes it."""
    raw = tiny_raw_config(tmp_path, llama_dir, data={"num_train": 16, "num_eval": 0})
    raw["encoders"][0]["compute_dtype"] = "auto"
    config = build(Config, raw, "")
    validate(config)
    run_embed(config, limit=8, progress=False, log=lambda *_: None)
    meta_path = Path(config.cache_path) / META_FILE
    meta = json.loads(meta_path.read_text())
    other = "bfloat16" if meta["encoders"][0]["compute_dtype"] == "float32" else "float32"
    meta["encoders"][0]["compute_dtype"] = other  # as if the first machine resolved it the other way
    meta_path.write_text(json.dumps(meta))
    lines = []
    summary = run_embed(config, progress=False, log=lines.append)
    assert summary.written == 8 and summary.skipped == 8
    assert any(f"computes in {other} (asked: auto, kept from the existing cache)" in line for line in lines)
    assert json.loads(meta_path.read_text())["encoders"][0]["compute_dtype"] == other


def test_a_cache_written_before_an_encoder_field_existed_still_matches_its_config(tiny_cache, tmp_path):
    """A record without `final_norm` (or any later field) reads as that field's default, so
    training and a rerun of embed accept it; a record that differs is still refused."""
    from store.reader import CacheError, CacheReader

    config = build(Config, tiny_cache, "")
    copy = tmp_path / "cache"
    copy.mkdir()
    for path in config.cache_path.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    (copy / SAMPLES).symlink_to((config.cache_path / SAMPLES).resolve())
    meta = json.loads((copy / META_FILE).read_text())
    for record in meta["encoders"]:
        del record["final_norm"], record["backend"]
    (copy / META_FILE).write_text(json.dumps(meta))
    wanted = [dict(vars(e)) for e in config.encoders]
    CacheReader(copy).check_matches(wanted)
    with pytest.raises(CacheError, match="final_norm: cache has False, config wants True"):
        CacheReader(copy).check_matches([{**w, "final_norm": True} for w in wanted])
