"""Error messages name what the caller gave (a file name, a line, an id), never an absolute server path:
the data reader's and the adapter writer's refusals, and the Train RPC's
dataset_path refusals, all with real files under a temporary directory whose path must not show."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest
from harness import RunningServer, copy_adapters
from loraserve.core.errors import LoraserveError
from loraserve.server.config import TrainingConfig
from loraserve.trainer.data import read_jsonl
from loraserve.trainer.output import write_trained_adapter

GOOD = '{"prompt": "a", "completion": "b"}\n'


def assert_no_path(message: str, *directories: Path) -> None:
    for directory in directories:
        for form in {str(directory), str(directory.resolve())}:
            assert form not in message, f"{message!r} reveals {form!r}"


def make_files(root: Path) -> Path:
    """Data files that fail each way the reader can fail; returns the directory outside `root`'s data."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good.jsonl").write_text(GOOD)
    (root / "four.jsonl").write_text(GOOD * 4)
    (root / "broken.jsonl").write_text(GOOD + '{"prompt": "c", "completion": \n')
    (root / "utf8.jsonl").write_bytes(GOOD.encode() + b'{"prompt": "\xff", "completion": "c"}\n')
    (root / "blank.jsonl").write_text("\n  \n")
    (root / "array.jsonl").write_text('["prompt", "completion"]\n')
    (root / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (root / "folder.jsonl").mkdir()
    (root / "loop.jsonl").symlink_to("loop.jsonl")
    (root / "dangling.jsonl").symlink_to("gone.jsonl")
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(GOOD)
    (root / "escape.jsonl").symlink_to(outside / "secret.jsonl")
    return outside


# read_jsonl(name) -> (exception class name, part of the message)
READER = {
    "missing.jsonl": ("NotFound", "'missing.jsonl' does not exist"),
    "folder.jsonl": ("InvalidArgument", "'folder.jsonl' cannot be read: Is a directory"),
    "good.jsonl/below": ("InvalidArgument", "'below' cannot be read: Not a directory"),
    "loop.jsonl": ("InvalidArgument", "'loop.jsonl' cannot be read: Too many levels of symbolic links"),
    "dangling.jsonl": ("NotFound", "'dangling.jsonl' does not exist"),
    "x" * 300 + ".jsonl": ("InvalidArgument", "cannot be read: File name too long"),
    "broken.jsonl": ("InvalidArgument", "line 2: not valid JSON"),
    "utf8.jsonl": ("InvalidArgument", "line 2: not valid UTF-8"),
    "blank.jsonl": ("InvalidArgument", "'blank.jsonl' holds no examples"),
    "array.jsonl": ("InvalidArgument", "line 1: expected a JSON object, got an array"),
    "deep.jsonl": ("InvalidArgument", "line 1: JSON nested too deeply"),
    "four.jsonl": ("InvalidArgument", "more than 3 examples"),
}


@pytest.mark.parametrize("name", READER)
def test_data_reader_errors_name_the_file_not_its_path(tmp_path, name):
    root = tmp_path / "data"
    make_files(root)
    kind, part = READER[name]
    with pytest.raises(LoraserveError) as e:
        read_jsonl(root / name, max_examples=3)
    assert_no_path(str(e.value), tmp_path)
    assert type(e.value).__name__ == kind and part in str(e.value), str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_data_file_names_the_file_not_its_path(tmp_path):
    path = tmp_path / "locked.jsonl"
    path.write_text(GOOD)
    path.chmod(0)
    with pytest.raises(LoraserveError, match="'locked.jsonl' cannot be read: Permission denied") as e:
        read_jsonl(path)
    assert_no_path(str(e.value), tmp_path)


@pytest.mark.parametrize("existing,overwrite,kind,part", [
    ("dir", False, "AlreadyExists", "adapter 'taken' already exists"),
    ("file", False, "AlreadyExists", "adapter 'taken' already exists"),
    ("file", True, "FailedPrecondition", "adapter 'taken' exists and is not a directory"),
    ("symlink", True, "FailedPrecondition", "adapter 'taken' exists and is not a directory"),
])
def test_adapter_writer_errors_name_the_adapter_not_its_path(tmp_path, existing, overwrite, kind, part):
    target = tmp_path / "adapters" / "taken"
    target.parent.mkdir()
    if existing == "dir":
        target.mkdir()
    elif existing == "file":
        target.write_text("x")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    # The target is checked before anything is written: no trained result is needed to reach the refusal.
    with pytest.raises(LoraserveError) as e:
        write_trained_adapter(target, None, None, None, overwrite=overwrite)
    assert_no_path(str(e.value), tmp_path)
    assert type(e.value).__name__ == kind and part in str(e.value), str(e.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["taken"]  # nothing else left behind


@pytest.fixture(scope="module")
def srv(tiny_model_dir, adapter_sources, tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    data_root = base / "data"
    make_files(data_root)
    root = copy_adapters(adapter_sources, base / "adapters", names=("a0",))
    s = RunningServer(tiny_model_dir, root, training=TrainingConfig(data_root=str(data_root), max_examples=3))
    s.base = base
    yield s
    s.close()


# dataset_path -> (status code, part of the message)
RPC = {
    "nope.jsonl": ("NOT_FOUND", "dataset_path 'nope.jsonl' names no file"),
    "folder.jsonl": ("NOT_FOUND", "dataset_path 'folder.jsonl' names no file"),
    "good.jsonl/below": ("NOT_FOUND", "names no file"),
    "dangling.jsonl": ("NOT_FOUND", "names no file"),
    "loop.jsonl": ("INVALID_ARGUMENT", "dataset_path 'loop.jsonl' cannot be resolved"),
    "x" * 300 + ".jsonl": ("INVALID_ARGUMENT", "cannot be resolved"),
    "../outside/secret.jsonl": ("INVALID_ARGUMENT", "lies outside the server's data root"),
    "escape.jsonl": ("INVALID_ARGUMENT", "'escape.jsonl' lies outside the server's data root"),
    "folder.jsonl/../../outside/secret.jsonl": ("INVALID_ARGUMENT", "lies outside"),
    "/etc/hostname": ("INVALID_ARGUMENT", "lies outside"),
    "bad\x00.jsonl": ("INVALID_ARGUMENT", "must not contain NUL characters"),
    "broken.jsonl": ("INVALID_ARGUMENT", "line 2: not valid JSON"),
    "utf8.jsonl": ("INVALID_ARGUMENT", "line 2: not valid UTF-8"),
    "blank.jsonl": ("INVALID_ARGUMENT", "'blank.jsonl' holds no examples"),
    "deep.jsonl": ("INVALID_ARGUMENT", "JSON nested too deeply"),
    "four.jsonl": ("INVALID_ARGUMENT", "more than 3 examples"),
}


@pytest.mark.parametrize("dataset_path", RPC, ids=lambda p: p[:40].replace("\x00", "NUL"))
def test_train_dataset_errors_never_reveal_server_paths(srv, dataset_path):
    code, part = RPC[dataset_path]
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.train("new", dataset_path=dataset_path, settings={"max_steps": 1}))
    assert_no_path(e.value.details(), srv.base, Path(srv.config.training.data_root),
                   Path(srv.config.lora.adapter_root))
    assert e.value.code().name == code, e.value.details()
    assert part in e.value.details(), e.value.details()


def test_train_into_an_existing_adapter_names_the_id_not_its_path(srv):
    with pytest.raises(grpc.RpcError) as e:
        next(srv.client.train("a0", dataset_path="good.jsonl", settings={"max_steps": 1}))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "adapter 'a0' already exists" in e.value.details()
    assert_no_path(e.value.details(), srv.base)
    assert srv.client.list_training_jobs() == []


def test_errno_names_used_above_are_this_platforms():
    # The reader reports e.strerror; the expected texts above are Linux's.
    assert os.strerror(errno.ELOOP) == "Too many levels of symbolic links"
    assert os.strerror(errno.ENAMETOOLONG) == "File name too long"
