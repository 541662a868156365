"""Fine-tuning a trained model (issue 23): a run that starts from a model's weights and trains only some of its
components. The library (`al.run.train` with init_from), the command line (`al train --init-from`), and a job
that starts from a registered version over real HTTP (`al serve` with its worker)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from service_support import (
    drop_queue,
    free_port,
    fresh_redis,
    register_model,
    service_env,
    sse_events,
    start_server,
    use_env,
)
from sklearn.datasets import load_digits

from al.config import from_spec, make_config
from al.data import Dataset, load_dataset
from al.run import train

MLP = {"arch": "mlp", "widths": [32, 32], "target_width": 16}
CNN = {"arch": "cnn", "widths": [4, 8], "target_width": 16, "bridge_pool": 1}  # batch norm: running statistics
TRAINING = {"epochs": 1, "batch_size": 64, "lr": 0.01, "device": "cpu"}
DIGITS = load_dataset("digits")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A trained model directory of each architecture, two components each."""
    root = tmp_path_factory.mktemp("bases")
    for name, model in (("mlp", MLP), ("cnn", CNN)):
        train(DIGITS, root / name, make_config("lean", model, TRAINING))
    return root


def fine_tune(base, out, train_components=None, dataset=DIGITS, **training):
    spec = {"preset": "lean", "training": {**TRAINING, "seed": 1, **training}, "train_components": train_components,
            "init_from": {"directory": str(base)}}
    return train(dataset, out, from_spec(spec, json.loads((base / "config.json").read_text())))


def by_component(weights: dict, k: int) -> dict:
    """The tensors of component k (numbered from 1): f_k, b_k, g_k, h_k, parameters and buffers."""
    return {name: tensor for name, tensor in weights.items() if name.startswith(f"components.{k - 1}.")}


@pytest.mark.parametrize(("arch", "pipeline", "frozen", "trained"), [
    ("mlp", "sequential", 1, 2), ("mlp", "sequential", 2, 1), ("cnn", "sequential", 1, 2),
    ("mlp", "threads", 1, 2)])
def test_frozen_components_are_bit_identical_and_trained_ones_change(bases, tmp_path, arch, pipeline, frozen,
                                                                      trained):
    before = load_file(str(bases / arch / "model.safetensors"))
    result = fine_tune(bases / arch, tmp_path / "tuned", [trained], pipeline=pipeline)
    assert result["status"] == "completed"
    after = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert before.keys() == after.keys()
    kept = by_component(before, frozen)
    assert kept and all(torch.equal(tensor, after[name]) for name, tensor in kept.items())  # batch norm's buffers too
    weights = [name for name in by_component(before, trained) if name.endswith("weight")]
    changed = [name for name in weights if not torch.equal(before[name], after[name])]
    assert weights and changed == weights
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["init_from"] == {"directory": str(bases / arch)}
    assert config["training"]["train_components"] == [trained]
    # The frozen component's losses are still reported: it ran forward on every mini-batch.
    metrics = json.loads((tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()[0])
    assert all(np.isfinite(metrics["associated_loss"]))


def test_without_train_components_every_component_trains_from_the_models_weights(bases, tmp_path):
    base = bases / "mlp"
    before = load_file(str(base / "model.safetensors"))
    fine_tune(base, tmp_path / "tuned")
    after = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert all(not torch.equal(before[name], after[name]) for name in before if name.endswith("weight"))
    # It starts from the model, not from fresh weights: it keeps the model's input normalisation.
    tuned = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert tuned["normalization"] == json.loads((base / "config.json").read_text())["normalization"]


def test_a_dataset_of_other_classes_or_inputs_and_a_changed_architecture_are_refused(bases, tmp_path):
    first_five = DIGITS.train_y < 5
    fewer = Dataset(DIGITS.train_x[first_five], DIGITS.train_y[first_five], DIGITS.test_x, DIGITS.test_y,
                    DIGITS.classes[:5], "digits-0-4")
    with pytest.raises(ValueError, match=r"the dataset has 5 classes \(0, 1, 2, 3, 4\), the model 10"):
        fine_tune(bases / "mlp", tmp_path / "a", dataset=fewer)
    renamed = Dataset(DIGITS.train_x, DIGITS.train_y, DIGITS.test_x, DIGITS.test_y, [str(c) for c in DIGITS.classes],
                      "digits-named")
    with pytest.raises(ValueError, match=r"the dataset's classes \('0', '1'.*\) are not the model's \(0, 1"):
        fine_tune(bases / "mlp", tmp_path / "b", dataset=renamed)
    flat = Dataset(DIGITS.train_x.reshape(-1, 64), DIGITS.train_y, DIGITS.test_x.reshape(-1, 64), DIGITS.test_y,
                   DIGITS.classes, "digits-flat")
    with pytest.raises(ValueError, match=r"samples have shape \[64\], the model reads shape \[1, 8, 8\]"):
        fine_tune(bases / "mlp", tmp_path / "c", dataset=flat)
    base_config = json.loads((bases / "mlp" / "config.json").read_text())
    with pytest.raises(ValueError, match="keeps its architecture: leave out model widths"):
        from_spec({"model": {"widths": [8]}, "init_from": {"directory": "x"}}, base_config)
    with pytest.raises(ValueError, match="differs from this run in model.widths"):
        train(DIGITS, tmp_path / "d", make_config("lean", {**MLP, "widths": [16, 16]}, TRAINING,
                                                  init_from={"directory": str(bases / "mlp")}))
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing written


def al(*args):
    return subprocess.run([sys.executable, "-m", "al.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_command_line_fine_tunes_a_model_directory(bases, tmp_path):
    base, out = bases / "mlp", tmp_path / "tuned"
    done = al("train", "--dataset", "digits", "--init-from", str(base), "--train-components", "2", "--epochs", "1",
              "--device", "cpu", "--out", str(out), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["status"] == "completed"
    config = json.loads((out / "config.json").read_text())
    assert (config["init_from"], config["training"]["train_components"]) == ({"directory": str(base)}, [2])
    assert config["model"] == json.loads((base / "config.json").read_text())["model"]
    before, after = (load_file(str(d / "model.safetensors")) for d in (base, out))
    assert all(torch.equal(t, after[n]) for n, t in by_component(before, 1).items())
    # The other refusals are the library's (from_spec), as the job tests below show them.
    refused = al("train", "--dataset", "digits", "--init-from", str(base), "--widths", "8", "--out",
                 str(tmp_path / "x"))
    assert refused.returncode == 2 and "keeps its architecture: leave out model widths" in refused.stderr
    assert not (tmp_path / "x").exists()


def npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x.astype(np.float32), y=y)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory, bases):
    """`al serve` (API and worker) whose registry holds the mlp base as "digits" version 1; (client, the server's
    process, its data directory)."""
    data = tmp_path_factory.mktemp("finetune-service") / "data"
    data.mkdir()
    env = service_env(data, fresh_redis())
    with pytest.MonkeyPatch.context() as patch:
        register_model(use_env(patch, env), bases / "mlp")
    port = free_port()
    process = start_server(env, data.parent / "serve.log", port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, process, data
    process.stop()
    drop_queue(env)


def test_a_job_fine_tunes_a_registered_version_into_a_new_version_with_its_lineage(served):
    client, process, data = served
    assert client.put("/v1/models/digits/aliases/default", json={"version": 1}).status_code == 200
    spec = {"dataset": "digits", "name": "digits", "init_from": {"model": "digits", "alias": "default"},
            "train_components": [2], "training": {"epochs": 1, "batch_size": 64}}
    job = client.post("/v1/jobs", json=spec)
    assert job.status_code == 202, job.text
    with client.stream("GET", f"/v1/jobs/{job.json()['id']}/events", timeout=120) as response:
        sse_events(response)
    finished = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert finished["status"] == "succeeded", (finished["error"], process.output()[-3000:])
    assert finished["model"] == {"name": "digits", "version": 2}
    versions = client.get("/v1/models/digits").json()["versions"]
    assert [(v["version"], v["init_from"], v["train_components"]) for v in versions] == [
        (1, None, None), (2, {"model": "digits", "version": 1, "alias": "default"}, [2])]
    # The registered files: component 1 bit for bit the first version's, component 2 trained.
    files = {v: load_file(str(data / path / "model.safetensors")) for v, path in
             ((1, f"jobs/{versions[0]['job_id']}"), (2, "models/default/digits/2"))}
    assert all(torch.equal(t, files[2][n]) for n, t in by_component(files[1], 1).items())
    assert all(not torch.equal(t, files[2][n]) for n, t in by_component(files[1], 2).items() if n.endswith("weight"))
    predicted = client.post("/v1/models/digits/versions/2/predict", json={"inputs": [load_digits().data[0].tolist()]})
    assert predicted.status_code == 200 and predicted.json()["version"] == 2
    # An alias that splits its requests names no one version to start from.
    assert client.put("/v1/models/digits/aliases/canary", json={"versions": {"1": 0.5, "2": 0.5}}).status_code == 200
    split = client.post("/v1/jobs", json={**spec, "init_from": {"model": "digits", "alias": "canary"}})
    assert split.status_code == 422 and "splits its requests between versions" in split.text, split.text


def test_a_fine_tuning_job_that_does_not_fit_its_version_is_refused_naming_the_mismatch(served):
    client, _, _ = served
    jobs = client.get("/v1/jobs").json()["total"]
    digits = load_digits()
    flat = client.post("/v1/datasets", files={"file": ("flat.npz", npz(digits.data, digits.target))}).json()
    first_five = digits.target < 5
    five = client.post("/v1/datasets", files={"file": ("five.npz", npz(digits.images[first_five],
                                                                         digits.target[first_five]))}).json()
    assert (flat["shape"], five["shape"], five["classes"]) == ([64], [1, 8, 8], [0, 1, 2, 3, 4])
    start = {"model": "digits", "version": 1}
    for change, problem in (
        ({"dataset": flat["id"]}, "init_from: model 'digits' version 1 does not fit dataset "
                                  f"'{flat['id']}': the dataset's samples have shape [64], the model reads shape "
                                  "[1, 8, 8]"),
        ({"dataset": five["id"]}, "the dataset has 5 classes (0, 1, 2, 3, 4), the model 10"),
        ({"train_components": [3]}, "train_components [3] out of range: the model has 2 components"),
        ({"train_components": [0]}, "greater than or equal to 1"),
        ({"init_from": {"model": "digits", "version": 9}}, "init_from: no model 'digits' version 9"),
        ({"init_from": {"model": "other", "version": 1}}, "init_from: no model 'other' version 1"),
        ({"init_from": {"model": "digits", "alias": "nope"}}, "init_from: model 'digits' has no alias 'nope'"),
        ({"init_from": {"model": "digits"}}, "names the model's version or an alias"),
        ({"model": {"widths": [8]}}, "keeps its architecture: leave out model widths"),
        ({"method": "bp"}, "was trained with al"),
        ({"init_from": None}, "train_components freezes the other components of a trained model"),
    ):
        spec = {"dataset": "digits", "init_from": start, "train_components": [1], **change}
        refused = client.post("/v1/jobs", json={k: v for k, v in spec.items() if v is not None})
        assert refused.status_code == 422 and problem in refused.text, (change, refused.text)
    assert client.get("/v1/jobs").json()["total"] == jobs  # none was made


def test_a_worker_on_another_host_fetches_the_version_it_starts_from_into_the_jobs_folder(served, tmp_path,
                                                                                          monkeypatch):
    from service.artifacts import artifacts_for
    from service.cache import trim_cache
    from service.store import get_store

    client, _, data = served
    host = tmp_path / "host"  # a worker host's data directory: the API's artifact store is reached over HTTP
    settings = use_env(monkeypatch, {"AL_DATA_DIR": str(host), "AL_ARTIFACTS_URL": str(client.base_url)})
    store = get_store(f"sqlite:///{(data / 'al.db').resolve()}")
    version = store.get_model("default", "digits", 1)
    copy = artifacts_for(settings).model(version.path, "job_x")
    assert copy == host / "cache" / "jobs" / "job_x" / "init_from"
    names = sorted(p.name for p in (data / version.path).iterdir() if p.name != "checkpoint.pt")
    assert sorted(p.name for p in copy.iterdir()) == names
    assert all((copy / name).read_bytes() == (data / version.path / name).read_bytes() for name in names)
    # The copy goes with the job's folder once no attempt runs the job.
    assert "jobs/job_x" in trim_cache(store, host / "cache", 1 << 30, grace=0) and not copy.exists()
