"""The memory plan: parameter shapes from the model's own classes, states sharded by FSDP, activations counted."""

import json

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from store.config import load_config
from train.model import TextToImageModel, build_kwargs
from train.module import LIDiTModule
from train.plan import (activation_bytes, codec_record, encoder_records, main, meta_model, parameter_counts, plan,
                        shapes_for)


@pytest.fixture
def default(tmp_path):
    """The default recipe with no cache (so its encoders' widths come from the known table)."""
    return load_config("configs/default.yaml", [f"cache_dir={tmp_path / 'no-cache'}"])


def _plan_inputs(config):
    records, codec = encoder_records(config), codec_record(config)
    return records, codec, parameter_counts(meta_model(config, records, codec))


def test_plan_counts_the_parameters_of_the_model_the_trainer_builds(default):
    records, codec, counts = _plan_inputs(default)
    module = LIDiTModule(default.to_dict(), {"encoders": records, "codec": codec})  # what it reads of a meta.json
    assert counts["total"] == module.num_parameters()
    assert counts["dit"] + counts["refiners"] == counts["total"]


def test_fsdp_shards_the_states_over_the_gpus_and_not_the_activations(default):
    records, codec, counts = _plan_inputs(default)
    gpus = 4
    ddp, fsdp = (plan(default, strategy, gpus, records, codec, counts) for strategy in ("ddp", "fsdp"))
    for part in ("weights (fp32)", "gradients (fp32)", "AdamW moments (2 x fp32)", "EMA (fp32)"):
        assert fsdp["states"][part] == ddp["states"][part] // gpus
    assert fsdp["states"]["DDP gradient buckets (fp32)"] == 0 < ddp["states"]["DDP gradient buckets (fp32)"]
    for checkpointing in ("off", "on"):
        assert fsdp[checkpointing]["activations"] == ddp[checkpointing]["activations"]


def test_activations_scale_with_the_per_gpu_batch(default):
    records, codec, _ = _plan_inputs(default)
    one, four = (sum(activation_bytes(shapes_for(default, records, codec, gpus), False).values()) for gpus in (1, 4))
    assert one == 4 * four


def test_activation_checkpointing_reduces_the_activation_bytes(default):
    records, codec, counts = _plan_inputs(default)
    planned = plan(default, "ddp", 1, records, codec, counts)
    assert planned["on"]["activations"]["LI-DiT blocks"] < planned["off"]["activations"]["LI-DiT blocks"]
    assert planned["on"]["activations"]["refiners"] == planned["off"]["activations"]["refiners"]  # not checkpointed
    assert planned["on"]["total"] < planned["off"]["total"]


def _saved_for_backward(model: TextToImageModel, x, t, features, masks, target) -> int:
    """Bytes of the distinct tensors autograd saves in a bf16-autocast forward, less the parameters
    and their bf16 casts (the plan counts those as states)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def cast_of_a_parameter(tensor) -> bool:
        node = tensor.grad_fn
        for _ in range(3):  # a weight's bf16 copy: ToCopy (and a transpose) above its AccumulateGrad
            if node is None:
                return False
            if type(node).__name__ == "AccumulateGrad":
                return True
            parents = [n for n, _ in node.next_functions if n is not None]
            if len(parents) != 1:
                return False
            node = parents[0]
        return False

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and not cast_of_a_parameter(tensor):
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.mse_loss(model(x, t, features, masks).float(), target)
    return sum(storages.values())


def test_activation_count_matches_what_autograd_saves_on_the_cpu(tmp_path):
    config = load_config("configs/default.yaml", [
        f"cache_dir={tmp_path}", "model.dim=64", "model.depth=3", "model.heads=4", "model.patch=2",
        "model.rope=false", "train.batch_size=4", "codec.buckets=[[16, 16]]",
        "encoders.0.max_tokens=12", "encoders.1.max_tokens=10"])
    records, codec, _ = _plan_inputs(config)
    shapes = shapes_for(config, records, codec, gpus=1)
    model = TextToImageModel(**build_kwargs(config.model, records, codec)).train()
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(shapes.batch, prefix + caption, width, generator=generator).bfloat16()
                for width, prefix, caption in shapes.encoders]
    masks = [torch.ones(f.shape[:2], dtype=torch.bool) for f in features]  # padded to the longest: all real
    x, target = (torch.randn(shapes.batch, *shapes.latent, generator=generator) for _ in range(2))
    measured = _saved_for_backward(model, x, torch.rand(shapes.batch, generator=generator) * 1000, features, masks,
                                   target)
    planned = sum(activation_bytes(shapes, checkpointing=False, device="cpu").values())
    assert 0.95 < measured / planned < 1.05


def test_the_json_line_holds_bytes_per_gpu_strategy_and_gpus(default, tmp_path, capsys):
    code = main(["--config", "configs/default.yaml", "--set", f"cache_dir={tmp_path}", "--strategy", "fsdp",
                 "--gpus", "2", "--activation-checkpointing", "on", "--json"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["strategy"], line["gpus"], line["activation_checkpointing"]) == ("fsdp", 2, True)
    records, codec, counts = _plan_inputs(default)
    assert line["bytes_per_gpu"] == plan(default, "fsdp", 2, records, codec, counts)["on"]["total"]


def test_the_paper_configs_plan_without_their_models(capsys):
    assert main(["--config", "configs/lidit-1b.yaml", "--gpus", "64", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["per_gpu_batch"] == 2048 // 64 and line["strategy"] == "ddp"


def test_an_encoder_of_unknown_width_is_refused_with_the_option_that_gives_it(tmp_path, capsys):
    overrides = ["--set", f"cache_dir={tmp_path}", "--set", f"encoders.0.path={tmp_path / 'my-llm'}"]
    assert main(["--config", "configs/default.yaml", *overrides]) == 2
    assert "--hidden-size smollm2=SIZE" in capsys.readouterr().err
    assert main(["--config", "configs/default.yaml", *overrides, "--hidden-size", "smollm2=576"]) == 0
