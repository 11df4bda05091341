"""API keys the server accepts: a file of hashed keys (re-read when it changes) and one key from the
environment, looked up in constant time.

The file (--api-keys-file) holds one key per line; `#` starts a comment, blank lines are skipped:

    sha256:<64 hex digits: SHA-256 of the key's UTF-8 bytes> <name> <scope>[,<scope>...]

- name: [A-Za-z0-9][A-Za-z0-9._-]{0,63}, unique in the file. It is the caller's identity: errors and
  per-key limits name it; the key itself is never logged or echoed.
- scopes: inference, adapters:read, adapters:write, training, or * for all four.

`loraserve keys new --name NAME --scopes SCOPE,...` prints a fresh key and its line. Keys are 256-bit
random strings, so one SHA-256 is as strong as a slow password hash here, and the file holds nothing
that lets anyone call the server: it can be shared with whoever deploys it.

LORASERVE_API_KEY (plain text, e.g. from a container secret) adds one key named "env" with every scope.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass

from loraserve.server.config import StartupError

log = logging.getLogger(__name__)

SCOPES = ("inference", "adapters:read", "adapters:write", "training")
ALL_SCOPES = "*"
ENV_KEY_NAME = "env"
KEY_PREFIX = "lsk_"
"""Marks loraserve keys, so secret scanners and people can tell them apart from other tokens."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes
    """SHA-256 of the key."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> frozenset[str]:
    scopes = {s.strip() for s in text.split(",") if s.strip()}
    if not scopes:
        raise ValueError(f"no scope given; scopes are {', '.join(SCOPES)} or {ALL_SCOPES} for all")
    unknown = sorted(scopes - {*SCOPES, ALL_SCOPES})
    if unknown:
        raise ValueError(f"unknown scope {', '.join(map(repr, unknown))}; scopes are {', '.join(SCOPES)} "
                         f"or {ALL_SCOPES} for all")
    return frozenset(SCOPES) if ALL_SCOPES in scopes else frozenset(scopes)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ValueError(f"key name {name!r} must match {NAME.pattern}")
    return name


def key_line(key: str, name: str, scopes: frozenset[str]) -> str:
    """The key file line of `key` (its hash, never the key)."""
    listed = ALL_SCOPES if scopes == frozenset(SCOPES) else ",".join(s for s in SCOPES if s in scopes)
    return f"sha256:{digest(key).hex()} {check_name(name)} {listed}"


def parse_line(line: str) -> ApiKey:
    fields = line.split()
    if len(fields) != 3:
        raise ValueError("expected 'sha256:<hex> <name> <scope>[,<scope>...]'")
    hashed, name, scopes = fields
    match = DIGEST.fullmatch(hashed)
    if not match:
        raise ValueError("the hash must be 'sha256:' and 64 lowercase hex digits")
    return ApiKey(check_name(name), parse_scopes(scopes), bytes.fromhex(match.group(1)))


def parse(text: str) -> tuple[list[ApiKey], list[str]]:
    """The file's keys and its errors ("line N: why"); a bad line costs only its own key."""
    keys: list[ApiKey] = []
    errors: list[str] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = parse_line(line)
            if key.name in names:
                raise ValueError(f"name {key.name!r} is used twice")
            if key.digest in digests:
                raise ValueError("the same key is listed twice")
        except ValueError as e:
            errors.append(f"line {number}: {e}")
            continue
        names.add(key.name)
        digests.add(key.digest)
        keys.append(key)
    return keys, errors


class ApiKeys:
    """The keys in force. Used on the event loop only (the auth interceptor), so no lock."""

    def __init__(self, path: str | None, env_key: str | None):
        self.path = path
        self._env = [ApiKey(ENV_KEY_NAME, frozenset(SCOPES), digest(env_key))] if env_key else []
        self._from_file: list[ApiKey] = []
        self._identity: tuple[int, int, int] | None = None
        if path:
            self._load(at_start=True)

    def __len__(self) -> int:
        return len(self._env) + len(self._from_file)

    def lookup(self, key: str) -> ApiKey | None:
        """The entry for `key`, or None. Every entry is compared, whichever matches, so the time taken
        says nothing about which keys exist."""
        self._refresh()
        presented = digest(key)
        found = None
        for entry in (*self._env, *self._from_file):
            if hmac.compare_digest(entry.digest, presented):
                found = entry
        return found

    def _refresh(self) -> None:
        # A stat per authenticated call (microseconds) lets a revoked key stop working at once.
        if self.path and _identity(self.path) != self._identity:
            self._load(at_start=False)

    def _load(self, at_start: bool) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                # Taken before the read: a write after it changes the identity again and the next
                # call reads anew, where one taken after could hide that write.
                identity = _file_identity(os.fstat(f.fileno()))
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            if at_start:
                raise StartupError(f"--api-keys-file {self.path}: {getattr(e, 'strerror', None) or e}") from e
            # Gone or unreadable: no key from the file is accepted until it changes again (fail closed).
            log.error("API key file %s: %s; refusing its keys until it changes", self.path, e)
            self._from_file, self._identity = [], _identity(self.path)
            return
        keys, errors = parse(text)
        if errors and at_start:
            raise StartupError(f"--api-keys-file {self.path}: {'; '.join(errors)}")
        for error in errors:
            log.error("API key file %s: %s; that key is refused", self.path, error)
        self._from_file, self._identity = keys, identity
        if not at_start:
            log.info("API key file %s reloaded: %d keys", self.path, len(keys))


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        return _file_identity(os.stat(path))
    except OSError:
        return None


def _file_identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns
