"""The public contract: committed client code matches proto/, and proto/ passes buf's STANDARD lint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "clients" / "python" / "loraserve" / "v1"


def test_generated_client_code_is_fresh(tmp_path):
    sys.path.insert(0, str(ROOT / "clients"))
    try:
        from generate import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "loraserve" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"run `python clients/generate.py`: stale generated files {stale}"


def find_buf() -> str | None:
    return os.environ.get("BUF") or shutil.which("buf") or next(
        (str(p) for p in [ROOT / ".ci" / "node_modules" / ".bin" / "buf"] if p.exists()), None)


def test_buf_lint_standard():
    buf = find_buf()
    if buf is None:
        if os.environ.get("CI"):
            pytest.fail("buf is not installed: .ci/run installs it from the npm registry (@bufbuild/buf)")
        pytest.skip("buf not installed (npm install --prefix .ci @bufbuild/buf)")
    result = subprocess.run([buf, "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rpc_documents_its_status_codes():
    for proto in (ROOT / "proto" / "loraserve" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                comment = []
                j = i - 1
                while j >= 0 and lines[j].strip().startswith("//"):
                    comment.append(lines[j])
                    j -= 1
                assert "Status codes" in "\n".join(comment), f"{proto.name}: {line.strip()}"
