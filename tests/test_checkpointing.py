"""Activation checkpointing of LI-DiT's blocks: the same loss and gradients, recomputed in backward."""

import pytest
import torch

from store.config import load_config
from train.lidit import LIDiTBlock
from train.model import TextToImageModel

TINY_MODEL = dict(encoders=[(24, 3), (16, 0)], in_channels=4, patch=2, dim=32, depth=3, heads=4,
                  refiner_depth=1, collab_depth=1, rope=True, mlp_conv=True)


def _tiny_model(checkpointing: bool) -> TextToImageModel:
    """The same weights whatever the switch; the zero-initialised gates opened so every path carries gradient."""
    torch.manual_seed(0)
    model = TextToImageModel(**TINY_MODEL, activation_checkpointing=checkpointing)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def _batch():
    generator = torch.Generator().manual_seed(2)
    lengths = [torch.tensor([8, 5]), torch.tensor([6, 3])]
    features = [torch.randn(2, 8, 24, generator=generator), torch.randn(2, 6, 16, generator=generator)]
    masks = [torch.arange(f.shape[1])[None] < n[:, None] for f, n in zip(features, lengths)]  # [B, L], True = real
    x = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    return x, torch.tensor([10.0, 700.0]), features, masks, target


def _loss_and_gradients(checkpointing: bool, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = _tiny_model(checkpointing).train()
    x, t, features, masks, target = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.mse_loss(model(x, t, features, masks).float(), target)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_checkpointing_gives_the_same_loss_and_gradients(autocast):
    loss_off, grads_off = _loss_and_gradients(False, autocast)
    loss_on, grads_on = _loss_and_gradients(True, autocast)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")


def _block_forwards(model: TextToImageModel, step) -> int:
    """How many times LI-DiT's blocks start their forward during `step()` (a pre-hook: the backward's
    recomputation stops as soon as it has what the backward needs, before any forward hook)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, LIDiTBlock)]
    step()
    for hook in hooks:
        hook.remove()
    return len(calls)


def test_checkpointed_blocks_run_their_forward_again_in_backward():
    depth = TINY_MODEL["depth"]
    for checkpointing, forwards in ((False, depth), (True, 2 * depth)):
        model = _tiny_model(checkpointing).train()
        x, t, features, masks, target = _batch()
        step = lambda: torch.nn.functional.mse_loss(model(x, t, features, masks), target).backward()  # noqa: E731
        assert _block_forwards(model, step) == forwards


def test_blocks_are_not_checkpointed_in_eval_or_without_gradients():
    plain, checkpointed = _tiny_model(False), _tiny_model(True)
    x, t, features, masks, _ = _batch()
    for mode, context in (("eval", torch.enable_grad), ("train", torch.no_grad)):
        for model in (plain, checkpointed):
            model.train(mode == "train")
        with context():
            out = {}
            for name, model in (("plain", plain), ("checkpointed", checkpointed)):
                forwards = _block_forwards(model, lambda m=model, n=name: out.__setitem__(n, m(x, t, features, masks)))
                assert forwards == TINY_MODEL["depth"]
        torch.testing.assert_close(out["checkpointed"], out["plain"], rtol=0, atol=0)


def test_activation_checkpointing_is_a_train_key_off_by_default():
    assert load_config("configs/default.yaml").train.activation_checkpointing is False
    config = load_config("configs/default.yaml", ["train.activation_checkpointing=true"])
    assert config.train.activation_checkpointing is True
