"""Local updates: one component with its own two optimizers, the learning-rate clock, and what a runner is.

The trainer (al/trainer.py) and the pipeline's stages (al/pipeline/) both train components through
this module, so neither imports the other: the trainer hands a runner its `Work`, and the runner
hands back the losses of each mini-batch that every component has trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from al.config import ModelConfig, TrainConfig
from al.model import Component


def lr_multiplier(schedule: str, step: int, total_steps: int) -> float:
    """Learning-rate factor at `step`; a pure function of the step, so resuming needs no scheduler state."""
    progress = step / max(total_steps, 1)
    if schedule == "step":  # R1: x0.1 at 40/60/80 % of the steps, then x0.5 at 90 %
        factor = 0.1 ** sum(progress >= p for p in (0.4, 0.6, 0.8))
        return factor * (0.5 if progress >= 0.9 else 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def _ramp(step: int, steps: int) -> float:
    """A linear warm-up's factor: (step + 1) / steps over the first `steps` steps, then 1."""
    return min(1.0, (step + 1) / steps) if steps else 1.0


def lr_factors(cfg: TrainConfig, step: int, total_steps: int) -> tuple[float, float]:
    """(f/b factor, g/h factor) at `step`: the schedule times the warm-up ramps (lr_warmup for every module,
    target_warmup for g and h besides)."""
    factor = lr_multiplier(cfg.schedule, step, total_steps) * _ramp(step, cfg.lr_warmup)
    return factor, factor * _ramp(step, cfg.target_warmup)


def scaled_lr(cfg: TrainConfig) -> float:
    """lr scaled with the batch size as `lr_scaling` says (Goyal et al.'s linear rule, or the square root)."""
    ratio = cfg.batch_size / cfg.lr_reference_batch
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam as one fused kernel per step: about a fifth off an AL step of the MLP on one CPU thread
    (32 -> 26 ms, 2 components of 512), which pays the per-tensor Python of the default loop."""
    return torch.optim.Adam(params, lr=lr, fused=True)


class ComponentTrainer:
    """One component with its two optimizers: f/b learn from A_i, g/h from R_i. A frozen component (not in
    train_components) only passes each mini-batch on."""

    def __init__(self, component: Component, index: int, model_cfg: ModelConfig, train_cfg: TrainConfig):
        self.component = component
        self.first = index == 0
        self.frozen = train_cfg.train_components is not None and index + 1 not in train_cfg.train_components
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        lr = scaled_lr(train_cfg)
        encoder, bridge = [*component.encoder.parameters()], [*component.bridge.parameters()]
        # One group for f and b when they learn alike: a checkpoint from before bridge_lr_factor still loads.
        encoder_groups = [(encoder + bridge, lr)] if train_cfg.bridge_lr_factor == 1 else [
            (encoder, lr), (bridge, lr * train_cfg.bridge_lr_factor)]
        target_side = [*component.target_encoder.parameters(), *component.decoder.parameters()]
        # The base learning rate of each optimizer's param groups, in order.
        self.encoder_lrs = [group_lr for _, group_lr in encoder_groups]
        self.target_lrs = [lr * train_cfg.target_lr_factor]
        self.encoder_optimizer = adam([{"params": params, "lr": group_lr} for params, group_lr in encoder_groups],
                                      lr)
        self.target_optimizer = adam(target_side, self.target_lrs[0])

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.encoder_optimizer, self.target_optimizer]

    def step(self, s_prev, t_prev, labels, lr_factors: tuple[float, float]):
        """Train on one mini-batch at `lr_factors` (f/b, g/h: see `lr_factors`); returns (sg(s_i), sg(t_i), A_i,
        R_i) for the next component."""
        cfg = self.train_cfg
        if self.frozen:
            return self.forward(s_prev, t_prev, labels)
        for optimizer, bases, factor in ((self.encoder_optimizer, self.encoder_lrs, lr_factors[0]),
                                         (self.target_optimizer, self.target_lrs, lr_factors[1])):
            for group, base in zip(optimizer.param_groups, bases):
                group["lr"] = base * factor
        s, t, associated, autoencoder = self.component.local_losses(
            s_prev, t_prev, labels, self.first, self.model_cfg.h1_loss, cfg.detach_target
        )
        loss = cfg.associated_weight * associated + cfg.autoencoder_weight * autoencoder
        self.encoder_optimizer.zero_grad(set_to_none=True)
        self.target_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.encoder_optimizer.step()
        self.target_optimizer.step()
        return s.detach(), t.detach(), associated.detach(), autoencoder.detach()

    @torch.no_grad()
    def forward(self, s_prev, t_prev, labels):
        """A frozen component's step: its local forward pass as at inference (batch norm reads its running
        statistics and leaves them as they are), for s_i, t_i and its losses; no backward, no optimizer step."""
        self.component.eval()
        try:
            return self.component.local_losses(s_prev, t_prev, labels, self.first, self.model_cfg.h1_loss,
                                               self.train_cfg.detach_target)
        finally:
            self.component.train()


def train_components(trainers: list[ComponentTrainer], s, t, labels, lr_factors: tuple[float, float]):
    """One mini-batch through consecutive components: (sg(s), sg(t), [A_i, R_i for each component])."""
    losses = []
    for trainer in trainers:
        s, t, associated, autoencoder = trainer.step(s, t, labels, lr_factors)
        losses += [associated, autoencoder]
    return s, t, losses


# Components by index: all of them (rank 0, the threads mode) or a stage's own (a stage process)
ComponentTrainers = list[ComponentTrainer] | dict[int, ComponentTrainer]
# (global step, x, y): one mini-batch and the step that sets its learning rate
Batches = Iterable[tuple[int, torch.Tensor, torch.Tensor]]
Record = Callable[[list[torch.Tensor]], None]


@dataclass
class Work:
    """What a runner needs of the trainer to train mini-batches, and nothing more."""

    component_trainers: list[ComponentTrainer]  # AL's components with their optimizers; empty for BP
    num_classes: int
    device: torch.device  # the trainer's: where the model lives between runs and the losses are recorded
    total_steps: int  # the learning-rate schedule's horizon
    train_step: Callable[[int, torch.Tensor, torch.Tensor], list[torch.Tensor]]  # the whole model on one batch


class Runner(Protocol):
    """How the mini-batches of an epoch reach the components: in turn (sequential) or in stages at once."""

    stats: dict  # of the last run: a pipeline's "busy_seconds" and "idle_fraction" per stage, among others

    def run(self, work: Work, batches: Batches, record: Record) -> None:
        """Train on `batches` in order and call `record(losses)` once for each, in order, when every
        component has trained on it; return with the model whole again on `work.device`."""

    def close(self) -> None:
        """Release what the runner holds between runs (threads, processes); the trainer calls it once, at the end."""
