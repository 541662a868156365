"""The job store's guarantees on SQLite and, where it answers, PostgreSQL: one lease holder at a time,
expired leases requeued once, epochs recorded once, models versioned per job, attempts bounded."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
from service_support import use_env

from al.checkpoint import TRAINING_STATE, WEIGHTS, load_model
from al.config import make_config
from al.run import train
from service.artifacts import LocalArtifacts
from service.queue import enqueue, make_celery
from service.registry import published_copy
from service.settings import DEFAULT_TENANT
from service.store import DatasetRow, QuotaExceeded, Store, StudyRow, with_installed_driver
from worker.reconcile import reconcile_once
from worker.tasks import run_job

CONFIG = make_config(training={"epochs": 2}).to_dict()  # what a job trains with, as the API stores it
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def postgres_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'al.db'}"
        return
    if not postgres_answers():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    from sqlalchemy import create_engine

    schema = f"al_test_{uuid.uuid4().hex[:8]}"  # a schema of its own, dropped afterwards
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture
def store(database_url):
    store = Store(database_url)
    store.create_tables()
    yield store
    store.engine.dispose()


def new_job(store: Store, name: str = "m", key: str | None = None, tenant: str = DEFAULT_TENANT):
    job, _ = store.create_job(tenant, name, {"dataset": "digits"}, CONFIG, key, None)
    return job


def test_one_lease_holder_at_a_time_even_when_racing(store):
    job = new_job(store)
    claims, barrier = [], threading.Barrier(8)

    def take(i):
        barrier.wait()
        claims.append(store.take_lease(job.id, f"w{i}", 60))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    owner = winners[0].owner
    assert store.get_job(job.id).status == "running" and store.get_job(job.id).attempts == 1
    assert store.heartbeat(job.id, owner, 60) == "running"
    assert store.heartbeat(job.id, "someone-else", 60) is None
    assert not store.record_progress(job.id, "someone-else", step=5)
    assert store.take_lease(job.id, "late", 60) is None


def test_expired_lease_is_released_once_and_the_old_holder_is_locked_out(store):
    job = new_job(store)
    old = store.take_lease(job.id, "dead", 0.05).owner
    time.sleep(0.1)
    [expired] = store.expired_leases()
    assert store.release_expired(expired) == "queued"
    assert store.release_expired(expired) is None  # a second reconciler sees it already done
    assert store.get_job(job.id).status == "queued"
    fresh = store.take_lease(job.id, "alive", 60)
    assert fresh is not None and fresh.job.attempts == 2
    assert not store.finish(job.id, old, "succeeded")  # the dead attempt can no longer finish it
    assert store.finish(job.id, "alive", "succeeded", publish=lambda name, version: "jobs/x")
    assert store.get_job(job.id).model_version == 1


def test_epochs_are_recorded_once_and_versions_count_per_name(store):
    first, second = new_job(store, "digits"), new_job(store, "digits")
    for job in (first, second):
        owner = store.take_lease(job.id, "w", 60).owner
        store.record_epoch(job.id, owner, {"epoch": 1, "loss": 2.0})
        store.record_epoch(job.id, owner, {"epoch": 1, "loss": 1.0})  # redone after a resume
        assert not store.record_epoch(job.id, "intruder", {"epoch": 2, "loss": 0.0})
        assert store.finish(job.id, owner, "succeeded", publish=lambda name, version, job=job: f"jobs/{job.id}")
    assert store.job_epochs(first.id) == [{"epoch": 1, "loss": 1.0}]
    assert [(m.version, m.job_id) for m in store.list_models(DEFAULT_TENANT, "digits")] == [
        (1, first.id), (2, second.id)]
    assert store.get_model(DEFAULT_TENANT, "digits").version == 2
    assert store.get_model(DEFAULT_TENANT, "digits", 1).job_id == first.id


def test_idempotency_key_returns_the_first_job(store):
    job = new_job(store, key="abc")
    again, created = store.create_job(DEFAULT_TENANT, "other", {"dataset": "digits"}, CONFIG, "abc", None)
    assert not created and again.id == job.id


def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_one_cooperative(store):
    queued, running = new_job(store), new_job(store)
    owner = store.take_lease(running.id, "w", 60).owner
    assert store.request_cancel(queued.id).status == "cancelled"
    assert store.request_cancel(running.id).status == "cancelling"
    assert store.heartbeat(running.id, owner, 60) == "cancelling"
    assert store.take_lease(queued.id, "w2", 60) is None  # a stray message for it does nothing


def test_a_lost_message_is_resent_per_job_even_while_others_run(store):
    waiting, running = new_job(store), new_job(store)
    store.take_lease(running.id, "w", 60)
    time.sleep(0.02)
    assert store.stale_queued(0.01) == [waiting.id]  # another job's live lease holds up nothing
    assert store.stale_queued(60) == []  # bumped: not resent again at once


def test_only_the_finish_that_ends_the_job_registers_a_version(store):
    job = new_job(store)
    owner = store.take_lease(job.id, "w", 60).owner
    published = []

    def publish(name, version):
        published.append((name, version))
        return f"models/{name}/{version}"

    assert not store.finish(job.id, "stale", "succeeded", publish=publish)  # lost the lease: nothing at all
    assert published == [] and store.list_models(DEFAULT_TENANT) == []

    def full_disk(name, version):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        store.finish(job.id, owner, "succeeded", publish=full_disk)
    assert store.list_models(DEFAULT_TENANT) == [] and store.get_job(job.id).status == "running"  # rolled back whole
    assert store.finish(job.id, owner, "failed", error="could not register the model")
    assert store.list_models(DEFAULT_TENANT) == [] and store.get_job(job.id).model_version is None


def test_racing_finishes_of_one_name_publish_each_version_once(store):
    jobs = [new_job(store, "racy") for _ in range(6)]
    owners = [store.take_lease(job.id, f"w{i}", 60).owner for i, job in enumerate(jobs)]
    published, barrier = [], threading.Barrier(len(jobs))

    def publish(name, version):
        published.append(version)
        return f"models/{name}/{version}"

    def finish(job, owner):
        barrier.wait()
        assert store.finish(job.id, owner, "succeeded", publish=publish)

    threads = [threading.Thread(target=finish, args=pair) for pair in zip(jobs, owners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registered = [(m.version, m.path) for m in store.list_models(DEFAULT_TENANT, "racy")]
    assert registered == [(v, f"models/racy/{v}") for v in range(1, 7)]
    assert sorted(published) == list(range(1, 7))  # never a copy for a version that was not registered


def test_worker_gives_up_after_max_attempts_and_reconciler_requeues(tmp_path, monkeypatch):
    settings = use_env(monkeypatch, {"AL_DATA_DIR": str(tmp_path), "AL_MAX_ATTEMPTS": "2",
                                     "AL_REQUEUE_QUEUED_AFTER": "0.01"})
    store = Store(settings.store_url)
    store.create_tables()
    job = new_job(store)
    for attempt in range(2):  # two attempts that died: their leases expire
        store.take_lease(job.id, f"dead{attempt}", 0.01)
        time.sleep(0.02)
    broker = make_celery(settings)  # the embedded broker, in tmp_path
    assert reconcile_once(store, broker, settings) == [job.id]
    assert store.get_job(job.id).status == "queued"
    assert run_job(store, settings, job.id, requeue=lambda job_id: enqueue(broker, job_id),
                   send_stage=lambda *_: None) == "failed"
    job = store.get_job(job.id)
    assert job.status == "failed" and "gave up after 2 attempts" in job.error and job.attempts == 3


def test_a_plain_postgresql_url_uses_the_installed_driver():
    """The form most platforms hand out; SQLAlchemy 2.1 alone would look for psycopg 3 and crash at start."""
    if not postgres_answers():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    for url in ("postgresql://postgres@127.0.0.1:5432/test", "postgres://postgres@127.0.0.1:5432/test"):
        store = Store(url)
        store.create_tables()
        assert store.engine.dialect.driver == "psycopg2"
        queued = store.count_by_status()["queued"]
        job = new_job(store)  # a write and reads through that driver
        assert store.get_job(job.id).spec == {"dataset": "digits"}
        assert store.count_by_status()["queued"] == queued + 1
        store.request_cancel(job.id)
        store.engine.dispose()


# The schema as it was before tenants (issue 8), with a row in every table.
BEFORE_TENANTS = [
    "CREATE TABLE datasets (id VARCHAR(40) PRIMARY KEY, name VARCHAR(255) NOT NULL, path TEXT NOT NULL, "
    "rows INTEGER NOT NULL, shape JSON NOT NULL, classes JSON NOT NULL, size_bytes INTEGER NOT NULL, "
    "created_at FLOAT NOT NULL)",
    "CREATE TABLE jobs (id VARCHAR(40) PRIMARY KEY, name VARCHAR(64) NOT NULL, spec JSON NOT NULL, "
    "status VARCHAR(16) NOT NULL, idempotency_key VARCHAR(255) UNIQUE, request_hash VARCHAR(64), "
    "epoch INTEGER NOT NULL, epochs INTEGER NOT NULL, step INTEGER NOT NULL, steps INTEGER, latest_metrics JSON, "
    "result JSON, error TEXT, created_at FLOAT NOT NULL, enqueued_at FLOAT NOT NULL, started_at FLOAT, "
    "finished_at FLOAT, lease_owner VARCHAR(255), lease_expires_at FLOAT, attempts INTEGER NOT NULL, "
    "releases INTEGER NOT NULL, resumed_from_epoch INTEGER, model_name VARCHAR(64), model_version INTEGER)",
    "CREATE TABLE job_epochs (job_id VARCHAR(40) NOT NULL REFERENCES jobs (id), epoch INTEGER NOT NULL, "
    "metrics JSON NOT NULL, PRIMARY KEY (job_id, epoch))",
    "CREATE TABLE models (name VARCHAR(64) NOT NULL, version INTEGER NOT NULL, "
    "job_id VARCHAR(40) NOT NULL UNIQUE REFERENCES jobs (id), path TEXT NOT NULL, created_at FLOAT NOT NULL, "
    "PRIMARY KEY (name, version))",
    "INSERT INTO datasets VALUES ('ds_old', 'old.csv', 'datasets/ds_old.csv', 10, '[64]', '[0, 1]', 100, 1.0)",
    "INSERT INTO jobs VALUES ('job_old', 'digits', '{\"dataset\": \"ds_old\"}', 'succeeded', 'key-old', NULL, "
    "2, 2, 0, NULL, NULL, NULL, NULL, 1.0, 1.0, 1.0, 2.0, NULL, NULL, 1, 0, NULL, 'digits', 1)",
    "INSERT INTO job_epochs VALUES ('job_old', 1, '{\"epoch\": 1}')",
    "INSERT INTO models VALUES ('digits', 1, 'job_old', 'jobs/job_old', 2.0)",
]


def test_a_database_from_before_tenants_opens_with_everything_the_default_tenants(database_url):
    from sqlalchemy import create_engine

    engine = create_engine(with_installed_driver(database_url))
    with engine.begin() as conn:
        for statement in BEFORE_TENANTS:
            conn.exec_driver_sql(statement)
    engine.dispose()
    store = Store(database_url)
    store.create_tables()
    store.create_tables()  # the next start finds it upgraded
    assert store.get_dataset(DEFAULT_TENANT, "ds_old").rows == 10
    assert store.get_job("job_old").tenant == DEFAULT_TENANT and store.job_epochs("job_old") == [{"epoch": 1}]
    assert store.get_model(DEFAULT_TENANT, "digits", 1).job_id == "job_old"
    assert store.get_dataset("b", "ds_old") is None and store.get_model("b", "digits") is None

    # Model names are per tenant now: b's first "digits" is its version 1; the default tenant's next is 2.
    for tenant in ("b", DEFAULT_TENANT):
        job = new_job(store, "digits", tenant=tenant)
        owner = store.take_lease(job.id, "w", 60).owner
        assert store.finish(job.id, owner, "succeeded", publish=lambda name, version, job=job: f"jobs/{job.id}")
    assert [m.version for m in store.list_models("b")] == [1]
    assert [m.version for m in store.list_models(DEFAULT_TENANT, "digits")] == [1, 2]
    store.engine.dispose()


def test_a_registered_version_is_a_copy_that_later_writes_do_not_change(tmp_path, monkeypatch):
    settings = use_env(monkeypatch, {"AL_DATA_DIR": str(tmp_path)})
    job_dir = settings.jobs_dir / "job_x"
    train("digits", job_dir, make_config("default", {"widths": [8], "target_width": 8}, {"epochs": 1}))
    path = published_copy(LocalArtifacts(settings.data_dir), "job_x", "team-a")("digits", 1)
    assert path == "models/team-a/digits/1" and not (tmp_path / path / TRAINING_STATE).exists()
    registered = (tmp_path / path / WEIGHTS).read_bytes()
    (job_dir / WEIGHTS).write_bytes(b"a stale attempt's write")
    assert (tmp_path / path / WEIGHTS).read_bytes() == registered
    assert load_model(tmp_path / path).depth == 1


def test_an_attempt_that_may_not_save_writes_nothing(tmp_path):
    out = tmp_path / "run"
    train("digits", out, make_config("default", {"widths": [8], "target_width": 8}, {"epochs": 1}),
          may_save=lambda: False)
    assert not (out / WEIGHTS).exists() and not (out / TRAINING_STATE).exists()


def test_version_numbers_only_grow_after_a_delete(store):
    """A client pinned to version 2 must never get another model under that number (a deleted one's)."""
    jobs = [new_job(store, "m") for _ in range(3)]
    for job in jobs[:2]:
        assert store.finish(job.id, store.take_lease(job.id, "w", 60).owner, "succeeded",
                            publish=lambda name, version: f"models/{name}/{version}")
    assert store.delete_model(DEFAULT_TENANT, "m", 2) is not None
    assert store.finish(jobs[2].id, store.take_lease(jobs[2].id, "w", 60).owner, "succeeded",
                        publish=lambda name, version: f"models/{name}/{version}")
    assert [m.version for m in store.list_models(DEFAULT_TENANT, "m")] == [1, 3]
    assert store.get_job(jobs[2].id).model_version == 3


def test_idempotency_keys_are_per_tenant(store):
    mine = new_job(store, key="shared-key", tenant="t1")
    theirs, created = store.create_job("t2", "m", {"dataset": "digits"}, CONFIG, "shared-key", None)
    assert created and theirs.id != mine.id and theirs.tenant == "t2"  # nothing said of t1's key
    again, created = store.create_job("t1", "m", {"dataset": "digits"}, CONFIG, "shared-key", None)
    assert not created and again.id == mine.id


def test_racing_submissions_cannot_pass_the_queue_quota_together(store):
    created, barrier = [], threading.Barrier(8)

    def submit():
        barrier.wait()
        try:
            created.append(store.create_job("racer", "m", {"dataset": "digits"}, CONFIG, None, None, max_queued=3))
        except QuotaExceeded as e:
            assert (e.used, e.limit) == (3, 3)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) == 3 and len(store.list_jobs("racer", "queued", 50, 0)[0]) == 3


def test_racing_uploads_cannot_pass_the_disk_quota_together(store):
    added, barrier = [], threading.Barrier(6)

    def upload(i):
        barrier.wait()
        row = DatasetRow(id=f"ds_{i}", tenant="racer", name="d.csv", path=f"datasets/ds_{i}.csv", rows=10,
                         shape=[4], classes=[0, 1], size_bytes=400, created_at=time.time())
        try:
            added.append(store.add_dataset(row, quota_bytes=1000))
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(added) == 2 and store.dataset_bytes("racer") == 800


def test_a_study_turn_that_ran_over_does_not_free_its_successors_turn(store):
    study = store.add_study(StudyRow(id="study_x", tenant=DEFAULT_TENANT, name="s", spec={}, status="running",
                                     created_at=time.time(), seed=0))
    first = store.take_study_turn(study.id)
    assert first is not None and store.take_study_turn(study.id) is None  # held
    with store.writing() as s, s.begin():  # the first pass overran its turn
        s.get(StudyRow, study.id).driver_until = time.time() - 1
    second = store.take_study_turn(study.id)
    assert second is not None
    store.end_study_turn(study.id, first)  # the overrunning pass ends: the second pass still holds it
    assert store.take_study_turn(study.id) is None
    store.end_study_turn(study.id, second)
    assert store.take_study_turn(study.id) is not None
