"""Scoped keys, tenants, deletes and quotas (issue 8): every route's scope decision against every scope,
tenant isolation, docs closed in production, constant-time key comparison, no key in a real run's logs,
429 and 507, and deletes that refuse while in use and free the disk. Real store and files throughout."""

from __future__ import annotations

import hmac
import re

import httpx
import pytest
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.testclient import TestClient
from service_support import (
    TINY_MODEL,
    dashboard_login,
    digits_npz,
    digits_rows,
    free_port,
    register_model,
    service_env,
    start_server,
    use_env,
    wait_for,
)

from al.config import make_config
from al.run import train
from app.api.deps import REACHES, known_key
from app.edge import CAPPED, needs_key
from app.main import create_app
from service.settings import DEFAULT_TENANT, SCOPES, Settings, parse_api_keys

TOKENS = {scope: f"{scope}-token-Zq81x" for scope in SCOPES}
SCOPED_KEYS = ",".join(f"{token}:{scope}" for scope, token in TOKENS.items())
INFER = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows(1)[0]}]}


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "digits"
    training = {"epochs": 1, "batch_size": 128, "device": "cpu"}
    train("digits", directory, make_config(model=TINY_MODEL, training=training))
    return directory


def make_client(tmp_path, monkeypatch, **env) -> TestClient:
    """The app on the embedded broker, which nothing consumes here: a submitted job stays queued."""
    return TestClient(create_app(use_env(monkeypatch, service_env(tmp_path / "data", None, **env))))


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def detail(response) -> str:
    body = response.json()
    return body.get("detail") or body.get("error")


# --- every route's scope decision, against every scope --------------------------------------


def scope_decisions(route: RouteContext) -> list[str | None]:
    """The scope each of the route's dependencies (and theirs) decides: `require(scope)`, `page_scope(scope)`
    or `public` (None)."""
    found, pending = [], list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if hasattr(dependency.call, "scope"):
            found.append(dependency.call.scope)
        pending.extend(dependency.dependencies)
    return found


def concrete(path: str) -> str:
    return re.sub(r"\{version\}", "1", re.sub(r"\{(?!version\})[^}]+\}", "nothing-here", path))


def test_every_route_has_one_scope_decision_that_every_scope_meets(tmp_path, monkeypatch):
    """A new route without a decision fails here; so does a decision the route does not keep."""
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS=SCOPED_KEYS)
    every = list(iter_route_contexts(client.app.routes))  # app.routes, with included routers' routes in them
    routes = [r for r in every if isinstance(r.original_route, APIRoute)]
    others = {r.path for r in every if not isinstance(r.original_route, APIRoute)}
    assert others <= {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/ui/static"}, others
    undecided = [f"{sorted(r.methods)} {r.path}: {scope_decisions(r)}" for r in routes if len(scope_decisions(r)) != 1]
    assert not undecided, f"routes without exactly one scope decision: {undecided}"

    decisions = {(method, r.path): scope_decisions(r)[0] for r in routes for method in r.methods}
    # What the issue asks of the decisions themselves.
    assert all(scope == "admin" for (method, _), scope in decisions.items() if method == "DELETE")
    assert {path for (_, path), scope in decisions.items() if scope is None} == {
        "/v2/health/live", "/v2/health/ready", "/ui/key", "/ui", "/"}
    for (method, path), scope in decisions.items():
        if scope == "predict":  # predict keys only read models and infer
            assert path.startswith(("/v1/models", "/v2", "/ui/models")) and method in ("GET", "POST"), path

    callers = {"no key": None, "an unknown key": "not-a-key", **TOKENS}
    for (method, path), needed in sorted(decisions.items(), key=str):
        for who, token in callers.items():
            response = client.request(method, concrete(path), headers=bearer(token), follow_redirects=False,
                                      json={} if method == "POST" and path != "/ui/key" else None)
            scope = who if who in SCOPES else None
            if needed is None or (scope and needed in REACHES[scope]):
                assert response.status_code not in (401, 403), (method, path, who, response.text)
            else:
                assert response.status_code == (403 if scope else 401), (method, path, who, response.text)
                if scope and not path.startswith("/ui"):
                    assert f"scope {needed!r}" in detail(response) and TOKENS[scope] not in response.text


def test_the_edge_tells_from_the_path_every_route_that_needs_a_key_and_every_capped_kind(tmp_path, monkeypatch):
    """app/edge.py decides before routing, from the path alone, whether a request needs a key (401 before its
    body is read) and which kind of request in flight it is: a new route must not fall between the two."""
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS=SCOPED_KEYS)
    routes = [r for r in iter_route_contexts(client.app.routes) if isinstance(r.original_route, APIRoute)]
    for route in routes:
        path, [decision] = concrete(route.path), scope_decisions(route)
        assert needs_key(path) == (decision is not None and not path.startswith("/ui")), route.path
        for method in route.methods:
            kinds = [kind for kind, capped_method, pattern, *_ in CAPPED
                     if capped_method == method and pattern.fullmatch(path)]
            expected = {"/predict": "predict", "/infer": "predict", "/events": "stream"}.get(path[path.rfind("/"):])
            expected = "upload" if (method, path) == ("POST", "/v1/datasets") else expected
            assert kinds == ([expected] if expected else []), (method, route.path, kinds)


def test_api_keys_format_and_clear_errors_that_never_quote_a_token():
    keys = parse_api_keys(" bare , p1:predict, t1:train:team-b,,w1:worker:ops ")
    assert [(k.token, k.scope, k.tenant) for k in keys] == [
        ("bare", "admin", DEFAULT_TENANT), ("p1", "predict", DEFAULT_TENANT), ("t1", "train", "team-b"),
        ("w1", "worker", "ops")]
    assert "bare" not in repr(keys)
    bad = {
        "good1,secret-one:trainer": "entry 2: the scope must be one of predict, train, admin, worker",
        "secret-one:admin:default:x": "entry 1: use TOKEN, TOKEN:SCOPE or TOKEN:SCOPE:TENANT",
        ":predict": "entry 1: the token is empty",
        "secret-one:admin:../etc": "entry 1: a tenant is 1 to 64 letters",
        "secret-one,secret-one:predict": "entry 2: its token is also in an earlier entry",
    }
    from pydantic import ValidationError

    for value, message in bad.items():
        with pytest.raises(ValidationError) as raised:
            Settings(api_keys=value)
        assert message in str(raised.value) and "secret-one" not in str(raised.value), str(raised.value)


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    """No early exit: compare_digest runs once per configured key, wherever the match is, or if there is none,
    on values of one length whatever the keys' lengths."""
    keys = parse_api_keys("first-key, second-key:train:b, third-key:predict")
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for given, expected in (("first-key", keys[0]), ("third-key", keys[2]), ("nobody", None), ("", None),
                            ("ключ", None)):
        calls.clear()
        assert known_key(keys, given) == expected
        assert len(calls) == len(keys) and {(len(a), len(b)) for a, b in calls} == {(32, 32)}, given


# --- tenants ---------------------------------------------------------------------------------


def test_a_tenant_sees_and_touches_only_its_own(tmp_path, monkeypatch, trained_model_dir):
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS="key-a:admin:a, key-b:admin:b")
    settings = client.app.state.core.settings
    a, b = bearer("key-a"), bearer("key-b")
    dataset = client.post("/v1/datasets", files={"file": ("mine.npz", digits_npz())}, headers=a).json()["id"]
    job = client.post("/v1/jobs", json={"dataset": dataset, "name": "secret-a"}, headers=a).json()["id"]
    register_model(settings, trained_model_dir, tenant="a")  # a's "digits" version 1

    own = [f"/v1/datasets/{dataset}", f"/v1/jobs/{job}", f"/v1/jobs/{job}/metrics", "/v1/models/digits",
           "/v1/models/digits/versions/1/predict", "/v2/models/digits", "/v2/models/digits/versions/1",
           "/v2/models/digits/ready", "/v2/models/digits/versions/1/ready", "/v2/models/digits/infer",
           f"/ui/jobs/{job}", "/ui/models/digits"]
    for path in own:
        method, body = ("POST", {"inputs": digits_rows(1)} if path.startswith("/v1") else INFER) if (
            path.endswith(("predict", "infer"))) else ("GET", None)
        assert client.request(method, path, json=body, headers=a).status_code == 200, path
        refused = client.request(method, path, json=body, headers=b)
        assert refused.status_code == 404 and "secret-a" not in refused.text, (path, refused.text)
    for path in (f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/cancel"):
        assert client.request("GET" if path.endswith("events") else "POST", path, headers=b).status_code == 404
    for path in (f"/v1/datasets/{dataset}", f"/v1/jobs/{job}", "/v1/models/digits/versions/1"):
        assert client.delete(path, headers=b).status_code == 404, path

    # Listings leave the other tenant's out, in the API and on the dashboard.
    assert client.get("/v1/datasets", headers=b).json()["total"] == 0
    assert client.get("/v1/jobs", headers=b).json()["total"] == 0
    assert client.get("/v1/models", headers=b).json() == []
    for page in ("/ui/jobs", "/ui/models", "/ui/datasets"):
        shown = client.get(page, headers=b)
        assert shown.status_code == 200 and job not in shown.text and dataset not in shown.text, page
    assert job in client.get("/ui/jobs", headers=a).text

    # b cannot train on a's upload, nor reach a's job through a's Idempotency-Key, nor learn that a used it:
    # keys are per tenant, so b's key makes b's own job.
    assert client.post("/v1/jobs", json={"dataset": dataset}, headers=b).status_code == 422
    first = client.post("/v1/jobs", json={"dataset": "digits"}, headers={**a, "Idempotency-Key": "k-1"})
    own = client.post("/v1/jobs", json={"dataset": "digits"}, headers={**b, "Idempotency-Key": "k-1"})
    assert own.status_code == 202 and first.json()["id"] not in own.text
    assert client.get(f"/v1/jobs/{own.json()['id']}", headers=a).status_code == 404

    # Model names are per tenant: b's own "digits" is its version 1, a different model from a's.
    register_model(settings, trained_model_dir, tenant="b")
    mine, theirs = (client.get("/v1/models/digits", headers=h).json()["versions"] for h in (a, b))
    assert [v["version"] for v in mine] == [v["version"] for v in theirs] == [1]
    assert mine[0]["job_id"] != theirs[0]["job_id"]


# --- documentation -------------------------------------------------------------------------


@pytest.mark.parametrize("env, open_", [
    ({}, True),
    ({"AL_ENVIRONMENT": "production", "AL_API_KEYS": "k"}, False),
    ({"AL_ENVIRONMENT": "production", "AL_API_KEYS": "k", "AL_DOCS": "1"}, True),
    ({"AL_DOCS": "0"}, False),
])
def test_docs_follow_al_docs_and_are_closed_in_production(tmp_path, monkeypatch, env, open_):
    client = make_client(tmp_path, monkeypatch, **env)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == (200 if open_ else 404), path
    assert client.get("/v2/health/live").status_code == 200


# --- quotas ----------------------------------------------------------------------------------


def test_queued_jobs_past_the_quota_get_429_with_retry_after(tmp_path, monkeypatch):
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS="key-a:train:a, key-b:train:b",
                         AL_MAX_QUEUED_JOBS="2")
    a, b = bearer("key-a"), bearer("key-b")
    jobs = [client.post("/v1/jobs", json={"dataset": "digits"}, headers=a) for _ in range(2)]
    assert [j.status_code for j in jobs] == [202, 202]
    full = client.post("/v1/jobs", json={"dataset": "digits"}, headers=a)
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert "2 queued jobs" in detail(full) and "AL_MAX_QUEUED_JOBS" in detail(full)
    assert client.post("/v1/jobs", json={"dataset": "digits"}, headers=b).status_code == 202  # per tenant
    client.post(f"/v1/jobs/{jobs[0].json()['id']}/cancel", headers=a)
    assert client.post("/v1/jobs", json={"dataset": "digits"}, headers=a).status_code == 202


def test_an_upload_past_the_disk_quota_gets_507_and_leaves_nothing(tmp_path, monkeypatch):
    upload = digits_npz()
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS="key-a:admin:a, key-b:admin:b",
                         AL_DISK_QUOTA_BYTES=str(int(len(upload) * 1.5)))
    a, b = bearer("key-a"), bearer("key-b")
    first = client.post("/v1/datasets", files={"file": ("one.npz", upload)}, headers=a)
    assert first.status_code == 201
    datasets_dir = tmp_path / "data" / "datasets"
    before = sorted(p.name for p in datasets_dir.rglob("*") if p.is_file())
    over = client.post("/v1/datasets", files={"file": ("two.npz", upload)}, headers=a)
    assert over.status_code == 507 and "disk quota" in detail(over) and "AL_DISK_QUOTA_BYTES" in detail(over)
    assert sorted(p.name for p in datasets_dir.rglob("*") if p.is_file()) == before
    assert client.get("/v1/datasets", headers=a).json()["total"] == 1
    assert client.post("/v1/datasets", files={"file": ("b.npz", upload)}, headers=b).status_code == 201
    assert client.delete(f"/v1/datasets/{first.json()['id']}", headers=a).status_code == 204
    assert client.post("/v1/datasets", files={"file": ("two.npz", upload)}, headers=a).status_code == 201


# --- deletes -------------------------------------------------------------------------------


def test_deletes_refuse_while_in_use_and_free_the_disk(tmp_path, monkeypatch, trained_model_dir):
    client = make_client(tmp_path, monkeypatch)  # no keys: the default tenant's admin
    core = client.app.state.core
    data_dir, store = core.settings.data_dir, core.store

    # A dataset that a job has not finished with stays, file and all.
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz())}).json()["id"]
    path = data_dir / store.get_dataset(DEFAULT_TENANT, dataset).path
    job = client.post("/v1/jobs", json={"dataset": dataset}).json()["id"]
    in_use = client.delete(f"/v1/datasets/{dataset}")
    assert in_use.status_code == 409 and job in detail(in_use) and path.is_file()
    assert client.delete("/v1/datasets/digits").status_code == 400

    # A job that has not finished stays too: queued, running, cancelling.
    assert client.delete(f"/v1/jobs/{job}").status_code == 409
    owner = store.take_lease(job, "test-worker", 60).owner
    checkpoint = data_dir / "jobs" / job / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"\0" * 1000)
    assert client.delete(f"/v1/jobs/{job}").status_code == 409
    client.post(f"/v1/jobs/{job}/cancel")
    refused = client.delete(f"/v1/jobs/{job}")
    assert refused.status_code == 409 and "cancelling" in detail(refused)
    assert store.finish(job, owner, "cancelled")
    assert client.delete(f"/v1/datasets/{dataset}").status_code == 204 and not path.exists()
    assert client.get(f"/v1/datasets/{dataset}").status_code == 404
    assert client.delete(f"/v1/jobs/{job}").status_code == 204 and not checkpoint.parent.exists()
    assert client.get(f"/v1/jobs/{job}").status_code == 404
    assert client.get(f"/v1/jobs/{job}/metrics").status_code == 404

    # A model version: the job that made it waits for it; once deleted it answers nothing, at once.
    made_by = register_model(core.settings, trained_model_dir)
    model_dir = data_dir / store.get_model(DEFAULT_TENANT, "digits", 1).path
    assert client.post("/v1/models/digits/predict", json={"inputs": digits_rows(1)}).status_code == 200  # cached
    waits = client.delete(f"/v1/jobs/{made_by}")
    assert waits.status_code == 409 and "/v1/models/digits/versions/1" in detail(waits)
    assert client.delete("/v1/models/digits/versions/1").status_code == 204 and not model_dir.exists()
    assert client.post("/v1/models/digits/predict", json={"inputs": digits_rows(1)}).status_code == 404
    assert client.post("/v2/models/digits/versions/1/infer", json=INFER).status_code == 404
    assert client.delete("/v1/models/digits/versions/1").status_code == 404
    assert client.delete(f"/v1/jobs/{made_by}").status_code == 204
    assert not (data_dir / "jobs" / made_by).exists()


# --- a real run: scopes end to end, and no key in any log line ------------------------------------------------


def test_a_real_run_never_logs_a_key(tmp_path):
    """`al serve` (API and worker) with every kind of key, sent every way a client may: as a bearer header,
    through the dashboard's key form (its session then holds no key) and in an old `?key=` link (which the
    dashboard no longer reads); a wrong key too. Its log holds none of them, nor does the session cookie."""
    keys = {**TOKENS, "other": "other-tenant-Kp27"}
    env = service_env(tmp_path / "data", None, AL_API_KEYS=f"{SCOPED_KEYS},{keys['other']}:admin:other")
    port = free_port()
    server = start_server(env, tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            train_key, predict_key, admin_key = (bearer(keys[s]) for s in ("train", "predict", "admin"))
            dataset = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz())}, headers=train_key)
            assert dataset.status_code == 201, dataset.text
            spec = {"dataset": dataset.json()["id"], "name": "logged", "model": TINY_MODEL,
                    "training": {"epochs": 1, "batch_size": 128}}
            job = client.post("/v1/jobs", json=spec, headers=train_key).json()["id"]
            wait_for(lambda: client.get(f"/v1/jobs/{job}", headers=train_key).json()["status"] == "succeeded",
                     120, "the job")
            predicted = client.post("/v1/models/logged/predict", json={"inputs": digits_rows(1)}, headers=predict_key)
            assert predicted.status_code == 200
            assert client.delete("/v1/models/logged/versions/1", headers=train_key).status_code == 403
            assert client.get("/v1/models/logged", headers=bearer(keys["other"])).status_code == 404
            assert client.get("/v1/jobs", headers=bearer(keys["worker"])).status_code == 403
            assert client.get("/v1/jobs", headers=bearer("wrong-key-Jh55")).status_code == 401
            assert client.get(f"/ui/jobs?key={keys['admin']}").status_code == 401  # the key form; not logged in
            assert client.get("/v1/jobs").status_code == 401
            assert dashboard_login(client, keys["predict"], "/ui/models").status_code == 303
            assert "logged" in client.get("/ui/models").text
            assert not [name for name, token in keys.items() if token in str(client.cookies.jar)]
            copy = tmp_path / "data" / "models" / DEFAULT_TENANT / "logged" / "1"
            assert copy.is_dir()
            assert client.delete("/v1/models/logged/versions/1", headers=admin_key).status_code == 204
            assert not copy.exists()
            assert client.delete(f"/v1/jobs/{job}", headers=admin_key).status_code == 204
        assert not (tmp_path / "data" / "jobs" / job).exists()  # the worker's checkpoint, freed
    finally:
        server.stop()
    log = server.output()
    assert f"job {job}: succeeded" in log and "GET /ui/jobs?key=<hidden>" in log  # the worker's and uvicorn's
    leaked = [name for name, token in {**keys, "wrong": "wrong-key-Jh55"}.items() if token in log]
    assert not leaked, f"keys in the log: {leaked}"



def test_artifacts_are_for_worker_keys_within_the_data_directory_and_registered_versions_never_change(
        tmp_path, monkeypatch, trained_model_dir):
    client = make_client(tmp_path, monkeypatch, AL_API_KEYS=SCOPED_KEYS)
    worker = bearer(TOKENS["worker"])
    store = client.app.state.core.store
    job, _ = store.create_job(DEFAULT_TENANT, "j", {"dataset": "digits"}, make_config().to_dict(), None, None)
    lease = store.take_lease(job.id, "attempt-1", 60).owner  # a job's files are written by the attempt holding it
    stored = client.put(f"/v1/artifacts/jobs/{job.id}/checkpoint.pt", content=b"state",
                        headers={**worker, "AL-Lease": lease})
    assert stored.status_code == 204, stored.text
    assert client.get(f"/v1/artifacts/jobs/{job.id}/checkpoint.pt", headers=worker).content == b"state"
    assert client.get(f"/v1/artifacts/jobs/{job.id}/checkpoint.pt", headers=bearer(TOKENS["admin"])).status_code == 403
    assert client.get("/v1/artifacts/jobs/job_2/checkpoint.pt", headers=worker).status_code == 404
    for key in ("al.db", "jobs/../al.db", "jobs/job_1/.checkpoint.pt.tmp", "broker/queue/x", "jobs"):
        refused = client.put(f"/v1/artifacts/{key}", content=b"x", headers=worker)
        assert refused.status_code in (400, 404), (key, refused.text)  # 404: a path the router never matches
    assert not (tmp_path / "data" / "broker" / "queue" / "x").exists()

    register_model(Settings(), trained_model_dir)  # version 1 of "digits"
    refused = client.put("/v1/artifacts/models/default/digits/1/model.safetensors", content=b"x", headers=worker)
    assert refused.status_code == 409 and "never change" in detail(refused)
    assert client.put("/v1/artifacts/models/default/digits/2/model.safetensors", content=b"x",
                      headers=worker).status_code == 204  # not registered yet: a registration uploads it first
