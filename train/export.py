"""Weights for sampling: safetensors (EMA and raw) with the config and cache metadata.

    checkpoints/ema.safetensors, model.safetensors   the denoiser's weights
    checkpoints/model.json                           build arguments, config, cache metadata, step
    checkpoints/text_constants.safetensors           prefix and unconditional text states

Sampling loads these and never needs the cache, the Lightning checkpoint or pickle.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from store.config import Config, ConfigError, config_from_dict, encoder_features
from store.reader import CacheReader
from store.storage import RemotePath, location, write_atomic
from train.diffusion import Objective, objective_from_config
from train.model import TextToImageModel


class ExportError(FileNotFoundError):
    """No exported weights where they were expected."""


def export(module, reader: CacheReader, out_dir: str | Path, step: int,
           runtime: dict | None = None, states: dict[str, dict] | None = None) -> Path | RemotePath:
    """Write the module's raw and EMA weights, its build arguments and the text constants.

    `out_dir` is a folder or an object-store URI; model.json goes last, so a reader that
    finds it finds the weights too. `runtime`: how the run ran (the resolved precision,
    the hardware), recorded as is. `states`: the weights, whole ({"model", "ema"}: a sharded
    module's `full_state_dicts()`); None reads them from the module."""
    out = location(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    states = states or {"model": module.model.state_dict(), "ema": module.ema.state_dict()}
    for name in ("model", "ema"):
        state = {k: v.detach().float().contiguous().cpu() for k, v in states[name].items()}
        data = save(state)
        if name == "ema":
            ema_sha256 = hashlib.sha256(data).hexdigest()
        write_atomic(out / f"{name}.safetensors", data)
    constants = {}
    for name in module.encoder_names:
        constants[f"{name}.prefix_states"] = reader.prefix[name].contiguous()
        constants[f"{name}.null_states"] = reader.null[name].contiguous()
    write_atomic(out / "text_constants.safetensors", save(constants))
    info = {"build": module.kwargs, "config": module.config.to_dict(), "cache_meta": reader.meta,
            "encoders": module.encoder_names, "step": step, "runtime": runtime or {},
            "ema_sha256": ema_sha256}  # what a later stage started from (train/curriculum.py)
    write_atomic(out / "model.json", json.dumps(info, indent=2).encode())
    return out


# TextToImageModel's arguments that change how it trains, not the model (train/module.py passes them)
TRAINING_ONLY = ("activation_checkpointing",)


def build_args(info: dict) -> dict:
    """An exported model's build arguments (model.json's "build", JSON types). A key the
    export lacks is a switch added since, set as the model was built before it existed: the
    model's default, except collab_condition, which was the mean. How a model trains
    (TRAINING_ONLY) is not part of what it is, so it is left out."""
    defaults = {k: p.default for k, p in inspect.signature(TextToImageModel).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in TRAINING_ONLY}
    return {**defaults, "collab_condition": "mean", **info["build"]}


def exported_folder(source: str | Path) -> Path | RemotePath:
    """Where a run's exported weights are: `source` itself, or its checkpoints folder."""
    folder = location(source)
    if not (folder / "model.json").is_file() and (folder / "checkpoints" / "model.json").is_file():
        folder = folder / "checkpoints"
    return folder


def ema_digest(source: str | Path) -> str | None:
    """The sha256 of the EMA weights exported in `source` (a run or checkpoints folder), as
    its model.json records it; None if there is no export or it predates the record."""
    model_json = exported_folder(source) / "model.json"
    return json.loads(model_json.read_text()).get("ema_sha256") if model_json.is_file() else None


def init_from_exported(module, source: str | Path) -> tuple[Path | RemotePath, int]:
    """Load another run's exported EMA weights into `module`'s trained model and its EMA
    (train.init_from): the next stage of a curriculum, or a fine-tune. `source` is that
    run's folder or its checkpoints folder, local or a URI. Refused, naming what differs,
    unless the exported model builds exactly as `module`'s and reads the same encoders
    (name, path, layer): another layer's features would load without an error and mean
    nothing to the weights. Returns the folder read and the step it was exported at."""
    folder = exported_folder(source)
    if not (folder / "model.json").is_file():
        raise ConfigError(f"train.init_from: no exported model in {folder} (model.json missing)")
    info = json.loads((folder / "model.json").read_text())
    saved = build_args(info)
    now = json.loads(json.dumps(module.kwargs))  # tuples as lists, as model.json holds them
    differ = [f"{key}: {saved.get(key)!r} there, {now.get(key)!r} here"
              for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    there = encoder_features(info["config"], info["encoders"])
    here = encoder_features(module.config.to_dict(), module.encoder_names)
    if there != here:
        differ.append(f"encoders: {there} there, {here} here")
    if differ:
        raise ConfigError(f"train.init_from: the model in {folder} is not this config's model ("
                          + "; ".join(differ) + ")")
    weights = load((folder / "ema.safetensors").read_bytes())
    for net in (module.model, module.ema):
        net.load_state_dict(weights, strict=True)
    return folder, int(info["step"])


@dataclass
class Exported:
    model: TextToImageModel
    config: Config
    cache_meta: dict
    encoders: list[dict]  # the cache's encoder records the model consumes, in order
    objective: Objective
    prefix: dict[str, torch.Tensor]
    null: dict[str, torch.Tensor]
    step: int


def load_exported(checkpoint_dir: str | Path, ema: bool = True) -> Exported:
    folder = location(checkpoint_dir)
    if not (folder / "model.json").is_file():
        raise ExportError(f"no exported model in {folder} (model.json missing); run `make train` first")
    info = json.loads((folder / "model.json").read_text())
    args = build_args(info)
    args["encoders"] = [tuple(e) for e in args["encoders"]]
    model = TextToImageModel(**args)
    weights = load((folder / ("ema.safetensors" if ema else "model.safetensors")).read_bytes())
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)
    constants = load((folder / "text_constants.safetensors").read_bytes())
    by_name = {e["name"]: e for e in info["cache_meta"]["encoders"]}
    config = config_from_dict(info["config"])
    return Exported(
        model=model, config=config, cache_meta=info["cache_meta"],
        encoders=[by_name[n] for n in info["encoders"]],
        objective=objective_from_config(config.train),
        prefix={n: constants[f"{n}.prefix_states"] for n in info["encoders"]},
        null={n: constants[f"{n}.null_states"] for n in info["encoders"]},
        step=info["step"],
    )
