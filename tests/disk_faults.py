"""A full disk, for real: the kernel's file size limit makes writes fail part way, as ENOSPC does."""

from __future__ import annotations

import resource
import signal
from contextlib import contextmanager


@contextmanager
def file_size_limit(limit: int):
    """Writes that would make a file longer than `limit` bytes fail with EFBIG, the rest of the file
    unwritten, as on a disk that fills up mid-write. The limit holds for the whole process (every
    thread) and is lifted after; SIGXFSZ is ignored meanwhile, or the kernel's signal would kill it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
