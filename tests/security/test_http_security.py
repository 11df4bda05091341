"""The OpenAI-compatible HTTP port under the gRPC port's rules: the same keys and scopes (401 / 403 in
OpenAI's error body), the same certificates with mutual TLS, and certificate files re-read on change."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl

import openai
import pytest
from harness import RunningServer
from loraserve.server.api_keys import key_line, new_key, parse_scopes
from loraserve.server.config import SecurityConfig

KEYS = {"inference": new_key(), "adapters:read": new_key()}
CHAT = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)


@pytest.fixture(scope="module")
def live_pki(pki, tmp_path_factory):
    """Copies of the server's files that a test may replace."""
    directory = tmp_path_factory.mktemp("live-pki")
    cert, key = pki.server.write(directory, "live")
    return cert, key


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory, pki, live_pki):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("".join(key_line(k, s.replace(":", "-"), parse_scopes(s)) + "\n" for s, k in KEYS.items()))
    cert, key = live_pki
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"), http_port=0,
                      security=SecurityConfig(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki.ca),
                                              api_keys_file=str(keys)),
                      connect={"root_ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key,
                               "api_key": KEYS["inference"]})
    yield s
    s.close()


def tls_context(ca, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def client(srv, key: str, context: ssl.SSLContext) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"https://localhost:{srv.server.http_port}/v1", api_key=key,
                         max_retries=0, timeout=30, http_client=openai.DefaultHttpxClient(verify=context))


def post_without_key(srv, context: ssl.SSLContext) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", srv.server.http_port, context=context, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": srv.server.base.name, **CHAT}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def test_keys_and_scopes_hold_on_http(srv, pki):
    context = tls_context(pki.ca, pki.client_cert, pki.client_key)
    with client(srv, KEYS["inference"], context) as inference:
        assert inference.chat.completions.create(model=srv.server.base.name, **CHAT).choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as e:
            inference.models.list()
        assert "adapters:read" in str(e.value) and KEYS["inference"] not in str(e.value)
    with client(srv, KEYS["adapters:read"], context) as reader:
        assert [m.id for m in reader.models.list()] == [srv.server.base.name]
        with pytest.raises(openai.PermissionDeniedError):
            reader.chat.completions.create(model=srv.server.base.name, **CHAT)
    with client(srv, "lsk_not-a-key-of-this-server", context) as stranger, pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=srv.server.base.name, **CHAT)
    status, body = post_without_key(srv, context)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert srv.metric("loraserve_requests_total", method="openai/v1/chat/completions", code="UNAUTHENTICATED") == 2
    assert srv.metric("loraserve_requests_total", method="openai/v1/models", code="PERMISSION_DENIED") == 1


@pytest.mark.parametrize("who", ["no client certificate", "another CA's client", "plaintext"])
def test_connections_without_a_trusted_client_certificate_are_refused(srv, pki, who):
    if who == "plaintext":
        with openai.OpenAI(base_url=f"http://localhost:{srv.server.http_port}/v1", api_key=KEYS["inference"],
                           max_retries=0, timeout=10) as plain, pytest.raises(openai.APIConnectionError):
            plain.chat.completions.create(model=srv.server.base.name, **CHAT)
        return
    context = tls_context(pki.ca) if who == "no client certificate" else tls_context(pki.ca, pki.rogue_cert,
                                                                                      pki.rogue_key)
    with client(srv, KEYS["inference"], context) as c, pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model=srv.server.base.name, **CHAT)


def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def replace(path, data: bytes) -> None:
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def test_replaced_certificate_files_serve_new_http_connections(srv, pki, live_pki):
    cert, key = live_pki
    port = srv.server.http_port
    assert peer_certificate(port, tls_context(pki.ca, pki.client_cert, pki.client_key)) == pki.server.der
    replace(key, pki.other_server.key_pem)  # a key that fits no certificate yet: the old pair stays
    assert peer_certificate(port, tls_context(pki.ca, pki.client_cert, pki.client_key)) == pki.server.der
    replace(cert, pki.other_server.cert_pem)
    assert peer_certificate(port, tls_context(pki.other_ca, pki.client_cert, pki.client_key)) == pki.other_server.der
    with pytest.raises(ssl.SSLError):
        peer_certificate(port, tls_context(pki.ca, pki.client_cert, pki.client_key))
