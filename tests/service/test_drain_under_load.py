"""SIGTERM while streams run on several adapters and new calls keep arriving: every call ends OK or UNAVAILABLE
(never hangs, never INTERNAL), the in-flight ones finish within the grace period, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from harness import copy_adapters
from loraserve.client import Client
from serve_process import ServeProcess

IN_FLIGHT = 10


def stream(client: Client, adapter: str, tokens: int, started: threading.Barrier) -> tuple[str, int]:
    generated = 0
    try:
        for i, chunk in enumerate(client.stream("Once upon a time", adapter_id=adapter, max_new_tokens=tokens,
                                                timeout=120)):
            if i == 0:
                started.wait(60)
            if chunk.completion:
                generated = chunk.completion.generated_tokens
        return "OK", generated
    except grpc.RpcError as e:
        return e.code().name, generated


def knock(client: Client, stop: threading.Event) -> list[str]:
    """New calls while the server drains and stops."""
    codes = []
    while not stop.is_set():
        try:
            client.predict("new", max_new_tokens=2, timeout=30)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
        time.sleep(0.02)
    return codes


@pytest.mark.parametrize("grace,tokens", [(30, 60), (1, 400)], ids=["in-grace", "past-grace"])
def test_sigterm_under_load(tiny_model_dir, adapter_sources, tmp_path, grace, tokens):
    root = copy_adapters(adapter_sources, tmp_path / "root")
    with ServeProcess(tiny_model_dir, root, "--grace-seconds", str(grace), "--max-new-tokens", "400") as server:
        clients = [Client(server.target) for _ in range(3)]
        started = threading.Barrier(IN_FLIGHT + 1)
        stop = threading.Event()
        with ThreadPoolExecutor(IN_FLIGHT + 2) as pool:
            streams = [pool.submit(stream, clients[i % 3], ["", "a0", "a1", "a2"][i % 4], tokens, started)
                       for i in range(IN_FLIGHT)]
            started.wait(60)  # every stream has its first chunk
            server.proc.send_signal(signal.SIGTERM)
            knocking = [pool.submit(knock, clients[2], stop) for _ in range(2)]
            ended = [f.result(timeout=120) for f in streams]
            assert server.proc.wait(60) == 0
            stop.set()
            late = [c for f in knocking for c in f.result(timeout=60)]
        for c in clients:
            c.close()
    assert {code for code, _ in ended} <= {"OK", "UNAVAILABLE"}, ended
    assert set(late) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in late, late
    if grace == 30:  # all in-flight work fits the grace period: every stream finishes in full
        assert ended == [("OK", tokens)] * IN_FLIGHT, ended
