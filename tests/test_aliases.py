"""Aliases and rollback (issue 23, part 2): over real HTTP against `al serve`, with keys of two tenants and
every scope. The alias `default` steers the requests that name no version (native and v2) and moving it back is
a rollback; v2 takes an alias in place of a version; a split alias shares its requests by weight; a version an
alias points to cannot be deleted; aliases follow tenants and scopes, survive a restart and show on the
dashboard. The store's side on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_support import TINY_MODEL, digits_rows, free_port, register_model, service_env, start_server, use_env
from test_service_store import database_url, new_job  # noqa: F401 - database_url is a fixture

from al.config import make_config
from al.run import train
from app import inference
from service.store import Conflict, Missing, Store

KEYS = {"admin": "vision-admin-Qw81", "train": "vision-train-Qw82", "predict": "vision-predict-Qw83",
        "other": "audio-admin-Zr55"}
API_KEYS = (f"{KEYS['admin']}:admin:vision,{KEYS['train']}:train:vision,{KEYS['predict']}:predict:vision,"
            f"{KEYS['other']}:admin:audio")
ROW = {"inputs": digits_rows(1)}
V2_ROW = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digits_rows(1)[0]}]}


class Service:
    """`al serve` (no worker: the versions are registered straight into its store) on a data directory that
    outlives the process, so that it can be restarted on the same database."""

    def __init__(self, tmp_path, model_dir):
        self.tmp_path, self.model_dir, self.port = tmp_path, model_dir, free_port()
        self.env = service_env(tmp_path / "data", None, AL_API_KEYS=API_KEYS, AL_EMBEDDED_WORKER="0")
        with pytest.MonkeyPatch.context() as patch:
            self.settings = use_env(patch, self.env)
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.process = start_server(self.env, self.tmp_path / f"serve-{self.starts}.log", self.port)

    def register(self, name: str, versions: int, tenant: str = "vision") -> None:
        for _ in range(versions):
            register_model(self.settings, self.model_dir, tenant, name)

    def client(self, key: str = "admin") -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30,
                            headers={"Authorization": f"Bearer {KEYS[key]}"})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model") / "digits"
    train("digits", model_dir, make_config(model=TINY_MODEL, training={"epochs": 1, "batch_size": 128,
                                                                       "device": "cpu"}))
    running = Service(tmp_path_factory.mktemp("service"), model_dir)
    yield running
    running.process.stop()


@pytest.fixture
def api(service):
    with service.client() as client:
        yield client


def answered(client: httpx.Client, path: str) -> int:
    """The version that answered one row: native predict's `version`, v2 infer's `model_version`."""
    response = client.post(path, json=V2_ROW if path.startswith("/v2") else ROW)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["version"] if "version" in body else int(body["model_version"])


def unversioned(client: httpx.Client, name: str) -> tuple[int, int]:
    """What a request that names no version gets, natively and through v2."""
    return answered(client, f"/v1/models/{name}/predict"), answered(client, f"/v2/models/{name}/infer")


def point(client: httpx.Client, name: str, alias: str, **body) -> dict:
    response = client.put(f"/v1/models/{name}/aliases/{alias}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response) -> str:
    body = response.json()
    return body.get("detail") or body.get("error")


def test_the_default_alias_steers_unversioned_requests_and_moving_it_back_is_a_rollback(service, api):
    service.register("rollback", 2)
    assert unversioned(api, "rollback") == (2, 2)  # no alias: the latest, as before aliases
    assert point(api, "rollback", "default", version=1)["versions"] == {"1": 1.0}
    assert unversioned(api, "rollback") == (1, 1)

    # A new version lands without reaching the clients, also after the routes are read again ...
    service.register("rollback", 1)
    assert api.get("/v1/models/rollback").json()["latest"] == 3
    assert unversioned(api, "rollback") == (1, 1)
    time.sleep(inference.ROUTES_TTL + 0.2)
    assert unversioned(api, "rollback") == (1, 1)
    # ... until the alias moves to it; moving it back is the rollback.
    point(api, "rollback", "default", version=3)
    assert unversioned(api, "rollback") == (3, 3)
    point(api, "rollback", "default", version=1)
    assert unversioned(api, "rollback") == (1, 1)
    assert api.get("/v2/models/rollback").json()["versions"] == ["1", "2", "3"]  # what may be asked for by number

    model = api.get("/v1/models/rollback").json()
    assert [(a["alias"], a["versions"]) for a in model["aliases"]] == [("default", {"1": 1.0})]
    page = api.get("/ui/models/rollback")  # the dashboard's model page, with the same key
    assert page.status_code == 200
    assert '<td class="aliases">default</td>' in page.text and "selected>alias default: v1</option>" in page.text

    deleted = api.delete("/v1/models/rollback/aliases/default")
    assert deleted.status_code == 204
    assert unversioned(api, "rollback") == (3, 3)  # the latest again
    assert api.delete("/v1/models/rollback/aliases/default").status_code == 404
    assert "selected>version 3</option>" in api.get("/ui/models/rollback").text


def test_a_version_an_alias_points_to_cannot_be_deleted(service, api):
    service.register("pinned", 3)
    point(api, "pinned", "default", version=2)
    point(api, "pinned", "canary", versions={"2": 0.5, "3": 0.5})
    refused = api.delete("/v1/models/pinned/versions/2")
    assert refused.status_code == 409 and "aliases 'canary', 'default'" in error(refused)
    refused = api.delete("/v1/models/pinned/versions/3")
    assert refused.status_code == 409 and "alias 'canary'" in error(refused)
    assert answered(api, "/v1/models/pinned/versions/3/predict") == 3  # nothing was deleted

    point(api, "pinned", "canary", version=1)
    assert api.delete("/v1/models/pinned/versions/3").status_code == 204
    assert api.post("/v1/models/pinned/versions/3/predict", json=ROW).status_code == 404
    assert api.delete("/v1/models/pinned/aliases/default").status_code == 204
    assert api.delete("/v1/models/pinned/versions/2").status_code == 204

    # An alias points only to versions that exist, takes shares that sum to 1, and is no number.
    missing = api.put("/v1/models/pinned/aliases/default", json={"versions": {"1": 0.5, "3": 0.5}})
    assert missing.status_code == 422 and "model 'pinned' has no version 3" in error(missing)
    for body, says in [({"versions": {"1": 0.5}}, "sum to 0.5"), ({"version": 1, "versions": {"1": 1}}, "one of"),
                       ({}, "one of"), ({"versions": {"1": 0}}, "greater than 0"),
                       ({"versions": {"x": 1}}, "pattern")]:
        refused = api.put("/v1/models/pinned/aliases/default", json=body)
        assert refused.status_code == 422 and says in error(refused), (body, refused.text)
    number = api.put("/v1/models/pinned/aliases/12", json={"version": 1})
    assert number.status_code == 422 and "is a number" in error(number)
    assert api.put("/v1/models/nothing/aliases/default", json={"version": 1}).status_code == 404
    assert [a["alias"] for a in api.get("/v1/models/pinned").json()["aliases"]] == ["canary"]


def test_v2_takes_an_alias_in_place_of_a_version(service, api):
    service.register("v2", 2)
    point(api, "v2", "stable", version=1)
    assert answered(api, "/v2/models/v2/versions/stable/infer") == 1
    assert answered(api, "/v2/models/v2/versions/2/infer") == 2  # numbers are still versions
    assert answered(api, "/v1/models/v2/aliases/stable/predict") == 1
    assert api.get("/v2/models/v2/versions/stable").json()["versions"] == ["1"]
    assert api.get("/v2/models/v2/versions/stable/ready").json() == {"name": "v2", "version": "stable",
                                                                     "ready": True}
    unknown = api.post("/v2/models/v2/versions/beta/infer", json=V2_ROW)
    assert unknown.status_code == 404 and "no alias 'beta'" in unknown.json()["error"]
    assert api.get("/v2/models/v2/versions/beta/ready").status_code == 404
    assert api.post("/v2/models/v2/versions/99999999999999999999/infer", json=V2_ROW).status_code == 400


def test_aliases_follow_scopes_and_tenants(service, api):
    service.register("shared", 2)
    service.register("shared", 1, tenant="audio")
    with service.client("predict") as predict, service.client("train") as trainer, \
            service.client("other") as other:
        for client in (predict, trainer):  # only admin keys point and delete aliases
            refused = client.put("/v1/models/shared/aliases/default", json={"version": 1})
            assert refused.status_code == 403 and "scope 'admin'" in error(refused)
        point(api, "shared", "default", version=1)
        point(api, "shared", "canary", version=2)
        assert predict.delete("/v1/models/shared/aliases/canary").status_code == 403
        # A predict key reads aliases and predicts with them.
        assert [a["alias"] for a in predict.get("/v1/models/shared").json()["aliases"]] == ["canary", "default"]
        assert unversioned(predict, "shared") == (1, 1)
        assert answered(predict, "/v1/models/shared/aliases/canary/predict") == 2

        # The other tenant's "shared" is another model: vision's aliases are nowhere in it.
        assert other.get("/v1/models/shared").json()["aliases"] == []
        assert all(m["aliases"] == [] for m in other.get("/v1/models").json())
        assert unversioned(other, "shared") == (1, 1)  # its own latest
        assert other.post("/v1/models/shared/aliases/canary/predict", json=ROW).status_code == 404
        assert other.post("/v2/models/shared/versions/canary/infer", json=V2_ROW).status_code == 404
        assert other.delete("/v1/models/shared/aliases/canary").status_code == 404
        assert other.put("/v1/models/shared/aliases/canary", json={"version": 2}).status_code == 422  # it has 1
        assert other.put("/v1/models/rollback/aliases/default", json={"version": 1}).status_code == 404
        point(other, "shared", "canary", version=1)
        assert answered(predict, "/v1/models/shared/aliases/canary/predict") == 2  # vision's is unmoved
        assert other.delete("/v1/models/shared/aliases/canary").status_code == 204
        assert answered(predict, "/v1/models/shared/aliases/canary/predict") == 2


def test_aliases_survive_a_restart(service, api):
    service.register("durable", 2)
    point(api, "durable", "default", version=1)
    point(api, "durable", "canary", versions={"1": 0.25, "2": 0.75})
    before = api.get("/v1/models/durable").json()["aliases"]
    service.process.stop()
    service.start()  # the same data directory and database
    with service.client("predict") as predict:
        assert predict.get("/v1/models/durable").json()["aliases"] == before
        assert list(before[0]["versions"].items()) == [("2", 0.75), ("1", 0.25)]  # the largest share first
        assert unversioned(predict, "durable") == (1, 1)
        assert answered(predict, "/v2/models/durable/versions/canary/infer") in (1, 2)


def versions_answering(port: int, paths: list[str], connections: int = 16) -> Counter:
    """The versions that answered one request per path, over `connections` kept-alive connections at once
    (http.client in threads: about 5 times the requests per second of httpx's AsyncClient, whose own work
    would otherwise take most of the test's time)."""
    headers = {"Authorization": f"Bearer {KEYS['predict']}", "Content-Type": "application/json"}
    bodies = {path: json.dumps(V2_ROW if path.startswith("/v2") else ROW) for path in set(paths)}

    def send(share: list[str]) -> list[int]:
        connection, versions = http.client.HTTPConnection("127.0.0.1", port, timeout=60), []
        for path in share:
            connection.request("POST", path, bodies[path], headers)
            response = connection.getresponse()
            body = json.loads(response.read())
            assert response.status == 200, body
            versions.append(body["version"] if "version" in body else int(body["model_version"]))
        connection.close()
        return versions

    with ThreadPoolExecutor(connections) as pool:
        return Counter(v for share in pool.map(send, [paths[i::connections] for i in range(connections)])
                       for v in share)


def test_a_split_alias_shares_its_requests_by_weight(service, api):
    """2,000 requests, native and v2 in turn, to a canary that sends 10 % to version 2: version 2's count is
    binomial (n = 2000, p = 0.1), sd = sqrt(n p (1 - p)) = 13.4; it must lie within 4 sd of n p = 200 (a correct
    split fails this about once in 16,000 runs; one that ignores the weights, never sends there, or splits
    evenly, always)."""
    service.register("split", 2)
    assert point(api, "split", "canary", versions={"1": 0.9, "2": 0.1})["versions"] == {"1": 0.9, "2": 0.1}
    n, p = 2000, 0.1
    paths = ["/v1/models/split/aliases/canary/predict", "/v2/models/split/versions/canary/infer"] * (n // 2)
    counts = versions_answering(service.port, paths)
    assert set(counts) == {1, 2} and sum(counts.values()) == n
    tolerance = 4 * math.sqrt(n * p * (1 - p))
    assert abs(counts[2] - n * p) <= tolerance, f"version 2 answered {counts[2]} of {n}; expected {n * p} ± " \
                                                f"{tolerance:.0f}"
    point(api, "split", "default", versions={"1": 0.5, "2": 0.5})  # the default may be a split too
    assert set(versions_answering(service.port, ["/v1/models/split/predict"] * 64)) == {1, 2}


# --- the store: SQLite and PostgreSQL ---------------------------------------------------------------------


def test_the_store_keeps_aliases_per_tenant_and_holds_their_versions(database_url):  # noqa: F811
    store = Store(database_url)
    store.create_tables()
    for tenant in ("a", "a", "b"):
        job = new_job(store, "m", tenant=tenant)
        owner = store.take_lease(job.id, "w", 60).owner
        assert store.finish(job.id, owner, "succeeded", publish=lambda name, version, job=job: f"jobs/{job.id}")
    store.set_alias("a", "m", "default", {1: 1.0})
    store.set_alias("a", "m", "canary", {1: 0.2, 2: 0.8})
    with pytest.raises(Missing, match="no version 2"):
        store.set_alias("b", "m", "default", {1: 0.5, 2: 0.5})
    assert store.list_aliases("b") == []
    aliases = {a.alias: a.versions for a in store.list_aliases("a", "m")}
    assert aliases == {"canary": {2: 0.8, 1: 0.2}, "default": {1: 1.0}} and list(aliases["canary"]) == [2, 1]
    with pytest.raises(Conflict, match="aliases 'canary', 'default'"):
        store.delete_model("a", "m", 1)
    store.set_alias("a", "m", "canary", {2: 1.0})  # in place of what it pointed to
    assert store.delete_alias("a", "m", "default") and not store.delete_alias("a", "m", "default")
    assert store.delete_model("a", "m", 1).version == 1
    assert [(a.alias, a.versions) for a in store.list_aliases("a")] == [("canary", {2: 1.0})]
    store.engine.dispose()
