"""The main fleet and the fallback fleet, applied into one namespace: the handoff between them
goes where a fleet listens, ends there, and neither fleet's objects touch the other's.

Each check is given the fallback fleet (`r`), with the main fleet beside it as `r.main`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from checks import Problems, pair_check
from checks.wiring import CLUSTER_SCOPED
from manifests import HANDS_OFF, Rendered, lanes, matches, pod_templates

# What the store components label their own objects with (not the workers' settings).
STORE_LABEL = ("app.kubernetes.io/component", "snapshot-store")


def _topics(r: Rendered) -> list[str]:
    return [t for t, _ in lanes(r.setting("FERRY_REQUEST_TOPIC") or "")]


def _watched(r: Rendered) -> list[str]:
    return [t["metadata"].get("topic") for t in r.triggers]


def _hand_elsewhere(r: Rendered) -> None:
    r.main.worker_config()["FERRY_FALLBACK_TOPIC"] = "ferry.requests.small"


@pair_check(_hand_elsewhere)
def handoffs_reach_the_fallback_fleet(r: Rendered) -> Problems:
    # A handed-off request is committed on the main topic once the fallback topic has it: if no
    # fleet consumes that topic, or KEDA does not watch it, it waits there unanswered.
    target = r.main.setting("FERRY_FALLBACK_TOPIC")
    if not target:
        if r.main.overlay == HANDS_OFF:
            yield f"the {HANDS_OFF} fleet sets no FERRY_FALLBACK_TOPIC: it hands nothing to the fallback fleet"
        return
    if target not in _topics(r):
        yield f"the {r.main.overlay} fleet hands off to {target!r}, the fallback fleet consumes {_topics(r)}"
    if target not in _watched(r):
        yield f"the fallback fleet's ScaledObject watches {_watched(r)}, not {target!r}: its lag would not scale it"


def _hand_back(r: Rendered) -> None:
    r.worker_config()["FERRY_FALLBACK_TOPIC"] = _topics(r.main)[0]


@pair_check(_hand_back)
def fallback_fleet_hands_nothing_on(r: Rendered) -> Problems:
    # The worker never hands a handed-off request on (it carries ferry-handoff-reason), so a
    # fallback topic here would do nothing but suggest a chain, or a loop back to the main topic.
    if own := r.setting("FERRY_FALLBACK_TOPIC"):
        yield f"the fallback fleet sets FERRY_FALLBACK_TOPIC={own!r}: the fallback is the last hop"
    if shared := sorted(set(_topics(r)) & set(_topics(r.main))):
        yield f"both fleets consume {shared}: a handoff would come back to the fleet that gave it up"
    if (target := r.main.setting("FERRY_FALLBACK_TOPIC")) in _topics(r.main):
        yield f"the {r.main.overlay} fleet hands off to {target!r}, a topic it consumes itself"


def _same_group(r: Rendered) -> None:
    r.worker_config()["FERRY_GROUP_ID"] = r.main.setting("FERRY_GROUP_ID")


@pair_check(_same_group)
def fleets_use_their_own_groups(r: Rendered) -> Problems:
    # In one group the fallback workers would be assigned partitions of the main topic (and the
    # main workers of the fallback topic), and KEDA would read the two fleets' lag as one.
    groups = {fleet.overlay: fleet.setting("FERRY_GROUP_ID") for fleet in (r.main, r)}
    if len(set(groups.values())) != 2:
        yield f"the fleets share a consumer group: {groups}"
    watched = [{t["metadata"].get("consumerGroup") for t in fleet.triggers} for fleet in (r.main, r)]
    if both := sorted(watched[0] & watched[1]):
        yield f"both fleets' ScaledObjects read the lag of group {both}"


def _keys(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str, str, str]]:
    for d in docs:
        group = d["apiVersion"].rpartition("/")[0]
        namespace = "" if d["kind"] in CLUSTER_SCOPED else d["metadata"].get("namespace", "")
        yield group, d["kind"], namespace, d["metadata"]["name"]


def _same_name(r: Rendered) -> None:
    r.one("PodDisruptionBudget")["metadata"]["name"] = r.main.one("PodDisruptionBudget")["metadata"]["name"]


@pair_check(_same_name)
def object_names_do_not_collide(r: Rendered) -> Problems:
    # One name in one namespace is one object: applying the second fleet would overwrite the
    # first's, and `kubectl delete -k` of either would delete it for both. Cluster-scoped objects
    # (the PriorityClass) count in every namespace.
    for group, kind, namespace, name in sorted(set(_keys(r.main.docs)) & set(_keys(r.docs))):
        where = f" in namespace {namespace}" if namespace else ""
        yield f"{kind}{'.' + group if group else ''} {name}{where} is in both fleets"


def _pdb_selects_both(r: Rendered) -> None:
    r.one("PodDisruptionBudget")["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/component": "worker"}}


def _selectors(r: Rendered) -> Iterator[tuple[str, dict[str, Any]]]:
    """(what, pod selector) for everything of a fleet that selects pods."""
    name = r.deployment["metadata"]["name"]
    yield f"Deployment {name}", r.deployment["spec"]["selector"]
    # Spreading over nodes and zones counts the pods these select: the other fleet's would skew it.
    anti = r.pod_spec.get("affinity", {}).get("podAntiAffinity", {})
    for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", []) + anti.get(
        "requiredDuringSchedulingIgnoredDuringExecution", []
    ):
        yield f"Deployment {name}'s pod anti-affinity", t.get("podAffinityTerm", t)["labelSelector"]
    for s in r.pod_spec.get("topologySpreadConstraints", []):
        yield f"Deployment {name}'s topology spread", s["labelSelector"]
    for kind in ("PodDisruptionBudget", "Service"):
        for d in r.all(kind):
            selector = d["spec"].get("selector", {})
            yield f"{kind} {d['metadata']['name']}", selector if kind != "Service" else {"matchLabels": selector}


@pair_check(_pdb_selects_both)
def selectors_stay_within_their_fleet(r: Rendered) -> Problems:
    # A Deployment that selects another's pods fights it over them; a PodDisruptionBudget over
    # both fleets lets a drain of one block evictions of the other; a Service or ServiceMonitor
    # over both mixes their metrics. The main fleet's selectors cannot be changed (a Deployment's
    # is immutable), so the fallback fleet's pods must carry a name of their own.
    for fleet, other in ((r.main, r), (r, r.main)):
        pods = [w for w, t in pod_templates(other.docs) if w == f"Deployment/{other.deployment['metadata']['name']}"]
        labels = other.pod_labels
        for what, selector in _selectors(fleet):
            if matches(selector, labels):
                yield f"the {fleet.overlay} fleet's {what} also selects the {other.overlay} fleet's pods ({pods[0]})"
        services = [s for s in other.all("Service") if matches({"matchLabels": s["spec"].get("selector", {})}, labels)]
        for monitor in fleet.all("ServiceMonitor"):
            for svc in services:
                if matches(monitor["spec"]["selector"], svc["metadata"].get("labels", {})):
                    yield (
                        f"the {fleet.overlay} fleet's ServiceMonitor {monitor['metadata']['name']} also "
                        f"scrapes the {other.overlay} fleet's Service {svc['metadata']['name']}"
                    )


def _own_store(r: Rendered) -> None:
    r.worker_config()["FERRY_SNAPSHOT_STORE"] = "file:///var/lib/ferry/fallback-snapshots"


@pair_check(_own_store)
def fallback_fleet_uses_the_main_fleets_namespace_and_store(r: Rendered) -> Problems:
    # The fallback overlay drops the store's objects and the Namespace, which the main fleet's
    # overlay owns: its workers must then use exactly that store, and it must own neither, or
    # deleting the fallback fleet would delete them under the main fleet.
    mine, theirs = r.setting("FERRY_SNAPSHOT_STORE"), r.main.setting("FERRY_SNAPSHOT_STORE")
    if mine != theirs:
        yield f"the fallback fleet's snapshot store is {mine!r}, the main fleet's {theirs!r}: only the latter is deployed"
    for d in r.docs:
        labels = d["metadata"].get("labels", {})
        if d["kind"] == "Namespace" or labels.get(STORE_LABEL[0]) == STORE_LABEL[1]:
            yield f"the fallback fleet owns {d['kind']} {d['metadata']['name']}, which is the main fleet's"
