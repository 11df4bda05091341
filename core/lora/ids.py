"""Adapter ids: the one rule every entry point (RPCs, CLI, the adapter root listing) checks.

An id names a directory under the adapter root, so it may hold no path separators and no "..";
fullmatch, not match with "$", so that a trailing newline cannot slip through.
"""

from __future__ import annotations

import re

from loraserve.core.errors import InvalidArgument

ADAPTER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(adapter_id: str) -> str:
    if not ADAPTER_ID_RE.fullmatch(adapter_id or "") or adapter_id in (".", ".."):
        raise InvalidArgument(
            f"adapter id {adapter_id!r} is malformed: it must match ^{ADAPTER_ID_RE.pattern}$ (no slashes or '..')"
        )
    return adapter_id
