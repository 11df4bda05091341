"""Write a trained adapter atomically: PEFT files plus loraserve_metadata.json, renamed into place.

The adapter root is watched by the registry and read by stock PEFT, so a half-written adapter must
never be visible under its name: everything goes into a hidden temporary directory in the same
parent (same filesystem, so rename is atomic), is flushed to disk, and is then renamed to the target.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import tomllib
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from loraserve.core.errors import AlreadyExists, FailedPrecondition
from loraserve.core.lora.weights import METADATA_FILE, AdapterSpec, write_adapter
from loraserve.core.model.load import BaseModel
from loraserve.core.prompt import rendering_record
from loraserve.core.tasks.heads import PEFT_TASK_TYPE, HeadSpec
from loraserve.trainer.loop import TrainResult
from loraserve.trainer.render import use_chat
from loraserve.trainer.settings import TrainSettings

METADATA_FORMAT = 1


def write_trained_adapter(target: str | Path, result: TrainResult, settings: TrainSettings, base: BaseModel, *,
                          adapter_id: str | None = None, task_id: str | None = None,
                          overwrite: bool = False) -> Path:
    """Write the adapter to `target` (a directory); refuses an existing one unless overwrite=True."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _check_target(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        write_adapter_files(tmp, result, settings, base, adapter_id=adapter_id or target.name, task_id=task_id)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(parent)
    return target


def write_adapter_files(directory: Path, result: TrainResult, settings: TrainSettings, base: BaseModel, *,
                        adapter_id: str, task_id: str | None = None) -> None:
    """The adapter's files, flushed to disk, into a directory not yet visible under its name (the
    server's registry renames it into place itself with AdapterRegistry.install_dir)."""
    spec = AdapterSpec(rank=settings.rank, alpha=settings.alpha, target_modules=list(settings.target_modules),
                       use_rslora=settings.use_rslora, base_model=base.name, dropout=settings.dropout,
                       task_type=PEFT_TASK_TYPE[settings.task])
    write_adapter(directory, spec, result.modules, head=result.head)
    info = build_metadata(result, settings, base, adapter_id=adapter_id, task_id=task_id)
    (directory / METADATA_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    _usual_modes(directory)
    _sync_tree(directory)


def build_metadata(result: TrainResult, settings: TrainSettings, base: BaseModel, *, adapter_id: str,
                   task_id: str | None) -> dict:
    return {
        "format": METADATA_FORMAT,
        "adapter_id": adapter_id,
        "task_id": task_id,
        "base_model": {"name": base.name, "fingerprint": base.fingerprint, "quantization": base.quantization},
        "settings": settings.to_dict(),
        # How prompts were rendered (settings.template resolved against this tokenizer, as
        # trainer.data.prepare did): the server renders a plain prompt to this adapter the same way.
        "rendering": rendering_record(use_chat(settings.template, base.tokenizer), base.tokenizer),
        "data": {"sha256": result.data_hash, **asdict(result.stats)},
        "metrics": {k: _finite_or_none(v) for k, v in result.metrics.to_dict().items()},
        "timings": {"started_at": _iso(result.started_at), "finished_at": _iso(result.finished_at),
                    "seconds": result.metrics.seconds},
        "created_at": _iso(datetime.now(timezone.utc).timestamp()),
        "loraserve_version": loraserve_version(),
        **_task_metadata(result, settings),
    }


def _task_metadata(result: TrainResult, settings: TrainSettings) -> dict:
    """A task adapter's head: its kind, label names and input options (what the server builds requests
    and reads results with), and the full evaluation report (per class, confusion matrix, ...)."""
    if result.task is None:
        return {}
    spec = HeadSpec(settings.task, result.task.labels, result.task.multi_label, settings.threshold,
                    settings.task_input())
    return {"task": spec.to_dict(), "evaluation": result.evaluation}


def loraserve_version() -> str:
    try:
        return metadata.version("loraserve")
    except metadata.PackageNotFoundError:
        # Running from a source checkout that was never pip-installed: pyproject.toml has it.
        try:
            pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _check_target(target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise AlreadyExists(f"adapter {target.name!r} already exists: choose another adapter id or overwrite it")
    if target.is_symlink() or not target.is_dir():
        raise FailedPrecondition(f"adapter {target.name!r} exists and is not a directory: it will not be replaced")


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if not os.path.lexists(target):
                raise
        # Someone created the target since the check: fall through to the same rule as before.
        _check_target(target, overwrite)
    # Replace: the old adapter moves aside, the new one takes its name, then the old one goes.
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _usual_modes(directory: Path) -> None:
    """mkdtemp makes directories 0700 and safetensors writes 0600; give them the modes a plain
    mkdir / open would under this umask (a server may run as another user). A file just written
    with write_text shows that umask."""
    file_mode = (directory / METADATA_FILE).stat().st_mode & 0o666
    for path in directory.iterdir():
        os.chmod(path, file_mode)
    os.chmod(directory, file_mode | (file_mode & 0o444) >> 2)


def _sync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _sync(directory)


def _sync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite_or_none(value):
    # Strict JSON has no Infinity (a perplexity can overflow); readers get null instead.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
