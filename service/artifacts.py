"""The artifact store: datasets, job checkpoints and registered model versions, each a file under a key.

A key is the file's path relative to the data directory, the one the job store records:
datasets/<id>.<ext>, jobs/<job>/<file>, models/<tenant>/<name>/<version>/<file>. Every host keeps
the files it uses as local files, so the rest of the service reads and writes local files; the store
decides what moves between hosts. AL_ARTIFACTS_URL chooses it:

- unset: this host's data directory is the store (one host, or a filesystem that every host mounts);
  nothing moves.
- http(s)://API-HOST:PORT: the API's data directory is the store. A worker on another host fetches
  and uploads through the API's /v1/artifacts routes (app/api/routes/artifacts.py), with the
  worker-scoped key in AL_API_KEY, as MLflow's artifact proxy does. Its copies live under
  data_dir/cache, which the reconciler trims (service/cache.py); a model version's copy goes once uploaded.

Each upload replaces its file atomically on the API's side, and a job's checkpoint goes up after its
model files: the latest checkpoint there is always a whole one, from the epoch it names. A job's files go
up with the lease of the attempt that wrote them, and the API refuses them from any other attempt.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx

from al.checkpoint import MODEL_FILES, OPTIONAL_MODEL_FILES, TRAINING_STATE, replace_atomically
from service.settings import Settings

# Top folders of the keys, and the characters of a key's parts: what the API's routes accept, nothing
# that could leave the data directory ("..", an absolute path) or name a temporary file (a leading ".").
KINDS = ("datasets", "jobs", "models")
KEY_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
CHUNK = 1 << 20
CACHE_FOLDER = "cache"  # under a worker host's data directory: its copies (service/cache.py trims them)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per file moved


class ArtifactError(OSError):
    """An artifact could not be fetched or stored; the message names it and why. An OSError, like a full disk:
    the attempt fails (or, at registration, nothing is registered) and the job's checkpoint stays."""


MAX_VERSION = 2**31 - 1  # the largest version the store's integer column holds on both databases
LEASE_HEADER = "AL-Lease"  # a PUT into a job's folder names the attempt (its lease owner) that writes it


@dataclass(frozen=True)
class ArtifactKey:
    """A checked key: the file's path under the data directory, and what it belongs to."""

    path: str
    job: str | None = None  # jobs/<job>/...: that job's folder, written only by the attempt holding its lease
    model: tuple[str, str, int] | None = None  # models/<tenant>/<name>/<version>/...: a version's files


def parse_key(key: str) -> ArtifactKey:
    """What `key` names in the store; ValueError naming the problem if it names nothing there."""
    parts = key.split("/")
    if len(parts) < 2 or parts[0] not in KINDS or not all(KEY_PART.fullmatch(p) for p in parts):
        raise ValueError(f"{key!r} is not an artifact key: {'|'.join(KINDS)}/... with parts of letters, digits, "
                         "'.', '_' or '-', none starting with '.'")
    if parts[0] == "jobs":
        if len(parts) < 3:
            raise ValueError(f"{key!r} is not an artifact key: jobs/<job>/<file>")
        return ArtifactKey(key, job=parts[1])
    if parts[0] == "models":
        if len(parts) < 5 or not parts[3].isdigit() or not 1 <= int(parts[3]) <= MAX_VERSION:
            raise ValueError(f"{key!r} is not an artifact key: models/<tenant>/<name>/<version>/<file>, the version "
                             f"a whole number from 1 to {MAX_VERSION}")
        return ArtifactKey(key, model=(parts[1], parts[2], int(parts[3])))
    return ArtifactKey(key)


def job_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


STARTING_MODEL = "init_from"  # the folder, in a job's folder on a worker host, of the version it fine-tunes


class LocalArtifacts:
    """This host's data directory is the store: every method finds the file where it already is."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def path(self, key: str) -> Path:
        return self.data_dir / key

    def dataset(self, key: str, sha256: str | None) -> Path:
        """An uploaded dataset's file on this host."""
        return self.path(key)

    def model(self, key: str, job_id: str) -> Path:
        """A registered version's files on this host, for job `job_id`, which starts from them."""
        return self.path(key)

    def pull_job(self, job_id: str) -> None:
        """The job's directory as the store holds it, for an attempt to resume from."""

    def push_job(self, job_id: str, lease: str) -> None:
        """The job's model files, then its checkpoint, to the store (after every save), by the attempt holding
        `lease`; StaleAttempt if another attempt holds the job now."""

    def push_model(self, key: str) -> None:
        """A model version's files, once copied under `key`, to the store."""


class StaleAttempt(Exception):
    """The API refused a job's file: the attempt that wrote it no longer holds the job's lease. Not an
    ArtifactError: asking again cannot help."""


def dataset_copy_name(key: str, sha256: str | None) -> str:
    """A dataset's copy on a worker host, by content: a dataset uploaded twice, or used by many jobs, is fetched
    once per host."""
    return f"{sha256}{Path(key).suffix}" if sha256 else Path(key).name


class HttpArtifacts(LocalArtifacts):
    """The API's data directory is the store; this host keeps copies under data_dir/cache."""

    def __init__(self, data_dir: Path, url: str, token: str | None, timeout: float = 60.0):
        super().__init__(data_dir)
        self.cache = data_dir / CACHE_FOLDER
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=f"{self.url}/v1/artifacts/", headers=headers, timeout=timeout)

    def path(self, key: str) -> Path:
        return self.cache / key

    def dataset(self, key: str, sha256: str | None) -> Path:
        cached = self.cache / "datasets" / dataset_copy_name(key, sha256)
        if cached.is_file():
            os.utime(cached)  # used now: the cache keeps what was used last (service/cache.py)
        else:
            self._fetch(key, cached, sha256)
        return cached

    def model(self, key: str, job_id: str) -> Path:
        # A copy in the job's folder, which goes with it (service/cache.py); a version's files never change.
        copy = self.path(job_key(job_id, STARTING_MODEL))
        for name in MODEL_FILES:
            self._fetch(f"{key}/{name}", copy / name)
        for name in OPTIONAL_MODEL_FILES:
            if not self._fetch(f"{key}/{name}", copy / name, missing_ok=True):
                (copy / name).unlink(missing_ok=True)
        return copy

    def pull_job(self, job_id: str) -> None:
        # Files an earlier attempt left on this host may be older than the store's: the store's replace them,
        # and one the store lacks goes.
        for name in (*MODEL_FILES, *OPTIONAL_MODEL_FILES, TRAINING_STATE):
            local = self.path(job_key(job_id, name))
            if not self._fetch(job_key(job_id, name), local, missing_ok=True):
                local.unlink(missing_ok=True)

    def push_job(self, job_id: str, lease: str) -> None:
        for name in (*MODEL_FILES, *self._present(job_key(job_id, ""), OPTIONAL_MODEL_FILES), TRAINING_STATE):
            self._push(job_key(job_id, name), {LEASE_HEADER: lease})  # the checkpoint last: it names what resumes

    def push_model(self, key: str) -> None:
        try:
            for name in (*MODEL_FILES, *self._present(f"{key}/", OPTIONAL_MODEL_FILES)):
                self._push(f"{key}/{name}")
        finally:  # the store's copy is the registered version; this host never reads one
            shutil.rmtree(self.path(key), ignore_errors=True)

    def _fetch(self, key: str, destination: Path, sha256: str | None = None, missing_ok: bool = False) -> bool:
        """Whether the store has the file; it is at `destination` if so."""
        destination.parent.mkdir(parents=True, exist_ok=True)

        def download(tmp: Path) -> None:
            digest = hashlib.sha256()
            with self.client.stream("GET", key) as response, open(tmp, "wb") as out:
                self._check(response, key, "fetch")
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if sha256 and digest.hexdigest() != sha256:
                raise ArtifactError(f"artifact {key} from {self.url} does not match its SHA-256: damaged on the way")

        try:
            replace_atomically(destination, download)
            return True
        except _Missing:
            if not missing_ok:
                raise ArtifactError(f"artifact {key} is not in the store at {self.url}") from None
            return False
        except httpx.HTTPError as e:
            raise ArtifactError(f"cannot fetch artifact {key} from {self.url}: {e}") from None

    def _present(self, prefix: str, names: tuple[str, ...]) -> list[str]:
        """Those of `names` that this host holds under `prefix` (a text model's tokenizer, for one)."""
        return [name for name in names if self.path(prefix + name).is_file()]

    def _push(self, key: str, headers: dict[str, str] | None = None) -> None:
        try:
            with open(self.path(key), "rb") as f:
                self._check(self.client.put(key, content=iter(lambda: f.read(CHUNK), b""), headers=headers), key,
                            "store")
        except httpx.HTTPError as e:
            raise ArtifactError(f"cannot store artifact {key} at {self.url}: {e}") from None

    @staticmethod
    def _check(response: httpx.Response, key: str, verb: str) -> None:
        if response.status_code == 404 and verb == "fetch":
            raise _Missing
        if response.status_code == 409 and key.startswith("jobs/"):
            raise StaleAttempt(f"the API refused artifact {key}: {response.read().decode(errors='replace')[:300]}")
        if response.status_code >= 400:
            response.read()
            raise ArtifactError(f"cannot {verb} artifact {key}: {response.status_code} {response.text[:300]}")


class _Missing(Exception):
    """The store has no such file (an HTTP 404)."""


def artifacts_for(settings: Settings) -> LocalArtifacts:
    """The store AL_ARTIFACTS_URL names; one HTTP client per process and store, kept open for its connections."""
    if not settings.artifacts_url:
        return LocalArtifacts(settings.data_dir)
    return _http_artifacts(os.getpid(), settings.data_dir, settings.artifacts_url,
                           settings.api_key.get_secret_value() if settings.api_key else None)


@functools.lru_cache(maxsize=4)
def _http_artifacts(pid: int, data_dir: Path, url: str, token: str | None) -> HttpArtifacts:
    # By process: a forked worker child must not share its parent's connections.
    return HttpArtifacts(data_dir, url, token)
