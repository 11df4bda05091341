"""Regenerate the Python client code from proto/ (committed; tests/test_proto.py fails when stale).

    python clients/generate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"
OUT = ROOT / "clients" / "python"


def generate(out: Path = OUT) -> None:
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "loraserve" / "v1").glob("*.proto"))
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", *files])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    (out / "loraserve" / "v1" / "__init__.py").touch()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
