"""A real `al serve` (API process, keys on) met by outside clients: Triton's own `tritonclient.http`, hostile
uploads measured in the server's resident memory, 32 concurrent clients while a real worker trains, and
schemathesis fuzzing the OpenAPI document with and without a key."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    Process,
    digits_npz,
    digits_rows,
    drop_queue,
    free_port,
    fresh_redis,
    register_model,
    service_env,
    start_server,
    start_worker,
    use_env,
    wait_for,
)

from al.config import make_config
from al.run import train

KEY = "outside-client-key"
MAX_DATASET_BYTES = 64 * 2**20


@dataclass
class Served:
    url: str
    process: Process
    env: dict[str, str]

    def client(self, key: str | None = KEY, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The API alone (a test starts a worker when it needs one), with "digits" version 1 registered."""
    root = tmp_path_factory.mktemp("outside")
    model_dir = root / "model"
    train("digits", model_dir, make_config(model={"arch": "mlp", "widths": [32, 32], "target_width": 16},
                                           training={"epochs": 2, "batch_size": 128, "device": "cpu"}))
    env = service_env(root / "data", fresh_redis(), AL_API_KEYS=KEY, AL_EMBEDDED_WORKER="0",
                      AL_MAX_DATASET_BYTES=str(MAX_DATASET_BYTES), AL_MAX_PARAMETERS="200000")
    (root / "data").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        register_model(use_env(patch, env), model_dir)
    port = free_port()
    process = start_server(env, root / "serve.log", port)
    yield Served(f"http://127.0.0.1:{port}", process, env)
    process.stop()
    drop_queue(env)


def test_tritonclient_infers_with_json_and_binary_tensors(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    headers = {"Authorization": f"Bearer {KEY}"}
    assert client.is_server_live(headers=headers) and client.is_model_ready("digits", headers=headers)
    metadata = client.get_model_metadata("digits", headers=headers)
    assert metadata["inputs"][0]["shape"] == [-1, 64]
    x = np.asarray(digits_rows(8), dtype=np.float32)
    with server.client() as http:
        native = http.post("/v1/models/digits/predict", json={"inputs": x.tolist()}).json()
    for binary_input in (False, True):
        for binary_output in (False, True):
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary_input)
            outputs = [triton.InferRequestedOutput(name, binary_data=binary_output)
                       for name in ("predictions", "probabilities")]
            result = client.infer("digits", [tensor], outputs=outputs, headers=headers)
            assert result.as_numpy("predictions").tolist() == native["predictions"]
            np.testing.assert_allclose(result.as_numpy("probabilities"), native["probabilities"], rtol=1e-5)
    wrong = triton.InferInput("input", [8, 63], "FP32")
    wrong.set_data_from_numpy(x[:, :63].copy(), binary_data=True)
    with pytest.raises(triton.InferenceServerException, match="64 values"):
        client.infer("digits", [wrong], headers=headers)
    client.close()


def _memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since the last reset), in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def _peak_above_now(pid: int, request) -> int:
    """How far the server's resident memory rose above its level before `request()` ran."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _memory(pid)["VmRSS"]
    request()
    return _memory(pid)["VmHWM"] - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_uploads_and_listings_stay_in_bounded_memory(server, tmp_path):
    pid = server.process.popen.pid
    rng = np.random.default_rng(0)
    table = np.column_stack([rng.integers(0, 256, (30_000, 200)), np.arange(30_000) % 10])
    np.savetxt(tmp_path / "big.csv", table, fmt="%d", delimiter=",", header="," * 200 + "label", comments="")
    big = (tmp_path / "big.csv").read_bytes()
    bomb = io.BytesIO()
    np.savez_compressed(bomb, x=np.zeros((2 * MAX_DATASET_BYTES // 4 // 256, 256), np.float32), y=np.arange(2))
    with server.client() as client:
        client.post("/v1/datasets", files={"file": ("warm.npz", digits_npz())}).raise_for_status()  # first-use costs
        uploaded = {}
        rise = _peak_above_now(pid, lambda: uploaded.update(
            client.post("/v1/datasets", files={"file": ("big.csv", big)}).json()))
        assert uploaded["rows"] == 30_000 and uploaded["shape"] == [200], uploaded
        assert rise < 3 * len(big), f"a {len(big) >> 20} MiB CSV raised the server's memory by {rise >> 20} MiB"

        answers = []
        rise = _peak_above_now(pid, lambda: answers.append(
            client.post("/v1/datasets", files={"file": ("bomb.npz", bomb.getvalue())})))
        assert answers[0].status_code == 422 and "over the limit" in answers[0].json()["detail"]
        assert rise < 32 * 2**20, f"a {len(bomb.getvalue()) >> 10} KiB zip bomb raised memory by {rise >> 20} MiB"

        for path in ("/v1/models", "/v1/datasets", "/v1/datasets/digits"):
            rise = _peak_above_now(pid, lambda path=path: client.get(path).raise_for_status())
            assert rise < 100 * 2**20, f"GET {path} raised memory by {rise >> 20} MiB"
        if client.get("/v1/datasets/fashion-mnist").status_code == 200:  # where Debian's package is installed
            rise = _peak_above_now(pid, lambda: client.get("/v1/datasets/fashion-mnist").raise_for_status())
            assert rise < 100 * 2**20, f"GET /v1/datasets/fashion-mnist raised memory by {rise >> 20} MiB"


def test_32_clients_predict_and_upload_while_a_job_trains_without_an_error(server, tmp_path):
    worker = start_worker(server.env, tmp_path / "worker.log")
    try:
        with server.client() as client:
            spec = {"dataset": "digits", "name": "busy", "preset": "lean",
                    "model": {"widths": [32, 32], "target_width": 16}, "training": {"epochs": 1000}}
            job = client.post("/v1/jobs", json=spec).json()
            wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 60, "the job to run")
        rows, failures, lock = digits_rows(4), [], threading.Lock()

        def predict_many(count: int) -> None:
            with server.client() as client:
                for _ in range(count):
                    answer = client.post("/v1/models/digits/predict", json={"inputs": rows})
                    if answer.status_code != 200 or len(answer.json()["predictions"]) != 4:
                        with lock:
                            failures.append(answer.status_code)

        def upload() -> None:
            with server.client() as client:
                if client.post("/v1/datasets", files={"file": ("d.npz", digits_npz())}).status_code != 201:
                    failures.append("upload")

        threads = [threading.Thread(target=predict_many, args=(2000 // 32 + (i < 2000 % 32),)) for i in range(32)]
        threads.append(threading.Thread(target=upload))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        with server.client() as client:
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"  # trained throughout
            client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
    finally:
        worker.stop()


@pytest.mark.parametrize(("key", "seconds"), [(KEY, 30), (None, 10)], ids=["with-key", "without-key"])
def test_schemathesis_finds_no_server_error_and_no_answer_off_its_schema(server, key, seconds):
    """Property-based (fuzzing) and stateful phases over the OpenAPI document, bounded in time. (Its coverage
    phase is left out: in schemathesis 4.32 it fails inside hypothesis on Python 3.11.)"""
    command = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    header = ["-H", f"Authorization: Bearer {key}"] if key else []
    run = subprocess.run(
        [command, "run", f"{server.url}/openapi.json", *header, "--checks",
         "not_a_server_error,response_schema_conformance", "--phases", "examples,fuzzing,stateful",
         "--max-time", str(seconds), "--seed", "1", "--workers", "2", "--request-timeout", "30"],
        capture_output=True, text=True, timeout=seconds + 240)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
