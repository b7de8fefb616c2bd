"""deploy/k8s: every manifest valid against the Kubernetes API schemas (offline, strict: unknown
fields are errors), and the workloads agree with the topology in the ConfigMap: names, ports,
health probes, bind host, drain grace, GPUs, the engine beside a `backend: openai` node, the
HPA's metric (a real node metric, served by the adapter rule) and the ServiceMonitor's port;
the TLS option (the ConfigMap's commented `tls:` line, the Secret every ruyiflow pod mounts
there, readiness asked by `ruyiflow health` as operator) gives a valid topology and the
certificates `ruyiflow certs` makes for it."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from ruyiflow.cluster.tls import tls_files
from ruyiflow.cluster.topology_yaml import load_topology, parse_topology
from ruyiflow.cluster.units import parse_address
from ruyiflow.cmd_certs import make_certs
from ruyiflow.node.metrics import NodeMetrics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSIONS = ("1.29.0", "1.33.0")  # oldest and newest minor we claim
NAMESPACE = "ruyiflow"
TOPOLOGY_DIR = "/etc/ruyiflow"
# ServiceMonitor is a CRD (monitoring.coreos.com/v1), absent from the API schemas: the fields
# used here, checked against their types in the CRD, and nothing else.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object"}},
                    "additionalProperties": False,
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = documents()


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def topology():
    return parse_topology(find("ConfigMap", "ruyiflow-topology")["data"]["topology.yaml"])


def ports(items: list[dict[str, Any]], key: str) -> dict[str, int]:
    return {p["name"]: p[key] for p in items}


def health_probe_name(container: dict[str, Any]) -> str:
    """The process the readiness probe asks about: `ruyiflow health NAME --topology ...`
    (through `sh -c` where NAME comes from the environment)."""
    command = container["readinessProbe"]["exec"]["command"]
    if command[:2] == ["sh", "-c"]:
        command = shlex.split(command[2])
        assert command[0] == "exec"
        command = command[1:]
    assert command[:2] == ["ruyiflow", "health"]
    assert command[3:] == ["--topology", f"{TOPOLOGY_DIR}/topology.yaml"]
    assert container["readinessProbe"]["timeoutSeconds"] >= 5  # a Python start on a busy pod
    return command[2]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid(doc, version):
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICE_MONITOR)
        return
    kubernetes_validate.validate(doc, version, strict=True)
    if doc["kind"] != "Namespace":
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_validation_catches_a_wrong_field():
    doc = yaml.safe_load(yaml.safe_dump(find("Deployment", "router")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def workload_of(node_name: str, address: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(workload, Service) serving a node: a StatefulSet pod `<pod>.<service>.<ns>.svc...`, or
    a Deployment behind the headless Service `<service>.<ns>.svc...`."""
    labels = parse_address(address)[0].split(".")
    if labels[2:4] == [NAMESPACE, "svc"]:  # a StatefulSet pod's own name
        pod, service = labels[0], labels[1]
        workload = find("StatefulSet", service)
        assert workload["spec"]["serviceName"] == service
        ordinal = int(pod.rsplit("-", 1)[1])
        assert pod == f"{service}-{ordinal}" == node_name
        assert ordinal < workload["spec"]["replicas"]
    else:
        assert labels[1:3] == [NAMESPACE, "svc"], address
        service = labels[0]
        workload = find("Deployment", service)
    svc = find("Service", service)
    assert svc["spec"]["clusterIP"] == "None"  # headless: DNS names the pods themselves
    return workload, svc


def test_nodes_agree_with_the_topology():
    topo = topology()
    grace = topo.router.grace_period_s
    for node in topo.nodes:
        workload, svc = workload_of(node.name, node.listen)
        pod = workload["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        listen, metrics = parse_address(node.listen)[1], parse_address(node.metrics)[1]
        assert ports(svc["spec"]["ports"], "port") == {"grpc": listen, "metrics": metrics}
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
        assert ports(container["ports"], "containerPort") == {"grpc": listen, "metrics": metrics}
        tier, _, name, *_ = container["args"]
        expected_name = "$(POD_NAME)" if workload["kind"] == "StatefulSet" else node.name
        assert (tier, name) == (node.tier, expected_name)
        assert container["args"][-2:] == ["--topology", f"{TOPOLOGY_DIR}/topology.yaml"]
        assert {"name": "RUYIFLOW_BIND_HOST", "value": "0.0.0.0"} in container["env"]
        assert health_probe_name(container) == (
            "$POD_NAME" if workload["kind"] == "StatefulSet" else node.name
        )
        assert container["livenessProbe"]["tcpSocket"]["port"] == "grpc"
        assert pod["spec"]["terminationGracePeriodSeconds"] >= grace + 5
        assert container["resources"]["requests"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes[mounts[TOPOLOGY_DIR]]["configMap"]["name"] == "ruyiflow-topology"


def test_statefulset_replicas_are_the_topology_nodes():
    names = [n.name for n in topology().nodes]
    for doc in DOCS:
        if doc["kind"] == "StatefulSet":
            stem = doc["metadata"]["name"]
            count = sum(1 for n in names if n.rsplit("-", 1)[0] == stem)
            assert doc["spec"]["replicas"] == count


def test_an_engine_node_has_its_engine_and_a_gpu_in_the_pod():
    for node in topology().nodes:
        if node.backend != "openai":
            continue
        workload, _ = workload_of(node.name, node.listen)
        containers = workload["spec"]["template"]["spec"]["containers"]
        (engine,) = [c for c in containers if c["name"] != "node"]
        args = engine["args"]
        assert node.base_url == f"http://127.0.0.1:{args[args.index('--port') + 1]}/v1"
        assert args[args.index("--host") + 1] == "127.0.0.1"  # not reachable from outside
        assert args[args.index("--served-model-name") + 1] == node.served_model
        assert engine["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_router_agrees_with_the_topology():
    topo = topology()
    router = find("Deployment", "router")
    (container,) = router["spec"]["template"]["spec"]["containers"]
    expected = {
        "grpc": parse_address(topo.router.listen)[1],
        "http": parse_address(topo.router.http)[1],
        "metrics": parse_address(topo.router.metrics)[1],
    }
    assert ports(container["ports"], "containerPort") == expected
    assert ports(find("Service", "router")["spec"]["ports"], "port") == expected
    assert health_probe_name(container) == "router"
    spec = router["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= topo.router.grace_period_s + 5


def test_hpa_scales_a_pool_on_a_node_metric_the_adapter_serves():
    hpa = find("HorizontalPodAutoscaler", "cloud-pool")
    target = hpa["spec"]["scaleTargetRef"]
    assert find(target["kind"], target["name"])["kind"] == "Deployment"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in NodeMetrics("n", "cloud").exposition().decode()
    rules = yaml.safe_load(find("ConfigMap", "ruyiflow-adapter-rules")["data"]["config.yaml"])
    assert name in [r["name"]["as"] for r in rules["rules"]]


def test_service_monitor_scrapes_every_ruyiflow_service():
    monitor = find("ServiceMonitor", "ruyiflow")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    services = [d for d in DOCS if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"router", "edge", "cloud-pool"}
    for service in services:
        assert selector.items() <= service["metadata"]["labels"].items()
        assert endpoint["port"] in ports(service["spec"]["ports"], "port")


def tls_topology_text() -> str:
    """The ConfigMap's topology with its commented `tls:` line turned on."""
    text = find("ConfigMap", "ruyiflow-topology")["data"]["topology.yaml"]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("# tls:")]
    return text.replace(line, line[2:])


def test_the_tls_option_gives_a_topology_whose_certificates_every_pod_mounts(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(tls_topology_text())
    topo = load_topology(path)
    assert topo.tls is not None and topo.tls.require_client_cert
    workloads = [d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["image"].startswith("ruyiflow:")]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[topo.tls.dir]
        assert mount["readOnly"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"] == {
            "secretName": "ruyiflow-tls",
            "optional": True,  # plaintext without the Secret, as without tls:
            "defaultMode": 0o400,
        }
    # The Secret's files: what `ruyiflow certs` makes for this topology, each process's
    # certificate naming it and the DNS name the others dial it at.
    names = make_certs(path, tmp_path / "certs")
    assert sorted(names) == sorted(["router", "operator", *(n.name for n in topo.nodes)])
    for node in topo.nodes:
        files = tls_files(topo, node.name)
        assert files.cert == Path(topo.tls.dir) / f"{node.name}.pem"
        cert = x509.load_pem_x509_certificate((tmp_path / "certs" / files.cert.name).read_bytes())
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {node.name, parse_address(node.listen)[0]} <= set(
            dns.get_values_for_type(x509.DNSName)
        )
