"""The whole flow against a real `al serve` (API + its worker) with Redis as the broker:
upload -> train -> status -> events -> predict (native and Open Inference Protocol v2)."""

from __future__ import annotations

import httpx
import pytest
from service_support import (
    TINY_MODEL,
    digits_npz,
    digits_rows,
    drop_queue,
    free_port,
    fresh_redis,
    service_env,
    sse_events,
    start_server,
)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = service_env(tmp_path / "data", fresh_redis())
    process = start_server(env, tmp_path / "serve.log", port)
    yield f"http://127.0.0.1:{port}", process
    process.stop()
    drop_queue(env)


def test_upload_train_status_events_predict(server):
    url, process = server
    with httpx.Client(base_url=url, timeout=30) as client:
        uploaded = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz())})
        assert uploaded.status_code == 201, uploaded.text
        dataset = uploaded.json()
        assert (dataset["rows"], dataset["shape"], dataset["classes"]) == (1797, [64], list(range(10)))
        assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset

        spec = {"dataset": dataset["id"], "name": "digits-tiny", "model": TINY_MODEL,
                "training": {"epochs": 2, "batch_size": 64, "lr": 0.01}}
        submitted = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "flow-1"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert submitted.headers["Location"] == f"/v1/jobs/{job_id}"
        retried = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "flow-1"})
        assert retried.status_code == 202 and retried.json()["id"] == job_id

        # The event stream follows the job to its end, then closes.
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        names = [name for name, _ in events]
        assert names[-1] == "end", process.output()[-3000:]
        assert [data["epoch"] for name, data in events if name == "epoch"] == [1, 2]
        assert "progress" in names

        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded", job
        assert job["progress"]["epoch"] == job["progress"]["epochs"] == 2
        assert len(job["metrics"]["associated_loss"]) == 1 and "test_accuracy" in job["metrics"]
        assert job["model"] == {"name": "digits-tiny", "version": 1}
        assert job["attempts"] == 1 and job["started_at"] and job["finished_at"]
        listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
        assert [j["id"] for j in listed["items"]] == [job_id] and listed["total"] == 1
        assert client.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 0
        assert [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2]

        model = client.get("/v1/models/digits-tiny").json()
        assert model["latest"] == 1 and model["versions"][0]["features"] == 64

        rows = digits_rows(3)
        native = client.post("/v1/models/digits-tiny/predict", json={"inputs": rows})
        assert native.status_code == 200, native.text
        body = native.json()
        assert len(body["predictions"]) == 3 and all(p in range(10) for p in body["predictions"])
        assert all(abs(sum(p) - 1) < 1e-4 for p in body["probabilities"])
        assert (body["model"], body["version"]) == ("digits-tiny", 1)

        assert client.get("/v2/models/digits-tiny/ready").status_code == 200
        meta = client.get("/v2/models/digits-tiny").json()
        assert meta["inputs"][0]["shape"] == [-1, 64] and meta["versions"] == ["1"]
        flat = [v for row in rows for v in row]
        infer = client.post("/v2/models/digits-tiny/versions/1/infer", json={
            "id": "r1", "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": flat}],
        })
        assert infer.status_code == 200, infer.text
        outputs = {o["name"]: o for o in infer.json()["outputs"]}
        assert infer.json()["id"] == "r1" and infer.json()["model_version"] == "1"
        assert outputs["predictions"]["data"] == body["predictions"]
        assert outputs["probabilities"]["shape"] == [3, 10]

        # The pipelined trainer's process mode starts stage processes from the worker's pool process.
        pipelined = client.post("/v1/jobs", json={
            "dataset": "digits", "model": {"widths": [32, 32], "target_width": 16}, "training": {"epochs": 1},
            "pipeline": {"mode": "processes", "devices": ["cpu", "cpu"]}}).json()["id"]
        with client.stream("GET", f"/v1/jobs/{pipelined}/events", timeout=120) as response:
            sse_events(response)
        job = client.get(f"/v1/jobs/{pipelined}").json()
        assert job["status"] == "succeeded", job["error"]

        metrics = client.get("/metrics").text
        assert 'al_jobs{status="succeeded"} 2.0' in metrics
        assert 'al_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} 1.0' in metrics
