"""train/optim.py: which parameters Muon takes, and the two optimizers stepping as one."""

from __future__ import annotations

import copy

import pytest
import torch

from store.config import Config, ConfigError, load_config
from train.model import TextToImageModel
from train.optim import MuonAdamW, adamw_options, build_optimizer, muon_split


def tiny_model() -> TextToImageModel:
    torch.manual_seed(0)
    return TextToImageModel([(16, 2), (8, 0)], in_channels=3, patch=2, dim=32, depth=2, heads=2, rope=True,
                            mlp_conv=True)


def train_config(**train) -> Config:
    """The default config with these train.* settings (validated as a user's would be)."""
    return load_config("configs/default.yaml", [f"train.{key}={value}" for key, value in train.items()])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    matrices, others = muon_split(model, model.dit.final_layer)
    ids = [id(p) for p in matrices + others]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter, once
    assert all(p.ndim == 2 for p in matrices)
    head = {id(p) for p in model.dit.final_layer.parameters()}
    assert head.isdisjoint(id(p) for p in matrices)  # the head stays with AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in matrices}
    assert {"dit.blocks.0.attn.q.weight", "dit.blocks.1.mlp.fc1.weight", "dit.t_embedder.mlp.0.weight"} <= muon_names
    assert any(n.startswith("diffuser.") for n in muon_names)  # the refiners' matrices too
    other_names = {names[id(p)] for p in others}
    assert "dit.x_embedder.proj.weight" in other_names  # a convolution
    assert any(n.endswith(".bias") for n in other_names)
    with pytest.raises(ValueError, match=r"2-D weight matrices only"):
        MuonAdamW(others, [], 1e-3, 1e-3, 0.0, (0.9, 0.95))


def test_one_optimizer_to_the_schedule_and_the_checkpoint():
    model = tiny_model()
    optimizer = build_optimizer(model, train_config(optimizer="muon", lr=2e-3, muon_lr=4e-3).train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.25)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(1e-3)  # the schedule reaches Muon
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(5e-4)  # ... and AdamW
    inputs = (torch.randn(4, 3, 8, 8), torch.full((4,), 500.0), [torch.randn(4, 5, 16), torch.randn(4, 3, 8)],
              [torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 3, dtype=torch.bool)])

    def step(model, optimizer):
        optimizer.zero_grad()
        (model(*inputs) - inputs[0]).square().mean().backward()  # a target: at init the output is 0
        optimizer.step()

    for _ in range(3):
        step(model, optimizer)
        schedule.step()
    twin = copy.deepcopy(model)
    saved = copy.deepcopy(optimizer.state_dict())
    restored = build_optimizer(twin, train_config(optimizer="muon", lr=2e-3, muon_lr=4e-3).train)
    restored.load_state_dict(saved)
    assert restored.muon.param_groups[0]["lr"] == pytest.approx(1e-3)
    step(model, optimizer)
    step(twin, restored)  # a restored optimizer takes the same next step as the original
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_model().parameters())]
    assert all(moved)  # both optimizers did update their parameters


@pytest.mark.parametrize(("key", "value", "error"), [
    ("optimizer", "sgd", r"train\.optimizer"),
    ("muon_lr", 0.0, r"train\.muon_lr: must be > 0"),
    ("muon_momentum", 1.0, r"train\.muon_momentum: must be in \[0, 1\)"),
    ("adamw_kernel", "turbo", r"train\.adamw_kernel"),
])
def test_bad_optimizer_settings_are_refused(key, value, error):
    with pytest.raises(ConfigError, match=error):
        train_config(**{key: value})


def adamw_flags(optimizer: torch.optim.Optimizer) -> tuple:
    group = optimizer.param_groups[0]
    return bool(group["fused"]), bool(group["foreach"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_auto_fuses_adamw_wherever_torch_has_the_kernel_but_under_fsdp(optimizer):
    model = tiny_model()
    config = train_config(optimizer=optimizer)

    def built(**train):
        opt = build_optimizer(model, train_config(optimizer=optimizer, **train).train)
        return adamw_flags(opt.adamw if optimizer == "muon" else opt)

    assert config.train.adamw_kernel == "auto"
    assert built() == (True, False)  # fused on a CPU, under any precision: the module clips around it
    assert built(adamw_kernel="loop") == (False, False)
    assert built(adamw_kernel="foreach") == (False, True)
    if optimizer == "adamw":
        assert built(strategy="fsdp") == (False, False)  # torch's own default
    with torch.device("meta"):
        meta_params = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert adamw_options("auto", meta_params) == {}  # no fused kernel on that device: unfused


@pytest.mark.parametrize(("train", "error"), [
    ({"optimizer": "muon", "strategy": "fsdp"}, r"train\.optimizer=muon with train\.strategy=fsdp"),
    ({"adamw_kernel": "fused", "strategy": "fsdp"}, r"train\.adamw_kernel=fused with train\.strategy=fsdp"),
    ({"precision": "bf16"}, r"train\.precision"),
])
def test_combinations_that_cannot_work_are_refused_when_the_config_is_read(train, error):
    with pytest.raises(ConfigError, match=error):
        train_config(**train)


def test_the_adamw_kernels_take_the_same_step():
    """One step from the same gradients: the same update to float rounding. (Over several steps
    the tiny model's near-zero gradients, where Adam's update is sign-like, amplify the rounding.)"""
    inputs = (torch.randn(4, 3, 8, 8), torch.full((4,), 500.0), [torch.randn(4, 5, 16), torch.randn(4, 3, 8)],
              [torch.ones(4, 5, dtype=torch.bool), torch.ones(4, 3, dtype=torch.bool)])
    trained = {}
    for kernel in ("loop", "foreach", "fused"):
        model = tiny_model()
        optimizer = build_optimizer(model, train_config(adamw_kernel=kernel, weight_decay=0.01).train)
        assert adamw_flags(optimizer) == {"loop": (False, False), "foreach": (False, True),
                                          "fused": (True, False)}[kernel]
        (model(*inputs) - inputs[0]).square().mean().backward()
        optimizer.step()
        trained[kernel] = model
    start, moved = tiny_model(), 0
    for a, b, c, p in zip(trained["loop"].parameters(), trained["foreach"].parameters(),
                          trained["fused"].parameters(), start.parameters()):
        moved += not torch.equal(a, p)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-8)
    assert moved > len(list(start.parameters())) // 2  # a real step (zero-init gates get no gradient yet)
