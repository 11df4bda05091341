"""Health, reflection, /metrics, and SIGTERM drain of a real `loraserve serve` process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from harness import RunningServer, copy_adapters
from loraserve.client import Client

SERVICES = ["loraserve.v1.InferenceService", "loraserve.v1.AdapterService"]


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path_factory.mktemp("root")))
    yield s
    s.close()


def test_health_reports_serving_for_every_service(srv):
    stub = health_pb2_grpc.HealthStub(srv.channel())
    for name in ["", *SERVICES]:
        assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(srv):
    db = ProtoReflectionDescriptorDatabase(srv.channel())
    services = db.get_services()
    assert set(SERVICES) <= set(services) and "grpc.health.v1.Health" in services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    predict = pool.FindServiceByName("loraserve.v1.InferenceService").FindMethodByName("Predict")
    assert predict.input_type.full_name == "loraserve.v1.PredictRequest"
    assert "adapter_id" in pool.FindMessageTypeByName("loraserve.v1.PredictRequest").fields_by_name


def test_metrics_scrape_counters_move(srv):
    before = {
        "ok": srv.metric("loraserve_requests_total", method="Predict", code="OK"),
        "notfound": srv.metric("loraserve_requests_total", method="Predict", code="NOT_FOUND"),
        "generated": srv.metric("loraserve_generated_tokens_total"),
        "prompt": srv.metric("loraserve_prompt_tokens_total"),
        "ttft": srv.metric("loraserve_time_to_first_token_seconds_count"),
        "itl": srv.metric("loraserve_inter_token_latency_seconds_count"),
        "e2e": srv.metric("loraserve_request_duration_seconds_count"),
    }
    got = srv.client.predict("Hello", adapter_id="a0", max_new_tokens=5)
    with pytest.raises(grpc.RpcError):
        srv.client.predict("Hello", adapter_id="missing", max_new_tokens=5)
    assert srv.metric("loraserve_requests_total", method="Predict", code="OK") == before["ok"] + 1
    assert srv.metric("loraserve_requests_total", method="Predict", code="NOT_FOUND") == before["notfound"] + 1
    assert srv.metric("loraserve_generated_tokens_total") == before["generated"] + 5
    assert srv.metric("loraserve_prompt_tokens_total") == before["prompt"] + got.prompt_tokens
    assert srv.metric("loraserve_time_to_first_token_seconds_count") == before["ttft"] + 1
    assert srv.metric("loraserve_inter_token_latency_seconds_count") == before["itl"] + 4
    assert srv.metric("loraserve_request_duration_seconds_count") == before["e2e"] + 1
    text = srv.metrics_text()
    for name in ("loraserve_queue_depth", "loraserve_running_batch_size", "loraserve_adapter_cache_hits_total",
                 "loraserve_adapter_cache_misses_total", "loraserve_adapter_load_seconds_bucket",
                 'loraserve_adapters_resident{tier="gpu"}'):
        assert name in text


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_model_dir, tmp_path):
    env = {**os.environ, "LORASERVE_LOG_LEVEL": "INFO"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraserve.server.cli", "serve", "--model", str(tiny_model_dir), "--quantization", "fp32",
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--adapter-root", str(tmp_path),
         "--grace-seconds", "30", "--max-lora-rank", "8", "--max-gpu-adapters", "2"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"on port (\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server did not start"
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        client = Client(f"127.0.0.1:{port}")
        chunks, result = [], {}
        started = threading.Event()

        def in_flight():
            for chunk in client.stream("Once upon a time", max_new_tokens=300):
                chunks.append(chunk)
                started.set()
            result["done"] = chunks[-1].finish_reason

        t = threading.Thread(target=in_flight)
        t.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(client.channel)
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            client.predict("new request", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        t.join(60)
        assert result.get("done") == "length" and chunks[-1].completion.generated_tokens == 300
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
