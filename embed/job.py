"""The stage-1 Ray Data job: source -> read + image codec -> prompt encoders -> Lance.

    items (driver) -> read_stage (tasks) -> [VAE stage (actors)] -> TextEncodeStage (actor pool)
                   -> driver: one Lance commit per shard of `embed.shard_rows` rows

The driver is the only writer, and every commit is a whole shard, so a run killed at any
moment (driver or worker) leaves whole shards; the next run lists the ids already
committed (accepted or rejected) and embeds only the rest: exactly once, no duplicates.
Rejected inputs are written to the rejects table with their stage and reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from tqdm import tqdm

from embed.codecs import PixelCodec, make_codec
from embed.encoder import EncodedCaption, blocks_to_run, build_encoder, model_num_blocks, resolve_model_path
from embed.shapes import world_spec
from embed.sources import list_items, load_item, reject_duplicate_ids
from store.cli import stderr_without
from store.config import Config, ConfigError, EncoderConfig
from store.schema import tensor_to_bytes
from store.writer import CacheWriter, read_meta


@dataclass
class EmbedSummary:
    cache: str
    written: int = 0
    rejected: int = 0
    skipped: int = 0  # already committed by an earlier run
    encoded: int = 0  # distinct captions run through the encoders (the rest were looked up)
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"embed: wrote {self.written} rows, rejected {self.rejected}, skipped {self.skipped} "
            f"already committed, in {self.seconds:.1f} s",
            f"  captions encoded {self.encoded} for {self.written + self.rejected} rows (equal captions once), "
            f"caption tokens {self.tokens}, {self.bytes / 2**20:.1f} MiB written to {self.cache}",
        ]
        lines += [f"  rejected ({n}): {reason}" for reason, n in sorted(self.reasons.items(), key=lambda x: -x[1])[:10]]
        return "\n".join(lines)


def pipeline_schema(encoders: list[EncoderConfig]) -> pa.Schema:
    fields = [("id", pa.string()), ("split", pa.string()), ("caption", pa.string()), ("truth", pa.string()),
              ("source", pa.string()), ("reject", pa.string()), ("stage", pa.string()),
              ("pixels", pa.binary()), ("pixels_shape", pa.list_(pa.int32())),
              ("latent", pa.binary()), ("latent_shape", pa.list_(pa.int32())), ("bucket", pa.int16()),
              ("caption_encoded", pa.bool_())]
    for e in encoders:
        fields += [(f"{e.name}__ids", pa.list_(pa.int32())), (f"{e.name}__states", pa.binary()),
                   (f"{e.name}__ntok", pa.int32()), (f"{e.name}__truncated", pa.bool_())]
    return pa.schema(fields)


def _latent_columns(row: dict, latent: torch.Tensor) -> None:
    row["latent"] = tensor_to_bytes(latent.to(torch.float16))
    row["latent_shape"] = list(latent.shape)


def read_stage(batch: pa.Table, config: Config) -> pa.Table:
    """Load captions and images, reject bad ones, encode pixels when the codec is lossless."""
    rows = []
    pixel = config.codec.kind == "pixel"
    for raw in batch.column("item").to_pylist():
        row = load_item(json.loads(raw), config)
        pixels = row.pop("pixels")
        if pixels is not None and row["reject"] is None:
            if pixel:
                _latent_columns(row, PixelCodec().encode(pixels[None])[0])
            else:
                row["pixels"], row["pixels_shape"] = pixels.tobytes(), list(pixels.shape)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=pipeline_schema(config.encoders))


class VAEStage:
    """Actor: pixels -> VAE latents (one model load per actor)."""

    def __init__(self, config: Config):
        self.codec = make_codec(config.codec, device=config.embed.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["pixels"] is not None]
        by_shape: dict[tuple, list[dict]] = {}
        for r in todo:
            by_shape.setdefault(tuple(r["pixels_shape"]), []).append(r)
        for shape, group in by_shape.items():
            images = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(shape) for r in group])
            for r, latent in zip(group, self.codec.encode(images)):
                _latent_columns(r, latent)
        for r in rows:
            r["pixels"], r["pixels_shape"] = None, None
        return pa.Table.from_pylist(rows, schema=batch.schema)


class CaptionMemo:
    """The encoded captions an actor saw last, up to a byte budget (least recently used out).

    The actor's encoders are fixed, so equal captions mean equal features: a caption met
    again (the same caption on many images) is looked up, not encoded again."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.entries: OrderedDict[str, EncodedCaption] = OrderedDict()

    def get(self, caption: str) -> EncodedCaption | None:
        found = self.entries.get(caption)
        if found is not None:
            self.entries.move_to_end(caption)
        return found

    def put(self, caption: str, encoded: EncodedCaption) -> None:
        size = encoded.states.numel() * encoded.states.element_size() + len(caption)
        if size > self.budget or caption in self.entries:
            return
        # a copy: the states are a view into their whole padded batch, which must not stay alive
        encoded = EncodedCaption(encoded.ids, encoded.states.clone(), encoded.truncated)
        self.entries[caption], self.used = encoded, self.used + size
        while self.used > self.budget:
            old_caption, old = self.entries.popitem(last=False)
            self.used -= old.states.numel() * old.states.element_size() + len(old_caption)


class TextEncodeStage:
    """Actor: captions -> every encoder's caption-dependent token states.

    Each distinct caption is encoded once: within a call, and across calls through a
    memo of `embed.caption_memo_mib`. The rows still each store their own copy of the
    states (the README's "Equal captions are encoded once" says why). `caption_encoded`
    marks the rows whose caption was run, so the driver can count forwards against rows."""

    def __init__(self, config: Config):
        torch.set_num_threads(config.embed.threads_per_actor)
        self.config = config
        self.encoders = [build_encoder(e, device=config.embed.device) for e in config.encoders]
        budget = int(config.embed.caption_memo_mib * 2**20)
        self.memos = {e.config.name: CaptionMemo(budget) for e in self.encoders}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["reject"] is None]
        distinct = list(dict.fromkeys(r["caption"] for r in todo))
        for i, enc in enumerate(self.encoders):
            name, memo = enc.config.name, self.memos[enc.config.name]
            known = {c: memo.get(c) for c in distinct}
            run = [c for c, found in known.items() if found is None]
            for caption, out in zip(run, enc.encode(run, batch_size=self.config.embed.batch_size)):
                known[caption] = out
                memo.put(caption, out)
            if i == 0:  # count each run caption once, on its first row
                fresh = set(run)
                for r in todo:
                    r["caption_encoded"] = r["caption"] in fresh
                    fresh.discard(r["caption"])
            for r in todo:
                out = known[r["caption"]]
                if len(out.ids) == 0 and enc.causal and r["reject"] is None:
                    r["reject"], r["stage"] = f"caption has no tokens for encoder {name}", "encode"
                r[f"{name}__ids"] = out.ids.tolist()
                r[f"{name}__states"] = tensor_to_bytes(out.states)
                r[f"{name}__ntok"] = len(out.ids)
                r[f"{name}__truncated"] = out.truncated
        return pa.Table.from_pylist(rows, schema=batch.schema)


def validate_before_work(config: Config) -> None:
    """Fail before any work on a wrong model path, a layer out of range, a bad codec path."""
    for i, enc in enumerate(config.encoders):
        path = resolve_model_path(enc.path)
        try:
            blocks_to_run(enc.layer, model_num_blocks(path))
        except ValueError as err:
            raise ConfigError(f"encoders[{i}] ({enc.name}): {err}") from err
    if config.data.source == "shapes" and [config.data.height, config.data.width] not in config.codec.buckets:
        raise ConfigError(
            f"data.height/width {config.data.height}x{config.data.width} is not one of codec.buckets "
            f"{config.codec.buckets}"
        )


@ray.remote
def _describe(config: Config, adopt: dict[str, str]) -> tuple[list[dict], dict, dict]:
    """Encoder identities, shared text constants and codec identity, computed on a worker
    (the driver may be a head node without the memory or GPU an 8B LLM needs).

    `auto` compute dtypes resolve here, on an encoder's kind of worker, once for the whole
    run; `adopt` maps encoder names to the dtype an existing cache recorded for `auto`,
    so a resumed cache keeps one compute dtype whatever machine resumes it."""
    identities, constants = [], {}
    for enc_config in config.encoders:
        requested = enc_config.compute_dtype
        if requested == "auto" and enc_config.name in adopt:
            enc_config = dataclasses.replace(enc_config, compute_dtype=adopt[enc_config.name])
        enc = build_encoder(enc_config, device=config.embed.device)
        identities.append({**enc.identity(), "compute_dtype_requested": requested})
        null = enc.null_caption()
        constants[f"{enc_config.name}.prefix_states"] = enc.prefix_states
        constants[f"{enc_config.name}.prefix_ids"] = torch.tensor(enc.prefix_ids, dtype=torch.int32)
        constants[f"{enc_config.name}.null_states"] = null.states
        constants[f"{enc_config.name}.null_ids"] = torch.from_numpy(null.ids)
    codec = make_codec(config.codec, config.embed.device)
    return identities, constants, codec.identity()


def group_equal_captions(items: list[dict]) -> list[dict]:
    """Items with equal captions made neighbours (in order of first appearance), so they
    reach the same encoder call and the caption is encoded once. Only sources that list
    captions (manifests, caption files) can be grouped before their items are read."""
    groups: dict = {}
    for i, item in enumerate(items):
        caption = item.get("caption")
        groups.setdefault(("caption", caption) if isinstance(caption, str) else ("item", i), []).append(item)
    return [item for group in groups.values() for item in group]


def with_resolved_dtypes(config: Config, identities: list[dict]) -> Config:
    """The config with every encoder's compute dtype as recorded: the actors run exactly that."""
    ran = {record["name"]: record["compute_dtype"] for record in identities}
    encoders = [dataclasses.replace(e, compute_dtype=ran[e.name]) for e in config.encoders]
    return dataclasses.replace(config, encoders=encoders)


RAY_LEVEL_NOTICE = "Set ray log level from environment variable"


def start_ray(config: Config) -> None:
    """Join RAY_ADDRESS / embed.ray_address, else start a local Ray sized for the encoder pool.

    Workers get the driver's OpenMP wait policy (PASSIVE unless set): a spin-waiting
    OpenMP team collapses when another process shares its cores (docs/BENCHMARKS.md)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}
    # Ray Data's actor pool makes Ray's C++ core log an error line on every run ("constructor
    # arguments in the object store", ray-project/ray#53727) that is no error of this job;
    # failures still reach us as Python exceptions. RAY_BACKEND_LOG_LEVEL=error shows it again.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    # ...which makes the C++ core print that it did so; that notice is dropped too.
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR, "runtime_env": runtime_env}
    address = config.embed.ray_address
    with stderr_without(RAY_LEVEL_NOTICE):
        if address is None and not os.environ.get("RAY_ADDRESS"):
            # A local Ray: one CPU more than the encoder actors hold, so read tasks can run.
            cpus = config.embed.actors * config.embed.threads_per_actor + 1
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
        else:
            ray.init(address=address or "auto", **quiet)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job draws its own bar
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def run_embed(config: Config, limit: int | None = None, progress: bool = True, log=print) -> EmbedSummary:
    started = time.time()
    validate_before_work(config)
    items = reject_duplicate_ids(list_items(config))
    if limit is not None:
        items = items[:limit]
    start_ray(config)
    existing = read_meta(config.cache_path)
    adopt = {r["name"]: r["compute_dtype"] for r in (existing or {}).get("encoders", [])
             if r.get("compute_dtype_requested") == "auto"}
    describe = _describe.options(num_gpus=config.embed.gpus_per_actor, resources=config.embed.resources)
    identities, constants, codec_identity = ray.get(describe.remote(config, adopt))
    for record in identities:
        note = ", kept from the existing cache" if record["name"] in adopt else ""
        log(f"embed: {record['name']} computes in {record['compute_dtype']} "
            f"(asked: {record['compute_dtype_requested']}{note}) on {record['hardware']}")
    config = with_resolved_dtypes(config, identities)
    meta = {"encoders": identities, "codec": codec_identity, "buckets": config.codec.buckets,
            "source": {"kind": config.data.source, "path": config.data.path,
                       "world": world_spec(config.data.height, config.data.width)
                       if config.data.source == "shapes" else None},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    writer = CacheWriter(config.cache_path, meta)
    if not writer.has_constants():
        writer.write_constants(constants)
    done = writer.committed_ids()
    todo = group_equal_captions([item for item in items if item["id"] not in done])
    summary = EmbedSummary(cache=str(config.cache_path), skipped=len(items) - len(todo))
    if todo:
        _run_pipeline(config, todo, writer, summary, progress)
    summary.seconds = time.time() - started
    return summary


def _run_pipeline(config: Config, todo: list[dict], writer: CacheWriter, summary: EmbedSummary,
                  progress: bool) -> None:
    from ray.data import ActorPoolStrategy

    emb = config.embed
    # Each actor call gets several encoder batches' worth of rows: PromptEncoder sorts a call's
    # captions by length, so a call of exactly one batch would pad every row to its longest
    # caption (measured: 2x the work on shapes captions, 7 tokens on average, 15 at most).
    block = min(emb.shard_rows, 4 * emb.batch_size)
    ds = ray.data.from_items([{"item": json.dumps(item)} for item in todo],
                             override_num_blocks=max(1, len(todo) // block))
    ds = ds.map_batches(read_stage, fn_kwargs={"config": config}, batch_format="pyarrow",
                        batch_size=block, num_cpus=0.5)
    if config.codec.kind == "vae":
        ds = ds.map_batches(VAEStage, fn_constructor_kwargs={"config": config}, batch_format="pyarrow",
                            batch_size=block, compute=ActorPoolStrategy(size=emb.actors),
                            num_cpus=emb.threads_per_actor, num_gpus=emb.gpus_per_actor)
    ds = ds.map_batches(TextEncodeStage, fn_constructor_kwargs={"config": config}, batch_format="pyarrow",
                        batch_size=block, compute=ActorPoolStrategy(size=emb.actors),
                        num_cpus=emb.threads_per_actor, num_gpus=emb.gpus_per_actor, resources=emb.resources)
    bar = tqdm(total=len(todo), desc="embed", unit="caption", disable=not progress, mininterval=2.0)
    for batch in ds.iter_batches(batch_size=emb.shard_rows, batch_format="pyarrow"):
        rejected = pc.is_valid(batch.column("reject"))
        good = batch.filter(pc.invert(rejected))
        bad = batch.filter(rejected)
        summary.bytes += writer.append(good)  # accepted rows first: see store/writer.py
        writer.append_rejects([{"id": r["id"], "stage": r["stage"], "reason": r["reject"], "source": r["source"]}
                               for r in bad.select(["id", "stage", "reject", "source"]).to_pylist()])
        summary.written += good.num_rows
        summary.rejected += bad.num_rows
        summary.encoded += int(pc.sum(batch.column("caption_encoded")).as_py() or 0)
        for reason in bad.column("reject").to_pylist():
            key = reason.split(":")[0]
            summary.reasons[key] = summary.reasons.get(key, 0) + 1
        for e in config.encoders:
            summary.tokens += int(pc.sum(good.column(f"{e.name}__ntok")).as_py() or 0)
        bar.update(batch.num_rows)
        bar.set_postfix(written=summary.written, rejected=summary.rejected)
    bar.close()
