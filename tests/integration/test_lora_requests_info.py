"""The vLLM-shaped adapter gauge that the Gateway API inference extension reads, through a real /metrics scrape."""

from __future__ import annotations

import re
import threading
import time

from harness import RunningServer, copy_adapters

INFO = re.compile(r'^(loraserve_lora_requests_info|vllm:lora_requests_info)\{(.*)\} (\S+)$', re.M)


def infos(srv) -> dict[str, tuple[dict[str, str], float]]:
    out = {}
    for name, labels, value in INFO.findall(srv.metrics_text()):
        out[name] = (dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value))
    return out


def test_running_and_waiting_adapters_are_exposed_in_vllm_shape(tiny_model_dir, adapter_sources, tmp_path):
    root = copy_adapters(adapter_sources, tmp_path / "adapters")
    srv = RunningServer(tiny_model_dir, root, max_batch_size=1, max_gpu_adapters=2)
    try:
        before = time.time()
        idle = infos(srv)
        assert set(idle) == {"loraserve_lora_requests_info", "vllm:lora_requests_info"}
        assert idle["vllm:lora_requests_info"][0] == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                                                      "max_lora": "2"}
        # One row: a0 streams (running) while a1 queues behind it (waiting).
        first = srv.client.stream("Hello there", adapter_id="a0", max_new_tokens=200, timeout=60)
        next(first)
        second = srv.client.stream("Once upon a time", adapter_id="a1", max_new_tokens=4, timeout=60)
        drained = threading.Thread(target=lambda: list(second), daemon=True)
        drained.start()
        deadline = time.monotonic() + 30
        while True:
            seen = infos(srv)
            labels, value = seen["vllm:lora_requests_info"]
            if labels["waiting_lora_adapters"] == "a1" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert labels == {"running_lora_adapters": "a0", "waiting_lora_adapters": "a1", "max_lora": "2"}
        assert seen["loraserve_lora_requests_info"] == seen["vllm:lora_requests_info"]
        assert before <= value <= time.time()  # the time this state began, as the extension sorts on
        first.close()
        drained.join(30)
        deadline = time.monotonic() + 30
        while infos(srv)["vllm:lora_requests_info"][0]["running_lora_adapters"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert infos(srv)["vllm:lora_requests_info"][0]["running_lora_adapters"] == ""
    finally:
        srv.close()
