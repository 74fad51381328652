# gam-serve for NVIDIA GPU hosts (README.md, Deploy).
#   docker build -t gam-serve .
#   docker run --gpus all -p 8000:8000 --stop-timeout 30 gam-serve
# CUDA 13.0: the default Linux build of torch 2.13.0 on PyPI is a CUDA 13.0 build (its metadata pins
# cuda-toolkit 13.0.*), so cu130 is the CUDA wheel PyTorch publishes for this release for sure. Host driver >= 580.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

# The PyTorch wheel index matching the base image's CUDA (cu130 = CUDA 13.0).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# The bundled checkpoint under weights/ that the image serves unless GAM_MODEL / --model names another.
ARG GAM_BUNDLED_MODEL=gam-wikitext2

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's security updates replace exact package versions in its archive, so pins would break rebuilds; the base
# image tag pins the release (https://github.com/hadolint/hadolint/wiki/DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --system --gid 10001 gam \
    && useradd --system --uid 10001 --gid gam --create-home --home-dir /home/gam --shell /usr/sbin/nologin gam

WORKDIR /app

# The same two installs as the Makefile's `serve` target (the torch pin, then the project with its `server` extra);
# here torch comes from the CUDA index and the project is installed as a regular (non-editable) package
# ('./[server]' is '.[server]' spelled so hadolint's DL3013 sees a local path, not an unpinned PyPI name).
# tests/deploy/test_dockerfile.py compares both with the Makefile and pyproject.toml.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0
COPY pyproject.toml README.md ./
COPY gam_model ./gam_model
COPY server ./server
RUN pip install --no-cache-dir './[server]' \
    && rm -rf build ./*.egg-info

COPY deploy/docker/healthcheck.py /usr/local/bin/gam-healthcheck
COPY weights ./weights

# Serve another checkpoint directory by mounting it and pointing GAM_MODEL (or --model) at it:
#   docker run --gpus all -p 8000:8000 -v /srv/models/mine:/models/mine:ro -e GAM_MODEL=/models/mine gam-serve
# Every other flag has a GAM_* variable too (GAM_MAX_BATCH_SIZE, GAM_API_KEY, GAM_SHUTDOWN_GRACE, ...).
ENV GAM_MODEL=/app/weights/${GAM_BUNDLED_MODEL} \
    GAM_PORT=8000

USER 10001:10001
EXPOSE 8000

# /health is 200 only while the model is loaded and the engine loop runs (503 while loading or draining). The probe
# dials the host and port gam-serve was given (its last --host / --port on PID 1's command line, else GAM_HOST /
# GAM_PORT), a wildcard host (0.0.0.0, ::) on loopback of its family.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/gam-healthcheck"]

# The server binds 127.0.0.1 by default; inside a container it must listen on every interface.
# SIGTERM (docker stop) drains in-flight requests for GAM_SHUTDOWN_GRACE seconds: give docker stop more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gam-serve", "--host", "0.0.0.0"]
CMD []
