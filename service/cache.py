"""A worker host's copies of the artifact store's files (AL_ARTIFACTS_URL set: service/artifacts.py keeps them under
data_dir/cache). Every reconciler pass trims them (worker/reconcile.py), so deletes reach every host and the disk
stays within AL_CACHE_BYTES:

- a job's folder goes once no attempt runs the job (a later attempt fetches the store's files anyway), so a
  finished or deleted job leaves nothing behind;
- a dataset's copy goes once the store no longer has the dataset (it was deleted);
- then, while the copies take more than AL_CACHE_BYTES, the least recently used datasets go.

What a running job uses stays, and so does whatever was used in the last `grace` seconds: a job that has just taken
its lease may open a copy before the store's list of running jobs shows it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from service.artifacts import dataset_copy_name
from service.store import Store

log = logging.getLogger(__name__)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def last_used(path: Path) -> float:
    """A copy is used when it is written or opened for a job (HttpArtifacts.dataset touches it)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def entries(folder: Path) -> list[Path]:
    """The copies in a folder, less files being written (a leading '.': al/checkpoint.py, replace_atomically)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def trim_cache(store: Store, cache: Path, cap_bytes: int, grace: float) -> list[str]:
    """Trim the copies under `cache`; the keys of those removed."""
    idle_since = time.time() - grace
    removed = []
    running = store.running_job_ids()
    for folder in entries(cache / "jobs"):
        if folder.name not in running and last_used(folder) < idle_since:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"jobs/{folder.name}")
    copies = {p.name: p for p in entries(cache / "datasets")}
    stored = {dataset_copy_name(r.path, r.sha256) for r in store.datasets_with(
        {Path(name).stem for name in copies}, {f"datasets/{name}" for name in copies})}
    in_training = {dataset_copy_name(r.path, r.sha256) for r in store.datasets_in_training()}
    for name in set(copies) - stored - in_training:  # deleted from the store
        copies.pop(name).unlink(missing_ok=True)
        removed.append(f"datasets/{name}")
    total = sum(size_of(p) for p in [*copies.values(), *entries(cache / "jobs")])
    for name, copy in sorted(copies.items(), key=lambda item: last_used(item[1])):
        if total <= cap_bytes:
            break
        if name in in_training or last_used(copy) >= idle_since:
            continue
        total -= size_of(copy)
        copy.unlink(missing_ok=True)
        removed.append(f"datasets/{name}")
    if removed:
        log.info("cache: removed %s", ", ".join(removed))
    return removed
