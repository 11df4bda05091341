"""TLS and mutual TLS through real channels, and certificates replaced on disk while serving."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from dial import channel
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import RunningServer
from loraserve.server.config import SecurityConfig


def health(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refused(ch: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        health(ch)
    return e.value.code()


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory, pki):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"),
                      security=SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)),
                      connect={"root_ca": pki.ca})
    yield s
    s.close()


@pytest.fixture(scope="module")
def mtls_server(tiny_model_dir, tmp_path_factory, pki):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"),
                      security=SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                              tls_client_ca=str(pki.ca)),
                      connect={"root_ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key})
    yield s
    s.close()


def test_tls_serves_clients_that_verify_it(tls_server, pki):
    assert tls_server.client.predict("Hello", max_new_tokens=2).generated_tokens == 2
    with channel(tls_server.target, root_ca=pki.ca.read_bytes()) as ch:  # the CA as bytes works too
        assert health(ch) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_and_untrusting_clients_are_refused(tls_server, pki):
    with channel(tls_server.target) as ch:
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE
    with channel(tls_server.target, root_ca=pki.other_ca) as ch:  # the server's certificate is not from this CA
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_its_ca(mtls_server, pki):
    assert mtls_server.client.predict("Hello", max_new_tokens=2).generated_tokens == 2
    with channel(mtls_server.target, root_ca=pki.ca) as ch:  # no client certificate
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE
    with channel(mtls_server.target, root_ca=pki.ca, client_cert=pki.rogue_cert, client_key=pki.rogue_key) as ch:
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
    with channel(mtls_server.target) as ch:
        assert refused(ch) == grpc.StatusCode.UNAVAILABLE


def peer_certificate(port: int, cafile: Path) -> bytes:
    """The certificate the server presents to a new TLS connection (DER)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def replace(path: Path, data: bytes) -> None:
    """Write then rename, as certificate tools and Kubernetes secret updates do."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def test_replaced_certificate_files_serve_new_connections(tiny_model_dir, tmp_path, pki):
    cert, key = pki.server.write(tmp_path, "live")
    s = RunningServer(tiny_model_dir, tmp_path / "root", security=SecurityConfig(tls_cert=str(cert), tls_key=str(key)),
                      connect={"root_ca": pki.ca})
    try:
        assert s.client.predict("Hello", max_new_tokens=1).generated_tokens == 1  # opens a connection
        assert peer_certificate(s.port, pki.ca) == pki.server.der
        replace(key, pki.other_server.key_pem)
        # The key alone does not fit the old certificate: the old pair stays in force meanwhile.
        assert peer_certificate(s.port, pki.ca) == pki.server.der
        replace(cert, pki.other_server.cert_pem)
        assert peer_certificate(s.port, pki.other_ca) == pki.other_server.der
        with channel(s.target, root_ca=pki.other_ca) as ch:
            assert health(ch) == health_pb2.HealthCheckResponse.SERVING
        with channel(s.target, root_ca=pki.ca) as ch:
            assert refused(ch) == grpc.StatusCode.UNAVAILABLE
        # The connection opened before the change keeps its session.
        assert s.client.predict("Hello", max_new_tokens=1).generated_tokens == 1
    finally:
        s.close()
