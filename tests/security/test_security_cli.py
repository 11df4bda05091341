"""The command line against a server with mutual TLS and API keys: `loraserve keys new` makes a key the
server accepts once its line is in the file, `loraserve health` (the Dockerfile's HEALTHCHECK) and
`loraserve finetune` connect with the TLS and key flags or their variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import RunningServer
from loraserve.server.api_keys import digest, parse_line
from loraserve.server.cli import main
from loraserve.server.config import SecurityConfig

LORASERVE = str(Path(sys.executable).with_name("loraserve"))  # the installed console script


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory, pki, keys_file):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"),
                      security=SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                              tls_client_ca=str(pki.ca), api_keys_file=str(keys_file)),
                      connect={"root_ca": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key})
    yield s
    s.close()


def new_key(capsys, name: str, scopes: str) -> tuple[str, str]:
    assert main(["keys", "new", "--name", name, "--scopes", scopes]) == 0
    key, line = capsys.readouterr().out.splitlines()
    return key, line


def add_key(keys_file: Path, line: str) -> None:
    fresh = keys_file.with_name("api-keys.new")
    fresh.write_text(keys_file.read_text() + line + "\n")
    os.replace(fresh, keys_file)


def tls_flags(pki) -> list[str]:
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]


def test_keys_new_prints_a_key_and_its_line(capsys):
    key, line = new_key(capsys, "ci-bot", "training,inference")
    entry = parse_line(line)
    assert key.startswith("lsk_") and len(key) > 40 and key not in line
    assert (entry.name, entry.scopes, entry.digest) == ("ci-bot", {"inference", "training"}, digest(key))
    assert new_key(capsys, "admin", "*")[1].endswith(" admin *")
    assert main(["keys", "new", "--name", "x", "--scopes", "inference,root"]) == 2
    assert "unknown scope 'root'" in capsys.readouterr().err
    assert main(["keys", "new", "--name", "no spaces", "--scopes", "inference"]) == 2


def test_finetune_with_a_new_key_over_mutual_tls(srv, pki, keys_file, capsys):
    trainer, trainer_line = new_key(capsys, "trainer", "training")
    reader, reader_line = new_key(capsys, "reader", "adapters:read")
    add_key(keys_file, trainer_line)
    add_key(keys_file, reader_line)
    job = ["finetune", "--server", srv.target, *tls_flags(pki), "--job", "job-20250101-120000000-abcdef"]
    assert main([*job, "--api-key", trainer]) == 2  # authorized: the job is unknown
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main([*job, "--api-key", reader]) == 2
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "'training'" in err and reader not in err
    assert main([*job]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    return subprocess.run([LORASERVE, "health", *args], check=False, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def test_health_over_mutual_tls_with_flags_or_variables(srv, pki):
    result = health("--address", srv.target, *tls_flags(pki), "--api-key", "lsk_health-needs-none-but-may-send-one")
    assert result.returncode == 0 and result.stdout.strip().endswith("SERVING"), result.stdout + result.stderr
    # The container's way: the probe's settings from the environment, the certificate checked by name.
    env = {"LORASERVE_CLIENT_TLS_CA": str(pki.ca), "LORASERVE_CLIENT_TLS_CERT": str(pki.client_cert),
           "LORASERVE_CLIENT_TLS_KEY": str(pki.client_key), "LORASERVE_CLIENT_TLS_SERVER_NAME": "localhost",
           "LORASERVE_PORT": str(srv.port)}
    result = health(env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("SERVING"), result.stdout + result.stderr
    result = health(env={**env, "LORASERVE_CLIENT_TLS_SERVER_NAME": "elsewhere.example"})
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stdout + result.stderr


def test_health_without_tls_or_certificate_fails(srv, pki):
    result = health("--address", srv.target, "--timeout", "3")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stdout + result.stderr
    result = health("--address", srv.target, "--tls-ca", str(pki.ca), "--timeout", "3")  # no client certificate
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr, result.stdout + result.stderr
    result = health("--address", srv.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert))
    assert result.returncode == 2 and "go together" in result.stderr, result.stdout + result.stderr
