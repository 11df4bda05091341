"""A request that breaks the decode step fails alone; the rows decoding beside it carry on."""

from __future__ import annotations

import threading

import grpc
import pytest
from harness import RunningServer, copy_adapters

POISON = 77  # max_new_tokens that marks the injected failing row


@pytest.fixture()
def srv(tiny_model_dir, adapter_sources, tmp_path):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path / "root"), max_batch_size=8)
    batch = s.engine.batch
    decode = batch.decode

    def failing_decode(ranks):  # a step with the poisoned row in it raises, as a broken row would
        if any(r.request.sampling.max_new_tokens == POISON and r.position is not None for r in batch.rows):
            raise RuntimeError("injected failure of one row")
        return decode(ranks)

    batch.decode = failing_decode
    yield s
    s.close()


def test_injected_failing_row_fails_alone(srv):
    first = threading.Event()
    results = {}

    def steady(name, adapter):
        chunks = []
        for c in srv.client.stream("Once upon a time", adapter_id=adapter, max_new_tokens=40):
            chunks.append(c)
            first.set()
        results[name] = chunks[-1]

    threads = [threading.Thread(target=steady, args=(f"s{i}", a)) for i, a in enumerate(("", "a0", "a1"))]
    for t in threads:
        t.start()
    assert first.wait(60)
    with pytest.raises(grpc.RpcError) as err:
        srv.client.predict("Hello there", adapter_id="a2", max_new_tokens=POISON)
    assert err.value.code() == grpc.StatusCode.INTERNAL  # an unexplained failure is a bug: logged, not shown
    for t in threads:
        t.join(60)
    assert sorted(results) == ["s0", "s1", "s2"]
    assert all(r.finish_reason == "length" and r.completion.generated_tokens == 40 for r in results.values())
    # The server goes on serving, the poisoned shape included once the failure is gone.
    assert srv.client.predict("Hello there", max_new_tokens=5).generated_tokens == 5
