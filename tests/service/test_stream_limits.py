"""--max-concurrent-streams (ServerConfig.max_concurrent_streams, the server's grpc.max_concurrent_streams)
bounds the RPCs one connection has open at once.

The server announces the limit as HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS; a gRPC client holds a call
beyond it until one of its connection's streams ends (RFC 9113 5.1.2 forbids exceeding it; had a stream
been opened anyway, the server would refuse it with REFUSED_STREAM, which gRPC retries transparently).
Either way the call waits, the server never sees it meanwhile, and other connections are unaffected.
"""

from __future__ import annotations

import time

import grpc
import pytest
from harness import RunningServer
from loraserve.v1 import inference_pb2, inference_pb2_grpc

LIMIT = 2


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    s = RunningServer(tiny_model_dir, tmp_path_factory.mktemp("root"), max_concurrent_streams=LIMIT)
    yield s
    s.close()


def own_connection(srv) -> grpc.Channel:
    # gRPC Python shares one connection between channels with the same target and arguments (the global
    # subchannel pool); a local pool gives each of these channels a connection of its own.
    return grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)])


def open_streams(channel: grpc.Channel, n: int) -> list:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.PredictStreamRequest(prompt="Hello", sampling={"max_new_tokens": 3})
    return [stub.PredictStream(request, timeout=120) for _ in range(n)]


def predict(channel: grpc.Channel):
    request = inference_pb2.PredictRequest(prompt="Hello", sampling={"max_new_tokens": 3})
    return inference_pb2_grpc.InferenceServiceStub(channel).Predict.future(request, timeout=120)


def until(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def finish(stream) -> int:
    return list(stream)[-1].usage.generated_tokens


def test_streams_beyond_the_limit_wait_for_a_free_one_and_other_connections_are_unaffected(srv):
    first, other = own_connection(srv), own_connection(srv)
    try:
        # Holding the device turn the engine steps in (as a training micro-batch does) keeps every stream
        # open, admitted but without a token, for as long as the test needs.
        with srv.server.turns.turn():
            held = open_streams(first, LIMIT)
            until(lambda: srv.engine.in_flight == LIMIT)  # the first connection is at its limit
            waiting = predict(first)
            beside = open_streams(other, LIMIT)  # another connection has a limit of its own
            until(lambda: srv.engine.in_flight >= 2 * LIMIT)
            # The call over the first connection's limit has not reached the server (a wait, generous,
            # to show it is held back rather than late).
            with pytest.raises(grpc.FutureTimeoutError):
                waiting.result(timeout=1.0)
            assert srv.engine.in_flight == 2 * LIMIT  # without the limit: 2 * LIMIT + 1
        # The engine steps again: the streams finish, freeing the first connection's slots, and the
        # waiting call goes through.
        assert [finish(s) for s in held + beside] == [3] * (2 * LIMIT)
        assert waiting.result(timeout=60).usage.generated_tokens == 3
    finally:
        first.close()
        other.close()


def test_the_limit_comes_from_the_flag(monkeypatch):
    import argparse

    from loraserve.server.cli import add_serve_arguments, config_from_args

    def parsed(*argv):
        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        return config_from_args(p.parse_args(argv))

    assert parsed().max_concurrent_streams == 256
    assert parsed("--max-concurrent-streams", "7").max_concurrent_streams == 7
    monkeypatch.setenv("LORASERVE_MAX_CONCURRENT_STREAMS", "9")
    assert parsed().max_concurrent_streams == 9
