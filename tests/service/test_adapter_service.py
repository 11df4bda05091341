"""AdapterService and the tiered cache: list, get, load (root / path / upload), unload, delete, eviction."""

from __future__ import annotations

import shutil

import grpc
import pytest
from harness import RunningServer, copy_adapters


@pytest.fixture
def srv(tiny_model_dir, adapter_sources, tmp_path):
    root = copy_adapters(adapter_sources, tmp_path / "root")
    s = RunningServer(tiny_model_dir, root, max_gpu_adapters=1, max_cpu_adapters=1)
    yield s
    s.close()


def test_adapters_in_the_root_are_listed_and_servable_without_a_load_call(srv):
    listed = srv.client.list_adapters()
    assert [a.adapter_id for a in listed] == ["a0", "a1", "a2"]
    a2 = srv.client.get_adapter("a2")
    assert (a2.state, a2.rank, a2.alpha, a2.task_type) == ("disk", 12, 16.0, "CAUSAL_LM")
    assert set(a2.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert a2.size_bytes > 0 and a2.error == ""
    assert srv.client.predict("hi", adapter_id="a2", max_new_tokens=3).generated_tokens == 3
    assert srv.client.get_adapter("a2").state == "gpu"
    pages = [srv.client.adapters.ListAdapters(__import__("loraserve.v1.adapter_pb2", fromlist=["x"])
                                              .ListAdaptersRequest(page_size=2))]
    assert [a.adapter_id for a in pages[0].adapters] == ["a0", "a1"] and pages[0].next_page_token == "a1"
    assert [a.adapter_id for a in srv.client.list_adapters(page_size=1)] == ["a0", "a1", "a2"]


def test_eviction_and_reload_give_the_same_output(srv):
    first = {a: srv.client.predict("Tell me", adapter_id=a, max_new_tokens=8).text for a in ("a0", "a1", "a2")}
    assert len(set(first.values())) == 3
    states = {a: srv.client.get_adapter(a).state for a in ("a0", "a1", "a2")}
    assert states == {"a0": "disk", "a1": "disk", "a2": "gpu"}  # 1 device slot, 1 CPU copy (a2's own)
    assert srv.metric("loraserve_adapter_evictions_total", tier="gpu") >= 2
    loads = srv.metric("loraserve_adapter_loads_total")
    again = {a: srv.client.predict("Tell me", adapter_id=a, max_new_tokens=8).text for a in ("a0", "a1", "a2")}
    assert again == first
    assert srv.metric("loraserve_adapter_loads_total") == loads + 3
    assert srv.metric("loraserve_adapters_resident", tier="gpu") == 1


def test_load_unload_delete(srv, adapter_sources):
    info = srv.client.load_adapter("a1")
    assert info.state == "cpu"
    assert srv.client.unload_adapter("a1").state == "disk"
    # Register a directory under the root under another id (a relative symlink).
    shutil.copytree(adapter_sources / "a0", srv.registry.root / "team" / "v3")
    assert srv.client.load_adapter("team-v3", path="team/v3").state == "cpu"
    assert srv.client.predict("x", adapter_id="team-v3", max_new_tokens=5).text == \
        srv.client.predict("x", adapter_id="a0", max_new_tokens=5).text
    # Upload the files themselves.
    up = srv.client.load_adapter("uploaded", upload_dir=adapter_sources / "a2")
    assert up.rank == 12 and up.state == "cpu"
    assert srv.client.predict("x", adapter_id="uploaded", max_new_tokens=5).text == \
        srv.client.predict("x", adapter_id="a2", max_new_tokens=5).text
    # Overwrite swaps the served weights without a restart.
    srv.client.load_adapter("uploaded", upload_dir=adapter_sources / "a1", overwrite=True)
    assert srv.client.predict("x", adapter_id="uploaded", max_new_tokens=5).text == \
        srv.client.predict("x", adapter_id="a1", max_new_tokens=5).text
    srv.client.delete_adapter("uploaded")
    assert not (srv.registry.root / "uploaded").exists()
    with pytest.raises(grpc.RpcError) as e:
        srv.client.predict("x", adapter_id="uploaded", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    srv.client.delete_adapter("team-v3")  # removes the link, not the directory it points to
    assert (srv.registry.root / "team" / "v3" / "adapter_config.json").is_file()
