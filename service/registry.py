"""The model registry's files: a registered version is a copy of its job's model directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from al.checkpoint import copy_model
from service.settings import Settings


def published_copy(settings: Settings, model_dir: Path, tenant: str) -> Callable[[str, int], str]:
    """Store.finish's `publish`: the registered version is a copy under models/<tenant>/<name>/<version> (names
    are per tenant) that no later write to the job's directory (a stale attempt, say) can change."""
    def publish(name: str, version: int) -> str:
        destination = settings.models_dir / tenant / name / str(version)
        # Left by a registration whose commit failed: that version number was never registered.
        shutil.rmtree(destination, ignore_errors=True)
        copy_model(model_dir, destination)
        return str(destination.relative_to(settings.data_dir))

    return publish
