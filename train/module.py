"""The LightningModule: the model, the diffusion loss, the optimizer (train/optim.py) with warm-up, EMA weights.

The Trainer owns devices, precision, gradient clipping and checkpoints. The noise and
timesteps of step k come from a generator seeded by (seed, k), so a resumed run
reproduces an uninterrupted one exactly (with the sampler in train/data.py).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.plugins.precision import MixedPrecision

from store.config import Config, config_from_dict
from train.diffusion import objective_from_config
from train.lidit import LIDiTBlock
from train.model import TextToImageModel, build_kwargs
from train.optim import build_optimizer
from train.refiner import CollaborativeRefinerBlock, LanguageTokenRefinerBlock


class LIDiTModule(L.LightningModule):
    def __init__(self, config: dict, cache_meta: dict):
        """`config` is Config.to_dict(); `cache_meta` the cache's meta.json (both saved in
        the checkpoint, so a checkpoint alone rebuilds the model)."""
        super().__init__()
        self.save_hyperparameters()
        self.config: Config = config_from_dict(config)
        by_name = {e["name"]: e for e in cache_meta["encoders"]}
        names = self.config.model.encoders or [e["name"] for e in cache_meta["encoders"]]
        self.encoder_names = list(names)
        self.kwargs = build_kwargs(self.config.model, [by_name[n] for n in names], cache_meta["codec"])
        # activation checkpointing is a way of training, not part of what the model is (build_kwargs)
        self.model = TextToImageModel(**self.kwargs, activation_checkpointing=self.config.train.activation_checkpointing)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.objective = objective_from_config(self.config.train)

    def configure_model(self) -> None:
        """Shard the model and its EMA copy when train.strategy is fsdp, then compile the
        trained model in place when train.compile asks (its state_dict keys stay as they are,
        so checkpoints and exports do not change); the EMA copy stays eager.

        FSDP2 (torch's fully_shard) over the data-parallel mesh of Lightning's
        ModelParallelStrategy: each LI-DiT, refiner and collaborative block is a unit of its own
        (its weights are gathered just before it runs and freed after), and the rest of each
        network is one more (train/plan.py counts memory the same way). The EMA
        copy is sharded the same way, so every process holds 1/N of it too and the EMA update
        runs shard by shard."""
        if self.config.train.strategy == "fsdp" and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            blocks = (LIDiTBlock, LanguageTokenRefinerBlock, CollaborativeRefinerBlock)
            for net in (self.model, self.ema):
                for block in [m for m in net.modules() if isinstance(m, blocks)]:
                    fully_shard(block, mesh=mesh)
                fully_shard(net, mesh=mesh)
            self._sharded = True
        if self.config.train.compile != "off" and not getattr(self, "_compiled", False):
            self.model.compile(mode=self.config.train.compile, dynamic=False)
            self._compiled = True

    def full_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"model": ..., "ema": ...}: every weight whole, on the CPU. Sharded (fsdp), this
        gathers the shards: a collective every process must call."""
        if not getattr(self, "_sharded", False):
            return {"model": self.model.state_dict(), "ema": self.ema.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {name: get_model_state_dict(net, options=options)
                for name, net in (("model", self.model), ("ema", self.ema))}

    def forward(self, x, t, features, masks):
        return self.model(x, t, features, masks)

    def _inputs(self, batch: dict) -> tuple[list, list]:
        text = [batch["text"][name] for name in self.encoder_names]
        return [f.states for f in text], [f.mask for f in text]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = batch["latents"]  # [B, C, h, w]
        # One stream per (seed, step): seeds are spaced by a prime above any step count, so two
        # runs with different seeds never share a step's noise.
        generator = torch.Generator(device=x0.device).manual_seed(self.config.seed * 1_000_003 + self.global_step)
        x_t, t, target = self._draw(x0, generator)
        features, masks = self._inputs(batch)
        prediction = self.model(x_t, t, features, masks)
        loss = self.objective.loss(prediction, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}; lower train.lr or check the cache"
            )
        # under DDP, the mean over the ranks' shares: the global batch's loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _draw(self, x0: torch.Tensor, generator: torch.Generator) -> tuple:
        """The objective's training draws (x_t, t, target) for this rank's share of the global batch.

        Under DDP each rank holds a contiguous share of batch k (train/data.py); the times and
        noise are drawn for the whole global batch and each rank keeps its share, so N
        processes train on exactly the draws of one (and no two ranks share their noise)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return self.objective.sample_training(x0, generator)
        rank, size = self.trainer.global_rank, x0.shape[0]
        drawn = self.objective.sample_training(x0.repeat(world, *([1] * (x0.ndim - 1))), generator)
        return tuple(d[rank * size : (rank + 1) * size] for d in drawn)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        decay = self.config.train.ema_decay
        # Warm the EMA up: early on, an average over a few steps beats a stale init.
        decay = min(decay, (1 + self.global_step) / (10 + self.global_step))
        # one fused call over all tensors: a per-parameter loop is ~100 kernel launches on a GPU
        # sharded (fsdp), each process updates its own shards: both copies are sharded alike,
        # once FSDP has freed the whole weights a root may still hold after its forward (the
        # model's in training, the EMA's after an in-training evaluation)
        if getattr(self, "_sharded", False):
            self.model.reshard()
            self.ema.reshard()
        ema = [local(p) for p in self.ema.parameters()]
        torch._foreach_lerp_(ema, [local(p.detach()) for p in self.model.parameters()], 1.0 - decay)

    def configure_optimizers(self):
        train = self.config.train
        optimizer = build_optimizer(self.model, train)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(train, step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the gradients' global norm to train.grad_clip under mixed precision too.

        Lightning's mixed-precision plugin refuses to clip around an optimizer that unscales
        inside its step (fused AdamW), under bf16-mixed as well, where nothing is scaled. So the
        norm is clipped here, as Lightning's own clipping does it (torch's clip_grad_norm_ over
        the optimizer's parameters). Under a grad scaler (16-mixed) such an optimizer's gradients
        are unscaled first; the scaler then tells the fused step not to unscale them again.
        Other precision plugins (32-true, FSDP's) clip the way Lightning does."""
        plugin = self.trainer.precision_plugin
        if not gradient_clip_val or not isinstance(plugin, MixedPrecision):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if plugin.scaler is not None and _optimizer_handles_unscaling(optimizer):
            plugin.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this process (a view: writing to it writes the DTensor), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def lr_factor(train, step: int) -> float:
    """The lr of optimizer step `step` (0-based) as a fraction of train.lr.

    Linear warm-up over train.warmup_steps, then constant, or a cosine from 1 down to
    train.lr_final that reaches it at train.steps (a run stopped by max_minutes stops
    partway down the curve)."""
    warmup = max(1, train.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step + 1 - warmup) / max(1, train.steps - warmup))
    return train.lr_final + (1.0 - train.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))
