"""The service on separate hosts that share only a network: Linux network namespaces (benchmarks/hosts.py).

Host A runs the API with its own PostgreSQL and Redis, bound to A's address; hosts B and C run one
worker each. Every host has its own empty data directory: workers reach datasets and checkpoints only
through the API's artifact store (AL_ARTIFACTS_URL), with a worker key. All traffic stays between the
namespaces this test makes; the test itself talks to the API from inside host A. The tests run in
order on one cluster, and each starts the workers it needs that are not running.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from service_support import FAST, digits_npz, digits_rows, wait_for

from al.config import from_spec
from al.run import train
from benchmarks.hosts import Hosts, unavailable_reason

POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path(
    "/usr/lib/postgresql").is_dir() else None
ADMIN, WORKER = "admin-key-hosts", "worker-key-hosts"
CLONE_NEWNET = 0x40000000
# A pipeline over two workers, one intra-op thread per stage: its weights must equal a sequential run's.
PIPELINE_JOB = {
    "dataset": "digits", "model": {"arch": "mlp", "widths": [24, 24, 24, 24], "target_width": 12},
    "training": {"epochs": 3, "batch_size": 64, "seed": 5},
    "pipeline": {"mode": "processes", "workers": 2, "stages": "0-1,2-3", "stage_threads": 1, "stage_timeout": 30},
}


def reason_to_skip() -> str | None:
    if POSTGRES_BIN is None or not shutil.which("runuser") or not shutil.which("redis-server"):
        return "needs Debian's PostgreSQL server binaries, runuser and redis-server to run host A's own"
    return unavailable_reason()


@contextmanager
def inside(namespace: str):
    """This thread in `namespace`'s network: the sockets it opens meanwhile stay there (setns(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{namespace}") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            libc.setns(home.fileno(), CLONE_NEWNET)


class Cluster:
    def __init__(self, hosts, root: Path):
        self.a, self.b, self.c = hosts
        self.root = root
        self.api = f"http://{self.a.address}:8000"
        shared = {"DATABASE_URL": f"postgresql://postgres@{self.a.address}:5432/postgres",
                  "REDIS_URL": f"redis://{self.a.address}:6379/0", "AL_QUEUE": "al.hosts"}
        base = {k: v for k, v in os.environ.items() if not k.startswith("AL_") and k not in shared}
        self.env = {**base, **FAST, **shared, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, host, args: list[str], **env: str) -> None:
        data = self.root / name
        data.mkdir(exist_ok=True)
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            host.command([sys.executable, "-m", "al.cli", *args]), env={**self.env, "AL_DATA_DIR": str(data), **env},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, name: str) -> None:
        """The worker of host `name` ("b" or "c"), unless it runs already."""
        if name in self.processes and self.processes[name].poll() is None:
            return
        offset = len(self.log(name)) if (self.root / f"{name}.log").exists() else 0
        self.start(name, {"b": self.b, "c": self.c}[name], ["worker"], AL_ARTIFACTS_URL=self.api, AL_API_KEY=WORKER)
        wait_for(lambda: " ready." in self.log(name)[offset:], 90, f"worker {name} to start")

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything it started, as a host that dies."""
        try:
            os.killpg(self.processes[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.processes[name].wait()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster():
    reason = reason_to_skip()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="al-hosts-"))  # outside pytest's root-only tmp: postgres must reach it
    shutil.chown(root, "postgres", "postgres")
    with Hosts(3) as hosts:
        cluster = Cluster(hosts, root)
        a = cluster.a

        def pg(*args: str) -> None:
            subprocess.run(a.command(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / args[0]), *args[1:]]),
                           check=True, capture_output=True, cwd=root)

        pg("initdb", "-D", str(root / "pg"), "-A", "trust", "-U", "postgres")
        with open(root / "pg" / "pg_hba.conf", "a") as hba:  # the other hosts, over the network
            hba.write(f"host all all {a.address}/24 trust\n")
        pg("pg_ctl", "-D", str(root / "pg"), "-o", f"-p 5432 -k {root} -c listen_addresses={a.address}",
           "-l", str(root / "pg.log"), "-w", "start")
        redis = subprocess.Popen(a.command(["redis-server", "--bind", a.address, "--port", "6379", "--save", "",
                                            "--appendonly", "no", "--protected-mode", "no"]), stdout=subprocess.DEVNULL)
        try:
            cluster.start("api", a, ["serve", "--host", a.address, "--port", "8000", "--no-worker"],
                          AL_API_KEYS=f"{ADMIN}:admin,{WORKER}:worker")
            with inside(a.namespace):
                cluster.client = httpx.Client(base_url=cluster.api, headers={"Authorization": f"Bearer {ADMIN}"},
                                              timeout=30)

                def ready():
                    try:
                        return cluster.client.get("/v2/health/ready").status_code == 200
                    except httpx.TransportError:
                        return False

                wait_for(ready, 90, "the API on host A", interval=0.3)
                yield cluster
        finally:
            for name in list(cluster.processes):
                cluster.kill(name)
                print(f"--- {name}.log (last 3000 characters)\n{cluster.log(name)[-3000:]}")
            redis.kill()
            subprocess.run(a.command(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / "pg_ctl"), "-D",
                                      str(root / "pg"), "-m", "immediate", "stop"]), capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def job_status(cluster: Cluster, job_id: str) -> dict:
    with inside(cluster.a.namespace):
        return cluster.client.get(f"/v1/jobs/{job_id}").json()


def wait_job(cluster: Cluster, job_id: str, wanted: tuple[str, ...], timeout: float = 180) -> dict:
    return wait_for(lambda: (j := job_status(cluster, job_id))["status"] in wanted and j, timeout,
                    f"job {job_id} to be {' or '.join(wanted)}", interval=0.3)


def submit(cluster: Cluster, spec: dict) -> str:
    with inside(cluster.a.namespace):
        answer = cluster.client.post("/v1/jobs", json=spec)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def test_upload_on_a_train_on_b_predict_on_a(cluster):
    cluster.start_worker("b")
    with inside(cluster.a.namespace):
        upload = cluster.client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz())})
        assert upload.status_code == 201, upload.text
        dataset = upload.json()["id"]
        # The artifact routes take a worker key only.
        assert cluster.client.get(f"/v1/artifacts/datasets/{dataset}.npz").status_code == 403
    job_id = submit(cluster, {"dataset": dataset, "name": "digits-hosts", "preset": "lean",
                              "model": {"arch": "mlp", "widths": [32], "target_width": 16},
                              "training": {"epochs": 3}})
    done = wait_job(cluster, job_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, cluster.log("b")[-3000:])
    with inside(cluster.a.namespace):
        predicted = cluster.client.post("/v1/models/digits-hosts/predict", json={"inputs": digits_rows(4)})
    assert predicted.status_code == 200, predicted.text
    # B fetched the upload once into its cache (by content hash) and trained in its own directory; A holds the
    # checkpoint it uploaded at each epoch end and the registered version.
    assert len(list((cluster.root / "b" / "cache" / "datasets").glob("*.npz"))) == 1
    assert (cluster.root / "api" / "jobs" / job_id / "checkpoint.pt").is_file()
    assert (cluster.root / "api" / "models" / "default" / "digits-hosts" / "1" / "model.safetensors").is_file()


def test_a_job_whose_host_is_killed_resumes_on_another_host(cluster):
    spec = {"dataset": "digits", "name": "resumed-on-c", "preset": "lean",
            "model": {"arch": "mlp", "widths": [128, 128], "target_width": 64}, "training": {"epochs": 15}}
    cluster.start_worker("b")
    if "c" in cluster.processes:
        cluster.kill("c")
    job_id = submit(cluster, spec)
    # Epoch 3 reported: epoch 2's checkpoint is uploaded (an epoch's progress is reported before its upload ends).
    wait_for(lambda: job_status(cluster, job_id)["progress"]["epoch"] >= 3, 120, "three epochs on B", interval=0.2)
    cluster.kill("b")  # host B dies with its worker; C has not seen this job
    cluster.start_worker("c")
    done = wait_job(cluster, job_id, ("succeeded", "failed"), timeout=240)
    assert done["status"] == "succeeded", (done, cluster.log("c")[-3000:])
    assert done["attempts"] == 2 and done["resumed_from_epoch"] >= 2, done
    assert f"job {job_id} resumes at epoch" in cluster.log("c")


def test_a_pipeline_over_two_workers_equals_a_sequential_run(cluster, tmp_path):
    cluster.start_worker("b")
    cluster.start_worker("c")
    job_id = submit(cluster, {**PIPELINE_JOB, "name": "piped"})
    done = wait_job(cluster, job_id, ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, cluster.log("b")[-3000:], cluster.log("c")[-3000:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("digits", tmp_path / "sequential", from_spec({**PIPELINE_JOB, "pipeline": None}))
    finally:
        torch.set_num_threads(threads)
    piped = load_file(str(cluster.root / "api" / "models" / "default" / "piped" / "1" / "model.safetensors"))
    sequential = load_file(str(tmp_path / "sequential" / "model.safetensors"))
    assert all(torch.equal(piped[k], sequential[k]) for k in sequential)


def test_a_killed_stage_ends_the_attempt_and_the_job_resumes(cluster):
    spec = {**PIPELINE_JOB, "name": "piped-killed", "training": {"epochs": 30, "batch_size": 64, "seed": 5}}
    cluster.start_worker("b")
    cluster.start_worker("c")
    seen = {name: len(cluster.log(name)) for name in ("b", "c")}
    job_id = submit(cluster, spec)
    wait_for(lambda: job_status(cluster, job_id)["progress"]["epoch"] >= 2, 120, "two epochs", interval=0.2)
    os.kill(stage_process(cluster, seen), signal.SIGKILL)
    done = wait_job(cluster, job_id, ("succeeded", "failed"), timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["resumed_from_epoch"] >= 2, done


def stage_worker(cluster: Cluster, seen: dict[str, int]) -> str:
    """The worker whose log, since `seen`, took stage 1."""
    [name] = [n for n in ("b", "c") if "al.train_stage" in cluster.log(n)[seen[n]:]]
    return name


def stage_process(cluster: Cluster, seen: dict[str, int]) -> int:
    """The pool process (the only one: concurrency 1) of the worker that took stage 1."""
    found = subprocess.run(["pgrep", "-P", str(cluster.processes[stage_worker(cluster, seen)].pid)],
                           capture_output=True, text=True)
    [pool_process] = [int(p) for p in found.stdout.split()]
    return pool_process


def test_a_worker_shutting_down_ends_its_stage_at_once(cluster):
    """A warm shutdown waits for running tasks; a stage's task must not make it wait for the whole job."""
    cluster.start_worker("b")
    cluster.start_worker("c")
    seen = {name: len(cluster.log(name)) for name in ("b", "c")}
    job_id = submit(cluster, {**PIPELINE_JOB, "name": "piped-shutdown",
                              "training": {"epochs": 200, "batch_size": 64, "seed": 5}})
    wait_for(lambda: job_status(cluster, job_id)["progress"]["epoch"] >= 1, 120, "an epoch", interval=0.2)
    name = stage_worker(cluster, seen)
    cluster.processes[name].send_signal(signal.SIGTERM)
    cluster.processes[name].wait(timeout=30)  # the job's 200 epochs would take minutes
    waiting = wait_for(lambda: (j := job_status(cluster, job_id))["status"] == "queued" and j["waiting"] and j, 60,
                       "the job back in the queue")
    assert "attempt 1 failed" in waiting["waiting"] or "asks for 2" in waiting["waiting"], waiting
    with inside(cluster.a.namespace):
        assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_a_job_asking_for_more_workers_than_exist_waits_and_says_why(cluster):
    cluster.start_worker("b")
    job_id = submit(cluster, {**PIPELINE_JOB, "name": "too-wide",
                              "pipeline": {**PIPELINE_JOB["pipeline"], "workers": 4, "stages": "0,1,2,3"}})
    waiting = wait_for(lambda: (j := job_status(cluster, job_id))["waiting"] and j, 30, "the reason it waits")
    assert waiting["status"] == "queued" and "asks for 4" in waiting["waiting"], waiting
    time.sleep(2)  # it holds no worker: both stay free for other jobs
    with inside(cluster.a.namespace):
        assert cluster.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
