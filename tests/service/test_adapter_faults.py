"""Broken adapter files, files changing under running requests, a full disk during an upload, leftovers of
a crash: each gets a clear status, nothing half-written is ever visible, and everything else keeps serving.

NaN, infinite, or overflowing weights (finite in the file, infinite once scaled by alpha / r and cast to the
compute dtype) are refused at load with FAILED_PRECONDITION, as are non-float dtypes: a served adapter
never puts NaN into a batch that other requests share.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import threading

import grpc
import pytest
import torch
from harness import RunningServer, copy_adapters
from loraserve.client import Client
from loraserve.v1 import adapter_pb2
from safetensors.torch import load_file, save_file
from serve_process import ServeProcess

WEIGHTS = "adapter_model.safetensors"


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file: an 8-byte little-endian header length, the JSON header, the tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def lie_about_offsets(data: bytes) -> bytes:
    header, body = split(data)
    header[first_tensor(header)]["data_offsets"][1] += 1 << 20  # past the end of the file
    return join(header, body)


def lie_about_shape(data: bytes) -> bytes:
    header, body = split(data)
    header[first_tensor(header)]["shape"][0] *= 2  # more elements than its byte range holds
    return join(header, body)


def converted(fn):
    def make(path):
        tensors = {k: fn(v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
    return make


def rewritten(fn):
    def make(path):
        path.write_bytes(fn(path.read_bytes()))
    return make


BROKEN = {
    "cut-in-length": rewritten(lambda d: d[:5]),
    "cut-in-header": rewritten(lambda d: d[:28]),
    "cut-mid-data": rewritten(lambda d: d[: len(d) - 100]),
    "header-length-huge": rewritten(lambda d: struct.pack("<Q", 1 << 62) + d[8:]),
    "header-offsets-past-end": rewritten(lie_about_offsets),
    "header-shape-too-big": rewritten(lie_about_shape),
    "int8": converted(lambda t: (t * 100).to(torch.int8)),
    "float8": converted(lambda t: t.to(torch.float8_e4m3fn)),
    "complex": converted(lambda t: t.to(torch.complex64)),
    "nan": converted(lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
    "inf": converted(lambda t: t.clone().fill_(float("inf"))),
    "overflows-when-scaled": converted(lambda t: t * 0 + 3e38),  # finite in the file, inf times alpha / r
}


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    root = copy_adapters(adapter_sources, tmp_path_factory.mktemp("root"))
    for name, make in BROKEN.items():
        shutil.copytree(adapter_sources / "a0", root / name)
        make(root / name / WEIGHTS)
    shutil.copytree(adapter_sources / "a0", root / "bf16")
    converted(lambda t: t.bfloat16())(root / "bf16" / WEIGHTS)
    s = RunningServer(tiny_model_dir, root, max_gpu_adapters=2)
    yield s
    s.close()


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kwargs)
    return e.value.code(), e.value.details()


def hidden(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".jobs")


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_weights_fail_precondition_on_disk_and_uploaded(srv, name):
    code, msg = code_of(srv.client.predict, "hi", adapter_id=name, max_new_tokens=2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
    assert srv.client.get_adapter(name).error
    files = {p.name: p.read_bytes() for p in (srv.registry.root / name).iterdir()}
    request = adapter_pb2.LoadAdapterRequest(adapter_id=f"up-{name}", upload=adapter_pb2.AdapterUpload(files=files))
    code, msg = code_of(srv.client.adapters.LoadAdapter, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
    assert not (srv.registry.root / f"up-{name}").exists() and hidden(srv.registry.root) == []
    assert srv.client.predict("hi", adapter_id="a1", max_new_tokens=2).generated_tokens == 2


def test_half_precision_weights_serve(srv):
    assert srv.client.predict("hi", adapter_id="bf16", max_new_tokens=4).generated_tokens == 4


def stream_in_background(srv, adapter: str, tokens: int):
    """Start a stream; returns (thread, started event, result dict) - result gets 'last' or 'error'."""
    started, result = threading.Event(), {}

    def run():
        try:
            chunks = []
            for c in srv.client.stream("Once upon a time", adapter_id=adapter, max_new_tokens=tokens):
                chunks.append(c)
                started.set()
            result["last"] = chunks[-1]
        except grpc.RpcError as e:
            result["error"] = e.code()
        started.set()

    t = threading.Thread(target=run)
    t.start()
    return t, started, result


def test_deleted_behind_the_servers_back_while_streaming(srv, adapter_sources):
    t, started, result = stream_in_background(srv, "a2", 60)
    assert started.wait(30)
    shutil.rmtree(srv.registry.root / "a2")
    code, _ = code_of(srv.client.predict, "hi", adapter_id="a2", max_new_tokens=2)
    assert code == grpc.StatusCode.NOT_FOUND
    t.join(60)
    assert result["last"].completion.generated_tokens == 60  # the running row finished on its slot
    shutil.copytree(adapter_sources / "a2", srv.registry.root / "a2")
    assert srv.client.predict("hi", adapter_id="a2", max_new_tokens=2).generated_tokens == 2


def test_truncated_in_place_while_streaming(srv, adapter_sources):
    weights = srv.registry.root / "a1" / WEIGHTS
    t, started, result = stream_in_background(srv, "a1", 60)
    assert started.wait(30)
    with open(weights, "r+b") as f:  # same inode, as a copy over the file that ran out of space leaves it
        f.truncate(weights.stat().st_size // 2)
    code, msg = code_of(srv.client.predict, "hi", adapter_id="a1", max_new_tokens=2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "corrupt" in msg
    t.join(60)
    assert result["last"].completion.generated_tokens == 60
    shutil.copyfile(adapter_sources / "a1" / WEIGHTS, weights)
    assert srv.client.predict("hi", adapter_id="a1", max_new_tokens=2).generated_tokens == 2


def test_restart_sweeps_what_a_crash_left(tiny_model_dir, adapter_sources, tmp_path):
    root = copy_adapters(adapter_sources, tmp_path / "root", names=("a0",))
    partial = root / ".upload-new-x1y2"  # died mid-upload
    partial.mkdir()
    (partial / WEIGHTS).write_bytes(b"\x00" * 100)
    shutil.copytree(adapter_sources / "a2", root / ".deleted-gone-123")  # died mid-delete
    shutil.copytree(adapter_sources / "a1", root / ".old-a1-456")  # died between a replacement's two renames
    s = RunningServer(tiny_model_dir, root)
    try:
        assert hidden(root) == []
        assert [a.adapter_id for a in s.client.list_adapters()] == ["a0", "a1"]  # a1 was restored
        assert s.client.predict("hi", adapter_id="a1", max_new_tokens=2).generated_tokens == 2
    finally:
        s.close()


def limit_file_size():
    # Files the server writes may not grow past 1 MiB: writes beyond fail with EFBIG, as on a full disk
    # (Python ignores SIGXFSZ, so the write fails instead of the process dying).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_disk_full_during_an_upload_is_resource_exhausted(tiny_model_dir, adapter_sources, tmp_path):
    root = copy_adapters(adapter_sources, tmp_path / "root", names=("a0",))
    files = {p.name: p.read_bytes() for p in (adapter_sources / "a1").iterdir() if p.name.startswith("adapter_")}
    with ServeProcess(tiny_model_dir, root, preexec_fn=limit_file_size) as server, Client(server.target) as client:
        too_big = {**files, "README.md": b"x" * (2 << 20)}
        request = adapter_pb2.LoadAdapterRequest(adapter_id="big", upload=adapter_pb2.AdapterUpload(files=too_big))
        code, msg = code_of(client.adapters.LoadAdapter, request, timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "big" in msg, (code, msg)
        assert not (root / "big").exists() and hidden(root) == []  # nothing half-written, visible or hidden
        assert client.predict("hi", adapter_id="a0", max_new_tokens=2).generated_tokens == 2
        request = adapter_pb2.LoadAdapterRequest(adapter_id="fits", upload=adapter_pb2.AdapterUpload(files=files))
        assert client.adapters.LoadAdapter(request, timeout=30).adapter.adapter_id == "fits"
        assert client.predict("hi", adapter_id="fits", max_new_tokens=2).generated_tokens == 2
