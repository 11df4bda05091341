"""The adapter cache follows the disk: replaced files serve new weights, deleted ones are gone, fixed ones load."""

from __future__ import annotations

import shutil
import threading

import grpc
import pytest
from harness import RunningServer, copy_adapters


@pytest.fixture
def srv(tiny_model_dir, adapter_sources, tmp_path):
    s = RunningServer(tiny_model_dir, copy_adapters(adapter_sources, tmp_path / "root"), max_gpu_adapters=2)
    yield s
    s.close()


def predict(srv, adapter, n=8):
    return srv.client.predict("Tell me", adapter_id=adapter, max_new_tokens=n).text


def replace_files(root, adapter, source):
    for f in (root / source).iterdir():
        if f.name.startswith("adapter_"):
            shutil.copyfile(f, root / adapter / f.name)


def test_replaced_files_serve_the_new_weights(srv):
    root = srv.registry.root
    want_a1 = predict(srv, "a1")
    before = predict(srv, "a0")
    assert before != want_a1 and srv.client.get_adapter("a0").state == "gpu"
    replace_files(root, "a0", "a1")  # behind the server's back, as a shared volume would
    assert predict(srv, "a0") == want_a1


def test_running_rows_finish_on_the_old_weights_while_new_requests_get_the_new(srv):
    root = srv.registry.root
    old_text = predict(srv, "a0", 40)
    new_text = predict(srv, "a2", 40)
    got = {}
    started = threading.Event()

    def stream():
        chunks = []
        for c in srv.client.stream("Tell me", adapter_id="a0", max_new_tokens=40):
            chunks.append(c)
            started.set()
        got["old"] = chunks[-1].completion.text

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    replace_files(root, "a0", "a2")
    got["new"] = predict(srv, "a0", 40)
    t.join(60)
    assert got == {"old": old_text, "new": new_text}


def test_deleted_files_mean_not_found_and_eviction(srv):
    predict(srv, "a0")
    assert srv.client.get_adapter("a0").state == "gpu"
    shutil.rmtree(srv.registry.root / "a0")
    with pytest.raises(grpc.RpcError) as e:
        predict(srv, "a0")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "a0" not in srv.registry._slot_of
    assert [a.adapter_id for a in srv.client.list_adapters()] == ["a1", "a2"]


def test_a_failed_load_is_retried_once_the_files_are_fixed(srv, adapter_sources):
    root = srv.registry.root
    (root / "late").mkdir()
    shutil.copyfile(adapter_sources / "a1" / "adapter_config.json", root / "late" / "adapter_config.json")
    (root / "late" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(grpc.RpcError) as e:
        predict(srv, "late")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError):  # still failed: nothing changed
        predict(srv, "late")
    shutil.copyfile(adapter_sources / "a1" / "adapter_model.safetensors", root / "late" / "adapter_model.safetensors")
    assert predict(srv, "late") == predict(srv, "a1")
