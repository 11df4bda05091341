"""`loraserve health`, the Dockerfile's HEALTHCHECK, against a live server: exit 0 only when SERVING."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from harness import RunningServer

LORASERVE = str(Path(sys.executable).with_name("loraserve"))  # the installed console script


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"))
    yield s
    s.close()


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LORASERVE, "health", *args], check=False, capture_output=True, text=True, timeout=60)


def test_serving_server_exits_0(srv):
    result = health("--address", srv.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{srv.target} (server): SERVING"
    result = health("--address", srv.target, "--service", "loraserve.v1.InferenceService")
    assert result.returncode == 0 and result.stdout.strip().endswith("SERVING"), result.stdout + result.stderr


def test_not_serving_unknown_service_and_no_server_exit_1(srv):
    srv._call(srv.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    try:
        result = health("--address", srv.target)
    finally:
        srv._call(srv.server.health.set("", health_pb2.HealthCheckResponse.SERVING))
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout, result.stdout + result.stderr
    result = health("--address", srv.target, "--service", "no.such.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr, result.stdout + result.stderr
    result = health("--address", "127.0.0.1:1", "--timeout", "2")  # nothing listens there
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stdout + result.stderr


def test_probe_does_not_import_torch(srv):
    # It runs every few seconds inside the serving container: it must stay a light gRPC call.
    code = ("import sys; from loraserve.server.cli import main; rc = main(['health', '--address', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, srv.target], check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_address_follows_loraserve_port(monkeypatch):
    from loraserve.server.cli import add_health_arguments

    monkeypatch.setenv("LORASERVE_PORT", "50123")
    p = argparse.ArgumentParser()
    add_health_arguments(p)
    assert p.parse_args([]).address == "127.0.0.1:50123"
