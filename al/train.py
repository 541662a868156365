"""Training: AL's local updates component by component, or end-to-end BP.

The trainer talks to the outside world only through callbacks (progress,
cancellation, checkpoints), so a CLI, a Celery task or a test can drive it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from al.config import ModelConfig, TrainConfig
from al.data import Splits
from al.model import ALNet, Component

TRAIN_ACCURACY_SAMPLES = 5000  # train accuracy is measured on this many fixed samples
EVAL_BATCH = 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_multiplier(schedule: str, step: int, total_steps: int) -> float:
    """Learning-rate factor at `step`; a pure function of the step, so resuming needs no scheduler state."""
    progress = step / max(total_steps, 1)
    if schedule == "step":  # R1: x0.1 at 40/60/80 % of the steps, then x0.5 at 90 %
        factor = 0.1 ** sum(progress >= p for p in (0.4, 0.6, 0.8))
        return factor * (0.5 if progress >= 0.9 else 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class ComponentTrainer:
    """One component with its two optimizers: f/b learn from A_i, g/h from R_i."""

    def __init__(self, component: Component, index: int, model_cfg: ModelConfig, train_cfg: TrainConfig):
        self.component = component
        self.first = index == 0
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        encoder_side = [*component.encoder.parameters(), *component.bridge.parameters()]
        target_side = [*component.target_encoder.parameters(), *component.decoder.parameters()]
        self.encoder_lr = train_cfg.lr
        self.target_lr = train_cfg.lr * train_cfg.target_lr_factor
        self.encoder_optimizer = torch.optim.Adam(encoder_side, lr=self.encoder_lr)
        self.target_optimizer = torch.optim.Adam(target_side, lr=self.target_lr)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.encoder_optimizer, self.target_optimizer]

    def step(self, s_prev, t_prev, labels, lr_factor: float):
        """Train on one mini-batch; returns (sg(s_i), sg(t_i), A_i, R_i) for the next component."""
        cfg = self.train_cfg
        for optimizer, base in ((self.encoder_optimizer, self.encoder_lr), (self.target_optimizer, self.target_lr)):
            for group in optimizer.param_groups:
                group["lr"] = base * lr_factor
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


def train_components(locals: list[ComponentTrainer], s, t, labels, lr_factor: float):
    """One mini-batch through consecutive components: (sg(s), sg(t), [A_i, R_i for each component])."""
    losses = []
    for local in locals:
        s, t, associated, autoencoder = local.step(s, t, labels, lr_factor)
        losses += [associated, autoencoder]
    return s, t, losses


class Callback:
    """Override what you need. `trainer.request_stop()` ends the run after the current step."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer, result: dict) -> None: ...


class Trainer:
    def __init__(
        self,
        net: ALNet,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        splits: Splits,
        callbacks: list[Callback] = (),
        device: str | None = None,
    ):
        self.device = resolve_device(device or train_cfg.device)
        self.net = net.to(self.device)
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.splits = splits
        self.callbacks = list(callbacks)
        self.train_x, self.train_y = splits.train_x.to(self.device), splits.train_y.to(self.device)
        self.steps_per_epoch = math.ceil(len(self.train_x) / train_cfg.batch_size)
        self.total_steps = train_cfg.epochs * self.steps_per_epoch
        if train_cfg.method == "al":
            self.locals = [ComponentTrainer(c, i, model_cfg, train_cfg) for i, c in enumerate(net.components)]
            self.optimizers = [o for local in self.locals for o in local.optimizers]
        else:
            self.optimizers = [torch.optim.Adam(net.parameters(), lr=train_cfg.lr)]
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # batches of the current epoch already trained
        self.history: list[dict] = []
        self._loss_sums = self._zero_losses()
        self._epoch_seconds = 0.0
        self._stop = False
        self.pipeline = None
        if train_cfg.pipeline != "sequential":
            from al.pipeline import Pipeline  # imports this module

            self.pipeline = Pipeline(self)

    # --- the outside world ---------------------------------------------------------

    def request_stop(self) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    # --- training ----------------------------------------------------------------------

    def batch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled sample order of an epoch: a function of seed and epoch alone."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_x), generator=generator)

    def batches(self, epoch: int, start: int = 0):
        """(x, y) mini-batches of an epoch from batch `start` on."""
        order = self.batch_order(epoch).to(self.device)
        size = self.cfg.batch_size
        for b in range(start, self.steps_per_epoch):
            idx = order[b * size : (b + 1) * size]
            yield self.train_x[idx], self.train_y[idx]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """One mini-batch through every component (AL) or the whole net (BP); the losses."""
        lr_factor = lr_multiplier(self.cfg.schedule, self.global_step, self.total_steps)
        if self.cfg.method == "bp":
            for group in self.optimizers[0].param_groups:
                group["lr"] = self.cfg.lr * lr_factor
            loss = F.cross_entropy(self.net(x), y)
            self.optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers[0].step()
            return [loss.detach()]
        return train_components(self.locals, x, F.one_hot(y, self.net.num_classes).float(), y, lr_factor)[2]

    def record_step(self, losses: list[torch.Tensor]) -> None:
        """Count one mini-batch that every component has trained on."""
        for i, loss in enumerate(losses):
            self._loss_sums[i] += loss
        self.step_in_epoch += 1
        self._emit("on_step")

    def fit(self) -> dict:
        """Train until cfg.epochs are done or a callback asks to stop; the final result."""
        if self.pipeline is not None and self.pipeline.is_worker:
            return self.pipeline.serve()  # a torchrun rank > 0 trains its stage; rank 0 does all else
        self.net.train()
        self._emit("on_train_start")
        try:
            while self.epoch < self.cfg.epochs and not self._stop:
                started = time.perf_counter()
                if self.pipeline is None:
                    for x, y in self.batches(self.epoch, self.step_in_epoch):
                        self.record_step(self.train_step(x, y))
                        if self._stop:
                            break
                else:
                    self.pipeline.train_batches()  # returns with every stage synced: an epoch end or a stop
                self._epoch_seconds += time.perf_counter() - started
                if self.step_in_epoch == self.steps_per_epoch:
                    self._end_epoch()
        finally:
            if self.pipeline is not None:
                self.pipeline.close()
        result = self.result()
        self._emit("on_train_end", result)
        return result

    def _zero_losses(self) -> list[torch.Tensor]:
        count = 1 if self.cfg.method == "bp" else 2 * self.net.depth
        return [torch.zeros((), device=self.device) for _ in range(count)]

    def _end_epoch(self) -> None:
        means = [float(s) / self.steps_per_epoch for s in self._loss_sums]
        metrics = {"epoch": self.epoch + 1, "seconds": round(self._epoch_seconds, 4)}
        if self.cfg.method == "bp":
            metrics["loss"] = means[0]
        else:
            metrics["associated_loss"] = means[0::2]
            metrics["autoencoder_loss"] = means[1::2]
        metrics["train_accuracy"] = self.accuracy(
            self.splits.train_x[:TRAIN_ACCURACY_SAMPLES], self.splits.train_y[:TRAIN_ACCURACY_SAMPLES]
        )
        if len(self.splits.val_x):
            metrics["val_accuracy"] = self.accuracy(self.splits.val_x, self.splits.val_y)
            metrics["val_accuracy_by_depth"] = [
                self.accuracy(self.splits.val_x, self.splits.val_y, depth=k) for k in range(1, self.net.depth + 1)
            ]
        metrics["samples_per_second"] = round(len(self.train_x) / max(self._epoch_seconds, 1e-9), 2)
        self.history.append(metrics)
        self.epoch += 1
        self.step_in_epoch = 0
        self._loss_sums = self._zero_losses()
        self._epoch_seconds = 0.0
        self._emit("on_epoch_end", metrics)

    def result(self) -> dict:
        done = self.epoch >= self.cfg.epochs
        train_seconds = sum(m["seconds"] for m in self.history)
        result = {
            "status": "completed" if done else "stopped",
            "method": self.cfg.method,
            "epochs": self.epoch,
            "train_seconds": round(train_seconds, 4),
            "samples_per_second": round(len(self.train_x) * self.epoch / max(train_seconds, 1e-9), 2),
        }
        if done:  # test accuracy of the last epoch: never a best-over-epochs pick on the test set
            result["test_accuracy"] = self.accuracy(self.splits.test_x, self.splits.test_y)
            result["test_accuracy_by_depth"] = [
                self.accuracy(self.splits.test_x, self.splits.test_y, depth=k) for k in range(1, self.net.depth + 1)
            ]
        if self.history:
            result["val_accuracy"] = self.history[-1].get("val_accuracy")
        return result

    @torch.inference_mode()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, depth: int | None = None) -> float:
        if len(x) == 0:
            return float("nan")
        was_training = self.net.training
        self.net.eval()
        correct = 0
        for i in range(0, len(x), EVAL_BATCH):
            scores = self.net(x[i : i + EVAL_BATCH].to(self.device), depth)
            correct += int((scores.argmax(dim=1).cpu() == y[i : i + EVAL_BATCH]).sum())
        self.net.train(was_training)
        return correct / len(x)

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "model": self.net.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "loss_sums": [float(s) for s in self._loss_sums],
            "epoch_seconds": self._epoch_seconds,
            "history": self.history,
            "cpu_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError("checkpoint was written for a different method or depth")
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self._loss_sums = [torch.tensor(v, device=self.device) for v in state["loss_sums"]]
        self._epoch_seconds = state["epoch_seconds"]
        self.history = list(state["history"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Atomically: a crash leaves the previous checkpoint, never half of a new one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        # weights_only: a checkpoint is data, never code to unpickle.
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
