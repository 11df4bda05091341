"""Every query of deploy/grafana-dashboard.json, evaluated by a real Prometheus scraping a real server.

Prometheus (Debian's /usr/bin/prometheus; .ci/run installs it) scrapes the test server's /metrics
every second while traffic runs: predictions over several adapters (more than the device slots,
so adapters are evicted), a few errors, a short training job. Then each target expression of each
panel, with Grafana's variables substituted, must return data: a panel that stays empty names
itself. Skipped only without Prometheus outside CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from harness import RunningServer, copy_adapters

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval would be for a short range scraped every 1 s


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def substitute(expr: str, dashboard: dict) -> str:
    """Grafana's built-in interval variables and the dashboard's own variables, as 'All' would select."""
    builtins = {"__rate_interval": RATE_INTERVAL, "__interval": "5s", "__range": "5m", "__range_s": "300"}
    for name, value in builtins.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    for var in dashboard.get("templating", {}).get("list", []):
        value = var.get("allValue") or ".*" if var.get("includeAll") else var.get("current", {}).get("value", "")
        expr = re.sub(rf"\$\{{{var['name']}(:\w+)?\}}|\${var['name']}\b", value, expr)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def test_dashboard_is_grafana_shaped():
    d = load_dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, titles = set(), set()
    for p in panels(d):
        where = f"panel {p.get('title')!r}"
        assert p["id"] not in ids and p["title"] not in titles, f"{where}: duplicate id or title"
        ids.add(p["id"])
        titles.add(p["title"])
        assert p["type"] in ("timeseries", "stat", "gauge", "table", "bargauge", "heatmap"), where
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, where
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], f"{where} has no targets"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), f"{where}: duplicate refId"
        for t in p["targets"]:
            assert t["expr"].strip() and t.get("datasource", p["datasource"]) == p["datasource"], where
    titles_lower = " ".join(titles).lower()
    for wanted in ("request latency", "error", "training jobs", "training tokens", "training loss", "top adapters"):
        assert wanted in titles_lower, f"no panel for {wanted}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_or_skip() -> str:
    binary = os.environ.get("PROMETHEUS") or shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return binary


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, check, timeout: float = 30.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def drive_traffic(srv: RunningServer) -> None:
    c = srv.client
    for i in range(9):  # three adapters over two device slots: misses, loads and evictions
        c.predict(f"Prompt number {i}", adapter_id=f"a{i % 3}", max_new_tokens=6)
    for chunk in c.stream("Once upon a time", adapter_id="a1", max_new_tokens=6):
        pass
    c.predict("The base model", max_new_tokens=4)
    for bad in ({"adapter_id": "no-such-adapter"}, {"adapter_id": "../escape"}, {"max_new_tokens": 100000}):
        with pytest.raises(grpc.RpcError):
            c.predict("x", **{"max_new_tokens": 2, **bad})
    events = list(c.train("trained-for-dashboard", examples=[{"prompt": f"Q{i}:", "completion": f" A{i}"}
                                                              for i in range(4)],
                          settings={"rank": 4, "max_steps": 3, "batch_size": 2, "eval_fraction": 0.0}))
    assert type(events[-1].kind).__name__ == "Completed", events[-1]
    c.predict("After training", adapter_id="trained-for-dashboard", max_new_tokens=4)


def test_every_dashboard_query_returns_data(tiny_model_dir, adapter_sources, tmp_path):
    binary = prometheus_or_skip()
    dashboard = load_dashboard()
    root = copy_adapters(adapter_sources, tmp_path / "adapters")
    srv = RunningServer(tiny_model_dir, root, max_gpu_adapters=2, per_adapter_metrics=True)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: loraserve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{srv.server.metrics_port}']}}]\n")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus to scrape the server", lambda: any(
            t["health"] == "up" for t in api(base, "/api/v1/targets")["activeTargets"]))
        drive_traffic(srv)
        # Two more scrapes after the last request, so every counter's last increase lies inside a window.
        done = time.time()
        wait_for("two scrapes after the traffic", lambda: all(
            t["lastScrape"] and _ts(t["lastScrape"]) > done + 1.0 for t in api(base, "/api/v1/targets")["activeTargets"]),
            timeout=20)
        empty = []
        for panel in panels(dashboard):
            for target in panel["targets"]:
                expr = substitute(target["expr"], dashboard)
                result = api(base, "/api/v1/query", query=expr, time=f"{time.time():.3f}")["result"]
                if not result:
                    empty.append(f"{panel['title']!r} [{target['refId']}]: {expr}")
        assert not empty, "dashboard queries with no data after traffic:\n" + "\n".join(empty)
        # Spot checks that the numbers are the traffic's: errors by code, the adapter ranking, the loss.
        codes = {r["metric"]["code"] for r in api(base, "/api/v1/query", query=substitute(
            'sum by (code) (increase(loraserve_requests_total{code!="OK"}[1m]))', dashboard))["result"]}
        assert {"NOT_FOUND", "INVALID_ARGUMENT"} <= codes, codes
        top = api(base, "/api/v1/query", query='topk(3, sum by (adapter) (increase(loraserve_adapter_requests_total[1m])))')
        assert {r["metric"]["adapter"] for r in top["result"]} == {"a0", "a1", "a2"}
        loss = api(base, "/api/v1/query", query="loraserve_training_loss")["result"]
        assert float(loss[0]["value"][1]) > 0
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
        srv.close()


def _ts(rfc3339: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339.replace("Z", "+00:00"))).timestamp()
