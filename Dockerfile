# The Associated Learning service image: `al serve` (API + embedded worker) by default,
# `al worker` for separate workers (see docker-compose.yml and docs/deploy.md).
#
#   CPU (default):  docker build -t associated-learning:cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t associated-learning:cuda .
#
# What an offline or mirrored site changes (docs/deploy.md, "Air-gapped build"):
#   PYTHON_IMAGE       the base image of both stages;
#   TORCH_INDEX_URL    where torch comes from (default: PyTorch's index for TORCH_VARIANT);
#   deploy/wheels/     a torch wheel here is installed instead, with no torch index at all;
#   deploy/ca/*.crt    CA certificates the build trusts, e.g. a TLS-inspecting proxy's.
# The two deploy/ folders serve the build stage only: neither reaches the runtime image.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment with torch and the project ---------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PATH=/opt/venv/bin:$PATH
COPY deploy/ /tmp/deploy/
RUN if ls /tmp/deploy/ca/*.crt >/dev/null 2>&1; then cat /tmp/deploy/ca/*.crt >>/etc/ssl/certs/ca-certificates.crt; fi \
 && python -m venv /opt/venv
# torch first, so that `pip install .` finds it satisfied and never pulls a CUDA build into
# the CPU image (this layer is cached across source changes). A local wheel has a local
# version (2.13.0+cpu), which pip prefers to the package index's build of the same release.
# Its C++ headers (a third of its files) serve only to compile extensions, which the service
# never does: without them the image is smaller and copies faster.
RUN if ls /tmp/deploy/wheels/torch-*.whl >/dev/null 2>&1; \
    then pip install "torch==${TORCH_VERSION}" --find-links /tmp/deploy/wheels; \
    else pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; fi \
 && rm -r /opt/venv/lib/python3*/site-packages/torch/include
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY al /src/al
COPY app /src/app
COPY service /src/service
COPY worker /src/worker
RUN pip install . \
 && python -c "import torch; print('torch', torch.__version__)"

# ---- runtime: the venv only, run as a non-root user -------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="associated-learning" \
      org.opencontainers.image.description="Associated Learning training-and-inference service" \
      ai.associated-learning.torch-variant="${TORCH_VARIANT}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AL_DATA_DIR=/data
RUN groupadd --system --gid 10001 al \
 && useradd --system --uid 10001 --gid al --create-home --home-dir /home/al --shell /usr/sbin/nologin al \
 && mkdir -p /data \
 && chown al:al /data
COPY --from=build /opt/venv /opt/venv
USER al
WORKDIR /home/al
# Uploads, checkpoints, models and the embedded store; owned by `al`, so a fresh named
# volume mounted here starts out writable by the service.
VOLUME ["/data"]
EXPOSE 8000
# For `al serve`; compose overrides it for workers, which listen on no port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["al", "serve", "--host", "0.0.0.0", "--port", "8000"]
