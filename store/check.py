"""`python -m store check PATH [--recompute N]`: verify a feature cache.

Checks the schema against the metadata, row counts, unique ids, per-row shapes
(token counts, hidden sizes, latent sizes), and recomputes N random rows with the
encoders named in the metadata, reporting the max abs difference against the store.
"""

from __future__ import annotations

import json
from pathlib import Path

from store import cli  # first: process defaults before torch loads (store/cli.py)

import lance
import numpy as np
import pyarrow.compute as pc

from store.reader import CacheReader
from store.schema import samples_schema, states_from_column
from store.writer import REJECTS


# A recomputed row runs in another batch (other padding, other length), so it may differ
# by rounding: a few units in the last place of the compute dtype at the largest values
# (bf16 has 8 significant bits: 2 ulps at |x| ~ 550 is 8).
RELATIVE_TOLERANCE = {"bfloat16": 2.0**-5, "float16": 2.0**-8, "float32": 1e-4}
# Storing rounds each value once more: a fp32 forward stored as bf16 may land one bf16 ulp
# (2^-8 relative) either side of a recomputation that differs from it by fp32 rounding.
STORE_ROUNDING = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 0.0}


class CheckFailed(Exception):
    """The cache is inconsistent; the message lists every problem found."""


def check_cache(path: str | Path, recompute: int = 0, seed: int = 0, log=print) -> dict:
    reader = CacheReader(path)
    ds = reader.dataset
    problems: list[str] = []
    expected = samples_schema(reader.meta["encoders"])
    if not ds.schema.equals(expected, check_metadata=False):
        problems.append(f"schema differs from the metadata's:\n{ds.schema}\nexpected:\n{expected}")
    rows = ds.count_rows()
    ids = ds.to_table(columns=["id"]).column("id")
    unique = len(pc.unique(ids))
    if unique != rows:
        problems.append(f"{rows - unique} duplicate ids among {rows} rows")
    rejects_path = reader.root / REJECTS
    rejected = lance.dataset(str(rejects_path)).count_rows() if rejects_path.exists() else 0
    log(f"rows {rows}, unique ids {unique}, rejected {rejected}, fragments {len(ds.get_fragments())}")
    for enc in reader.encoders:
        name = enc["name"]
        table = ds.to_table(columns=[f"{name}__ids", f"{name}__ntok"])
        ntok = table.column(f"{name}__ntok").to_numpy()
        nids = pc.list_value_length(table.column(f"{name}__ids")).to_numpy(zero_copy_only=False)
        if not np.array_equal(ntok, nids):
            problems.append(f"{name}: token counts disagree with stored ids in {int((ntok != nids).sum())} rows")
        for key in ("prefix", "null"):
            tensor = getattr(reader, key)[name]
            if tensor.ndim != 2 or tensor.shape[1] != enc["hidden_size"]:
                problems.append(f"{name}: {key} states have shape {tuple(tensor.shape)}")
        if reader.prefix[name].shape[0] != enc["prefix_len"]:
            problems.append(f"{name}: {reader.prefix[name].shape[0]} prefix states for prefix_len {enc['prefix_len']}")
        log(f"  {name}: layer {enc['layer']} of {enc['num_blocks']} blocks, hidden {enc['hidden_size']}, "
            f"{enc['store_dtype']}, prefix {enc['prefix_len']} tokens, caption tokens mean {ntok.mean():.1f} max {ntok.max()}")
    report = {"rows": rows, "rejected": rejected, "unique_ids": unique, "problems": problems}
    if recompute and rows:
        report["recompute_max_abs_diff"] = _recompute(reader, min(recompute, rows), seed, log)
    if problems:
        raise CheckFailed("\n".join(problems))
    return report


def _recompute(reader: CacheReader, n: int, seed: int, log) -> dict:
    """Re-encode n random rows with the encoders in the metadata; max |stored - fresh|.

    The one place the store reaches up to embed/: recomputing needs the very encoder
    class that wrote the rows, so it is imported here, lazily, and only for --recompute.
    """
    from embed.encoder import EncoderError, encoder_from_record

    rows = np.random.default_rng(seed).choice(len(reader), size=n, replace=False)
    columns = ["caption"] + [f"{e['name']}__{c}" for e in reader.encoders for c in ("ids", "states")]
    table = reader.dataset.take(rows.tolist(), columns=columns)
    captions = table.column("caption").to_pylist()
    result = {}
    for enc in reader.encoders:
        name = enc["name"]
        try:
            encoder = encoder_from_record(enc, exact=True)  # the compute dtype that wrote the rows
        except EncoderError as err:  # e.g. the model changed since the cache was built
            raise CheckFailed(str(err)) from err
        flat, offsets = states_from_column(table.column(f"{name}__states"), enc["store_dtype"], enc["hidden_size"])
        fresh = encoder.encode(captions)
        worst, scale = 0.0, 0.0
        for i, out in enumerate(fresh):
            stored = flat[offsets[i] : offsets[i + 1]].float()
            if out.ids.tolist() != table.column(f"{name}__ids")[i].as_py():
                raise CheckFailed(f"{name}: token ids of row {int(rows[i])} differ on recompute")
            worst = max(worst, (stored - out.states.float()).abs().max().item())
            scale = max(scale, stored.abs().max().item())
        result[name] = worst
        tolerance = max(RELATIVE_TOLERANCE[enc["compute_dtype"]], STORE_ROUNDING[enc["store_dtype"]]) * scale
        log(f"  recompute {name}: {n} rows in {enc['compute_dtype']} (stored {enc['store_dtype']}), max abs diff {worst:.3g} "
            f"(max |value| {scale:.3g}, tolerance {tolerance:.3g})")
        if worst > tolerance:
            raise CheckFailed(f"{name}: recomputed features differ by {worst:.3g} > {tolerance:.3g}")
    return result


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m store check")
    parser.add_argument("path")
    parser.add_argument("--recompute", type=int, default=0, metavar="N")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    try:
        report = check_cache(args.path, args.recompute)
    except CheckFailed as err:
        print(f"store check: FAILED\n{err}")
        return 1
    print(json.dumps(report) if args.json else f"store check: OK ({report['rows']} rows)")
    return 0
