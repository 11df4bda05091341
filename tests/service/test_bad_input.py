"""Every bad input gets a clear status and message; the server keeps serving everyone else."""

from __future__ import annotations

import json
import os
import shutil
import time

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.v1 import adapter_pb2, inference_pb2


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"))
    # Broken adapters side by side with good ones.
    shutil.copytree(adapter_sources / "a0", root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(adapter_sources / "a0", root / "garbage")
    (root / "garbage" / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    shutil.copytree(adapter_sources / "a0", root / "badjson")
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    shutil.copytree(adapter_sources / "a2", root / "toobig")  # rank 12 > max_lora_rank 8
    shutil.copytree(adapter_sources / "a0", root / "othermodel")
    cfg = json.loads((root / "othermodel" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (root / "othermodel" / "adapter_config.json").write_text(json.dumps(cfg))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapter_sources / "a1", outside / "escaped")
    os.symlink(outside / "escaped", root / "escape")
    s = RunningServer(tiny_model_dir, root, max_lora_rank=8, max_new_tokens=64)
    yield s
    s.close()


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    return e.value.code(), e.value.details()


def test_unknown_adapter_is_not_found(srv):
    code, msg = code_of(srv.client.predict, "hi", adapter_id="nope", max_new_tokens=2)
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    assert code_of(srv.client.get_adapter, "nope")[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(srv.client.delete_adapter, "nope")[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("bad_id", ["../a0", "a/b", "..", ".hidden", "-x", "a" * 129, "sp ace", "/etc", "a0\n"])
def test_malformed_adapter_id_is_invalid_argument(srv, bad_id):
    code, msg = code_of(srv.client.predict, "hi", adapter_id=bad_id, max_new_tokens=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in msg
    assert code_of(srv.client.get_adapter, bad_id)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(srv.client.load_adapter, bad_id)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_paths_outside_the_root_are_refused(srv):
    for path in ("/etc", "../../", "escape"):
        code, msg = code_of(srv.client.load_adapter, "newid", path=path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside" in msg
        assert str(srv.registry.root) not in msg  # messages name ids, never the server's paths
    code, msg = code_of(srv.client.predict, "hi", adapter_id="escape", max_new_tokens=2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "escape" not in [a.adapter_id for a in srv.client.list_adapters()]


@pytest.mark.parametrize("name,needle", [("truncated", "corrupt"), ("garbage", "corrupt"), ("badjson", "JSON"),
                                         ("toobig", "max-lora-rank"), ("othermodel", "c_attn")])
def test_broken_adapters_fail_precondition_while_others_serve(srv, name, needle):
    code, msg = code_of(srv.client.predict, "hi", adapter_id=name, max_new_tokens=2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and needle in msg, msg
    code, msg = code_of(srv.client.load_adapter, name)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and needle in msg
    assert srv.client.get_adapter(name).error
    assert srv.client.predict("hi", adapter_id="a0", max_new_tokens=2).generated_tokens == 2


def test_oversized_prompt_is_refused_by_size_before_tokenizing(srv):
    # Megabytes tokenized in full before the length check cost seconds of CPU and gigabytes of memory.
    # Within Predict's message limit (4 MiB) the prompt's byte size is checked against the token limit;
    # beyond it the request is refused before it is even parsed.
    start = time.monotonic()
    code, msg = code_of(srv.client.predict, "word " * (3 << 18), max_new_tokens=4)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg and "511 tokens" in msg
    code, msg = code_of(srv.client.predict, messages=[{"role": "user", "content": "x" * (3 << 20)}], max_new_tokens=4)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg
    code, msg = code_of(srv.client.predict, "x" * (8 << 20), max_new_tokens=4)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Predict" in msg
    assert time.monotonic() - start < 5


def test_prompt_and_token_limits_name_the_limit(srv):
    code, msg = code_of(srv.client.predict, "hi", max_new_tokens=65)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64" in msg
    code, msg = code_of(srv.client.predict, "word " * 600, max_new_tokens=4)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "511" in msg
    code, msg = code_of(srv.client.predict, "word " * 490, max_new_tokens=64)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 512 tokens" in msg


@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt=""), "empty"),
    (dict(prompt="hi", temperature=-0.5), "temperature"),
    (dict(prompt="hi", temperature=float("nan")), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", stop=["x"] * 9), "stop"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "not both"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
])
def test_bad_request_values_are_invalid_argument(srv, kwargs, needle):
    prompt = kwargs.pop("prompt", None)
    code, msg = code_of(srv.client.predict, prompt, max_new_tokens=2, **kwargs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg
    code, _ = code_of(lambda: list(srv.client.stream(prompt, max_new_tokens=2, **kwargs)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_uploads(srv, adapter_sources):
    stub = srv.client.adapters
    files = {p.name: p.read_bytes() for p in (adapter_sources / "a0").iterdir()
             if p.name.startswith("adapter_")}
    bad = dict(files)
    bad["../evil.py"] = b"x"
    code, msg = code_of(stub.LoadAdapter, adapter_pb2.LoadAdapterRequest(adapter_id="up",
                                                                         upload={"files": bad}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not accepted" in msg
    truncated = dict(files)
    truncated["adapter_model.safetensors"] = files["adapter_model.safetensors"][:100]
    code, _ = code_of(stub.LoadAdapter, adapter_pb2.LoadAdapterRequest(adapter_id="up",
                                                                       upload={"files": truncated}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not (srv.registry.root / "up").exists()
    assert [p.name for p in srv.registry.root.iterdir() if p.name.startswith(".")] == []
    code, _ = code_of(stub.LoadAdapter, adapter_pb2.LoadAdapterRequest(adapter_id="a1", upload={"files": files}))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = code_of(stub.ListAdapters, adapter_pb2.ListAdaptersRequest(page_token="../x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def adapter_files(adapter_sources, **change) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (adapter_sources / "a0").iterdir() if p.name.startswith("adapter_")}
    files["adapter_config.json"] = json.dumps({**json.loads(files["adapter_config.json"]), **change}).encode()
    return files


def test_backtracking_patterns_cost_linear_time(srv, adapter_sources):
    # Each of these takes Python's re longer than minutes on a module name (it froze the whole server).
    files = adapter_files(adapter_sources, rank_pattern={"(.*)*z": 4}, alpha_pattern={"(.|.)*z": 2.0},
                          target_modules="(.|.)*_proj")
    start = time.monotonic()
    srv.client.adapters.LoadAdapter(adapter_pb2.LoadAdapterRequest(adapter_id="regex", upload={"files": files}))
    assert srv.client.predict("hi", adapter_id="regex", max_new_tokens=2).generated_tokens == 2
    assert time.monotonic() - start < 5
    srv.client.adapters.DeleteAdapter(adapter_pb2.DeleteAdapterRequest(adapter_id="regex"))


@pytest.mark.parametrize("change", [
    {"lora_dropout": "abc"},
    {"r": "8"},
    {"r": float("inf")},
    {"alpha_pattern": {"q_proj": [1]}},
    {"rank_pattern": ["q_proj"]},
    {"target_modules": [1, 2]},
    {"use_rslora": "yes"},
    {"rank_pattern": {"(?=q)": 4}},  # a lookahead: not a regular expression RE2 accepts
])
def test_untrusted_adapter_configs_fail_alone_and_fast(srv, adapter_sources, change):
    """A hostile or broken adapter_config.json: FAILED_PRECONDITION in bounded time, nothing left behind,
    and every other call (ListAdapters included) unaffected."""
    files = adapter_files(adapter_sources, **change)
    start = time.monotonic()
    code, msg = code_of(srv.client.adapters.LoadAdapter,
                        adapter_pb2.LoadAdapterRequest(adapter_id="hostile", upload={"files": files}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and msg
    assert time.monotonic() - start < 5
    assert not (srv.registry.root / "hostile").exists()
    assert [p.name for p in srv.registry.root.iterdir() if p.name.startswith(".")] == []
    # The same file already in the root: listed with its error, the others still serve.
    (srv.registry.root / "hostile").mkdir()
    try:
        for name, data in files.items():
            (srv.registry.root / "hostile" / name).write_bytes(data)
        listed = {a.adapter_id for a in srv.client.list_adapters()}
        assert {"hostile", "a0"} <= listed
        code, _ = code_of(srv.client.predict, "hi", adapter_id="hostile", max_new_tokens=2)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert srv.client.predict("hi", adapter_id="a0", max_new_tokens=2).generated_tokens == 2
    finally:
        shutil.rmtree(srv.registry.root / "hostile")
        srv.registry.invalidate("hostile", forget_error=True)


def test_deeply_nested_adapter_config_is_refused(srv, adapter_sources):
    files = {p.name: p.read_bytes() for p in (adapter_sources / "a0").iterdir() if p.name.startswith("adapter_")}
    files["adapter_config.json"] = b"[" * 100_000 + b"]" * 100_000
    code, _ = code_of(srv.client.adapters.LoadAdapter,
                      adapter_pb2.LoadAdapterRequest(adapter_id="deep", upload={"files": files}))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_queue_full_is_resource_exhausted(tiny_model_dir, tmp_path):
    s = RunningServer(tiny_model_dir, tmp_path, max_batch_size=1, max_queue=1)
    try:
        stub = s.client.inference
        running = stub.PredictStream(inference_pb2.PredictStreamRequest(prompt="a", sampling={"max_new_tokens": 200}))
        next(running)  # occupies the only row
        queued = stub.Predict.future(inference_pb2.PredictRequest(prompt="b", sampling={"max_new_tokens": 2}))
        deadline = __import__("time").monotonic() + 10
        while s.engine.in_flight < 2 and __import__("time").monotonic() < deadline:
            pass
        code, msg = code_of(s.client.predict, "c", max_new_tokens=2)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 waiting" in msg
        running.cancel()
        assert queued.result(30).usage.generated_tokens == 2
    finally:
        s.close()
