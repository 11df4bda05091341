"""`loraserve serve` as a child process, for what needs a real process: signals, resource limits, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

# The start-up line names the gRPC port ("on port N", or "on HOST:N" once it names the bound address).
READY_RE = re.compile(r"serving .* on (?:port |\S+:)(\d+)")
REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, model_dir: Path, adapter_root: Path, *args: str, preexec_fn=None):
        self.cmd = [sys.executable, "-m", "loraserve.server.cli", "serve", "--model", str(model_dir),
                    "--quantization", "fp32", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
                    "--adapter-root", str(adapter_root), *args]
        self.preexec_fn = preexec_fn
        self.log: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> "ServeProcess":
        env = {**os.environ, "LORASERVE_LOG_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                     preexec_fn=self.preexec_fn)
        for line in self.proc.stderr:
            self.log.append(line)
            m = READY_RE.search(line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.__exit__()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))
        # Keep reading, so the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
