"""A real loraserve gRPC server on a loopback port, in-process on its own event loop thread."""

from __future__ import annotations

import asyncio
import shutil
import threading
import urllib.request
from pathlib import Path

import grpc
from loraserve.channel import open_channel
from loraserve.client import Client
from loraserve.server.app import LoraServer
from loraserve.server.config import (
    EngineConfig,
    LoraCacheConfig,
    ModelConfig,
    ServerConfig,
)


class RunningServer:
    def __init__(self, model_dir: Path, adapter_root: Path, quantization: str = "fp32",
                 connect: dict | None = None, **overrides):
        """`overrides` are ServerConfig fields (engine and lora ones too); `connect` holds open_channel's
        settings (TLS, api_key) for the client and channel() of a server with security=SecurityConfig(...)."""
        engine = {k: overrides.pop(k) for k in list(overrides) if k in EngineConfig.__dataclass_fields__}
        lora = {k: overrides.pop(k) for k in list(overrides) if k in LoraCacheConfig.__dataclass_fields__}
        overrides = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **overrides}
        self.config = ServerConfig(
            model=ModelConfig(path=str(model_dir), quantization=quantization, device="cpu"),
            lora=LoraCacheConfig(adapter_root=str(adapter_root), **{"max_gpu_adapters": 4, "max_lora_rank": 16,
                                                                    **lora}),
            engine=EngineConfig(**{"max_new_tokens": 256, **engine}),
            **overrides,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._call(self._build())
        self.port = self.server.port
        self.target = f"127.0.0.1:{self.port}"
        self.connect = connect or {}
        self.client = Client(self.target, **self.connect)

    async def _build(self):
        server = LoraServer(self.config)
        await server.start()
        return server

    def _call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self):
        return self.server.engine

    @property
    def registry(self):
        return self.server.registry

    def channel(self) -> grpc.Channel:
        return open_channel(self.target, **self.connect)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """Value of one sample from a real /metrics scrape (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics_text().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name or (want and key == f"{name}{{{want}}}"):
                return float(value)
        return 0.0

    def close(self) -> None:
        self.client.close()
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def copy_adapters(sources: Path, root: Path, names=("a0", "a1", "a2")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(sources / name, root / name)
    return root
