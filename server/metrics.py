"""Prometheus metrics: loraserve_ prefix, base units, bounded labels.

Each server owns its own CollectorRegistry (several servers can live in one test process).
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
OTHER = "other"


class Metrics:
    def __init__(self, per_adapter: bool = False, max_adapter_labels: int = 100):
        self.registry = CollectorRegistry()
        r = self.registry
        self.per_adapter = per_adapter
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        self.requests = Counter("loraserve_requests", "RPCs handled, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("loraserve_rpc_duration_seconds", "RPC handling time", ["method"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_requests = Counter("loraserve_adapter_requests", "Generation requests by adapter "
                                        f"(first {max_adapter_labels} ids, then '{OTHER}'); only with "
                                        "--per-adapter-metrics", ["adapter"], registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraserve_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraserve_request_duration_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraserve_request_queue_seconds", "Arrival to joining the running batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.admitted = Counter("loraserve_requests_admitted", "Generation requests the engine accepted into its "
                                "queue; each ends once in requests_finished", registry=r)
        self.finished = Counter("loraserve_requests_finished", "Generation requests by finish reason: stop, "
                                "length, cancelled, deadline, error", ["reason"], registry=r)
        self.queue_depth = Gauge("loraserve_queue_depth", "Requests waiting for a row", registry=r)
        self.running = Gauge("loraserve_running_batch_size", "Rows in the running batch", registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("loraserve_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("loraserve_adapter_cache_hits", "Adapter found in a device slot", registry=r)
        self.cache_misses = Counter("loraserve_adapter_cache_misses", "Adapter had to be read from disk",
                                    registry=r)
        self.loads = Counter("loraserve_adapter_loads", "Adapters read from disk", registry=r)
        self.load_seconds = Histogram("loraserve_adapter_load_seconds", "Disk to host memory load time",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("loraserve_adapter_evictions", "Adapters evicted, by tier", ["tier"], registry=r)
        self.resident = Gauge("loraserve_adapters_resident", "Adapters resident, by tier", ["tier"], registry=r)
        self.training_jobs = Gauge("loraserve_training_jobs", "Training jobs by state", ["state"], registry=r)
        self.training_tokens = Counter("loraserve_training_tokens", "Tokens trained on", registry=r)
        self.checkpoints = Counter("loraserve_training_checkpoints", "Training checkpoints, by outcome (written, "
                                   "failed: e.g. a full disk; the job trains on from the previous one)",
                                   ["outcome"], registry=r)
        self.training_loss = Gauge("loraserve_training_loss", "Mean token loss of the latest training step "
                                   "(of whichever job reported last)", registry=r)
        self.lora_info = LoraRequestsInfo()
        r.register(self.lora_info)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start the /metrics HTTP server; returns the address it bound."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[0], server.server_address[1]

    # --- hooks called by the engine and the registry -----------------------------------------------

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def observe_adapter_request(self, adapter_id: str) -> None:
        if not self.per_adapter:
            return
        label = adapter_id or "base"
        if label not in self._adapter_labels:
            if len(self._adapter_labels) >= self.max_adapter_labels:
                label = OTHER
            else:
                self._adapter_labels.add(label)
        self.adapter_requests.labels(label).inc()

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_admitted(self) -> None:
        self.admitted.inc()

    def observe_request(self, seconds: float, prompt_tokens: int, generated: int, reason: str) -> None:
        if reason != "error":  # a failure's time (often a refusal in milliseconds) is no request latency
            self.e2e.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated)
        self.finished.labels(reason).inc()

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def adapter_hit(self) -> None:
        self.cache_hits.inc()

    def adapter_miss(self) -> None:
        self.cache_misses.inc()

    def adapter_loaded(self, seconds: float) -> None:
        self.loads.inc()
        self.load_seconds.observe(seconds)

    def adapter_evicted(self, tier: str) -> None:
        self.evictions.labels(tier).inc()

    def adapters_resident(self, tier: str, n: int) -> None:
        self.resident.labels(tier).set(n)

    def checkpoint(self, written: bool) -> None:
        self.checkpoints.labels("written" if written else "failed").inc()

    def observe_training_step(self, loss: float) -> None:
        self.training_loss.set(loss)

    def set_lora_requests(self, running: Iterable[str], waiting: Iterable[str], max_lora: int) -> None:
        self.lora_info.set(running, waiting, max_lora)


class LoraRequestsInfo:
    """The adapters of the running batch and of the queue, in the shape of vLLM's `vllm:lora_requests_info`.

    The Gateway API inference extension's endpoint picker scrapes each replica's /metrics for that
    family (labels running_lora_adapters and waiting_lora_adapters: comma-separated ids; max_lora:
    the number of device slots, as a string; value: a Unix time, the series with the largest one
    is the current state) and routes a request to a replica that already runs its adapter. Exposed
    under that name and as loraserve_lora_requests_info; one series at a time (the current state,
    valued at the time it began), so the exposition stays small however the state changes.
    """

    NAMES = ("loraserve_lora_requests_info", "vllm:lora_requests_info")
    LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")

    def __init__(self):
        self._lock = threading.Lock()
        self._state = ("", "", "0")
        self._since = time.time()

    def set(self, running: Iterable[str], waiting: Iterable[str], max_lora: int) -> None:
        state = (",".join(sorted({a for a in running if a})), ",".join(sorted({a for a in waiting if a})),
                 str(max_lora))
        with self._lock:
            if state != self._state:
                self._state, self._since = state, time.time()

    def collect(self):
        with self._lock:
            state, since = self._state, self._since
        for name in self.NAMES:
            family = GaugeMetricFamily(name, "Adapters running and waiting (vLLM's lora_requests_info "
                                       "shape); the value is when this state began (Unix time)",
                                       labels=self.LABELS)
            family.add_metric(list(state), since)
            yield family

    def describe(self):
        return []
