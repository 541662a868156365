import json

import pytest
import torch
from safetensors.torch import load_file

from al.checkpoint import load_model
from al.config import make_config
from al.data import Dataset, load_dataset
from al.run import evaluate, train
from al.trainer import Callback

SMALL = {"arch": "mlp", "widths": [32, 32], "target_width": 16}


class StopAfter(Callback):
    """Stops the run after `epochs` epochs and `steps` more mini-batches."""

    def __init__(self, epochs: int, steps: int = 0):
        self.epochs, self.steps = epochs, steps

    def on_step(self, trainer):
        if trainer.global_step >= self.epochs * trainer.steps_per_epoch + self.steps:
            trainer.request_stop()


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("method", ["al", "bp"])
@pytest.mark.parametrize("stop_at", ["epoch", "mid-epoch"])
def test_stopped_and_resumed_run_ends_with_identical_weights(tmp_path, method, stop_at):
    training = {"method": method, "epochs": 4, "batch_size": 64, "schedule": "step"}
    straight = tmp_path / "straight"
    result = train("digits", straight, make_config("default", SMALL, training))
    assert result["status"] == "completed" and result["epochs"] == 4

    resumed = tmp_path / "resumed"
    stop = StopAfter(2) if stop_at == "epoch" else StopAfter(2, steps=5)
    first = train("digits", resumed, make_config("default", SMALL, training), callbacks=[stop])
    assert first["status"] == "stopped" and first["epochs"] == 2
    assert "test_accuracy" not in first
    second = train("digits", resumed, make_config("default", SMALL, training), resume=True)
    assert second["status"] == "completed" and second["epochs"] == 4

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result["test_accuracy"] == second["test_accuracy"]
    metrics = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("model", "training", "dataset", "named"),
    [
        ({"widths": [8, 8]}, {}, "digits", "model.widths"),
        ({}, {"batch_size": 16}, "digits", "training.batch_size"),  # a mid-epoch step would mean other samples
        ({}, {"seed": 1}, "digits", "training.seed"),
        ({}, {"val_fraction": 0.2}, "digits", "training.val_fraction"),
        ({}, {}, "other", "the dataset"),
    ],
)
def test_a_changed_run_cannot_resume_from_the_checkpoint(tmp_path, model, training, dataset, named):
    digits = load_dataset("digits")
    other = Dataset(digits.train_x[::-1].copy(), digits.train_y[::-1].copy(), digits.test_x, digits.test_y,
                    digits.classes, "digits")  # the same name and shape, other order
    out = tmp_path / "run"
    train(digits, out, make_config("default", SMALL, {"epochs": 1}))
    with pytest.raises(ValueError, match=f"different run \\({named} changed\\)"):
        train(other if dataset == "other" else digits, out,
              make_config("default", {**SMALL, **model}, {"epochs": 1, **training}), resume=True)


def test_a_run_may_resume_on_another_device_or_pipeline(tmp_path):
    train("digits", tmp_path, make_config("default", SMALL, {"epochs": 1, "val_fraction": 0.1}))
    result = train("digits", tmp_path, make_config("default", SMALL, {"epochs": 1, "pipeline": "threads",
                                                                   "device": "cpu"}), resume=True)
    assert result["epochs"] == 1


def test_training_twice_into_one_directory_without_resume_is_refused(tmp_path):
    train("digits", tmp_path, make_config("default", SMALL, {"epochs": 1}))
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):
        train("digits", tmp_path, make_config("default", SMALL, {"epochs": 1}))
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_model_directory_holds_config_metrics_and_weights_and_loads_for_inference(tmp_path):
    result = train("digits", tmp_path, make_config("default", SMALL, {"epochs": 2, "seed": 3}))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "al" and config["input_shape"] == [1, 8, 8]
    assert config["classes"] == list(range(10))
    assert config["model"]["widths"] == [32, 32] and config["training"]["seed"] == 3
    assert config["result"]["test_accuracy"] == result["test_accuracy"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert len(metrics[0]["associated_loss"]) == 2 and len(metrics[0]["autoencoder_loss"]) == 2
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind

    model = load_model(tmp_path)
    assert evaluate(tmp_path, "digits")["test_accuracy"] == pytest.approx(result["test_accuracy"])
    predictions, probabilities, depths = model.predict(model.request(torch.zeros(3, 64), depth=1))
    assert len(predictions) == 3 and all(p in range(10) for p in predictions)
    assert depths == [1, 1, 1]
    with pytest.raises(ValueError, match="exit_confidence"):
        model.request(torch.zeros(1, 64), exit_confidence=1.5)
    with pytest.raises(ValueError, match="64 values"):
        model.request(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="NaN"):
        model.request(torch.full((1, 64), float("nan")))


def test_detach_target_switch_changes_what_trains_the_target_encoder(tmp_path):
    # R2-old's variant (A_i also trains g_i) is a switch, off by default.
    a = train("digits", tmp_path / "a", make_config("paper", SMALL, {"epochs": 1}))
    b = train("digits", tmp_path / "b", make_config("paper", SMALL, {"epochs": 1, "detach_target": False}))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training"]["detach_target"] is True
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert not torch.equal(wa["components.0.target_encoder.0.weight"], wb["components.0.target_encoder.0.weight"])
    assert a["epochs"] == b["epochs"] == 1


@pytest.mark.parametrize("damage", ["truncated weights", "config not an object"])
def test_a_damaged_model_directory_is_a_model_error(tmp_path, damage):
    from al.checkpoint import CONFIG, WEIGHTS, ModelError

    train("digits", tmp_path, make_config("default", {"widths": [8, 8], "target_width": 8},
                                          {"epochs": 1, "device": "cpu"}))
    if damage == "truncated weights":
        weights = (tmp_path / WEIGHTS).read_bytes()
        (tmp_path / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    else:
        (tmp_path / CONFIG).write_text("[1, 2]")
    with pytest.raises(ModelError, match="model"):
        load_model(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_run_stopped_on_cuda_resumes_on_cuda(tmp_path):
    # The checkpoint holds the CPU and CUDA RNG states; they must come back as CPU tensors
    # (torch refuses a CUDA tensor as an RNG state), while weights and Adam moments go to the GPU.
    training = {"epochs": 3, "batch_size": 64, "device": "cuda"}
    first = train("digits", tmp_path, make_config("default", SMALL, training), callbacks=[StopAfter(1, steps=5)])
    assert first["status"] == "stopped"
    assert "cuda_rng" in torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    second = train("digits", tmp_path, make_config("default", SMALL, training), resume=True)
    assert second["status"] == "completed" and second["epochs"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
