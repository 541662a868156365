"""The deployment files' structure: docker-compose.yml (parsed with PyYAML) and the Dockerfile.

No Docker engine runs on the build machines, so these tests read the files; each check is one
a wrong edit to docker-compose.yml, Dockerfile or .dockerignore would make fail.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("api", "worker", "worker-gpu")
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.I)
# `${NAME}` or `${NAME:-}` / `${NAME-}`: taken from the host environment, with no default value.
HOST_VALUE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?-)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str | None]:
    """A service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: v for k, v in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def default_of(value: str, variable: str) -> str:
    """`${VARIABLE:-default}` -> default: a value the host may override, and what it is without."""
    match = re.fullmatch(rf"\$\{{{variable}:-([^}}]+)\}}(.*)", value)
    assert match, f"{value!r} is not ${{{variable}:-...}}"
    return match[1] + match[2]


def command_of(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts_of(service: dict) -> dict[str, str]:
    """target path -> source (a named volume or a host path)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v["target"]
        out[target] = source
    return out


def al_parses(argv: list[str]) -> None:
    """argv[0] is `al` and the rest is accepted by the real `al` command line."""
    assert argv[0] == "al", argv
    from al.cli import build_parser

    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on an unknown subcommand or option
        pytest.fail(f"`{shlex.join(argv)}` is not a valid al command (argparse exit {e.code})")


# ---- docker-compose.yml -------------------------------------------------------------------


def test_the_four_services(services):
    assert set(services) == {"redis", "api", "worker", "worker-gpu"}


def test_no_top_level_name(compose):
    # docker-compose 1.29 rejects it; the project is named by -p or COMPOSE_PROJECT_NAME instead
    assert set(compose) <= {"services", "volumes", "networks"} | {k for k in compose if k.startswith("x-")}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_base_image_is_the_hosts_choice(services, name):
    args = services[name]["build"]["args"]
    assert default_of(args["PYTHON_IMAGE"], "PYTHON_IMAGE") == "python:3.11-slim"


def test_redis_persists_and_never_evicts(compose, services):
    redis = services["redis"]
    image = default_of(redis["image"], "REDIS_IMAGE")
    assert image.split(":")[0] == "redis" and image.split(":")[1].startswith("7")
    cmd = command_of(redis)
    assert cmd[0] == "redis-server"
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags.get("--appendonly") == "yes"
    assert flags.get("--appendfsync") == "everysec"
    assert flags.get("--maxmemory-policy") == "noeviction"
    # the append-only file lives on a named volume, not in the container's layer
    source = mounts_of(redis).get("/data")
    assert source in (compose.get("volumes") or {}), mounts_of(redis)


def test_redis_healthcheck_pings(services):
    test = services["redis"]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert "redis-cli" in text and "ping" in text


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_have_a_healthcheck(services, name):
    hc = services[name].get("healthcheck")
    assert hc and not hc.get("disable"), f"{name} has no healthcheck"
    test = hc["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1


def test_api_healthcheck_uses_the_ready_endpoint(services):
    text = " ".join(services["api"]["healthcheck"]["test"])
    assert "urllib" in text and "http://127.0.0.1:8000/v2/health/ready" in text


@pytest.mark.parametrize("name", ("worker", "worker-gpu"))
def test_worker_healthcheck_pings_its_own_celery_node(services, name):
    text = " ".join(services[name]["healthcheck"]["test"])
    assert "inspect ping" in text
    # `$$` is compose's escape, so the container's shell (not compose) expands these
    assert "$${HOSTNAME}" in text and "$${REDIS_URL}" in text


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_wait_for_a_healthy_redis(services, name):
    depends = services[name]["depends_on"]
    assert isinstance(depends, dict), "depends_on must use the long form with conditions"
    assert depends["redis"]["condition"] == "service_healthy"


def test_every_depends_on_waits_for_health(services):
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert spec.get("condition") == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_gpu_profile_and_device_reservation_on_worker_gpu_only(services):
    gpu = services["worker-gpu"]
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert device.get("count") in ("all", 1) or device.get("device_ids")
    assert "gpu" in device["capabilities"]
    for name, svc in services.items():
        if name != "worker-gpu":
            assert "profiles" not in svc, f"{name} must start without a profile"
            assert "devices" not in str(svc.get("deploy", {})), f"{name} must not reserve devices"


def test_gpu_worker_builds_the_cuda_image(services):
    gpu_build = services["worker-gpu"]["build"]
    assert re.fullmatch(r"cu\d+", str(gpu_build["args"]["TORCH_VARIANT"]))
    # and it does not share the CPU image's tag, or one build would overwrite the other
    assert services["worker-gpu"]["image"] != services["worker"]["image"]
    for name in ("api", "worker"):
        args = (services[name].get("build") or {}).get("args") or {}
        assert args.get("TORCH_VARIANT", "cpu") == "cpu", name


def test_one_shared_data_volume(compose, services):
    sources = {name: mounts_of(services[name]).get("/data") for name in APP_SERVICES}
    assert len(set(sources.values())) == 1, sources
    (volume,) = set(sources.values())
    assert volume in (compose.get("volumes") or {}), f"{volume!r} is not a named volume"
    assert volume != mounts_of(services["redis"]).get("/data"), "the data volume must not be Redis's"
    for name in APP_SERVICES:
        assert env_of(services[name]).get("AL_DATA_DIR") == "/data", name


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_use_the_compose_redis(services, name):
    assert env_of(services[name]).get("REDIS_URL") == "redis://redis:6379/0"


def test_api_publishes_8000_and_runs_without_an_embedded_worker(services):
    api = services["api"]
    (port,) = api["ports"]
    # loopback only unless the host asks (AL_PUBLISH)
    assert default_of(port, "AL_PUBLISH") == "127.0.0.1:8000:8000"
    assert command_of(api) == ["al", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert env_of(api).get("AL_EMBEDDED_WORKER") == "0"
    for name in ("worker", "worker-gpu"):
        assert "ports" not in services[name], f"{name} publishes a port"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_commands_are_real_al_subcommands(services, name):
    al_parses(command_of(services[name]))


@pytest.mark.parametrize("name", ("worker", "worker-gpu"))
def test_workers_run_al_worker(services, name):
    assert command_of(services[name])[:2] == ["al", "worker"]


def settings_env_names() -> set[str]:
    """Every environment variable the service's settings object reads."""
    config = pytest.importorskip("service.settings")
    settings = config.Settings
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings.model_fields.items():
        names.add(f"{prefix}{field_name}".upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", [alias] if isinstance(alias, str) else []):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_settings_are_ones_the_service_reads(services, name):
    """A misspelt or unimplemented AL_* variable would be silently ignored by the settings object."""
    known = settings_env_names()
    ours = [k for k in env_of(services[name]) if k.startswith("AL_") or k in ("REDIS_URL", "DATABASE_URL")]
    assert {"REDIS_URL", "AL_DATA_DIR"} <= set(ours)
    unknown = sorted(set(ours) - known)
    assert not unknown, f"{name} sets {unknown}, which service.settings.Settings does not read"


def test_api_keys_come_from_the_host(services):
    """Every app service reads AL_API_KEYS, and from the host's own variable of that name, with no default."""
    for name in APP_SERVICES:
        value = env_of(services[name]).get("AL_API_KEYS")
        assert value is not None and re.fullmatch(r"\$\{AL_API_KEYS(:?-)?\}", value), f"{name}: AL_API_KEYS={value!r}"


def test_no_literal_secrets(services):
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if SECRET_NAME.search(key) and value is not None:
                assert HOST_VALUE.match(value), f"{name}: {key} has a literal value"
            if value:
                assert not re.search(r"://[^/@\s]*:[^/@\s]+@", value), f"{name}: {key} embeds a password"
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?\w{6,}", COMPOSE.read_text())


# ---- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions()


def args_with_defaults(instructions) -> dict[str, str]:
    out = {}
    for kw, rest in instructions:
        if kw == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out.setdefault(name, value.strip("\"'"))
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def test_dockerfile_base_is_python_311_slim(dockerfile):
    args = args_with_defaults(dockerfile)
    bases = [substitute(rest.split()[0], args) for kw, rest in dockerfile if kw == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        if base in {rest.split()[-1] for kw, rest in dockerfile if kw == "FROM" and " AS " in rest.upper()}:
            continue  # FROM an earlier stage
        assert base.startswith("python:3.11") and "slim" in base, base


def test_dockerfile_cpu_by_default_cuda_by_build_arg(dockerfile):
    args = args_with_defaults(dockerfile)
    assert args.get("TORCH_VARIANT") == "cpu"
    assert args.get("TORCH_VERSION") == "2.13.0"
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    runs = [rest for kw, rest in dockerfile if kw == "RUN"]
    torch_runs = [r for r in runs if re.search(r"pip install .*torch==", r)]
    assert len(torch_runs) == 1, torch_runs
    (torch_run,) = torch_runs
    # a wheel in deploy/wheels/, else the index
    assert "--find-links /tmp/deploy/wheels" in torch_run and '--index-url "${TORCH_INDEX_URL}"' in torch_run
    assert "torch==${TORCH_VERSION}" in torch_run
    default = substitute(substitute(torch_run, args), args)
    assert "https://download.pytorch.org/whl/cpu" in default and "torch==2.13.0" in default
    cuda = substitute(substitute(torch_run, args), {**args, "TORCH_VARIANT": "cu126"})
    assert "https://download.pytorch.org/whl/cu126" in cuda
    # torch is installed before the project, so `pip install .` finds it already satisfied
    project = [i for i, r in enumerate(runs) if re.search(r"pip install (--\S+ )*\.(\s|$)", r)]
    assert project and runs.index(torch_run) < project[0]


def test_dockerfile_site_files_stay_in_the_build_stage(dockerfile):
    # deploy/ca (a proxy's CA) and deploy/wheels reach the build stage only
    last_stage = max(i for i, (kw, _) in enumerate(dockerfile) if kw == "FROM")
    copies = [(i, rest) for i, (kw, rest) in enumerate(dockerfile) if kw == "COPY"]
    assert any(rest.startswith("deploy/ ") for i, rest in copies if i < last_stage)
    assert not any("deploy" in rest for i, rest in copies if i > last_stage)
    # BuildKit fetches a `# syntax=` frontend from Docker Hub, which an offline site cannot reach
    assert not DOCKERFILE.read_text().startswith("# syntax")


def test_dockerfile_runs_as_non_root(dockerfile):
    users = [rest for kw, rest in dockerfile if kw == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the USER is set in the final stage, so it applies to the running container
    last_stage = max(i for i, (kw, _) in enumerate(dockerfile) if kw == "FROM")
    assert any(kw == "USER" for kw, _ in dockerfile[last_stage:])


def test_dockerfile_data_dir_port_and_healthcheck(dockerfile):
    envs = " ".join(rest for kw, rest in dockerfile if kw == "ENV")
    assert re.search(r"\bAL_DATA_DIR=/data\b", envs)
    volumes = " ".join(rest for kw, rest in dockerfile if kw == "VOLUME")
    assert "/data" in volumes
    assert ("EXPOSE", "8000") in dockerfile
    checks = [rest for kw, rest in dockerfile if kw == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "urllib" in checks[0] and "http://127.0.0.1:8000/v2/health/ready" in checks[0]
    assert "curl" not in checks[0]


def test_dockerfile_default_command_is_al_serve(dockerfile):
    cmds = [rest for kw, rest in dockerfile if kw == "CMD"]
    assert cmds, "no CMD"
    argv = json.loads(cmds[-1])  # exec form, so signals reach `al` directly
    assert argv == ["al", "serve", "--host", "0.0.0.0", "--port", "8000"]
    al_parses(argv)


def test_dockerfile_installs_the_project_with_its_console_script():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^al\s*=\s*"al\.cli:main"', pyproject, re.M), "the image's CMD needs the `al` script"


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".venv", ".git", "data", "model", ".env"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    # and never the sources the image installs
    for source in ("al", "app", "worker", "pyproject.toml", "README.md"):
        assert source not in patterns, f".dockerignore excludes {source}"
