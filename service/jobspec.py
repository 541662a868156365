"""A job spec's mapping to the arguments of al.run.train: the API checks a spec with it when the job
is submitted, and the worker trains the job with what it returns."""

from __future__ import annotations


def pipeline_workers(spec: dict) -> int:
    """How many workers train the job at once: one per stage of a `processes` pipeline that asks for them."""
    return int((spec.get("pipeline") or {}).get("workers") or 1)


def training_arguments(spec: dict) -> tuple[dict, dict]:
    """The job spec's model and training dicts as al.run.train takes them (ValueError if they conflict)."""
    training = dict(spec.get("training") or {})
    if spec.get("method"):
        training["method"] = spec["method"]
    pipeline = dict(spec.get("pipeline") or {})
    mode, devices = pipeline.pop("mode", "sequential"), pipeline.pop("devices", None)
    workers = pipeline.pop("workers", None)
    if workers is not None and mode != "processes":
        raise ValueError("pipeline.workers applies to the processes mode only")
    if workers is not None and devices and len(devices) != workers:
        raise ValueError(f"pipeline.devices names {len(devices)} devices for {workers} workers: one per worker")
    if mode == "sequential":
        if pipeline:
            raise ValueError(f"pipeline {', '.join(sorted(pipeline))} apply to the threads and processes modes only")
        if devices and len(devices) > 1:
            raise ValueError("sequential mode trains on one device; name one, or use mode threads or processes")
        if devices:
            if training.get("device", devices[0]) != devices[0]:
                raise ValueError("training.device and pipeline.devices disagree")
            training["device"] = devices[0]
    else:  # TrainConfig's pipeline fields (al/config.py)
        training.update(pipeline, pipeline=mode, devices=devices)
    return dict(spec.get("model") or {}), training
