"""Assembles the server: base model, LoRA wrappers, registry, engine, gRPC services, metrics.

Lifecycle: start() binds the ports; on SIGTERM/SIGINT drain() turns health NOT_SERVING, makes new
requests fail with UNAVAILABLE, lets in-flight requests finish within the grace period, then stops.
Training jobs do not get the grace period: a job runs for minutes to hours, so draining suspends
running jobs at once with a checkpoint and leaves queued ones queued (their streams end with
UNAVAILABLE saying so), which also gives the device to the requests still finishing; the next start
resumes them (server/training/jobs.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from loraserve.core.lora.layer import wrap_model
from loraserve.core.model.load import BaseModel, load_base
from loraserve.core.model.turns import DeviceTurns
from loraserve.server.api_keys import ApiKeys
from loraserve.server.config import ServerConfig
from loraserve.server.engine.engine import Engine
from loraserve.server.lora.registry import AdapterRegistry
from loraserve.server.metrics import Metrics
from loraserve.server.openai_http.front import OpenAIFront
from loraserve.server.service.adapters import AdapterService
from loraserve.server.service.auth import Auth
from loraserve.server.service.inference import InferenceService
from loraserve.server.service.interceptors import ErrorsAndMetrics
from loraserve.server.service.limits import RequestSizeLimits, method_limits
from loraserve.server.service.training import TrainingService
from loraserve.server.tls import CertificateFiles, ReloadingSslContext
from loraserve.server.training.jobs import TrainingJobs
from loraserve.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapter_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name,
)
SHUTDOWN = "the server is shutting down"


class LoraServer:
    def __init__(self, config: ServerConfig, base: BaseModel | None = None):
        self.config = config
        security = config.security
        # Key file and certificates are read before the model loads: a bad one fails the start at once.
        self.api_keys = ApiKeys(security.api_keys_file, security.api_key) if security.auth else None
        self.certificates = (CertificateFiles(security.tls_cert, security.tls_key, security.tls_client_ca)
                             if security.tls else None)
        self.base = base or load_base(config.model)
        lora = config.lora
        self.ctx, self.wrapped = wrap_model(self.base.model, lora.max_gpu_adapters, lora.max_lora_rank,
                                            self.base.compute_dtype, self.base.device)
        self.metrics = Metrics(config.per_adapter_metrics, config.max_adapter_labels)
        self.turns = DeviceTurns()
        self.registry = AdapterRegistry(lora.adapter_root, self.wrapped, lora.max_gpu_adapters,
                                        lora.max_cpu_adapters, lora.max_lora_rank, self.base.compute_dtype,
                                        self.metrics)
        self.engine = Engine(self.base, self.ctx, self.registry, config.engine, self.turns, self.metrics)
        self.registry.on_loaded = self.engine.wake
        self.training = TrainingJobs(self.base, self.ctx, self.wrapped, self.registry, self.turns, self.metrics,
                                     config.training, serving=lambda: self.engine.in_flight > 0)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_host, self.metrics_port = "", 0
        self.http: OpenAIFront | None = None
        self.http_port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        limits = method_limits(self.config.max_inference_request_bytes, self.config.max_message_bytes,
                               self.config.lora.max_upload_bytes)
        # Outermost first: auth and size limits run inside ErrorsAndMetrics, so refused requests are
        # counted with their code; auth before the limits, so a caller without a key learns nothing more.
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorsAndMetrics(self.metrics)]
        if self.api_keys is not None:
            interceptors.append(Auth(self.api_keys))
        interceptors.append(RequestSizeLimits(limits))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", max(limits.values())),
                     ("grpc.max_send_message_length", self.config.max_message_bytes),
                     ("grpc.max_concurrent_streams", self.config.max_concurrent_streams)],
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceService(self.engine, self.base.tokenizer, self.metrics), self.server)
        adapter_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterService(self.registry, self.config.lora.max_upload_bytes), self.server)
        training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingService(self.training), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.security.reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server)
        address = f"{self.config.host}:{self.config.port}"
        if self.certificates is not None:
            self.port = self.server.add_secure_port(address, self.certificates.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        self.engine.start()
        await self.server.start()
        if self.config.metrics_port >= 0:
            self.metrics_host, self.metrics_port = self.metrics.serve(self.config.metrics_host,
                                                                      self.config.metrics_port)
        if self.config.http_port >= 0:
            # The same keys and certificate files as the gRPC port: turning HTTP on opens no way around them.
            self.http = OpenAIFront(self.engine, self.base.tokenizer, self.metrics, self.registry, self.base.name,
                                    self.config.max_inference_request_bytes, self.api_keys)
            security = self.config.security
            tls = (ReloadingSslContext(security.tls_cert, security.tls_key, security.tls_client_ca).context
                   if security.tls else None)
            self.http_port = await self.http.start(self.config.host, self.config.http_port, tls)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s) on port %d of %s (%s), metrics on %s:%d", self.base.name,
                 self.base.quantization, self.port, self.config.host, self._exposure(), self.metrics_host,
                 self.metrics_port)
        return self.port

    def _exposure(self) -> str:
        security = self.config.security
        transport = ("mutual TLS" if security.tls_client_ca else "TLS") if security.tls else "plaintext"
        keys = f"{len(self.api_keys)} API keys" if self.api_keys is not None else "no API keys: every RPC open"
        return f"{transport}, {keys}, reflection {'on' if security.reflection else 'off'}"

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking work, let in-flight requests finish (up to the grace period), then stop."""
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()  # every service reports NOT_SERVING
        self.engine.begin_drain()
        deadline = time.monotonic() + grace
        await asyncio.to_thread(self.training.shutdown, SHUTDOWN, grace)
        await asyncio.to_thread(self.engine.wait_idle, max(0.0, deadline - time.monotonic()))
        await self.stop(grace=max(0.0, deadline - time.monotonic()))

    async def stop(self, grace: float = 0.0) -> None:
        # Jobs are suspended before the RPCs stop: within the grace their streams say when they go on.
        await asyncio.to_thread(self.training.shutdown, SHUTDOWN)
        if self.http is not None:
            await self.http.stop()
        if self.server is not None:
            await self.server.stop(grace)
        self.engine.stop()
        self.registry.close()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve_forever(config: ServerConfig) -> None:
    server = LoraServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task] = []

    def on_signal(sig):
        if not draining:
            log.info("%s: draining (grace %.0f s)", signal.Signals(sig).name, config.grace_seconds)
            draining.append(loop.create_task(server.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.wait()
