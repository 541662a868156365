"""Early exit (`exit_confidence`) over HTTP, and dynamic batching of concurrent predictions: the real app
(concurrent requests through httpx's ASGI transport), a real two-component model, the real batcher."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_support import digits_rows, drop_queue, register_model, registered_model_client, wait_for

from al.checkpoint import InferenceRequest, Prediction, load_model
from al.config import make_config
from al.run import train
from app import batching, inference
from service.store import ModelRow

TWO_COMPONENTS = {"arch": "mlp", "widths": [32, 32], "target_width": 16}
NATIVE, V2 = "/v1/models/digits/predict", "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "digits"
    training = {"epochs": 2, "batch_size": 128, "device": "cpu"}
    train("digits", directory, make_config(model=TWO_COMPONENTS, training=training))
    return directory


@pytest.fixture
def make_app(tmp_path, monkeypatch, model_dir):
    """make_app(**env): a TestClient of a fresh app with these settings, its registry holding the model."""
    clients = []

    def make(**env: str):
        clients.append(registered_model_client(tmp_path / str(len(clients)), monkeypatch, model_dir, **env))
        return clients[-1]

    yield make
    for client in clients:
        drop_queue({"AL_QUEUE": client.app.state.core.settings.queue})


@pytest.fixture
def client(make_app):
    return make_app()


@pytest.fixture
def batch_sizes(monkeypatch) -> list[int]:
    """The number of requests in each batched forward."""
    sizes, original = [], batching.forward

    def counting(model, requests):
        sizes.append(len(requests))
        return original(model, requests)

    monkeypatch.setattr(batching, "forward", counting)
    return sizes


def v2_body(rows: list[list[float]], outputs: list[str] | None = None, **parameters) -> dict:
    body = {"inputs": [{"name": "input", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": rows}],
            "parameters": parameters}
    return {**body, "outputs": [{"name": name} for name in outputs]} if outputs else body


def answer(response: httpx.Response) -> Prediction:
    """A native or a v2 answer as the library's Prediction (classes, probabilities as rows, depths)."""
    assert response.status_code == 200, response.text
    body = response.json()
    if "outputs" not in body:
        return Prediction(body["predictions"], body["probabilities"], body["depths"])
    outputs = {o["name"]: o for o in body["outputs"]}
    probabilities = np.reshape(outputs["probabilities"]["data"], outputs["probabilities"]["shape"]).tolist()
    return Prediction(outputs["predictions"]["data"], probabilities, outputs["depths"]["data"])


def assert_same(a: Prediction, b: Prediction) -> None:
    """The same classes and depths; probabilities to float32 rounding (a batch's matmul may block differently)."""
    assert (a.classes, a.depths) == (b.classes, b.depths)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=0, atol=1e-6)


def both(client, rows: list[list[float]], **settings) -> Prediction:
    """The native and the v2 answer, which must agree."""
    native = answer(client.post(NATIVE, json={"inputs": rows, **settings}))
    assert native == answer(client.post(V2, json=v2_body(rows, **settings)))
    return native


# --- early exit -------------------------------------------------------------------------------


def test_every_answer_says_the_depth_each_row_used(client):
    rows = digits_rows(5)
    assert both(client, rows).depths == [2] * 5
    assert both(client, rows, depth=1).depths == [1] * 5
    response = client.post(V2, json=v2_body(rows, ["depths"], depth=1))
    assert response.json()["outputs"] == [{"name": "depths", "shape": [5], "datatype": "INT64", "data": [1] * 5}]
    outputs = client.get("/v2/models/digits").json()["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in outputs][2] == ("depths", "INT64", [-1])


def test_exit_confidence_takes_each_row_to_its_first_confident_depth(client):
    rows = digits_rows(40)
    shallow, full = both(client, rows, depth=1), both(client, rows)
    assert both(client, rows, exit_confidence=0) == shallow  # every row is confident enough at depth 1
    tops = [max(p) for p in shallow.probabilities]
    assert max(tops) < 1
    assert both(client, rows, exit_confidence=(max(tops) + 1) / 2) == full  # no row is, before the last depth
    assert both(client, rows, depth=1, exit_confidence=(max(tops) + 1) / 2) == shallow  # depth caps the exits

    median = float(np.median(tops))
    mixed = both(client, rows, exit_confidence=median)
    assert mixed.depths == [1 if top >= median else 2 for top in tops]
    expected = [(s if top >= median else f) for top, s, f in zip(tops, zip(*shallow), zip(*full))]
    assert_same(mixed, Prediction(*(list(column) for column in zip(*expected))))


@pytest.mark.parametrize("value", [1.5, -0.1, "high"])
def test_a_bad_exit_confidence_is_refused_naming_it(client, value):
    native = client.post(NATIVE, json={"inputs": digits_rows(1), "exit_confidence": value})
    assert native.status_code == 422 and "exit_confidence" in native.json()["detail"]
    v2 = client.post(V2, json=v2_body(digits_rows(1), exit_confidence=value))
    assert v2.status_code == 400 and "parameter exit_confidence" in v2.json()["error"]


# --- dynamic batching -------------------------------------------------------------------------


def concurrently(client, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Every request at once against the client's app, on one event loop as uvicorn would run it."""

    async def send():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await asyncio.gather(*(http.post(path, json=body) for path, body in requests))

    return asyncio.run(send())


def mixed_requests(n: int) -> list[tuple[str, dict]]:
    """Native and v2 requests of 1 to 3 rows with three different settings."""
    rows, requests = digits_rows(n + 3), []
    for i in range(n):
        settings = [{}, {"depth": 1}, {"exit_confidence": 0.9}][i % 3]
        mine = rows[i : i + 1 + i % 4 % 3]
        requests.append((V2, v2_body(mine, **settings)) if i % 2 else (NATIVE, {"inputs": mine, **settings}))
    return requests


def test_batched_answers_are_the_unbatched_ones(make_app, batch_sizes):
    requests = mixed_requests(60)
    unbatched = concurrently(make_app(AL_BATCH_MAX_SIZE="1"), requests)
    assert batch_sizes == []  # batching off: every request its own forward
    batched = concurrently(make_app(AL_BATCH_WAIT_MS="20"), requests)
    for a, b in zip(unbatched, batched):
        assert_same(answer(a), answer(b))
    assert sum(batch_sizes) == len(requests) and max(batch_sizes) > 1, batch_sizes


def test_a_bad_request_in_a_batch_gets_its_error_and_the_others_their_answers(make_app, batch_sizes):
    client = make_app(AL_BATCH_WAIT_MS="20")
    rows = digits_rows(12)
    alone = [answer(client.post(V2, json=v2_body([row]))) for row in rows]
    batch_sizes.clear()
    good = [(V2, v2_body([row])) for row in rows]
    bad = [(V2, v2_body([["NaN"] + rows[0][1:]])), (V2, v2_body([rows[0][1:]]))]  # NaN; 63 values
    responses = concurrently(client, good[:6] + bad + good[6:])
    assert [r.status_code for r in responses[6:8]] == [400, 400]
    assert "NaN" in responses[6].json()["error"] and "64 values" in responses[7].json()["error"]
    for expected, response in zip(alone, responses[:6] + responses[8:]):
        assert_same(expected, answer(response))
    assert sum(batch_sizes) == len(rows) and max(batch_sizes) > 1, batch_sizes


@pytest.mark.serial  # a bound on latency: alone on the machine
def test_a_lone_request_waits_at_most_the_batch_wait(make_app):
    for wait in (0.25, 0):  # 0: dispatched at once when the inference thread is idle
        client = make_app(AL_BATCH_WAIT_MS=str(wait * 1000))
        client.post(NATIVE, json={"inputs": digits_rows(1)})  # loads the model
        started = time.perf_counter()
        answer(client.post(NATIVE, json={"inputs": digits_rows(1)}))
        assert wait <= time.perf_counter() - started < wait + 0.15


def run_batcher(model, max_size: int, requests: list[InferenceRequest]) -> list:
    """Batcher.submit for every request at once (same settings): each one's Prediction or exception."""
    row = ModelRow(tenant="default", name="digits", version=1)

    async def send():
        with ThreadPoolExecutor(1) as executor:
            batcher = batching.Batcher(executor, max_size, wait=0.02, max_queued_rows=10**6)
            return await asyncio.gather(*(batcher.submit(row, model, request) for request in requests),
                                        return_exceptions=True)

    return asyncio.run(send())


def test_a_failed_batch_runs_its_requests_one_by_one(model_dir, batch_sizes):
    model = load_model(model_dir)
    rows = np.asarray(digits_rows(3), dtype=np.float32)
    # Made without LoadedModel.request, so nothing checked it: rows of 63 values break the forward.
    broken = InferenceRequest(np.zeros((1, 63), dtype=np.float32))
    first, error, last = run_batcher(model, 64, [model.request(rows[:1]), broken, model.request(rows[1:])])
    assert batch_sizes == [3]
    assert isinstance(error, RuntimeError) and "1x63" in str(error)
    assert_same(first, model.predict(model.request(rows[:1])))
    assert_same(last, model.predict(model.request(rows[1:])))


def test_batches_hold_at_most_max_size_rows_and_a_larger_input_runs_alone(model_dir, batch_sizes):
    model = load_model(model_dir)
    rows = np.asarray(digits_rows(10), dtype=np.float32)
    requests = [model.request(x) for x in (rows[:2], rows[2:4], rows[4:9], rows[9:])]
    results = run_batcher(model, 4, requests)
    assert batch_sizes == [2, 1, 1]  # 2 + 2 rows, then 5 alone, then 1
    for request, result in zip(requests, results):
        assert_same(result, model.predict(request))


def test_a_full_queue_refuses_rows_past_its_bound_and_an_empty_one_takes_any_request(model_dir):
    model = load_model(model_dir)
    rows = np.asarray(digits_rows(5), dtype=np.float32)
    row = ModelRow(tenant="default", name="digits", version=1)

    async def send():
        with ThreadPoolExecutor(1) as executor:
            batcher = batching.Batcher(executor, 64, wait=0.05, max_queued_rows=4)
            waiting = asyncio.ensure_future(batcher.submit(row, model, model.request(rows[:3])))
            await asyncio.sleep(0)  # 3 rows wait for others to join
            with pytest.raises(batching.QueueFull, match="AL_BATCH_QUEUE_ROWS"):
                await batcher.submit(row, model, model.request(rows[:2]))
            assert_same(await waiting, model.predict(model.request(rows[:3])))
            assert batcher.queued_rows == 0
            alone = await batcher.submit(row, model, model.request(rows))  # 5 > 4 rows, on an empty queue
            assert_same(alone, model.predict(model.request(rows)))

    asyncio.run(send())


# --- finding the model --------------------------------------------------------------------------


def test_concurrent_requests_for_an_unloaded_model_load_it_once(make_app, monkeypatch):
    loads, original = [], inference.load_model
    monkeypatch.setattr(inference, "load_model", lambda path: loads.append(path) or original(path))
    responses = concurrently(make_app(), [(NATIVE, {"inputs": digits_rows(1)})] * 16)
    assert [r.status_code for r in responses] == [200] * 16 and len(loads) == 1


def test_a_new_version_answers_soon_after_it_is_registered(client, model_dir):
    assert client.post(NATIVE, json={"inputs": digits_rows(1)}).json()["version"] == 1
    register_model(client.app.state.core.settings, model_dir)
    # Until the name's latest version is re-read (every ROUTES_TTL seconds, in the background), v1 answers.
    wait_for(lambda: client.post(NATIVE, json={"inputs": digits_rows(1)}).json()["version"] == 2,
             inference.ROUTES_TTL + 2, "version 2 to answer")


def test_a_version_deleted_through_another_api_process_stops_answering_there_soon(client):
    """Each API process (AL_WEB_WORKERS) keeps its own loaded models: a delete through one reaches another's
    within ROUTES_TTL, when it asks the registry again, for the version by number and as the latest alike."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    other = TestClient(create_app(client.app.state.core.settings))  # another process's cache, the same store
    versioned, body = "/v1/models/digits/versions/1/predict", {"inputs": digits_rows(1)}
    for api in (client, other):
        assert api.post(versioned, json=body).status_code == api.post(NATIVE, json=body).status_code == 200
    assert client.delete("/v1/models/digits/versions/1").status_code == 204
    assert client.post(versioned, json=body).status_code == 404  # at once where it was deleted
    wait_for(lambda: other.post(versioned, json=body).status_code == other.post(NATIVE, json=body).status_code == 404,
             inference.ROUTES_TTL + 2, "the other process to stop answering with the deleted version")
