"""The HTTP API's checks: every bad input gets a 4xx naming the problem, nothing is half-written,
API keys guard everything but health. Real store (SQLite in tmp_path), real Redis broker, a real model."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import TINY_MODEL, digits_rows, drop_queue, registered_model_client

from al.config import ModelConfig, TrainConfig, make_config
from al.run import train
from service.jobspec import JobCreate, PipelineSpec, TrainingSpec

UPLOAD_LIMIT = 1_500_000
REQUEST_LIMIT = 200_000


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory):
    """One tiny digits model, trained by the library, reused by every test here."""
    directory = tmp_path_factory.mktemp("model") / "digits"
    training = {"epochs": 1, "batch_size": 128, "device": "cpu"}
    train("digits", directory, make_config(model=TINY_MODEL, training=training))
    return directory


def make_client(tmp_path, monkeypatch, trained_model_dir, **extra) -> TestClient:
    return registered_model_client(tmp_path, monkeypatch, trained_model_dir, AL_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
                                   AL_MAX_REQUEST_BYTES=str(REQUEST_LIMIT), **extra)


@pytest.fixture
def client(tmp_path, monkeypatch, trained_model_dir):
    with make_client(tmp_path, monkeypatch, trained_model_dir) as c:
        yield c
    drop_queue({"AL_QUEUE": c.app.state.core.settings.queue})


def detail(response) -> str:
    body = response.json()
    return body.get("detail") or body.get("error")


# --- prediction ------------------------------------------------------------------------


def test_predict_valid_then_shortcut_depth(client):
    response = client.post("/v1/models/digits/predict", json={"inputs": digits_rows(2), "depth": 1})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1 and len(response.json()["probabilities"][0]) == 10


def test_predict_takes_rows_nested_in_the_models_input_shape(client):
    """digits samples are 8x8 images, [1, 8, 8] for the model: uploaded as (N, 8, 8), sent as 8 lists of 8."""
    [version] = client.get("/v1/models/digits").json()["versions"]
    assert version["input_shape"] == [1, 8, 8] and version["features"] == 64 and version["available"]
    flat = np.asarray(digits_rows(3))
    answers = [client.post("/v1/models/digits/predict", json={"inputs": rows.tolist()}).json()
               for rows in (flat, flat.reshape(3, 8, 8), flat.reshape(3, 1, 8, 8))]
    assert answers[0]["predictions"] == answers[1]["predictions"] == answers[2]["predictions"]
    ragged = [flat[0].reshape(8, 8).tolist(), flat[1].tolist()]
    response = client.post("/v1/models/digits/predict", json={"inputs": ragged})
    assert response.status_code == 422 and "same shape" in detail(response)


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ('{"inputs": [[NaN' + ", 0" * 63 + "]]}", 422, "finite"),
        ('{"inputs": [[Infinity' + ", 0" * 63 + "]]}", 422, "finite"),
        ('{"inputs": [[1, 2, 3]]}', 422, "64 values"),
        ('{"inputs": [[1, 2], [1, 2, 3]]}', 422, "every row must have the same shape"),
        ('{"inputs": []}', 422, "inputs"),
        ('{"inputs": [["a"' + ", 0" * 63 + "]]}", 422, "number"),
        ('{"inputs": [[0' + ", 0" * 63 + ']], "depth": 2}', 422, "depth must be between 1 and 1"),
        ('{"inputs": [[0' + ", 0" * 63 + ']], "extra": 1}', 422, "extra"),
        ('{"inputs": [[0, ', 422, "JSON"),
    ],
)
def test_predict_bad_inputs_are_4xx_naming_the_problem(client, body, status, names):
    response = client.post("/v1/models/digits/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert names.lower() in detail(response).lower()


def test_unknown_model_and_version(client):
    rows = {"inputs": digits_rows(1)}
    assert "no model 'nope'" in detail(client.post("/v1/models/nope/predict", json=rows))
    response = client.post("/v1/models/digits/versions/7/predict", json=rows)
    assert response.status_code == 404 and "version 7" in detail(response)
    assert client.get("/v1/models/nope").status_code == 404
    response = client.post("/v2/models/nope/infer", json={
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]})
    assert response.status_code == 404 and "no model 'nope'" in response.json()["error"]


def test_too_many_rows_and_too_large_body(client):
    response = client.post("/v1/models/digits/predict", json={"inputs": [[0.0]] * 4097})
    assert response.status_code == 422 and "4096" in detail(response)
    big = {"inputs": [[0.0] * 64] * 2000}  # > REQUEST_LIMIT bytes
    assert client.post("/v1/models/digits/predict", json=big).status_code == 413


def test_body_without_content_length_is_cut_off_at_the_limit(client):
    def chunks():
        yield b'{"inputs": ['
        for _ in range(2000):
            yield b"[" + b"0," * 63 + b"0],"
        yield b"[0]]}"

    response = client.post("/v1/models/digits/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and str(REQUEST_LIMIT) in detail(response)


@pytest.mark.parametrize(
    ("tensor", "names"),
    [
        ({"shape": [2, 64], "datatype": "FP32", "data": [0] * 64}, "needs 128 values"),
        ({"shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}, "64 values"),
        ({"shape": [1, 64], "datatype": "FP32", "data": ["NaN"] + [0] * 63}, "NaN"),
        ({"shape": [1, 64], "datatype": "FP32", "data": ["x"] + [0] * 63}, "numbers"),
        ({"shape": [1, 64], "datatype": "STRING", "data": [0] * 64}, "datatype"),
        ({"shape": [64], "datatype": "FP32", "data": [0] * 64}, "shape"),
    ],
)
def test_v2_infer_bad_inputs_are_400_with_error(client, tensor, names):
    response = client.post("/v2/models/digits/infer", json={"inputs": [{"name": "input", **tensor}]})
    assert response.status_code == 400, response.text
    assert names.lower() in response.json()["error"].lower()


def test_v2_infer_takes_json_without_content_type_and_binary_tensor_data(client):
    """As Triton's own HTTP client (tritonclient.http) sends them: no Content-Type; binary tensors announced
    by Inference-Header-Content-Length (tests/test_outside_clients.py runs the client itself)."""
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows(1)}]})
    plain = client.post("/v2/models/digits/infer", content=body)
    assert plain.status_code == 200, plain.text
    assert [o["name"] for o in plain.json()["outputs"]] == ["predictions", "probabilities", "depths"]
    values = np.asarray(digits_rows(1), dtype="<f8")
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP64",
                                     "parameters": {"binary_data_size": values.nbytes}}]})

    def binary(tail: bytes, length: int = len(header)):
        return client.post("/v2/models/digits/infer", content=header.encode() + tail,
                           headers={"Inference-Header-Content-Length": str(length)})

    assert binary(values.tobytes()).json()["outputs"] == plain.json()["outputs"]
    for tail, length, names in [(values.tobytes()[:-8], len(header), "does not fit"),
                                (values.tobytes() + b"\0" * 8, len(header), "belong to no input"),
                                (values.tobytes(), len(header) + 5, "not an inference request"),
                                (values.tobytes(), 10**9, "does not fit a body")]:
        answer = binary(tail, length)
        assert answer.status_code == 400 and names in answer.json()["error"], answer.text


def test_v2_nested_data_selected_output_and_metadata(client):
    rows = digits_rows(2)
    response = client.post("/v2/models/digits/infer", json={
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP64", "data": rows}],
        "outputs": [{"name": "probabilities"}], "parameters": {"depth": 1}})
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [2, 10] and len(output["data"]) == 20
    assert "id" not in response.json() and "parameters" not in output  # unset fields are omitted, never null
    assert client.get("/v2/models/digits/versions/1").json()["outputs"][0]["datatype"] == "INT64"
    assert client.get("/v2/models/digits/versions/2/ready").status_code == 404
    assert client.get("/v2").json()["name"] == "associated-learning"


# --- uploads --------------------------------------------------------------------------


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "content", "names"),
    [
        ("data.txt", b"1,2\n", "upload a .npz"),
        ("data.npz", b"not a zip at all", "data.npz"),
        ("data.npz", npz_bytes(x=np.zeros((10, 3))), "lacks array(s) y"),
        ("data.npz", npz_bytes(x=np.array([object()] * 10, dtype=object), y=np.zeros(10)), "data.npz"),
        ("data.npz", npz_bytes(x=np.full((10, 3), np.nan), y=np.arange(10) % 2), "NaN"),
        ("data.npz", npz_bytes(x=np.zeros((10, 3)), y=np.zeros(10)), "one class"),
        ("data.csv", b"a,b,label\n1,2,0\n1,x,1\n", "line 3"),
        ("data.csv", b"", "empty"),
    ],
)
def test_malformed_upload_is_422_and_leaves_nothing(client, filename, content, names):
    response = client.post("/v1/datasets", files={"file": (filename, content)})
    assert response.status_code == 422, response.text
    assert names.lower() in detail(response).lower()
    settings = client.app.state.core.settings
    assert not [p for p in settings.datasets_dir.rglob("*") if p.is_file()]
    assert client.get("/v1/datasets").json()["total"] == 0


def test_oversize_upload_is_413_and_leaves_nothing(client):
    response = client.post("/v1/datasets", files={"file": ("big.npz", b"\0" * (UPLOAD_LIMIT + 1))})
    assert response.status_code == 413 and str(UPLOAD_LIMIT) in detail(response)
    assert client.get("/v1/datasets").json()["total"] == 0


def test_csv_upload_and_builtin_dataset(client):
    response = client.post("/v1/datasets", files={"file": ("t.csv", b"a,b,label\n" + b"1,2,x\n3,4,y\n" * 10)})
    assert response.status_code == 201, response.text
    assert response.json()["classes"] == ["x", "y"] and response.json()["shape"] == [2]
    listed = client.get("/v1/datasets").json()
    assert listed["total"] == 1 and "digits" in listed["builtin"]
    assert client.get("/v1/datasets/digits").json()["shape"] == [1, 8, 8]
    assert client.get("/v1/datasets/ds_missing").status_code == 404


# --- jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ({"dataset": "nope"}, "unknown dataset 'nope'"),
        ({"dataset": "digits", "training": {"epochs": 0}}, "training.epochs"),
        ({"dataset": "digits", "training": {"epochs": 10**6}}, "training.epochs"),
        ({"dataset": "digits", "model": {"widths": [10**6]}}, "model.widths"),
        ({"dataset": "digits", "model": {"colour": "red"}}, "model.colour"),
        ({"dataset": "digits", "name": "../etc"}, "name"),
        ({"dataset": "digits", "training": {"lr": -1}}, "training.lr"),
        ({"dataset": "digits", "model": {"arch": "resnet", "widths": [16]}}, "resnet widths"),
        ({"dataset": "digits", "pipeline": {"devices": ["cpu", "cpu"]}}, "one device"),
        ({}, "dataset"),
    ],
)
def test_invalid_job_spec_is_422(client, spec, names):
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert names.lower() in detail(response).lower()


def test_job_list_pagination_cancel_and_idempotency(client):
    ids = [client.post("/v1/jobs", json={"dataset": "digits", "training": {"seed": i}}).json()["id"] for i in range(3)]
    page = client.get("/v1/jobs", params={"status": "queued", "limit": 2}).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"status": "queued", "offset": 2}).json()["items"]
    assert [j["id"] for j in rest] == ids[:1]
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422

    cancelled = client.post(f"/v1/jobs/{ids[0]}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert "already cancelled" in detail(client.post(f"/v1/jobs/{ids[0]}/cancel"))
    assert client.post("/v1/jobs/job_nope/cancel").status_code == 404
    assert client.get("/v1/jobs/job_nope").status_code == 404

    spec = {"dataset": "digits", "training": {"epochs": 3}}
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert first.json()["id"] == again.json()["id"] and again.headers["Location"] == first.headers["Location"]
    conflict = client.post("/v1/jobs", json={**spec, "training": {"epochs": 4}}, headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409 and "Idempotency-Key" in detail(conflict)


# --- auth and documentation -----------------------------------------------------------------


def test_api_keys_guard_all_but_health(tmp_path, monkeypatch, trained_model_dir):
    with make_client(tmp_path, monkeypatch, trained_model_dir, AL_API_KEYS="alpha, beta") as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        for path in ("/v1/jobs", "/v1/models", "/v1/datasets", "/metrics", "/v2/models/digits"):
            response = client.get(path)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
        assert "API key" in client.get("/v2/models/digits").json()["error"]
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer gamma"}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Basic YWxwaGE="}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer beta"}).status_code == 200


def test_production_refuses_to_start_without_keys(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("AL_ENVIRONMENT", "production")
    monkeypatch.delenv("AL_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="AL_API_KEYS"):
        Settings()


def test_openapi_documents_every_field(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    missing = [
        f"{name}.{field}"
        for name, schema in schemas.items()
        if name not in ("HTTPValidationError", "ValidationError")
        for field, prop in schema.get("properties", {}).items()
        if "description" not in prop
    ]
    assert not missing, f"fields without a description: {missing}"
    training = schemas["TrainingSpec"]["properties"]["epochs"]["anyOf"][0]
    assert (training["minimum"], training["maximum"]) == (1, 1000)


def test_every_library_setting_is_reachable_from_a_job_spec():
    """A field added to ModelConfig or TrainConfig needs a place in the job spec (service/jobspec.py)."""
    from service.jobspec import ModelSpec

    assert set(ModelSpec.model_fields) == {f.name for f in dataclasses.fields(ModelConfig)}
    reachable = set(TrainingSpec.model_fields) | set(JobCreate.model_fields) | set(PipelineSpec.model_fields) - {"mode"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= reachable


def test_numbers_too_large_for_the_database_are_refused_not_a_500(client):
    huge = 10**30
    for path, status in ((f"/v1/jobs?offset={huge}", 422), (f"/v1/datasets?offset={huge}", 422),  # as FastAPI
                         (f"/v2/models/digits/versions/{huge}", 400),  # as the v2 protocol
                         (f"/v2/models/digits/versions/{huge}/ready", 400)):
        response = client.get(path)
        assert response.status_code == status, (path, response.status_code, response.text)
    rows = {"inputs": digits_rows(1)}
    assert client.post(f"/v1/models/digits/versions/{huge}/predict", json=rows).status_code == 422
    assert client.post(f"/v2/models/digits/versions/{huge}/infer", json={"inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows(1)}]}).status_code == 400
