"""The client on its own (clients/python, install name loraserve-client): a wheel built from the
repository installs into a bare virtual environment with grpcio and protobuf only, no torch, and talks
to a live server, typed (py.typed) and with its deadlines and retries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from harness import RunningServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    from loraserve.client import Client
    assert importlib.util.find_spec("torch") is None, "the client pulled in torch"
    with Client(sys.argv[1], timeout=60) as c:
        reply = c.predict("Hello", max_new_tokens=3)
        assert reply.generated_tokens == 3 and reply.finish_reason == "length", reply
        print("ok", [a.adapter_id for a in c.list_adapters()])
""")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{args[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> Path:
    """A fresh venv holding only the client wheel and its dependencies, at the locked versions."""
    work = tmp_path_factory.mktemp("client-package")
    # Built from a copy: an in-place build leaves build/ behind, whose stale files a later wheel would
    # ship. --no-build-isolation: setuptools comes from this environment, not a download.
    source = work / "src"
    shutil.copytree(ROOT / "clients" / "python", source,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work),
        str(source), cwd=work)
    wheel = next(work.glob("loraserve_client-*.whl"))
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
        str(ROOT / "requirements.lock"), str(wheel))
    return python


def test_the_client_wheel_alone_calls_a_live_server(client_env, tiny_model_dir, tmp_path):
    srv = RunningServer(tiny_model_dir, tmp_path)
    try:
        out = run(str(client_env), "-c", SCRIPT, srv.target, env={**os.environ, "PYTHONPATH": ""}).stdout
    finally:
        srv.close()
    assert out.startswith("ok")
    installed = run(str(client_env), "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "loraserve-client==0.1.0" in installed and "grpcio==" in installed and "torch" not in installed
    site = run(str(client_env), "-c", "import loraserve, os; print(os.path.dirname(loraserve.__file__))").stdout
    assert (Path(site.strip()) / "py.typed").exists()
