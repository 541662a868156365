"""The model registry's files: a registered version is a copy of its job's model directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from al.checkpoint import copy_model
from service.artifacts import LocalArtifacts


def published_copy(artifacts: LocalArtifacts, job_id: str, tenant: str) -> Callable[[str, int], str]:
    """Store.finish's `publish`: the registered version is a copy of the job's model files under
    models/<tenant>/<name>/<version> (names are per tenant), in this host's data directory and in the artifact
    store, that no later write to the job's directory (a stale attempt, say) can change."""
    def publish(name: str, version: int) -> str:
        key = f"models/{tenant}/{name}/{version}"
        destination = artifacts.path(key)
        # Left by a registration whose commit failed: that version number was never registered.
        shutil.rmtree(destination, ignore_errors=True)
        copy_model(artifacts.path(f"jobs/{job_id}"), destination)
        artifacts.push_model(key)
        return key

    return publish
