"""More requests than rows: the queue drains as rows free up, on both engines."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import RunningServer, copy_adapters


@pytest.mark.parametrize("engine", ["static", "generic"])
def test_requests_beyond_the_batch_size_all_finish(engine, tiny_model_dir, adapter_sources, tmp_path):
    # Once the batch drained, the engine used to sleep with requests still waiting (nothing woke it).
    root = copy_adapters(adapter_sources, tmp_path / "root")
    srv = RunningServer(tiny_model_dir, root, max_batch_size=2, static_engine=engine == "static")
    try:
        jobs = [("", 3), ("a0", 5), ("", 4), ("a1", 6), ("a2", 2), ("", 7), ("a0", 3), ("", 5)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: srv.client.predict("Count: one two", adapter_id=j[0], max_new_tokens=j[1],
                                                             timeout=60), jobs))
        assert [g.generated_tokens for g in got] == [n for _, n in jobs]
        assert srv.engine.wait_idle(5)
    finally:
        srv.close()


def test_requests_ending_in_the_queue_are_counted(tiny_model_dir, adapter_sources, tmp_path):
    """A request whose deadline passes while it waits for a row still shows in requests_finished_total."""
    import grpc
    import pytest as _pytest

    srv = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path / "root"), max_batch_size=1)
    try:
        before = srv.metric("loraserve_requests_finished_total", reason="deadline")
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(srv.client.predict, "Count: one two", max_new_tokens=200)
            while srv.engine.in_flight == 0:
                pass
            with _pytest.raises(grpc.RpcError) as err:
                srv.client.predict("Hello", max_new_tokens=4, timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert long.result().generated_tokens == 200
        assert srv.engine.wait_idle(5)
        assert srv.metric("loraserve_requests_finished_total", reason="deadline") == before + 1
    finally:
        srv.close()
