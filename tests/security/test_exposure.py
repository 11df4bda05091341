"""What a server exposes by default and the switches: /metrics on loopback, reflection off, the
security flags and their variables, and start-up errors for files that do not load."""

from __future__ import annotations

import argparse

import grpc
import pytest
from dial import channel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import RunningServer
from loraserve.server.app import LoraServer
from loraserve.server.cli import add_serve_arguments, config_from_args, main
from loraserve.server.config import SecurityConfig, ServerConfig, StartupError


@pytest.fixture(scope="module")
def closed(tiny_model_dir, tmp_path_factory):
    """gRPC on every interface, reflection off, /metrics left at its default address."""
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"), host="0.0.0.0",
                      security=SecurityConfig(reflection=False))
    yield s
    s.close()


def test_metrics_bind_loopback_even_when_grpc_binds_everywhere(closed):
    assert ServerConfig().metrics_host == "127.0.0.1"
    assert closed.server.metrics_host == "127.0.0.1"
    assert "loraserve_requests_total" in closed.metrics_text()


def test_reflection_off_leaves_health_on(closed):
    with channel(closed.target) as ch:
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(responses)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def serve_config(*argv: str) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_security_flags_and_their_variables(monkeypatch):
    security = serve_config().security
    assert (security.tls, security.auth, security.reflection) == (False, False, True)
    config = serve_config("--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                          "--api-keys-file", "keys", "--reflection", "off", "--metrics-host", "0.0.0.0")
    assert config.metrics_host == "0.0.0.0"
    assert config.security == SecurityConfig("c.pem", "k.pem", "ca.pem", "keys", reflection=False)
    for name, value in [("TLS_CERT", "c.pem"), ("TLS_KEY", "k.pem"), ("TLS_CLIENT_CA", "ca.pem"),
                        ("API_KEYS_FILE", "keys"), ("REFLECTION", "off"), ("METRICS_HOST", "0.0.0.0"),
                        ("API_KEY", "lsk_from-the-environment")]:
        monkeypatch.setenv(f"LORASERVE_{name}", value)
    config = serve_config()
    assert config.metrics_host == "0.0.0.0"
    assert config.security == SecurityConfig("c.pem", "k.pem", "ca.pem", "keys", "lsk_from-the-environment", False)
    assert "lsk_from-the-environment" not in repr(config)


@pytest.mark.parametrize("argv,message", [
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "k.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert"),
])
def test_incomplete_tls_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_key_file_stops_the_start_naming_the_file_and_line(tmp_path, capsys):
    keys = tmp_path / "api-keys"
    keys.write_text("# fine\nsha256:abc alice inference\n")
    assert main(["serve", "--api-keys-file", str(keys), "--port", "0", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert f"--api-keys-file {keys}: line 2: the hash must be" in err
    assert main(["serve", "--api-keys-file", str(tmp_path / "missing"), "--port", "0", "--metrics-port", "-1"]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_certificates_that_do_not_load_stop_the_start(tmp_path, pki):
    def start(cert, key, client_ca=None) -> str:
        config = ServerConfig(security=SecurityConfig(tls_cert=str(cert), tls_key=str(key),
                                                      tls_client_ca=client_ca and str(client_ca)))
        with pytest.raises(StartupError) as e:
            LoraServer(config)  # before the model loads
        return str(e.value)

    other_key = pki.other_server.write(tmp_path, "other")[1]
    assert "KEY_VALUES_MISMATCH" in start(pki.server_cert, other_key)
    assert "No such file or directory" in start(tmp_path / "absent.pem", pki.server_key)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    assert str(not_pem) in start(pki.server_cert, pki.server_key, not_pem)
