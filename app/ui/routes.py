"""The dashboard at /ui: pages rendered here (Jinja2, autoescaped), whose scripts call the API and follow
jobs over its SSE stream. With AL_API_KEYS set, a page without a known key shows the key form only; a page
shows the key's tenant's data, and only if the key's scope reaches what the API asks for the same data. The key
form logs a session in (app/edge.py: a signed cookie that holds the key's id, never the key)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, get_args
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader

from al import __version__
from al.checkpoint import read_model_info
from al.config import ARCHS, METHODS, PRESETS
from al.data import BUILTIN_DATASETS, TEXT
from app.api.deps import Caller, Core, CoreDep, caller_of, public, reaches, scope_refused
from app.api.routes.datasets import dataset_public
from app.api.routes.jobs import job_public
from app.api.routes.models import version_public
from app.api.routes.studies import study_public
from app.edge import csrf_matches, csrf_token
from app.inference import DEFAULT_ALIAS
from service.jobspec import JobCreate, PipelineSpec
from service.store import Alias, ModelRow

HERE = Path(__file__).parent
# Every page carries its session's CSRF token: the key form posts it, the scripts send it (X-CSRF-Token).
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True),
                            context_processors=[lambda request: {"csrf": csrf_token(request.session)}])
templates.env.globals["version"] = __version__
PIPELINE_MODES = get_args(PipelineSpec.model_fields["mode"].annotation)
PAGE = 100  # jobs listed, and offered to compare with


class Gate(Exception):
    """Stops a page before it reads any data: the key form, or the page that says the scope falls short."""

    def __init__(self, response: Response):
        self.response = response


def key_form(request: Request, target: str, error: str | None = None, status_code: int = 401) -> HTMLResponse:
    return templates.TemplateResponse(request, "key.html", {"target": target, "error": error},
                                      status_code=status_code)


def page_scope(scope: str):
    """A page's scope decision, as app/api/deps.py's `require` is a route's, on the caller app/edge.py found
    (the dashboard's session or a bearer header): without one the page is the key form, with one whose scope
    falls short it says what is missing."""

    async def caller(request: Request) -> Caller:
        who = caller_of(request)
        if who is None:
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "key"])  # old links
            raise Gate(key_form(request, request.url.path + (f"?{query}" if query else "")))
        if not reaches(who, scope):
            raise Gate(page(request, "refused.html", 403, message=scope_refused(who, scope)))
        return who

    caller.scope = scope
    return caller


PredictPage = Annotated[Caller, Depends(page_scope("predict"))]
TrainPage = Annotated[Caller, Depends(page_scope("train"))]
router = APIRouter(prefix="/ui", include_in_schema=False)


@router.post("/key", dependencies=[Depends(public)])
def submit_key(request: Request, core: CoreDep, key: Annotated[str, Form(max_length=1024)],
               csrf: Annotated[str, Form(max_length=256)] = "",
               target: Annotated[str, Form(max_length=2048)] = "/ui/jobs") -> Response:
    """The key form's answer: the session then holds the key's id (never the key), and a new CSRF token. Only
    with the token of the form this session was shown, so another site cannot log a browser in as its key."""
    if not target.startswith("/ui/") or target.startswith("//"):  # only back into the dashboard
        target = "/ui/jobs"
    if not csrf_matches(request.session, csrf):
        return key_form(request, target, "this form has expired or came from another site: enter the key again",
                        403)
    found = core.keyring.find(key)
    if found is None:
        return key_form(request, target, "unknown key")
    request.session.clear()  # a new session for the new key: nothing of the one before carries over
    request.session["key"] = core.keyring.id_of(found)
    return RedirectResponse(target, 303)


def page(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def dataset_choices(core: Core, caller: Caller) -> list[dict]:
    uploads, _ = core.store.list_datasets(caller.tenant, PAGE, 0)
    return [{"id": name, "label": f"{name} (built-in)"} for name in BUILTIN_DATASETS] + [
        {"id": row.id, "label": f"{row.name} ({row.id})"} for row in uploads]


@router.get("", dependencies=[Depends(public)])
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", 303)


@router.get("/jobs")
def jobs_page(request: Request, caller: TrainPage, core: CoreDep) -> HTMLResponse:
    rows, total = core.store.list_jobs(caller.tenant, None, PAGE, 0)
    return page(request, "jobs.html", active="jobs", total=total, datasets=dataset_choices(core, caller),
                archs=ARCHS, methods=METHODS, presets=list(PRESETS), modes=PIPELINE_MODES,
                default_preset=JobCreate.model_fields["preset"].default,
                data={"jobs": [job_public(r).model_dump() for r in rows]})


@router.get("/jobs/{job_id}")
def job_page(request: Request, caller: TrainPage, core: CoreDep, job_id: str) -> HTMLResponse:
    row = core.store.get_job(job_id, caller.tenant)
    if row is None:
        return page(request, "missing.html", 404, active="jobs", message=f"There is no job {job_id!r}.")
    job = job_public(row)
    others = [j for j in core.store.list_jobs(caller.tenant, None, PAGE, 0)[0] if j.id != job_id]
    return page(request, "job.html", active="jobs", job=job, spec=json.dumps(job.spec, indent=2),
                others=others, data={"job": job.model_dump()})


def canvas_spec(core: Core, config: dict, row: ModelRow) -> dict | None:
    """A drawing canvas for image models: [1, H, W], or a square row of a digits/MNIST-like dataset.
    `max` is the raw value of a full pixel: 16 for digits, else 1 or 255 as the data's mean suggests."""
    shape = tuple(config["input_shape"])
    if config.get("input_kind") == TEXT:
        return None
    job = core.store.get_job(row.job_id, row.tenant)
    source = job.spec["dataset"] if job else config.get("dataset", "")
    upload = core.store.get_dataset(row.tenant, source)
    name = (upload.name if upload else source).lower()
    if len(shape) == 3 and shape[0] == 1:
        height, width = shape[1:]
    elif len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0] and ("digit" in name or "mnist" in name):
        height = width = math.isqrt(shape[0])
    else:
        return None
    means = config["normalization"]["mean"]
    mean = sum(means) / len(means)
    return {"height": height, "width": width, "max": 16 if "digits" in name else (1 if mean < 1 else 255)}


def version_view(core: Core, row: ModelRow, aliases: list[Alias]) -> dict:
    """A version as the pages show it: what the API says of it, the aliases that point to it (a split's with the
    version's share), and what the try-it panel needs."""
    public = version_public(core, row).model_dump()
    public["aliases"] = [a.alias if len(a.versions) == 1 else f"{a.alias} {a.versions[row.version]:.0%}"
                         for a in aliases if a.name == row.name and row.version in a.versions]
    if not public["available"]:
        return public
    config = read_model_info(core.settings.data_dir / row.path).config
    result, arch = config.get("result") or {}, config.get("model", {})
    return {**public, "accuracy_by_depth": result.get("test_accuracy_by_depth"), "preset": config.get("preset"),
            "arch": arch.get("arch"), "widths": arch.get("widths"), "canvas": canvas_spec(core, config, row)}


def try_choices(name: str, versions: list[dict], aliases: list[Alias]) -> list[dict]:
    """What the try-it panel predicts with: the aliases, then the versions, newest first; chosen at first, what
    answers requests that name no version (the alias `default`, else the latest version). An alias shows the
    version with the largest share (a split's versions take the same input) and goes as deep as all of them."""
    depths = {v["version"]: v.get("depth") for v in versions}
    base = f"/v1/models/{quote(name, safe='')}"
    choices = [{"label": f"alias {a.alias}: " + ", ".join(f"v{v} {share:.0%}" if len(a.versions) > 1 else f"v{v}"
                                                          for v, share in a.versions.items()),
                "path": f"{base}/aliases/{quote(a.alias, safe='')}/predict", "version": next(iter(a.versions)),
                "depth": min((depths[v] for v in a.versions if depths.get(v)), default=None),
                "chosen": a.alias == DEFAULT_ALIAS} for a in aliases]
    latest = not any(choice["chosen"] for choice in choices)
    choices += [{"label": f"version {v['version']}", "path": f"{base}/versions/{v['version']}/predict",
                 "version": v["version"], "depth": v.get("depth"), "chosen": latest and i == 0}
                for i, v in enumerate(reversed(versions))]
    return choices


@router.get("/models")
def models_page(request: Request, caller: PredictPage, core: CoreDep) -> HTMLResponse:
    aliases = core.store.list_aliases(caller.tenant)
    versions = [version_view(core, row, aliases) for row in core.store.list_models(caller.tenant)]
    return page(request, "models.html", active="models", versions=versions)


@router.get("/models/{name}")
def model_page(request: Request, caller: PredictPage, core: CoreDep, name: str) -> HTMLResponse:
    rows = core.store.list_models(caller.tenant, name)
    if not rows:
        return page(request, "missing.html", 404, active="models", message=f"There is no model {name!r}.")
    aliases = core.store.list_aliases(caller.tenant, name)
    versions = [version_view(core, row, aliases) for row in rows]
    choices = try_choices(name, versions, aliases)
    return page(request, "model.html", active="models", name=name, versions=versions, choices=choices,
                data={"name": name, "versions": versions, "choices": choices})


@router.get("/studies")
def studies_page(request: Request, caller: TrainPage, core: CoreDep) -> HTMLResponse:
    rows, total = core.store.list_studies(caller.tenant, PAGE, 0)
    return page(request, "studies.html", active="studies", total=total,
                studies=[study_public(core, r, with_importances=False) for r in rows])


@router.get("/studies/{study_id}")
def study_page(request: Request, caller: TrainPage, core: CoreDep, study_id: str) -> HTMLResponse:
    row = core.store.get_study(study_id, caller.tenant)
    if row is None:
        return page(request, "missing.html", 404, active="studies", message=f"There is no study {study_id!r}.")
    study = study_public(core, row)
    return page(request, "study.html", active="studies", study=study, spec=json.dumps(study.spec, indent=2),
                data={"study": study.model_dump()})


@router.get("/datasets")
def datasets_page(request: Request, caller: TrainPage, core: CoreDep) -> HTMLResponse:
    uploads, total = core.store.list_datasets(caller.tenant, PAGE, 0)
    return page(request, "datasets.html", active="datasets", builtin=BUILTIN_DATASETS, total=total,
                uploads=[dataset_public(r) for r in uploads], max_bytes=core.settings.max_upload_bytes)


def mount_ui(app: FastAPI) -> None:
    """The dashboard's pages at /ui, its scripts and styles at /ui/static (open: they hold no data)."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)
    app.add_api_route("/", home, include_in_schema=False, dependencies=[Depends(public)])

    @app.exception_handler(Gate)
    async def gate(request: Request, exc: Gate) -> Response:
        return exc.response
