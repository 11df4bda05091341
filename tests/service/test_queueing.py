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
