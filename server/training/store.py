"""Job records on disk: one JSON file per job, replaced atomically, so a crash mid-write leaves
the previous version (or nothing) and never half a record."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from loraserve.server.training.records import JobRecord

log = logging.getLogger(__name__)

SUFFIX = ".json"


class JobStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().resolve()

    def save(self, record: JobRecord) -> None:
        data = json.dumps(record.to_json(), indent=1, sort_keys=True, allow_nan=False).encode()
        self.directory.mkdir(parents=True, exist_ok=True)  # on first use: a server that never trains leaves none
        fd, tmp = tempfile.mkstemp(prefix=f".{record.job_id}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.directory / f"{record.job_id}{SUFFIX}")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_all(self) -> list[JobRecord]:
        """Every readable record; an unreadable one is logged and skipped, never fatal to start-up."""
        records = []
        if not self.directory.is_dir():
            return records
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path.name.startswith("."):
                continue  # a temporary file left by a crash mid-save
            try:
                record = JobRecord.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("skipping unreadable training job record %s: %s", path, e)
                continue
            if f"{record.job_id}{SUFFIX}" != path.name:
                log.warning("skipping training job record %s: it names job %s", path, record.job_id)
                continue
            records.append(record)
        return records

    def remove_temporaries(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.glob(".*.tmp"):
            path.unlink(missing_ok=True)
