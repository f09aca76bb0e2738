"""Who may connect to the workers: the NetworkPolicy that admits Prometheus to the metrics port
and no other pod, and leaves egress alone."""

from __future__ import annotations

from typing import Any

from checks import Problems, check
from checks.pods import PROBE_PORT, PROBE_PORT_NAME
from manifests import Rendered, matches, pod_templates

# The Prometheus that servicemonitor.yaml assumes (prometheus-operator, as kube-prometheus-stack
# installs it): its pods' label, in this namespace.
PROMETHEUS_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS_PODS = {"app.kubernetes.io/name": "prometheus"}


def worker_policy(r: Rendered) -> dict[str, Any] | None:
    return r.find("NetworkPolicy", "ferry-worker")


def metrics_port(r: Rendered) -> tuple[str | None, int | None]:
    """The container port, (name, number), that the ServiceMonitor scrapes through the Service."""
    endpoint = r.one("ServiceMonitor")["spec"]["endpoints"][0].get("port")
    svc_port = next((p for p in r.one("Service")["spec"]["ports"] if p.get("name") == endpoint), None)
    if svc_port is None:
        return None, None
    target = svc_port.get("targetPort", svc_port["port"])
    for p in r.container.get("ports", []):
        if target in (p.get("name"), p["containerPort"]):
            return p.get("name"), p["containerPort"]
    return None, None


def _other_pods(r: Rendered) -> None:
    policy = worker_policy(r)
    assert policy is not None
    policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "ferry"


@check(_other_pods)
def network_policy_covers_the_workers(r: Rendered) -> Problems:
    policy = worker_policy(r)
    if policy is None:
        yield "no NetworkPolicy ferry-worker: every pod in the cluster may connect to the workers"
        return
    spec = policy["spec"]
    selector = spec.get("podSelector", {})
    if not matches(selector, r.pod_labels):
        yield f"NetworkPolicy {policy['metadata']['name']} does not select the worker pods"
    worker = f"Deployment/{r.deployment['metadata']['name']}"
    for where, template in pod_templates(r.docs):
        if where != worker and matches(selector, template["metadata"].get("labels", {})):
            yield f"NetworkPolicy {policy['metadata']['name']} also selects {where}"
    # An Egress policy type with no egress rules would cut the workers off Kafka and the store.
    if spec.get("policyTypes") != ["Ingress"]:
        yield f"policyTypes {spec.get('policyTypes')!r}: restrict ingress only, the workers must reach Kafka and the store"
    name, number = metrics_port(r)
    if name is None:
        yield "the ServiceMonitor scrapes no port the worker container declares"
        return
    covered = [p for rule in spec.get("ingress", []) for p in rule.get("ports", [])]
    if not any(p.get("port") in (name, number) and p.get("protocol", "TCP") == "TCP" for p in covered):
        yield f"NetworkPolicy {policy['metadata']['name']} does not admit Prometheus to the metrics port {name}"


def _any_pod_of_monitoring(r: Rendered) -> None:
    policy = worker_policy(r)
    assert policy is not None
    del policy["spec"]["ingress"][0]["from"][0]["podSelector"]


@check(_any_pod_of_monitoring)
def only_prometheus_gets_in(r: Rendered) -> Problems:
    policy = worker_policy(r)
    if policy is None:
        return  # network_policy_covers_the_workers says so.
    name, number = metrics_port(r)
    for i, rule in enumerate(policy["spec"].get("ingress", [])):
        peers = rule.get("from")
        if not peers:
            yield f"ingress rule {i} has no `from`: it admits every source"
        for peer in peers or []:
            ns, pods = peer.get("namespaceSelector"), peer.get("podSelector")
            if "ipBlock" in peer or ns is None or pods is None:
                yield (
                    f"ingress rule {i} admits {peer}: only a peer with both a namespaceSelector "
                    f"({PROMETHEUS_NAMESPACE}) and a podSelector ({PROMETHEUS_PODS})"
                )
            elif ns != {"matchLabels": PROMETHEUS_NAMESPACE} or pods != {"matchLabels": PROMETHEUS_PODS}:
                yield f"ingress rule {i} admits {peer}, not Prometheus pods in the monitoring namespace"
        ports = rule.get("ports")
        if not ports:
            yield f"ingress rule {i} names no port: it admits every port, the probes' included"
        for p in ports or []:
            if p.get("port") not in (name, number) or "endPort" in p:
                yield f"ingress rule {i} admits port {p.get('port')}; only the metrics port {name}"
            if p.get("port") in (PROBE_PORT_NAME, PROBE_PORT):
                yield f"ingress rule {i} admits pods to the {PROBE_PORT_NAME} port, which only the kubelet asks"
