"""A stream its client cancels is counted under CANCELLED in /metrics, never OK (such cancels were once counted OK).

Each stream here asks for MAX_NEW tokens and is cancelled the moment its first chunk arrives, so when
the client's reset reaches the server the request is still generating: the handler is interrupted,
and the interceptor records CANCELLED. The one way a cancelled call could still be counted OK is the
server finishing the whole stream (its last chunk and OK status already on the wire) before the
reset arrives; with MAX_NEW - 1 decode steps left when the client cancels, that would take the client
thread stalling for hundreds of milliseconds between reading the first chunk and calling cancel().
That race is ruled out below, not allowed for: every cancelled request must also end in the engine
as 'cancelled' (none as 'length'), which fails loudly if the server ever did finish one first.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.v1 import inference_pb2, inference_pb2_grpc
from metrics_scrape import delta, scrape

STREAMS = 24
MAX_NEW = 200
ADAPTERS = ["", "a0", "a1", "a2"]


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path_factory.mktemp("root")),
                      max_batch_size=8, max_new_tokens=MAX_NEW)
    yield s
    s.close()


def settle(srv, timeout: float = 15.0) -> dict:
    """A scrape once the engine is idle and the RPC counts stopped moving: the handler of a cancelled
    call records its code a moment after its client stopped waiting."""
    end = time.monotonic() + timeout
    last = None
    while True:
        now = scrape(srv)
        counts = {k: v for k, v in now.items() if k[0] == "loraserve_requests_total"}
        if (counts == last and srv.engine.in_flight == 0) or time.monotonic() > end:
            return now
        last = counts
        time.sleep(0.2)


def cancel_after_first_chunk(channel: grpc.Channel, i: int) -> grpc.StatusCode:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    request = inference_pb2.PredictStreamRequest(prompt=f"Story number {i}:", adapter_id=ADAPTERS[i % len(ADAPTERS)],
                                                 sampling={"max_new_tokens": MAX_NEW})
    call = stub.PredictStream(request, timeout=60)
    first = next(call)
    assert not first.finish_reason, first  # not the final message: still generating
    assert call.cancel()  # True: the call had not ended yet
    return call.code()


def test_streams_cancelled_after_their_first_chunk_are_counted_cancelled(srv):
    channels = [srv.channel() for _ in range(2)]
    before = scrape(srv)
    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda i: cancel_after_first_chunk(channels[i % 2], i), range(STREAMS)))
    after = settle(srv)
    for channel in channels:
        channel.close()
    assert seen == [grpc.StatusCode.CANCELLED] * STREAMS
    counted = delta(before, after, "loraserve_requests_total", "method", "code")
    assert counted == {("PredictStream", "CANCELLED"): STREAMS}, counted
    # Each one was still running in the engine when its cancel arrived (the race above did not happen).
    assert delta(before, after, "loraserve_requests_finished_total", "reason") == {"cancelled": STREAMS}
    # And the server serves on.
    assert srv.client.predict("Hello", max_new_tokens=3, timeout=30).generated_tokens == 3
