"""Adapters by id: where they live (disk / CPU / device slot), loading, LRU eviction, containment.

Disk -> CPU loads and CPU -> slot uploads run on worker threads, so neither stalls the running batch:
a slot being written is free (no running row reads it), and a request joins once its adapter's
upload has finished. On CUDA the host copies are pinned and the upload runs on its own stream, so
it overlaps the decode steps instead of queueing in front of them. Slots used by running rows are
pinned; the least recently used unpinned adapter is evicted first, in each tier.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from loraserve.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from loraserve.core.lora.ids import ADAPTER_ID_RE, check_id
from loraserve.core.lora.layer import LoraLinear
from loraserve.core.lora.weights import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    AdapterSpec,
    AdapterWeights,
    load_weights,
    read_metadata,
    read_spec,
)
from loraserve.core.prompt import RAW, parse_rendering
from loraserve.core.tasks.heads import TaskHead
from loraserve.core.tasks.inputs import check_options

log = logging.getLogger(__name__)

ALLOWED_UPLOADS = {CONFIG_FILE, WEIGHTS_FILE, "README.md", METADATA_FILE}

DISK, CPU, GPU = "disk", "cpu", "gpu"
# Hidden directories an upload, a replacement or a delete works in; a crash can leave one behind.
WORK_PREFIXES = (".upload-", ".old-", ".deleted-")
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass
class AdapterInfo:
    adapter_id: str
    state: str
    rank: int
    alpha: float
    target_modules: list[str]
    task_type: str
    size_bytes: int
    slot: int | None
    error: str | None = None
    rendering: str = RAW
    """How a plain prompt to this adapter is rendered: core.prompt.RAW or CHAT (see prompt_rendering)."""
    rendering_error: str | None = None
    """Why the metadata's rendering cannot be used; plain prompts to the adapter then fail."""
    labels: list[str] = field(default_factory=list)
    """A task adapter's labels (see _labels)."""


class AdapterRegistry:
    def __init__(self, root: str | Path, wrapped: dict[str, LoraLinear], slots: int, max_cpu: int,
                 max_rank: int, dtype: torch.dtype, metrics=None, on_loaded: Callable[[], None] | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.wrapped = wrapped
        self.shapes = {name: (m.in_features, m.out_features) for name, m in wrapped.items()}
        self.max_rank = max_rank
        self.max_cpu = max_cpu
        self.dtype = dtype
        self.metrics = metrics
        self.on_loaded = on_loaded or (lambda: None)
        self._lock = threading.RLock()
        self._cpu: OrderedDict[str, AdapterWeights] = OrderedDict()  # LRU order: oldest first
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order among resident adapters
        self._free_slots = list(range(slots, 0, -1))  # slot 0 means "no adapter"
        self._slot_rank = [0] * (slots + 1)
        self._pins: dict[int, int] = {}
        self._loading: dict[str, Future] = {}
        self._errors: dict[str, str] = {}
        self._retired: set[int] = set()  # slots detached from their adapter, freed when their rows finish
        self._fp: dict[str, tuple] = {}  # the files a cached copy (or a failed load) came from
        self._uploading: dict[str, int] = {}  # adapter -> slot being written
        self._metadata_cache: dict[str, tuple[tuple, dict | None | FailedPrecondition]] = {}  # by file identity
        self._heads: dict[int, TaskHead | None] = {}  # slot -> its adapter's task head, on the device
        some = next(iter(wrapped.values()), None)
        self.device = some.lora_a.device if some is not None else torch.device("cpu")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-load")
        self._sweep()
        self._report_residency()

    def _sweep(self) -> None:
        """Remove the work directories a previous run left when it died mid-upload or mid-delete: never
        listed (ids cannot start with a dot), but they hold disk space."""
        for entry in self.root.iterdir():
            if not entry.name.startswith(WORK_PREFIXES) or entry.is_symlink():
                continue
            adapter_id = entry.name.removeprefix(".old-").rpartition("-")[0]
            if entry.name.startswith(".old-") and ADAPTER_ID_RE.fullmatch(adapter_id) \
                    and not (self.root / adapter_id).exists():
                # The run died between the two renames of a replacement: the old copy is the only one.
                log.warning("restoring adapter %s from an interrupted replacement", adapter_id)
                os.rename(entry, self.root / adapter_id)
                continue
            log.warning("removing %s, left by an interrupted upload, replacement or delete", entry.name)
            shutil.rmtree(entry, ignore_errors=True)

    # --- paths -------------------------------------------------------------------------------

    def path_of(self, adapter_id: str) -> Path:
        check_id(adapter_id)
        path = (self.root / adapter_id).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidArgument(f"adapter {adapter_id!r} resolves outside the adapter root")
        return path

    def exists(self, adapter_id: str) -> bool:
        return (self.path_of(adapter_id) / CONFIG_FILE).is_file()

    def ids(self) -> list[str]:
        out = []
        for entry in sorted(self.root.iterdir()):
            if ADAPTER_ID_RE.fullmatch(entry.name) and (entry / CONFIG_FILE).is_file():
                try:
                    self.path_of(entry.name)
                except InvalidArgument:
                    continue  # a symlink escaping the root is never listed
                out.append(entry.name)
        return out

    # --- what the engine calls -----------------------------------------------------------------

    def _files(self, adapter_id: str) -> tuple | None:
        """What identifies an adapter's files (inode, size, mtime of each); None when it is gone."""
        path = self.path_of(adapter_id)
        out = []
        for name in (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE):  # the metadata holds a head's labels
            try:
                st = (path / name).stat()
            except OSError:
                if name == CONFIG_FILE:
                    return None
                out.append(None)
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def state(self, adapter_id: str) -> str:
        """GPU / CPU / disk; raises NotFound or FailedPrecondition (for a failed load).

        The cache follows the disk, checked here at every admission (two stats): files that changed
        drop the cached copies, so new requests get the new weights while running rows finish on the
        old slot; files that are gone mean NOT_FOUND; a failed load is retried once its files change."""
        files = self._files(adapter_id)
        with self._lock:
            known = self._fp.get(adapter_id)
            if known is not None and known != files and adapter_id not in self._loading:
                self.invalidate(adapter_id, forget_error=True)
            if files is None:
                raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
            if adapter_id in self._slot_of or adapter_id in self._uploading:
                return GPU
            if adapter_id in self._cpu:
                return CPU
            if adapter_id in self._errors:
                raise FailedPrecondition(f"adapter {adapter_id!r} cannot be served: {self._errors[adapter_id]}")
        return DISK

    def request_load(self, adapter_id: str) -> Future:
        """Start (or join) a background disk -> CPU load; on_loaded() fires when it ends."""
        with self._lock:
            fut = self._loading.get(adapter_id)
            if fut is None:
                if self.metrics:
                    self.metrics.adapter_miss()
                fut = self._pool.submit(self._load_to_cpu, adapter_id)
                self._loading[adapter_id] = fut
            return fut

    def _load_to_cpu(self, adapter_id: str) -> AdapterWeights:
        start = time.perf_counter()
        files = self._files(adapter_id)  # before reading: a change during the load shows as a change
        with self._lock:
            self._fp[adapter_id] = files
        try:
            weights = load_weights(self.path_of(adapter_id), self.shapes, self.max_rank, self.dtype)
        except FailedPrecondition as e:
            with self._lock:
                self._errors[adapter_id] = str(e)
                self._loading.pop(adapter_id, None)
            self.on_loaded()
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is this adapter's problem only
            with self._lock:
                self._errors[adapter_id] = f"{type(e).__name__}: {e}"
                self._loading.pop(adapter_id, None)
            self.on_loaded()
            raise FailedPrecondition(f"adapter {adapter_id!r} cannot be served: {e}") from e
        if self._stream is not None:  # pinned: the upload is then a true asynchronous copy
            weights.modules = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.modules.items()}
        with self._lock:
            self._cpu[adapter_id] = weights
            self._cpu.move_to_end(adapter_id)
            self._loading.pop(adapter_id, None)
            self._trim_cpu()
            self._report_residency()
        if self.metrics:
            self.metrics.adapter_loaded(time.perf_counter() - start)
        self.on_loaded()
        return weights

    def acquire_slot(self, adapter_id: str) -> int | None:
        """Engine thread: pin the adapter's device slot for a joining row.

        Returns None while the request must wait: the adapter is not in a slot yet (its upload is
        started here, on a worker, and on_loaded() fires when it is done) or every slot is pinned."""
        with self._lock:
            slot = self._slot_of.get(adapter_id)
            if slot is not None:
                self._slot_of.move_to_end(adapter_id)
                if self.metrics:
                    self.metrics.adapter_hit()
                self._pins[slot] = self._pins.get(slot, 0) + 1
                return slot
            if adapter_id in self._uploading:
                return None
            weights = self._cpu.get(adapter_id)
            if weights is None:
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self._uploading[adapter_id] = slot
            self._cpu.move_to_end(adapter_id)
            self._pool.submit(self._upload, adapter_id, slot, weights)
            return None

    def _upload(self, adapter_id: str, slot: int, weights: AdapterWeights) -> None:
        """Worker thread: write one adapter into a free slot, then make it admissible."""
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    self._write(slot, weights)
                self._stream.synchronize()  # this worker waits; the engine's stream does not
            else:
                self._write(slot, weights)
        except Exception as e:  # noqa: BLE001 - this adapter fails alone; its slot goes back
            log.error("upload of adapter %r into slot %d failed", adapter_id, slot, exc_info=e)
            with self._lock:
                self._uploading.pop(adapter_id, None)
                self._errors[adapter_id] = f"upload to the device failed: {type(e).__name__}: {e}"
                self._free_slots.append(slot)
            self.on_loaded()
            return
        with self._lock:
            self._uploading.pop(adapter_id, None)
            if self._cpu.get(adapter_id) is weights:
                self._slot_rank[slot] = weights.max_rank
                self._slot_of[adapter_id] = slot
                self._report_residency()
            else:  # invalidated (its files changed) during the upload: the next request loads anew
                self._free_slots.append(slot)
        self.on_loaded()

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        for name, layer in self.wrapped.items():
            a, b = weights.modules.get(name, (None, None))
            layer.write_slot(slot, a, b)
        # The head goes with the slot, so rows on a retired slot finish with the head they started on.
        self._heads[slot] = weights.head.to(self.device) if weights.head is not None else None

    def slot_head(self, slot: int) -> TaskHead | None:
        """The task head held by a slot (None: a generation adapter, or slot 0, the base model)."""
        return self._heads.get(slot)

    def release_slot(self, adapter_id: str, slot: int) -> None:
        with self._lock:
            self._pins[slot] -= 1
            if self._pins[slot] == 0:
                del self._pins[slot]
                if slot in self._retired:  # its adapter changed or went away while these rows ran
                    self._retired.discard(slot)
                    self._free(slot)

    def slot_ranks(self) -> list[int]:
        return self._slot_rank

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for victim, slot in self._slot_of.items():  # oldest first
            if slot not in self._pins:
                self._drop_slot(victim)
                if self.metrics:
                    self.metrics.adapter_evicted(GPU)
                return self._free_slots.pop()
        return None

    def _drop_slot(self, adapter_id: str) -> None:
        slot = self._slot_of.pop(adapter_id, None)
        if slot is not None:
            self._free(slot)

    def _free(self, slot: int) -> None:
        self._slot_rank[slot] = 0
        self._heads.pop(slot, None)
        self._free_slots.append(slot)
        self._report_residency()

    def _trim_cpu(self) -> None:
        # Adapters in a slot keep their CPU copy only while the CPU tier has room.
        while len(self._cpu) > self.max_cpu:
            victim = next(iter(self._cpu))
            del self._cpu[victim]
            if self.metrics:
                self.metrics.adapter_evicted(CPU)

    def _report_residency(self) -> None:
        if self.metrics:
            self.metrics.adapters_resident(GPU, len(self._slot_of))
            self.metrics.adapters_resident(CPU, len(self._cpu))

    # --- how prompts to an adapter are rendered -------------------------------------------------

    def prompt_rendering(self, adapter_id: str) -> str:
        """core.prompt.RAW or CHAT: how the adapter's training rendered the prompt of its examples, from
        "rendering" in its loraserve_metadata.json (cached while that file is unchanged: one stat).

        No metadata file (a PEFT adapter made elsewhere, or no adapter at all: the engine answers
        NOT_FOUND for that), or metadata without "rendering" (written before it was recorded): RAW,
        the text as is. Metadata that is present but unusable (not a regular file, over
        MAX_METADATA_BYTES, not a JSON object, a rendering this version cannot reproduce) raises
        FailedPrecondition: guessing would feed the adapter prompts it was never trained on; the caller
        can still send chat messages, or ask for the raw text."""
        result = self._rendering(adapter_id)
        if isinstance(result, FailedPrecondition):
            raise result
        return result

    def _rendering(self, adapter_id: str) -> str | FailedPrecondition:
        meta = self._metadata(adapter_id)
        if isinstance(meta, FailedPrecondition):
            return self._bad_rendering(adapter_id, str(meta))
        try:
            return RAW if meta is None or "rendering" not in meta else parse_rendering(meta["rendering"])
        except ValueError as e:
            return self._bad_rendering(adapter_id, str(e))

    def task_input(self, adapter_id: str) -> dict:
        """The input options a task adapter's training used ("task" -> "input" in its metadata; none for
        PEFT adapters made elsewhere: the defaults of core.tasks.inputs). FailedPrecondition when unusable."""
        meta = self._metadata(adapter_id)
        if isinstance(meta, FailedPrecondition):
            raise FailedPrecondition(f"adapter {adapter_id!r}: {meta}")
        task = (meta or {}).get("task") or {}
        try:
            if not isinstance(task, dict) or not isinstance(task.get("input", {}), dict):
                raise FailedPrecondition(f"{METADATA_FILE}: task and its input must be objects")
            return check_options(task.get("input", {}))
        except FailedPrecondition as e:
            raise FailedPrecondition(f"adapter {adapter_id!r}: {e}") from None

    def _metadata(self, adapter_id: str) -> dict | None | FailedPrecondition:
        """The adapter's loraserve_metadata.json (None: there is none), read once per file identity."""
        path = self.path_of(adapter_id)
        try:
            st = os.stat(path / METADATA_FILE, follow_symlinks=False)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            return None
        except OSError as e:
            return FailedPrecondition(f"its {METADATA_FILE} cannot be read: {e.strerror or type(e).__name__}")
        with self._lock:
            cached = self._metadata_cache.get(adapter_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            result = read_metadata(path)
        except FailedPrecondition as e:
            result = e
        with self._lock:
            self._metadata_cache[adapter_id] = (key, result)
        return result

    @staticmethod
    def _bad_rendering(adapter_id: str, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"adapter {adapter_id!r}: the prompt rendering its training used is unknown ({why}), so a plain "
            "prompt cannot be rendered the way it learned; send chat messages, set raw_prompt to tokenize the "
            f"text as is, or fix {METADATA_FILE}")

    # --- what the AdapterService calls ----------------------------------------------------------

    def info(self, adapter_id: str) -> AdapterInfo:
        path = self.path_of(adapter_id)
        if not (path / CONFIG_FILE).is_file():
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
        with self._lock:
            state = GPU if adapter_id in self._slot_of else CPU if adapter_id in self._cpu else DISK
            slot = self._slot_of.get(adapter_id)
            error = self._errors.get(adapter_id)
        try:
            spec = read_spec(path)
        except FailedPrecondition as e:
            spec, error = AdapterSpec(rank=0, alpha=0.0, target_modules=[]), error or str(e)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        rendering = self._rendering(adapter_id)
        bad = isinstance(rendering, FailedPrecondition)
        return AdapterInfo(adapter_id, state, spec.rank, spec.alpha, spec.targets_list, spec.task_type, size, slot,
                           error, RAW if bad else rendering, str(rendering) if bad else None,
                           self._labels(adapter_id))

    def _labels(self, adapter_id: str) -> list[str]:
        """A task adapter's labels: its loaded head's, else what its metadata names (unchecked until it loads)."""
        with self._lock:
            weights = self._cpu.get(adapter_id)
        if weights is not None and weights.head is not None:
            return list(weights.head.spec.labels)
        meta = self._metadata(adapter_id)
        task = meta.get("task") if isinstance(meta, dict) else None
        labels = task.get("labels") if isinstance(task, dict) else None
        return [x for x in labels if isinstance(x, str)][:4096] if isinstance(labels, list) else []

    def load(self, adapter_id: str) -> AdapterInfo:
        """Validate and bring an adapter already under the root into the CPU tier."""
        if not self.exists(adapter_id):
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
        self.invalidate(adapter_id, forget_error=True)
        self.request_load(adapter_id).result()
        return self.info(adapter_id)

    def register_path(self, adapter_id: str, rel_path: str) -> AdapterInfo:
        """Serve a directory that lies under the root under a (new) id, by a relative symlink."""
        check_id(adapter_id)
        if "\x00" in rel_path:
            raise InvalidArgument("path must not contain NUL characters")
        target = Path(rel_path)
        target = (target if target.is_absolute() else self.root / target).resolve()
        if not target.is_relative_to(self.root):
            raise InvalidArgument(f"path {rel_path!r:.200} lies outside the adapter root")
        try:
            found = (target / CONFIG_FILE).is_file()
        except OSError as e:  # a name the filesystem cannot hold (too long): that path names nothing
            raise InvalidArgument(f"path {rel_path!r:.200} is not a usable directory name: {e.strerror}") from None
        if not found:
            raise NotFound(f"no {CONFIG_FILE} in {rel_path!r:.200}")
        link = self.root / adapter_id
        if target != link.resolve():
            if link.exists() or link.is_symlink():
                raise AlreadyExists(f"adapter {adapter_id!r} already exists")
            os.symlink(os.path.relpath(target, self.root), link)
        try:
            return self.load(adapter_id)
        except FailedPrecondition:
            if link.is_symlink():
                link.unlink()
            raise

    def upload(self, adapter_id: str, files: dict[str, bytes], overwrite: bool) -> AdapterInfo:
        """Write uploaded adapter files atomically after validating them; nothing is left on failure."""
        check_id(adapter_id)
        for name in files:
            if name not in ALLOWED_UPLOADS:
                raise InvalidArgument(f"file {name!r} is not accepted; allowed: {', '.join(sorted(ALLOWED_UPLOADS))}")
        target = self.root / adapter_id
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise AlreadyExists(f"adapter {adapter_id!r} already exists (set overwrite to replace it)")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".upload-{adapter_id}-", dir=self.root))
            try:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
                load_weights(tmp, self.shapes, self.max_rank, self.dtype)  # raises FailedPrecondition
                self.install_dir(adapter_id, tmp, overwrite)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:  # the adapter root is full or failing: nothing was installed
            if e.errno in NO_SPACE:
                raise ResourceExhausted(f"no room to store adapter {adapter_id!r}: {e.strerror}; free disk space "
                                        "and retry") from None
            raise Unavailable(f"cannot store adapter {adapter_id!r}: {e.strerror or type(e).__name__}") from None
        return self.load(adapter_id)

    def install_dir(self, adapter_id: str, src: Path, overwrite: bool) -> None:
        """Rename a finished directory into place (atomic on one filesystem) and drop stale copies."""
        target = self.root / adapter_id
        with self._lock:
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise AlreadyExists(f"adapter {adapter_id!r} already exists (set overwrite to replace it)")
                old = self.root / f".old-{adapter_id}-{time.monotonic_ns()}"
                os.rename(target, old)
                os.rename(src, target)
                if old.is_symlink():
                    old.unlink()
                else:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(src, target)
            self.invalidate(adapter_id, forget_error=True)

    def invalidate(self, adapter_id: str, forget_error: bool = False) -> None:
        """Forget cached copies (files changed). A pinned slot is detached now and freed when its rows
        finish, so new requests load the adapter anew."""
        with self._lock:
            self._cpu.pop(adapter_id, None)
            self._fp.pop(adapter_id, None)
            if forget_error:
                self._errors.pop(adapter_id, None)
            slot = self._slot_of.pop(adapter_id, None)
            if slot is not None:
                if slot in self._pins:
                    self._retired.add(slot)
                else:
                    self._free(slot)
            self._report_residency()

    def unload(self, adapter_id: str) -> AdapterInfo:
        if not self.exists(adapter_id):
            self.invalidate(adapter_id, forget_error=True)  # files gone: nothing of it may keep serving
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
        self.invalidate(adapter_id, forget_error=True)
        return self.info(adapter_id)

    def delete(self, adapter_id: str) -> None:
        path = self.root / check_id(adapter_id)
        if not (path.exists() or path.is_symlink()):
            raise NotFound(f"adapter {adapter_id!r} not found under the adapter root")
        with self._lock:
            slot = self._slot_of.get(adapter_id)
            if slot is not None and slot in self._pins:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} is serving {self._pins[slot]} running request(s); retry when they finish"
                )
            self.invalidate(adapter_id, forget_error=True)
            if path.is_symlink():
                path.unlink()
            else:
                trash = self.root / f".deleted-{adapter_id}-{time.monotonic_ns()}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
