"""Training: AL's local updates component by component, or end-to-end BP.

The trainer talks to the outside world only through callbacks (progress,
cancellation, checkpoints), so a CLI, a Celery task or a test can drive it.
How the mini-batches reach the components is a runner's business (al/local.py):
`SequentialRunner` below, or a pipeline runner from al/pipeline/.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from al.checkpoint import replace_atomically
from al.config import ModelConfig, TrainConfig
from al.data import Splits
from al.local import Batches, ComponentTrainer, Record, Runner, Work, adam, lr_factors, scaled_lr, train_components
from al.model import ALNet

TRAIN_ACCURACY_SAMPLES = 5000  # train accuracy is measured on this many fixed samples
EVAL_BATCH = 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Callback:
    """Override what you need. `trainer.request_stop()` ends the run after the current step."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer, result: dict) -> None: ...


class SequentialRunner:
    """Every component in turn on the trainer's thread: the reference the pipeline runners match bit for bit."""

    stats: dict = {}

    def run(self, work: Work, batches: Batches, record: Record) -> None:
        for step, x, y in batches:
            record(work.train_step(step, x, y))

    def close(self) -> None:
        pass


class Trainer:
    def __init__(
        self,
        net: ALNet,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        splits: Splits,
        callbacks: list[Callback] = (),
        device: str | None = None,
        runner: Runner | None = None,
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
            self.component_trainers = [ComponentTrainer(c, i, model_cfg, train_cfg)
                                       for i, c in enumerate(net.components)]
            self.optimizers = [o for trainer in self.component_trainers for o in trainer.optimizers]
        else:
            self.optimizers = [adam(net.parameters(), scaled_lr(train_cfg))]
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # batches of the current epoch already trained
        self.history: list[dict] = []
        self._loss_sums = self._zero_losses()
        self._epoch_seconds = 0.0
        self._stop = False
        self.runner = runner or SequentialRunner()
        self.work = Work(self.component_trainers if train_cfg.method == "al" else [], net.num_classes, self.device,
                         self.total_steps, self.train_step)

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

    def remaining_batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(global step, x, y) for the rest of the current epoch; ends early once a stop is requested."""
        start = self.global_step
        for i, (x, y) in enumerate(self.batches(self.epoch, self.step_in_epoch)):
            if self._stop:
                return
            yield start + i, x, y

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """One mini-batch through every component (AL) or the whole net (BP) at global `step`; the losses."""
        factors = lr_factors(self.cfg, step, self.total_steps)
        if self.cfg.method == "bp":
            for group in self.optimizers[0].param_groups:
                group["lr"] = scaled_lr(self.cfg) * factors[0]
            loss = F.cross_entropy(self.net(x), y)
            self.optimizers[0].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers[0].step()
            return [loss.detach()]
        return train_components(self.component_trainers, x, F.one_hot(y, self.net.num_classes).float(), y, factors)[2]

    def record_step(self, losses: list[torch.Tensor]) -> None:
        """Count one mini-batch that every component has trained on."""
        for i, loss in enumerate(losses):
            self._loss_sums[i] += loss
        self.step_in_epoch += 1
        self._emit("on_step")

    def fit(self) -> dict:
        """Train until cfg.epochs are done or a callback asks to stop; the final result."""
        self.net.train()
        self._emit("on_train_start")
        try:
            while self.epoch < self.cfg.epochs and not self._stop:
                started = time.perf_counter()
                # Returns with the model whole again: at the epoch's end, or at a stop.
                self.runner.run(self.work, self.remaining_batches(), self.record_step)
                self._epoch_seconds += time.perf_counter() - started
                if self.step_in_epoch == self.steps_per_epoch:
                    self._end_epoch()
        finally:
            self.runner.close()
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
        for key in ("busy_seconds", "idle_fraction"):  # a pipeline's stages, over the epoch's last run
            if key in self.runner.stats:
                metrics[key] = [round(v, 4) for v in self.runner.stats[key]]
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
        replace_atomically(path, lambda tmp: torch.save(self.state_dict(), tmp))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        # weights_only: a checkpoint is data, never code to unpickle. Loaded on the CPU: the RNG states must
        # stay CPU byte tensors, and load_state_dict puts weights and optimizer state on the model's device.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
