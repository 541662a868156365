"""The `al` command as a user runs it: a real subprocess, JSON on the last stdout line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits


def al(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "al.cli", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"al {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """The README's model: AL, mlp, 20 epochs on digits."""
    out = tmp_path_factory.mktemp("cli") / "model"
    proc = al("train", "--dataset", "digits", "--arch", "mlp", "--method", "al", "--epochs", "20", "--json",
              "--out", str(out))
    return out, last_json(proc), proc


def test_train_reaches_the_accuracy_the_readme_promises(digits_model):
    out, result, proc = digits_model
    assert result["test_accuracy"] >= 0.95
    assert result["epochs"] == 20 and result["method"] == "al"
    assert result["train_seconds"] > 0 and result["samples_per_second"] > 0
    assert "epoch 20/20" in proc.stderr  # progress goes to stderr, the result to stdout


def test_shortcut_inference_at_depth_one_is_a_usable_classifier(digits_model):
    out, _, _ = digits_model
    result = last_json(al("eval", "--model", str(out), "--dataset", "digits", "--depth", "1", "--json"))
    assert result["test_accuracy"] >= 0.8 and result["depth"] == 1


def test_eval_matches_the_training_result(digits_model):
    out, trained, _ = digits_model
    result = last_json(al("eval", "--model", str(out), "--dataset", "digits", "--json"))
    assert result["test_accuracy"] == pytest.approx(trained["test_accuracy"])
    assert result["epochs"] == 20


def test_predict_a_file_of_samples(digits_model, tmp_path):
    out, _, _ = digits_model
    digits = load_digits()
    np.savez(tmp_path / "inputs.npz", x=digits.data[:50])
    result = last_json(al("predict", "--model", str(out), "--input", str(tmp_path / "inputs.npz"), "--json"))
    assert len(result["predictions"]) == 50 and len(result["probabilities"][0]) == 10
    assert np.mean(np.array(result["predictions"]) == digits.target[:50]) >= 0.9
    plain = al("predict", "--model", str(out), "--input", str(tmp_path / "inputs.npz"))
    assert len(plain.stdout.strip().splitlines()) == 50


def test_predict_with_the_wrong_number_of_features_fails_clearly(digits_model, tmp_path):
    out, _, _ = digits_model
    np.savez(tmp_path / "inputs.npz", x=np.zeros((3, 10)))
    proc = al("predict", "--model", str(out), "--input", str(tmp_path / "inputs.npz"), check=False)
    assert proc.returncode == 2
    assert "64 values" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_of_a_missing_model_fails_clearly(tmp_path):
    proc = al("eval", "--model", str(tmp_path / "nothing"), "--dataset", "digits", check=False)
    assert proc.returncode == 2
    assert "is not a model directory" in proc.stderr


def test_bp_trains_the_same_topology(tmp_path):
    proc = al("train", "--dataset", "digits", "--method", "bp", "--epochs", "3", "--json", "--out", str(tmp_path / "m"))
    result = last_json(proc)
    assert result["method"] == "bp" and result["test_accuracy"] >= 0.8


def test_the_conv_and_learning_rate_levers_reach_the_run_from_the_command_line(tmp_path):
    out = tmp_path / "m"
    al("train", "--dataset", "digits", "--arch", "cnn", "--widths", "8,8", "--target-widths", "16,8", "--bridge-pool",
       "2", "--bridge-convs", "1", "--init", "orthogonal", "--epochs", "1", "--lr-scaling", "sqrt",
       "--lr-reference-batch", "64", "--lr-warmup", "5", "--target-warmup", "10", "--bridge-lr-factor", "2",
       "--target-lr-factor", "3", "--json", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert {k: config["model"][k] for k in ("target_widths", "bridge_convs", "init")} == {
        "target_widths": [16, 8], "bridge_convs": 1, "init": "orthogonal"}
    assert {k: config["training"][k] for k in ("lr_scaling", "lr_reference_batch", "lr_warmup", "target_warmup",
                                               "bridge_lr_factor", "target_lr_factor")} == {
        "lr_scaling": "sqrt", "lr_reference_batch": 64, "lr_warmup": 5, "target_warmup": 10,
        "bridge_lr_factor": 2.0, "target_lr_factor": 3.0}
    refused = al("train", "--dataset", "digits", "--bridge-convs", "1", "--out", str(tmp_path / "n"), check=False)
    assert refused.returncode == 2 and "bridge_convs apply to conv maps" in refused.stderr


def test_early_exit_from_the_command_line(digits_model, tmp_path):
    out, _, _ = digits_model
    result = last_json(al("eval", "--model", str(out), "--dataset", "digits", "--exit-confidence", "0", "--json"))
    assert (result["exit_confidence"], result["mean_depth"]) == (0, 1)  # every sample confident enough at depth 1
    np.savez(tmp_path / "inputs.npz", x=load_digits().data[:50])
    inputs = ("--model", str(out), "--input", str(tmp_path / "inputs.npz"))
    result = last_json(al("predict", *inputs, "--exit-confidence", "0.9", "--json"))
    assert len(result["depths"]) == 50 and set(result["depths"]) <= {1, 2}
    proc = al("predict", *inputs, "--exit-confidence", "2", check=False)
    assert proc.returncode == 2 and "exit_confidence must be between 0 and 1" in proc.stderr


def test_the_installed_al_has_the_commands_that_packages_add():
    """`serve`, `worker` and `bench` come through entry points (pyproject.toml), not from the library."""
    command = Path(sys.executable).with_name("al")  # the venv's console script, as `make run` starts it
    listed = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "{train,eval,predict,export,study,bench,serve,worker}" in listed.stdout
    for name, expected in (("serve", "--no-worker"), ("worker", "usage: al worker"), ("bench", "time-to-accuracy")):
        proc = subprocess.run([command, name, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and expected in proc.stdout, proc.stderr


def installed(tmp_path, entry_point: str) -> dict:
    """An environment with one more installed distribution on PYTHONPATH, whose only content is an `al.commands`
    entry point: a distribution's metadata on disk, as pip writes it."""
    info = tmp_path / "extra_commands-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-commands\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[al.commands]\n{entry_point}\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_a_command_whose_package_is_not_installed_is_left_out(tmp_path):
    """As in an image built without benchmarks/: pyproject names `al bench`, its package is not there."""
    env = installed(tmp_path, "ghost = not_installed_here.commands:add_commands")
    proc = subprocess.run([sys.executable, "-m", "al.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "{train,eval,predict,export,study,bench,serve,worker}" in proc.stdout and "ghost" not in proc.stdout


def test_a_command_that_fails_to_import_says_why(tmp_path):
    (tmp_path / "broken_commands.py").write_text("import not_installed_here\n")
    env = installed(tmp_path, "broken = broken_commands:add_commands")
    proc = subprocess.run([sys.executable, "-m", "al.cli", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "No module named 'not_installed_here'" in proc.stderr
