"""Studies: hyperparameter searches whose trials are training jobs on real workers (Redis broker).

A small study through the HTTP API with two trials at once; a pruned trial; a cancelled study; a trial
resumed after its worker is SIGKILLed; search spaces refused with a 422 that names the bad field; and
the same search locally with `al study`."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from fastapi.testclient import TestClient
from service_support import (
    digits_rows,
    drop_queue,
    fresh_redis,
    service_env,
    sse_events,
    start_worker,
    use_env,
    wait_for,
)

from al.study import SpaceError, parse_space
from app.main import create_app
from service.settings import DEFAULT_TENANT
from service.store import StudyRow
from service.studies import Studies

# One component of 64: with lr 0.01 they learn digits in an epoch or two; with lr 1e-5 they stay near chance.
SMALL_MODEL = {"arch": "mlp", "widths": [64], "target_width": 32}
BASE = {"model": SMALL_MODEL, "preset": "lean", "training": {"epochs": 2, "batch_size": 64}}
LR_RANGE = {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}


def study_of(client, study_id: str) -> dict:
    response = client.get(f"/v1/studies/{study_id}")
    assert response.status_code == 200, response.text
    return response.json()


def finished(client, study_id: str) -> dict | None:
    study = study_of(client, study_id)
    return study if study["status"] in ("succeeded", "failed", "cancelled") else None


def job_of(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


@pytest.fixture
def redis_api(tmp_path, monkeypatch):
    """The API in this process and the environment for workers, on a queue of this test's own."""
    env = service_env(tmp_path / "data", fresh_redis())
    with TestClient(create_app(use_env(monkeypatch, env))) as client:
        yield env, client
    drop_queue(env)


def test_small_study_over_http_runs_trials_in_parallel_and_registers_the_best(redis_api, tmp_path):
    env, client = redis_api
    worker = start_worker({**env, "AL_WORKER_CONCURRENCY": "2"}, tmp_path / "worker.log")
    try:
        body = {"name": "digits-search", "dataset": "digits", "base": BASE, "trials": 4, "parallel": 2,
                "objective": "val_accuracy", "pruner": {"type": "none"}, "seed": 7,
                "space": {"training.lr": LR_RANGE,
                          "model.encoder_activation": {"type": "categorical", "choices": ["relu", "tanh"]}}}
        created = client.post("/v1/studies", json=body)
        assert created.status_code == 202, created.text
        study_id = created.json()["id"]
        assert created.headers["Location"] == f"/v1/studies/{study_id}"
        with client.stream("GET", f"/v1/studies/{study_id}/events") as response:
            events = sse_events(response)
        study = wait_for(lambda: finished(client, study_id), 120, "the study")
    finally:
        worker.stop()
    assert study["status"] == "succeeded", (study, worker.output()[-3000:])
    trials = study["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert all(t["state"] == "complete" and t["job_status"] == "succeeded" for t in trials), trials
    assert all(set(t["params"]) == {"training.lr", "model.encoder_activation"} for t in trials)
    for trial in trials:  # every trial is an ordinary job whose spec carries the trial's values
        spec = job_of(client, trial["job_id"])["spec"]
        assert spec["training"]["lr"] == trial["params"]["training.lr"]
        assert spec["model"]["encoder_activation"] == trial["params"]["model.encoder_activation"]
        assert spec["study"]["id"] == study_id and spec["study"]["trial"] == trial["number"]
    # Two trials trained at once: some pair of trial jobs overlapped in time, and never more than two.
    spans = [(job_of(client, t["job_id"])["started_at"], job_of(client, t["job_id"])["finished_at"]) for t in trials]
    overlapping = [max(a[0], b[0]) < min(a[1], b[1]) for i, a in enumerate(spans) for b in spans[i + 1:]]
    assert any(overlapping), spans

    best = study["best"]
    assert best["value"] == max(t["value"] for t in trials) and best["value"] > 0.5, trials
    assert set(study["importances"]) == {"training.lr", "model.encoder_activation"}
    # The best trial's model is the latest version of the study's name: predict works on it at once.
    versions = client.get("/v1/models/digits-search").json()["versions"]
    assert versions[-1]["job_id"] == best["job_id"] and best["model"]["name"] == "digits-search"
    predicted = client.post("/v1/models/digits-search/predict", json={"inputs": digits_rows(3)})
    assert predicted.status_code == 200 and predicted.json()["version"] == versions[-1]["version"]

    assert [name for name, _ in events] == ["trial"] * 4 + ["end"]
    assert sorted(data["number"] for name, data in events if name == "trial") == [0, 1, 2, 3]
    assert events[-1][1]["status"] == "succeeded"
    listed = client.get("/v1/studies").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == study_id


def test_pruning_cancel_and_a_trial_resumed_after_its_worker_is_killed(redis_api, tmp_path):
    env, client = redis_api
    first = start_worker(env, tmp_path / "worker-1.log")
    try:
        # Pruning. Seed 2 asks lr 0.01, then 1e-5, then 0.01 (Optuna 5's TPE sampler, random while it starts
        # up). After one complete trial the median pruner stops the 1e-5 trial at the end of its first epoch.
        pruned = client.post("/v1/studies", json={
            "name": "pruned", "dataset": "digits", "trials": 3, "seed": 2,
            "base": {**BASE, "training": {"epochs": 3, "batch_size": 64}},
            "space": {"training.lr": {"type": "categorical", "choices": [0.01, 1e-5]}},
            "pruner": {"type": "median", "startup_trials": 1}}).json()["id"]
        study = wait_for(lambda: finished(client, pruned), 120, "the pruned study")
        assert study["status"] == "succeeded", study
        states = [(t["params"]["training.lr"], t["state"], t["job_status"]) for t in study["trials"]]
        assert states == [(0.01, "complete", "succeeded"), (1e-5, "pruned", "pruned"),
                          (0.01, "complete", "succeeded")], states
        bad = job_of(client, study["trials"][1]["job_id"])
        assert bad["error"].startswith("pruned by its study after epoch 1") and bad["progress"]["epoch"] == 1
        assert study["trials"][1]["result"]["pruned_at_epoch"] == 1 and bad["model"] is None

        # Cancel: the running trial's job is cancelled as a job is, and no further trial starts.
        cancelled = client.post("/v1/studies", json={
            "name": "cancelled", "dataset": "digits", "trials": 5, "base": {**BASE, "training": {"epochs": 200}},
            "space": {"training.lr": LR_RANGE}}).json()["id"]
        running = wait_for(lambda: [t for t in study_of(client, cancelled)["trials"]
                                    if t["job_id"] and job_of(client, t["job_id"])["progress"]["step"] > 0],
                           60, "the first trial to train")
        response = client.post(f"/v1/studies/{cancelled}/cancel")
        assert response.status_code == 202 and response.json()["status"] == "cancelling"
        study = wait_for(lambda: finished(client, cancelled), 60, "the cancelled study")
        assert study["status"] == "cancelled"
        assert [t["job_status"] for t in study["trials"]] == ["cancelled"], study["trials"]
        assert job_of(client, running[0]["job_id"])["progress"]["epoch"] < 200
        assert client.post(f"/v1/studies/{cancelled}/cancel").status_code == 409

        # A worker SIGKILLed mid-trial: the trial's job resumes from its checkpoint like any job.
        survivor = client.post("/v1/studies", json={
            "name": "survivor", "dataset": "digits", "trials": 1, "base": {**BASE, "training": {"epochs": 4}},
            "space": {"training.lr": LR_RANGE}}).json()["id"]

        def checkpointed():
            trials = study_of(client, survivor)["trials"]
            job = trials and trials[0]["job_id"] and job_of(client, trials[0]["job_id"])
            model_dir = tmp_path / "data" / "jobs" / (job or {}).get("id", "-")
            return job and job["progress"]["epoch"] >= 1 and (model_dir / "checkpoint.pt").is_file() and (
                model_dir / "config.json").is_file() and job
        job = wait_for(checkpointed, 90, "the trial's first checkpoint")
    finally:
        first.kill_group()
    second = start_worker(env, tmp_path / "worker-2.log")
    try:
        study = wait_for(lambda: finished(client, survivor), 120, "the resumed trial")
    finally:
        second.stop()
    assert study["status"] == "succeeded", study
    resumed = job_of(client, job["id"])
    assert resumed["status"] == "succeeded" and resumed["attempts"] == 2 and resumed["resumed_from_epoch"] >= 1
    assert [m["epoch"] for m in client.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]] == [1, 2, 3, 4]
    assert study["best"]["job_id"] == job["id"] and study["best"]["model"] == {"name": "survivor", "version": 1}


@pytest.mark.parametrize(("space", "field"), [
    ({"training.momentum": LR_RANGE}, "space.training.momentum"),
    ({"model.encoder_activation": {"type": "float", "low": 0, "high": 1}}, "space.model.encoder_activation"),
    ({"model.encoder_activation": {"type": "categorical", "choices": ["relu", "swish"]}},
     "space.model.encoder_activation"),
    ({"training.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "space.training.lr"),
    ({"training.lr": {"type": "float", "low": 1e-3, "high": 50}}, "space.training.lr"),  # the API's bound is 10
    ({"training.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "space.training.lr"),
    ({"training.epochs": {"type": "float", "low": 1, "high": 3}}, "space.training.epochs"),
    ({"training.batch_size": {"type": "int", "low": 0, "high": 64}}, "space.training.batch_size"),
    ({"training.lr": {"type": "normal", "low": 1e-3, "high": 1e-2}}, "space.training.lr.type"),
])
def test_a_bad_search_space_is_refused_with_422_naming_the_field(tmp_path, monkeypatch, space, field):
    client = TestClient(create_app(use_env(monkeypatch, service_env(tmp_path / "data", fresh_redis()))))
    response = client.post("/v1/studies", json={"name": "s", "dataset": "digits", "trials": 2, "space": space})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(field), response.json()
    assert client.get("/v1/studies").json()["total"] == 0


def test_parse_space_checks_values_against_the_library():
    with pytest.raises(SpaceError) as refused:
        parse_space({"model.bridge_depth": {"type": "int", "low": 0, "high": 2}}, {})
    assert refused.value.field == "space.model.bridge_depth"
    distributions = parse_space({"training.detach_target": {"type": "categorical", "choices": [True, False]}}, {})
    assert distributions["training.detach_target"].choices == (True, False)


def test_al_study_searches_locally(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps({"training.lr": LR_RANGE}))
    (tmp_path / "base.json").write_text(json.dumps(BASE))
    done = subprocess.run(
        [sys.executable, "-m", "al.cli", "study", "--dataset", "digits", "--trials", "2", "--space",
         str(tmp_path / "space.json"), "--base", str(tmp_path / "base.json"), "--seed", "1", "--out",
         str(tmp_path / "study"), "--quiet", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert [t["state"] for t in result["trials"]] == ["complete", "complete"]
    assert result["best"]["value"] == max(t["value"] for t in result["trials"])
    assert (tmp_path / "study" / f"trial-{result['best']['number']}" / "model.safetensors").is_file()


def test_one_broken_study_fails_alone_and_the_others_go_on(tmp_path, monkeypatch):
    """A study whose driver pass raises (here: a space that no longer parses) fails with the reason; a study
    created after it still gets its trials (before, every pass raised on the first and stopped there)."""
    settings = use_env(monkeypatch, {"AL_DATA_DIR": str(tmp_path)})
    studies = Studies(settings)
    body = {"dataset": "digits", "base": BASE, "space": {"training.lr": LR_RANGE}, "trials": 2, "parallel": 1}
    broken = studies.create(DEFAULT_TENANT, "broken", body)
    healthy = studies.create(DEFAULT_TENANT, "healthy", body)
    with studies.store.writing() as s, s.begin():
        s.get(StudyRow, broken.id).spec = {**body, "space": {"model.no_such_switch": LR_RANGE}}
    sent = []
    studies.drive(sent.append)
    broken, healthy = studies.store.get_study(broken.id), studies.store.get_study(healthy.id)
    assert broken.status == "failed" and "model.no_such_switch" in broken.error
    assert healthy.status == "running" and len(sent) == 1  # its first trial's job
    assert studies.store.get_job(sent[0]).spec["study"]["id"] == healthy.id


# --- objectives for speed (issue 22) -------------------------------------------------------

# Seed 2 asks lr 0.01, then 1e-5 (see the pruning test): one trial that learns, one that stays near chance.
FAST_THEN_SLOW = {"training.lr": {"type": "categorical", "choices": [0.01, 1e-5]}}


def test_time_to_accuracy_and_pareto_studies_over_http(redis_api, tmp_path):
    env, client = redis_api
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        timed = client.post("/v1/studies", json={
            "name": "timed", "dataset": "digits", "trials": 2, "seed": 2, "space": FAST_THEN_SLOW,
            # The longest schedule: the slow trial is pruned once it has trained as long as the quick one took,
            # never because its schedule ended first. With 30 epochs (about 0.1 s each here) it once finished them all
            # inside the quick trial's one epoch, slowed by the load of the tests beside it.
            "base": {**BASE, "training": {"epochs": 1000, "batch_size": 64}},
            "objective": "time_to_accuracy", "target": 0.4})
        assert timed.status_code == 202, timed.text
        pareto = client.post("/v1/studies", json={
            "name": "front", "dataset": "digits", "trials": 2, "seed": 2, "space": FAST_THEN_SLOW, "base": BASE,
            "objectives": ["val_accuracy", "train_seconds"]})
        assert pareto.status_code == 202, pareto.text
        timed = wait_for(lambda: finished(client, timed.json()["id"]), 120, "the time-to-accuracy study")
        pareto = wait_for(lambda: finished(client, pareto.json()["id"]), 120, "the Pareto study")
    finally:
        worker.stop()
    # The quick trial stopped once it reached the target, and its job succeeded; the slow one, having trained as
    # long as that without reaching it, was pruned.
    quick, slow = timed["trials"]
    assert timed["status"] == "succeeded" and timed["pareto"] is None, (timed, worker.output()[-3000:])
    assert (quick["state"], quick["job_status"]) == ("complete", "succeeded"), quick
    assert quick["value"] == quick["result"]["seconds_to_target"] and quick["result"]["epochs"] < 6
    assert quick["result"]["val_accuracy"] >= 0.4 and quick["result"]["status"] == "stopped"
    assert (slow["state"], slow["job_status"]) == ("pruned", "pruned"), (slow, quick["value"])
    assert "had not reached 0.4" in job_of(client, slow["job_id"])["error"]
    assert timed["best"]["number"] == 0 and timed["best"]["model"] == {"name": "timed", "version": 1}
    # The Pareto study lists its front; the front's most accurate trial is registered.
    assert pareto["status"] == "succeeded", pareto
    assert all(len(t["values"]) == 2 and t["value"] is None for t in pareto["trials"])
    front = pareto["pareto"]
    assert 0 in [t["number"] for t in front] and pareto["best"]["number"] == 0
    assert pareto["trials"][0]["values"][0] > pareto["trials"][1]["values"][0]
    assert pareto["best"]["model"] == {"name": "front", "version": 1}
    versions = client.get("/v1/models/front").json()["versions"]
    assert versions[-1]["job_id"] == pareto["trials"][0]["job_id"]


@pytest.mark.parametrize(("extra", "field"), [
    ({"objective": "time_to_accuracy"}, "target"),
    ({"objective": "val_accuracy", "target": 0.9}, "target"),
    ({"objective": "val_accuracy", "objectives": ["val_accuracy", "train_seconds"]}, "objectives"),
    ({"objectives": ["train_seconds", "val_accuracy"]}, "objectives"),
])
def test_a_bad_objective_is_refused_with_422_naming_it(tmp_path, monkeypatch, extra, field):
    client = TestClient(create_app(use_env(monkeypatch, service_env(tmp_path / "data", fresh_redis()))))
    response = client.post("/v1/studies", json={"name": "s", "dataset": "digits", "trials": 2,
                                                "space": {"training.lr": LR_RANGE}, **extra})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(field), response.json()
    assert client.get("/v1/studies").json()["total"] == 0


def test_a_time_trial_is_pruned_once_it_has_trained_as_long_as_the_quickest_took(tmp_path):
    """Real runs against an Optuna study in memory: with no trial at the target yet, a trial that never reaches
    it trains all its epochs and scores below any that did, by its accuracy; once a trial reached it in no
    time, the same run is pruned after its first epoch."""
    from al.config import from_spec
    from al.run import train
    from al.study import NOT_REACHED, Goal, PruneAtEpochEnd

    goal = Goal("time_to_accuracy", 0.999)
    study = optuna.create_study(direction="minimize")
    config = from_spec({**BASE, "training": {"epochs": 2, "batch_size": 64, "lr": 1e-5}})
    first = PruneAtEpochEnd(study.ask(), goal)
    result = train("digits", tmp_path / "a", config, [first])
    assert result["status"] == "completed" and first.pruned_at is None and first.reached_at is None
    assert goal.values(result) == [NOT_REACHED + 1 - result["val_accuracy"]]
    study.tell(first.trial, 0.001)  # as if it had reached the target in a millisecond
    second = PruneAtEpochEnd(study.ask(), goal)
    result = train("digits", tmp_path / "b", config, [second])
    assert second.pruned_at == 1 and result["epochs"] == 1 and "had not reached 0.999" in second.reason
    assert not second.succeeded(result)


def test_al_study_minimises_time_to_accuracy_locally(tmp_path):
    (tmp_path / "space.json").write_text(json.dumps(FAST_THEN_SLOW))
    (tmp_path / "base.json").write_text(json.dumps({**BASE, "training": {"epochs": 4, "batch_size": 64}}))
    done = subprocess.run(
        [sys.executable, "-m", "al.cli", "study", "--dataset", "digits", "--trials", "2", "--space",
         str(tmp_path / "space.json"), "--base", str(tmp_path / "base.json"), "--seed", "0", "--out",
         str(tmp_path / "study"), "--objective", "time_to_accuracy", "--target", "0.4", "--quiet", "--json"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # Seed 0 asks lr 1e-5 first (it trains all 4 epochs, never reaching 0.4: no trial has, so none prunes
    # it), then 0.01, which reaches it and ranks first.
    slow, quick = json.loads(done.stdout.splitlines()[-1])["trials"]
    assert (slow["params"]["training.lr"], slow["state"], slow["epochs_reported"]) == (1e-5, "complete", 4), slow
    assert slow["value"] > 1e9 and quick["state"] == "complete" and quick["value"] < 60
    assert json.loads(done.stdout.splitlines()[-1])["best"]["number"] == 1
    refused = subprocess.run([sys.executable, "-m", "al.cli", "study", "--dataset", "digits", "--trials", "1",
                              "--space", str(tmp_path / "space.json"), "--objective", "time_to_accuracy"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "target: time_to_accuracy needs" in refused.stderr


def test_a_local_pareto_study_lists_its_front_and_picks_the_most_accurate(tmp_path):
    from al.study import Goal, run_local

    result = run_local("digits", {**BASE, "training": {"epochs": 1, "batch_size": 64}}, FAST_THEN_SLOW, 3,
                       tmp_path / "study", seed=0, goal=Goal("pareto"))
    trials = result["trials"]
    assert all(t["state"] == "complete" and len(t["values"]) == 2 for t in trials), trials
    front = {t["number"] for t in result["pareto"]}
    for t in trials:  # on the front exactly when no other trial is at least as good in both and better in one
        dominated = any(o["values"][0] >= t["values"][0] and o["values"][1] <= t["values"][1]
                        and o["values"] != t["values"] for o in trials)
        assert (t["number"] in front) == (not dominated), trials
    most_accurate = max(result["pareto"], key=lambda t: (t["values"][0], -t["values"][1]))
    assert result["best"]["number"] == most_accurate["number"]
    assert (tmp_path / "study" / f"trial-{most_accurate['number']}" / "model.safetensors").is_file()
