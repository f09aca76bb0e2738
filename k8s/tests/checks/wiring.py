"""How the objects find each other: selectors, the metrics path, the snapshot store, Secrets,
ConfigMaps and the namespace."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from checks import Problems, check
from manifests import Rendered, matches, pod_templates
from readme import secrets as documented_secrets

CLUSTER_SCOPED = {"Namespace", "PriorityClass"}


def _pdb_other_label(r: Rendered) -> None:
    r.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "ferry"


@check(_pdb_other_label)
def disruption_budget_covers_the_workers(r: Rendered) -> Problems:
    pdb = r.one("PodDisruptionBudget")["spec"]
    if not matches(pdb["selector"], r.pod_labels):
        yield "the PodDisruptionBudget's selector does not select the worker pods"
    if pdb["selector"] != r.deployment["spec"]["selector"]:
        yield "the PodDisruptionBudget's selector differs from the Deployment's"
    worker = f"Deployment/{r.deployment['metadata']['name']}"
    for where, template in pod_templates(r.docs):
        if where != worker and matches(pdb["selector"], template["metadata"].get("labels", {})):
            yield f"the PodDisruptionBudget also selects {where}"
    low = r.scaled_object["spec"].get("minReplicaCount", 0)
    if "minAvailable" in pdb or str(pdb.get("maxUnavailable")) != "1":
        yield f"use maxUnavailable: 1 (one drain at a time, and any fleet size down to {low} can still be evicted)"
    if pdb.get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
        yield "unhealthyPodEvictionPolicy must be AlwaysAllow, or a worker stuck loading blocks node drains"


def _monitor_wrong_port(r: Rendered) -> None:
    r.one("ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metrics"


@check(_monitor_wrong_port)
def metrics_are_scraped(r: Rendered) -> Problems:
    svc = r.one("Service")
    if not matches({"matchLabels": svc["spec"].get("selector", {})}, r.pod_labels):
        yield "the Service does not select the worker pods"
    container_ports = {p.get("name"): p["containerPort"] for p in r.container.get("ports", [])}
    svc_ports = {p.get("name"): p for p in svc["spec"]["ports"]}
    for name, p in svc_ports.items():
        target = p.get("targetPort", p["port"])
        if target not in container_ports and target not in container_ports.values():
            yield f"Service port {name} targets {target!r}, which the worker container does not expose"
    monitor = r.one("ServiceMonitor")["spec"]
    if not matches(monitor["selector"], svc["metadata"].get("labels", {})):
        yield "the ServiceMonitor does not select the Service"
    for e in monitor["endpoints"]:
        if e.get("port") not in svc_ports:
            yield f"ServiceMonitor endpoint port {e.get('port')!r} is not a port name of the Service"
        if e.get("path", "/metrics") != "/metrics":
            yield f"ServiceMonitor scrapes {e.get('path')}, the worker serves /metrics"


def _store_elsewhere(r: Rendered) -> None:
    r.worker_config()["FERRY_SNAPSHOT_STORE"] = "file:///nowhere"


@check(_store_elsewhere)
def snapshot_store_is_reachable(r: Rendered) -> Problems:
    url = urlparse(r.setting("FERRY_SNAPSHOT_STORE") or "")
    env = r.env()
    want = {"redis": "redis", "s3": "s3", "rwx": "file"}[r.store]
    if url.scheme != want:
        yield f"FERRY_SNAPSHOT_STORE is {url.geturl()!r}; the {r.store} component should make it {want}://"
        return
    # The fallback fleet's store is the main fleet's: look for it among both fleets' objects.
    shared = Rendered(r.variant, r.shared_docs)
    if want == "redis":
        svc = shared.find("Service", url.hostname or "")
        pods: list[dict[str, Any]] = []
        if svc is None or url.port not in [p["port"] for p in svc["spec"]["ports"]]:
            yield f"no Service {url.hostname} with port {url.port} in the manifests"
        else:
            pods = [
                t
                for w, t in pod_templates(shared.docs)
                if matches({"matchLabels": svc["spec"]["selector"]}, t["metadata"].get("labels", {}))
            ]
            if not pods:
                yield f"Service {url.hostname} selects no pod"
        # The store's own policies: those that select its pods (the workers' own policy admits
        # Prometheus, not workers, and is checked in network.py).
        store_pods = [t["metadata"].get("labels", {}) for t in pods]
        for policy in shared.all("NetworkPolicy"):
            if not any(matches(policy["spec"].get("podSelector", {}), labels) for labels in store_pods):
                continue
            froms = [
                f.get("podSelector", {}) for rule in policy["spec"].get("ingress", []) for f in rule.get("from", [])
            ]
            if not any(matches(s, r.pod_labels) for s in froms):
                yield f"NetworkPolicy {policy['metadata']['name']} lets no worker in"
    elif want == "s3":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not isinstance(env.get(key), dict) or "secretKeyRef" not in env[key]:
                yield f"{key} must come from a Secret"
        if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            yield "AWS_REGION is not set"
    else:
        volume = r.volume_at(url.path)
        claim = volume and volume.get("persistentVolumeClaim", {}).get("claimName")
        pvc = shared.find("PersistentVolumeClaim", claim) if claim else None
        if pvc is None:
            yield f"{url.path} is not on a PersistentVolumeClaim of the manifests"
        elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            yield f"PersistentVolumeClaim {claim} is not ReadWriteMany: workers on other nodes could not resume"


def _secret_refs(r: Rendered) -> Iterator[tuple[str, str, bool]]:
    """(where, Secret name, optional) for every Secret the manifests read."""
    for where, template in pod_templates(r.docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    yield f"{where} env {e['name']}", ref["name"], bool(ref.get("optional"))
            for e in c.get("envFrom", []):
                if ref := e.get("secretRef"):
                    yield f"{where} envFrom", ref["name"], bool(ref.get("optional"))
        for v in spec.get("volumes", []):
            if s := v.get("secret"):
                yield f"{where} volume {v['name']}", s["secretName"], bool(s.get("optional"))
    for a in r.all("TriggerAuthentication"):
        for ref in a["spec"].get("secretTargetRef", []):
            yield f"TriggerAuthentication {a['metadata']['name']}", ref["name"], False


def _auth_other_secret(r: Rendered) -> None:
    for ref in r.one("TriggerAuthentication", "ferry-kafka")["spec"]["secretTargetRef"]:
        ref["name"] = "keda-kafka"


@check(_auth_other_secret)
def secrets_are_documented_and_shared(r: Rendered) -> Problems:
    created = documented_secrets()
    for where, name, _ in _secret_refs(r):
        if r.find("Secret", name) is None and name not in created:
            yield f"{where} reads Secret {name}, which k8s/README.md never creates"
    props = r.env().get("FERRY_KAFKA_PROPERTIES")
    worker_secret = props.get("secretKeyRef", {}).get("name") if isinstance(props, dict) else None
    if worker_secret is None:
        yield "FERRY_KAFKA_PROPERTIES (Kafka TLS and SASL) must come from a Secret"
    for a in r.all("TriggerAuthentication"):
        names = {ref["name"] for ref in a["spec"].get("secretTargetRef", [])}
        if names != {worker_secret}:
            yield (
                f"TriggerAuthentication {a['metadata']['name']} reads {sorted(names)}, the workers "
                f"{worker_secret}: one Secret keeps KEDA's and the workers' credentials in step"
            )


def _missing_config(r: Rendered) -> None:
    r.container["envFrom"][0]["configMapRef"]["name"] = "ferry-settings"


@check(_missing_config)
def references_resolve(r: Rendered) -> Problems:
    # The fallback fleet mounts the main fleet's snapshot volume.
    shared = Rendered(r.variant, r.shared_docs)

    def exists(kind: str, name: str) -> bool:
        return (shared if kind == "PersistentVolumeClaim" else r).find(kind, name) is not None

    for where, template in pod_templates(r.docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("envFrom", []):
                if (ref := e.get("configMapRef")) and not exists("ConfigMap", ref["name"]) and not ref.get("optional"):
                    yield f"{where}: ConfigMap {ref['name']} is not in the manifests"
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            declared |= {t["metadata"]["name"] for t in _claim_templates(r, where)}
            for name in sorted(mounted - declared):
                yield f"{where} container {c['name']} mounts volume {name}, which the pod does not declare"
        for v in spec.get("volumes", []):
            if (cm := v.get("configMap")) and not exists("ConfigMap", cm["name"]):
                yield f"{where}: volume {v['name']} needs ConfigMap {cm['name']}"
            if (pvc := v.get("persistentVolumeClaim")) and not exists("PersistentVolumeClaim", pvc["claimName"]):
                yield f"{where}: volume {v['name']} needs PersistentVolumeClaim {pvc['claimName']}"
        account = spec.get("serviceAccountName")
        if account and not exists("ServiceAccount", account):
            yield f"{where}: ServiceAccount {account} is not in the manifests"


def _claim_templates(r: Rendered, where: str) -> list[dict[str, Any]]:
    kind, name = where.split("/", 1)
    doc = r.find(kind, name) or {}
    return doc.get("spec", {}).get("volumeClaimTemplates", [])


def _stray_namespace(r: Rendered) -> None:
    r.one("Service")["metadata"]["namespace"] = "default"


@check(_stray_namespace)
def one_namespace(r: Rendered) -> Problems:
    # The fallback fleet is applied into the main fleet's Namespace and must not create its own
    # (deleting that fleet would delete the namespace): one Namespace across both fleets.
    namespaces = [n["metadata"]["name"] for n in Rendered(r.variant, r.shared_docs).all("Namespace")]
    if len(namespaces) != 1:
        yield f"the manifests should create exactly one Namespace, not {namespaces}"
        return
    for d in r.shared_docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in CLUSTER_SCOPED and ns:
            yield f"{d['kind']} {d['metadata']['name']} is cluster-scoped but names namespace {ns}"
        elif d["kind"] not in CLUSTER_SCOPED and ns != namespaces[0]:
            yield f"{d['kind']} {d['metadata']['name']} is in namespace {ns!r}, not {namespaces[0]}"
