"""The training optimizer (config `train.optimizer`): AdamW, or Muon for the hidden matrices.

- "adamw": AdamW over every parameter (betas 0.9 / train.adam_beta2).
- "muon": torch.optim.Muon (momentum, then Newton-Schulz orthogonalisation of each update;
  Jordan et al. 2024) for every 2-D weight matrix but LI-DiT's output head, and AdamW for
  the rest: biases, norms, the convolutions (patch, position, MLP) and the head, as Muon's
  authors and Moonlight split them. Muon's update is rescaled to AdamW's RMS
  ("match_rms_adamw", Liu et al. 2025, "Muon is Scalable for LLM Training"), so it runs at
  train.muon_lr or, unset, at AdamW's train.lr.

Both optimizers sit behind one `torch.optim.Optimizer` (`MuonAdamW`): Lightning, the lr
schedule, gradient clipping and the checkpoints see one optimizer with all the param groups.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from store.config import TrainConfig

OPTIMIZERS = ("adamw", "muon")
ADAMW_KERNELS = ("auto", "fused", "foreach", "loop")
# where torch has a fused AdamW kernel
FUSED_DEVICES = ("cpu", "cuda")


class MuonAdamW(torch.optim.Optimizer):
    """Muon over `matrices`, AdamW over `others`, stepped together as one optimizer.

    The param-group dicts and the per-parameter state are shared with the two inner
    optimizers (the parameters are disjoint), so an lr scheduler's change reaches them, and
    `state_dict` / `load_state_dict` are the base class's, over all the groups at once.
    """

    def __init__(self, matrices: list[nn.Parameter], others: list[nn.Parameter], lr: float, muon_lr: float,
                 weight_decay: float, betas: tuple[float, float], momentum: float = 0.95,
                 adamw_options: dict | None = None):
        bad = [tuple(p.shape) for p in matrices if p.ndim != 2]
        if bad:
            raise ValueError(f"Muon: takes 2-D weight matrices only, got shapes {bad}")
        self.muon = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(others, lr=lr, weight_decay=weight_decay, betas=betas, **(adamw_options or {}))
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (after a load too)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # rebuilds the group dicts and the state
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def muon_split(model: nn.Module, head: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's): the trainable 2-D weights outside `head`, and the rest."""
    in_head = {id(p) for p in head.parameters()}
    matrices, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (matrices if p.ndim == 2 and id(p) not in in_head else others).append(p)
    return matrices, others


def adamw_options(kernel: str, params: list[nn.Parameter], strategy: str = "auto") -> dict:
    """torch.optim.AdamW's implementation flags for train.adamw_kernel.

    The update is the same (up to float rounding); only the speed differs. On a 2-core CPU the
    default model's step took 21-27 ms as a loop over its 212 tensors and 5-6 ms fused
    (docs/BENCHMARKS.md). "auto" is fused where torch has the kernel for every parameter, under
    every precision (gradient clipping works around it: LIDiTModule.configure_gradient_clipping),
    but not under FSDP, where torch's own default runs."""
    if kernel not in ADAMW_KERNELS:
        raise ValueError(f"train.adamw_kernel={kernel!r}; allowed: {', '.join(ADAMW_KERNELS)}")
    if kernel == "auto":
        if not fusable(params) or strategy == "fsdp":
            return {}
        kernel = "fused"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kernel]


def fusable(params: list[nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for every one of `params`."""
    return all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of train.optimizer for a TextToImageModel."""
    betas = (0.9, train.adam_beta2)
    if train.optimizer == "adamw":
        params = list(model.parameters())
        options = adamw_options(train.adamw_kernel, params, train.strategy)
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, betas=betas, **options)
    if train.optimizer == "muon":
        matrices, others = muon_split(model, model.dit.final_layer)
        muon_lr = train.lr if train.muon_lr is None else train.muon_lr
        options = adamw_options(train.adamw_kernel, others, train.strategy)
        return MuonAdamW(matrices, others, train.lr, muon_lr, train.weight_decay, betas, train.muon_momentum, options)
    raise ValueError(f"train.optimizer={train.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
