# syntax=docker/dockerfile:1
#
# sssd-signal-worker image.
#
#   docker build -t sssd-signal-worker:dev .                               # CUDA (default)
#   docker build -t sssd-signal-worker:dev-cpu --build-arg TORCH_VARIANT=cpu .
#
# CUDA: the PyTorch CUDA wheels carry the CUDA runtime, cuBLAS and cuDNN as pip packages, so the
# base image needs no CUDA toolkit; the node supplies only the NVIDIA driver (NVIDIA container
# toolkit / GPU operator). Run with --gpus all, or request nvidia.com/gpu in Kubernetes.
#
# Runs as uid 10001 with a read-only root filesystem: the only writable path it needs is /tmp
# (HOME and every cache below point there). In Kubernetes mount an emptyDir at /tmp.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# cu128 (default) or cpu; any PyTorch wheel index suffix works (cu126, cu129, ...).
ARG TORCH_VARIANT=cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. torch alone: the largest layer, changes only with TORCH_VERSION / TORCH_VARIANT.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. The pinned runtime dependencies (deploy/pin_requirements.py writes the file).
COPY deploy/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# 3. The code last, so editing it rebuilds only this layer. The default checkpoint and the
#    sample data ship inside the package (package-data) and are installed with it.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY worker/ worker/
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -I -c "import worker.settings as s; assert 'site-packages' in s.__file__ and s.DEFAULT_CHECKPOINT.is_dir() and (s.DEFAULT_CHECKPOINT / 'denoiser' / 'diffusion_pytorch_model.safetensors').is_file(), s.DEFAULT_CHECKPOINT"

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cu128
LABEL org.opencontainers.image.title="sssd-signal-worker" \
      org.opencontainers.image.description="Streaming probabilistic FX forecaster (Kafka -> Redis -> diffusion sampler -> Kafka)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.sssd.torch-variant="${TORCH_VARIANT}"

# tini as PID 1: forwards SIGTERM/SIGINT to the worker (which drains and commits itself) and
# reaps zombies of any helper processes (e.g. torch compile workers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid worker --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin worker

COPY --from=builder /opt/venv /opt/venv
# Sample candles for `signal-worker replay` (with their licence), at a stable path.
COPY worker/data/ /app/data/

# Everything that writes goes to /tmp, so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_HOME=/tmp/torch \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    PROMETHEUS_DISABLE_CREATED_SERIES=True \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SIGNAL_WORKER_SERVICE__METRICS_PORT=9108

WORKDIR /app
VOLUME ["/tmp"]
USER 10001:10001
EXPOSE 9108

# Liveness of the event loop via the worker's own health server (no curl in the image).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SIGNAL_WORKER_SERVICE__METRICS_PORT', '9108') + '/healthz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "signal-worker"]
CMD ["run"]
