"""Hyperparameter studies with Optuna: the search space over a job spec's switches, pruning at epoch
ends, and a local search (`al study`). The service's studies (service/studies.py) use the same parts.

A space maps dotted paths into a job spec (`training.lr`, `model.encoder_activation`) to
`{"type": "float"|"int", "low", "high", "log"?}` or `{"type": "categorical", "choices": [...]}`.
Every trial is a job spec: the base with the trial's values set at those paths.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from al.config import ModelConfig, TrainConfig, from_spec, limits_of, value_type
from al.trainer import Callback

OBJECTIVES = ("val_accuracy", "time_to_accuracy")
PARETO_OBJECTIVES = ("val_accuracy", "train_seconds")  # the one multi-objective study, in this order
# A time-to-accuracy trial that never reached its target scores this plus (1 - its validation accuracy):
# below every trial that reached it, and ranked among the others by accuracy.
NOT_REACHED = 1e9


def searchable() -> dict[str, tuple | type]:
    """The switches a study may search, by their path in a job spec: the config fields marked `search`
    (al/config.py). A tuple lists the allowed values; int and float take ranges."""
    switches = {}
    for cls, section in ((ModelConfig, "model."), (TrainConfig, "training.")):
        for name, limits in limits_of(cls).items():
            if limits.search:
                kind = value_type(cls, name)
                path = "method" if name == "method" else section + name  # a job spec names the method at its top
                switches[path] = limits.choices or ((True, False) if kind is bool else kind)
    return switches


SEARCHABLE = searchable()
PARAM_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "log"},
              "categorical": {"type", "choices"}}
MAX_CHOICES = 64
# Importances from fewer complete trials say little.
MIN_TRIALS_FOR_IMPORTANCE = 4


class SpaceError(ValueError):
    """A study that cannot run; `field` names the bad entry (e.g. `space.training.lr`, `target`)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def check_spec_with_library(spec: dict) -> None:
    from_spec(spec)


# --- what a study optimises ------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A study's objective: `val_accuracy` (maximised: the last epoch's), `time_to_accuracy` (minimised: train
    seconds until validation accuracy first reaches `target`), or `pareto` (val_accuracy up, train_seconds
    down: Optuna's multi-objective study, whose answer is a Pareto front)."""

    objective: str = "val_accuracy"
    target: float | None = None

    @property
    def directions(self) -> list[str]:
        return {"val_accuracy": ["maximize"], "time_to_accuracy": ["minimize"],
                "pareto": ["maximize", "minimize"]}[self.objective]

    def values(self, result: dict | None) -> list[float] | None:
        """The trial's objective values from its run's result (None: it has none to tell)."""
        accuracy = objective_value(result)
        if accuracy is None:
            return None
        if self.objective == "time_to_accuracy":
            reached = result.get("seconds_to_target")
            return [reached if reached is not None else NOT_REACHED + 1 - accuracy]
        if self.objective == "pareto":
            return [accuracy, result["train_seconds"]]
        return [accuracy]

    def best(self, study: optuna.Study) -> FrozenTrial | None:
        """The best complete trial; of a Pareto front, the most accurate (then the quickest)."""
        if self.objective == "pareto":
            front = self.front(study)
            return max(front, key=lambda t: (t.values[0], -t.values[1], -t.number)) if front else None
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        sign = 1 if self.objective == "val_accuracy" else -1
        return max(complete, key=lambda t: (sign * t.value, -t.number)) if complete else None

    def front(self, study: optuna.Study) -> list[FrozenTrial] | None:
        """A Pareto study's front, by trial number (None for one objective)."""
        return sorted(study.best_trials, key=lambda t: t.number) if self.objective == "pareto" else None


def parse_goal(spec: dict) -> Goal:
    """The goal of a study request's `objective` (with `target`) or `objectives`; SpaceError names the problem."""
    objective, objectives, target = spec.get("objective"), spec.get("objectives"), spec.get("target")
    if objectives is not None:
        if objective is not None:
            raise SpaceError("objectives", "give objective or objectives, not both")
        if list(objectives) != list(PARETO_OBJECTIVES):
            raise SpaceError("objectives", f"the multi-objective study takes {json.dumps(list(PARETO_OBJECTIVES))}")
        objective = "pareto"
    objective = objective or "val_accuracy"
    if objective not in (*OBJECTIVES, "pareto"):
        raise SpaceError("objective", f"choose one of {', '.join(OBJECTIVES)}")
    if objective == "time_to_accuracy" and target is None:
        raise SpaceError("target", "time_to_accuracy needs the validation accuracy to reach, e.g. 0.9")
    if objective != "time_to_accuracy" and target is not None:
        raise SpaceError("target", "applies to the time_to_accuracy objective only")
    if target is not None and not (isinstance(target, float | int) and 0 < target <= 1):
        raise SpaceError("target", f"must be a validation accuracy in (0, 1], got {target!r}")
    return Goal(objective, target)


def goal_fields(spec: dict) -> dict:
    """The entries of a study request that `parse_goal` reads: a trial's job carries them to its pruning."""
    return {k: spec[k] for k in ("objective", "objectives", "target") if spec.get(k) is not None}


def parse_space(space: dict, base: dict, check: Callable[[dict], None] = check_spec_with_library
                ) -> dict[str, BaseDistribution]:
    """Optuna distributions for a space; SpaceError names the first bad entry. `check(spec)` raises
    ValueError for a spec that cannot train: it is tried with each range's ends and each choice, and then with
    the switches together (`_check_together`)."""
    if not isinstance(space, dict) or not space:
        raise SpaceError("space", "give at least one switch to search")
    distributions = {}
    for path, param in space.items():
        field = f"space.{path}"
        distribution = _distribution(field, SEARCHABLE.get(path), param)
        values = distribution.choices if isinstance(distribution, CategoricalDistribution) else (
            distribution.low, distribution.high)
        for value in values:
            try:
                check(apply_params(base, {path: value}))
            except ValueError as e:
                raise SpaceError(field, f"{value!r} is not allowed: {e}") from None
        distributions[path] = distribution
    _check_together(distributions, base, check)
    return distributions


def _check_together(distributions: dict[str, BaseDistribution], base: dict, check: Callable[[dict], None]) -> None:
    """Values that pass one by one can fail together (a network grows with each of its widths): every range at its
    high end at once, alone and with each choice of each categorical switch."""
    highs = {path: d.high for path, d in distributions.items() if not isinstance(d, CategoricalDistribution)}
    choices = [{path: choice} for path, d in distributions.items() if isinstance(d, CategoricalDistribution)
               for choice in d.choices]
    for params in ({**highs, **choice} for choice in [{}, *choices]):
        if len(params) < 2:
            continue  # one switch alone was tried already
        try:
            check(apply_params(base, params))
        except ValueError as e:
            values = ", ".join(f"{path}={value!r}" for path, value in params.items())
            raise SpaceError("space", f"the values {values} are not allowed together: {e}") from None


def _distribution(field: str, kind, param) -> BaseDistribution:
    if kind is None:
        raise SpaceError(field, f"not a switch a study can search; choose from {', '.join(SEARCHABLE)}")
    if not isinstance(param, dict) or param.get("type") not in PARAM_KEYS:
        raise SpaceError(field, 'give {"type": "float"|"int", "low", "high", "log"?} or '
                                '{"type": "categorical", "choices": [...]}')
    kind_name = "categorical" if isinstance(kind, tuple) else kind.__name__
    unknown = sorted(set(param) - PARAM_KEYS[param["type"]])
    if unknown:
        raise SpaceError(field, f"unknown key(s) {', '.join(unknown)}")
    if param["type"] == "categorical":
        choices = param.get("choices")
        if not isinstance(choices, list) or not 0 < len(choices) <= MAX_CHOICES:
            raise SpaceError(field, f"choices must be a list of 1 to {MAX_CHOICES} values")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SpaceError(field, "choices repeat a value")
        for choice in choices:
            if not _fits(kind, choice):
                expected = ", ".join(map(json.dumps, kind)) if isinstance(kind, tuple) else f"{kind_name} values"
                raise SpaceError(field, f"choice {choice!r} is not one of {expected}")
        return CategoricalDistribution(choices)
    if param["type"] != kind_name:
        alternative = " (or categorical)" if kind_name != "categorical" else ""
        raise SpaceError(field, f"takes type {kind_name!r}{alternative}")
    low, high, log = param.get("low"), param.get("high"), param.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if not _fits(kind, value):
            raise SpaceError(field, f"{name} must be a finite {kind_name}, got {value!r}")
    if not low < high:
        raise SpaceError(field, f"low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise SpaceError(field, "log must be true or false")
    if log and low <= 0:
        raise SpaceError(field, "a log range needs low > 0")
    return FloatDistribution(low, high, log=log) if kind is float else IntDistribution(low, high, log=log)


def _fits(kind, value) -> bool:
    if isinstance(kind, tuple):
        return any(value == allowed and type(value) is type(allowed) for allowed in kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind is int else math.isfinite(value)


def apply_params(base: dict, params: dict) -> dict:
    """The base spec with each dotted path set to its value."""
    spec = copy.deepcopy(base)
    for path, value in params.items():
        *sections, key = path.split(".")
        target = spec
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return spec


def make_pruner(config: dict | None) -> optuna.pruners.BasePruner:
    """`{"type": "median", "startup_trials", "warmup_epochs"}` (the default) or `{"type": "none"}`."""
    config = config or {}
    if config.get("type", "median") == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=config.get("startup_trials", 3),
                                       n_warmup_steps=config.get("warmup_epochs", 0))


class PruneAtEpochEnd(Callback):
    """A trial's run and its study's goal. At each epoch's end: for `val_accuracy`, reports the validation
    accuracy and stops the run when the pruner says so (never after the last epoch: that run is complete); for
    `time_to_accuracy`, stops the run once it reaches the target (`reached_at`: its train seconds then), or prunes
    it once it has trained as long as the best trial took to reach it. A Pareto study prunes nothing."""

    def __init__(self, trial: optuna.Trial, goal: Goal = Goal(), prune: bool = True):
        self.trial, self.goal, self.prune = trial, goal, prune
        self.pruned_at: int | None = None
        self.reason: str | None = None  # why it was pruned
        self.reached_at: float | None = None

    def on_epoch_end(self, trainer, metrics):
        value = metrics.get("val_accuracy")
        if value is None or self.goal.objective == "pareto":
            return
        going_on = trainer.epoch < trainer.cfg.epochs
        self.trial.report(value, metrics["epoch"])  # a resumed run reports an epoch again: Optuna ignores it
        if self.goal.objective == "val_accuracy":
            if going_on and self.trial.should_prune():
                self._stop(trainer, metrics, "its validation accuracy was below the median of the earlier trials' "
                                             "at that epoch")
            return
        seconds = sum(m["seconds"] for m in trainer.history)
        if value >= self.goal.target:
            self.reached_at = seconds
            trainer.request_stop()
            return
        quickest = self._quickest()
        if going_on and self.prune and seconds >= quickest:
            self._stop(trainer, metrics, f"after {seconds:.1f} s of training it had not reached {self.goal.target}, "
                                         f"which another trial reached in {quickest:.1f} s")

    def on_train_end(self, trainer, result):
        if self.reached_at is not None:
            result["seconds_to_target"] = round(self.reached_at, 4)

    def _quickest(self) -> float:
        """The fewest train seconds in which a complete trial reached the target (inf: none has)."""
        reached = [t.value for t in self.trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                   if t.value < NOT_REACHED]
        return min(reached, default=math.inf)

    def _stop(self, trainer, metrics, reason: str) -> None:
        self.pruned_at, self.reason = metrics["epoch"], reason
        trainer.request_stop()

    def succeeded(self, result: dict) -> bool:
        """The run counts as done: it completed its epochs, or stopped at its target (a worker's job succeeds)."""
        return result["status"] == "completed" or self.reached_at is not None


def objective_value(result: dict | None) -> float | None:
    value = (result or {}).get("val_accuracy")
    return value if isinstance(value, float) and math.isfinite(value) else None


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Each parameter's importance (Optuna's default evaluator), once enough trials are complete (None before)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        with warnings.catch_warnings():  # e.g. "importances will be equal" when every trial scored alike
            warnings.simplefilter("ignore")
            # A Pareto study's importances are for its first objective, the validation accuracy.
            target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            return {k: round(v, 4) for k, v in optuna.importance.get_param_importances(study, target=target).items()}
    except (ValueError, RuntimeError):  # e.g. no parameter varied across the complete trials
        return None


def trial_summary(trial: FrozenTrial) -> dict:
    """`value` is the objective's (None for a Pareto study's trial); `values` lists every objective's."""
    values = trial.values
    return {"number": trial.number, "state": trial.state.name.lower(), "params": trial.params,
            "value": values[0] if values and len(values) == 1 else None, "values": values,
            "epochs_reported": len(trial.intermediate_values)}


def tell(study: optuna.Study, trial_number: int, goal: Goal, result: dict | None, succeeded: bool,
         pruned: bool) -> None:
    """Tell Optuna how a trial's run ended: its values if it succeeded with some, else pruned or failed."""
    values = goal.values(result) if succeeded else None
    if values is not None:
        study.tell(trial_number, values, skip_if_finished=True)
    else:
        study.tell(trial_number, state=TrialState.PRUNED if pruned else TrialState.FAIL, skip_if_finished=True)


def run_local(dataset: str, base: dict, space: dict, trials: int, out_dir: str | Path, pruner: dict | None = None,
              seed: int | None = None, callbacks: Callable[[int], list[Callback]] = lambda number: [],
              goal: Goal = Goal()) -> dict:
    """Search in this process, one trial after another, each trained into out_dir/trial-N."""
    from al.data import load_dataset
    from al.run import train

    distributions = parse_space(space, base)
    data = load_dataset(dataset)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=goal.directions, sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=make_pruner(pruner))
    out = Path(out_dir)
    for _ in range(trials):
        trial = study.ask(distributions)
        pruning = PruneAtEpochEnd(trial, goal, prune=(pruner or {}).get("type") != "none")
        result = train(data, out / f"trial-{trial.number}", from_spec(apply_params(base, trial.params)),
                       [pruning, *callbacks(trial.number)])
        tell(study, trial.number, goal, result, pruning.succeeded(result), pruning.pruned_at is not None)
    best = goal.best(study)
    front = goal.front(study)
    return {
        "trials": [trial_summary(t) for t in study.get_trials(deepcopy=False)],
        "best": None if best is None else {**trial_summary(best), "model": str(out / f"trial-{best.number}")},
        "pareto": None if front is None else [trial_summary(t) for t in front],
        "importances": importances(study),
    }
