"""Renders the deployment with kustomize and answers questions about the result.

A *variant* is an overlay (`cpu`, `gpu`, `fallback`) with one snapshot store (`redis`, `s3`,
`rwx`). The overlays as committed use `redis`; the other stores are rendered from a copy of
`k8s/` whose overlay names another component, which is exactly the one-line change k8s/README.md
tells an operator to make.

The `fallback` overlay is a second fleet, applied into the same namespace beside a main one
(`cpu` or `gpu`) with the same store: it owns neither the Namespace nor the store, which come
from the main fleet's variant (`Rendered.main`), and its objects' names end in `-fallback`.

Rendering runs `kubectl kustomize` (or `$FERRY_KUSTOMIZE build`): the real kustomize, not an
imitation, so what is checked is what `kubectl apply -k` would send.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[1]
MAIN_OVERLAYS = ("cpu", "gpu")
FALLBACK_OVERLAY = "fallback"
OVERLAYS = (*MAIN_OVERLAYS, FALLBACK_OVERLAY)
STORES = ("redis", "s3", "rwx")
DEFAULT_STORE = "redis"
VARIANTS = tuple(f"{o}+{s}" for o in OVERLAYS for s in STORES)
# The main fleet that hands requests to the fallback fleet (FERRY_FALLBACK_TOPIC), and whose
# Namespace and snapshot store the fallback fleet's variant uses.
HANDS_OFF = "gpu"
# What the fallback overlay appends to every name (its `nameSuffix`).
SUFFIX = {FALLBACK_OVERLAY: "-fallback"}

WORKER = "ferry-worker"
WORKER_CONTAINER = "worker"
# The worker's own defaults (worker/src/config.rs), for settings worker.env leaves out.
WORKER_DEFAULTS = {
    "FERRY_GROUP_ID": "ferry-workers",
    "FERRY_REQUEST_TOPIC": "ferry.requests",
    "FERRY_MAX_IN_FLIGHT": "4",
    "FERRY_SESSION_TIMEOUT": "10s",
    "FERRY_DRAIN_TIMEOUT": "20s",
    "FERRY_TERMINATION_GRACE_PERIOD": "30s",
    "FERRY_DEVICE": "cpu",
    "FERRY_LOG_FORMAT": "text",
    "FERRY_KV_BUDGET": "auto",
    "FERRY_PROBE_ADDR": "0.0.0.0:9091",
}
# The worker refuses to start unless the drain ends this long before the grace period does.
DRAIN_MARGIN_S = 5.0


def kustomize_command(directory: Path) -> list[str]:
    if kustomize := os.environ.get("FERRY_KUSTOMIZE"):
        return [kustomize, "build", str(directory)]
    kubectl = os.environ.get("FERRY_KUBECTL") or "kubectl"
    return [kubectl, "kustomize", str(directory)]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(kustomize_command(directory), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kustomize {directory} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@functools.cache
def render(variant: str) -> tuple[dict[str, Any], ...]:
    """The documents of one variant, as `kubectl apply -k` would send them."""
    overlay, store = variant.split("+")
    if store == DEFAULT_STORE:
        return tuple(kustomize(K8S / "overlays" / overlay))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        for part in ("base", "overlays", "components"):
            shutil.copytree(K8S / part, copy / part)
        kustomization = copy / "overlays" / overlay / "kustomization.yaml"
        text = kustomization.read_text()
        default = f"../../components/snapshot-{DEFAULT_STORE}"
        if text.count(default) != 1:
            raise RuntimeError(f"overlays/{overlay}/kustomization.yaml must name {default} exactly once")
        kustomization.write_text(text.replace(default, f"../../components/snapshot-{store}"))
        return tuple(kustomize(copy / "overlays" / overlay))


def fleet(variant: str, main: str | None = None) -> Rendered:
    """A variant's documents, copied so that a test may change them. The fallback fleet comes
    with the main fleet it is applied beside (`main`, an overlay; by default the one that hands
    requests off), on the same store."""
    overlay, store = variant.split("+")
    beside = None
    if overlay == FALLBACK_OVERLAY:
        beside = fleet(f"{main or HANDS_OFF}+{store}")
    return Rendered(variant, deepcopy(list(render(variant))), beside)


class Rendered:
    """One variant's documents, with accessors for what the checks look at. The documents are
    plain dicts: a test may change a copy to see that a check notices."""

    def __init__(self, variant: str, docs: list[dict[str, Any]], main: Rendered | None = None):
        self.variant = variant
        self.overlay, self.store = variant.split("+")
        self.docs = docs
        # For the fallback fleet: the main fleet it is applied beside, which owns the Namespace
        # and the snapshot store.
        self.main = main
        self.suffix = SUFFIX.get(self.overlay, "")

    @property
    def shared_docs(self) -> list[dict[str, Any]]:
        """This fleet's documents and those of the main fleet it shares a namespace and a store
        with (the fallback fleet's); what `kubectl apply -k` of both would create."""
        return self.docs + (self.main.docs if self.main else [])

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        """The object of this kind whose name is `name` with this overlay's suffix, or else
        `name` itself, either perhaps with kustomize's hash suffix."""
        for wanted in dict.fromkeys([name + self.suffix, name]):
            for d in self.all(kind):
                n = d["metadata"]["name"]
                if n == wanted or re.fullmatch(re.escape(wanted) + r"-[a-z0-9]{10}", n):
                    return d
        return None

    def one(self, kind: str, name: str = WORKER) -> dict[str, Any]:
        found = self.find(kind, name)
        if found is None:
            raise LookupError(f"{self.variant}: no {kind} {name}")
        return found

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def pod_labels(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"].get("labels", {})

    @property
    def container(self) -> dict[str, Any]:
        for c in self.pod_spec["containers"]:
            if c["name"] == WORKER_CONTAINER:
                return c
        raise LookupError(f"{self.variant}: no container {WORKER_CONTAINER}")

    @property
    def scaled_object(self) -> dict[str, Any]:
        return self.one("ScaledObject")

    @property
    def triggers(self) -> list[dict[str, Any]]:
        return self.scaled_object["spec"].get("triggers", [])

    def worker_config(self) -> dict[str, str]:
        """The data of the worker's ConfigMap (the first in envFrom), to read or change."""
        ref = self.container["envFrom"][0]["configMapRef"]["name"]
        return self.one("ConfigMap", ref)["data"]

    def env(self) -> dict[str, Any]:
        """The worker container's environment: ConfigMap values (envFrom) overridden by `env`
        entries; a plain value as a string, a `valueFrom` as its dict."""
        out: dict[str, Any] = {}
        for source in self.container.get("envFrom", []):
            if ref := source.get("configMapRef"):
                cm = self.find("ConfigMap", ref["name"])
                if cm is not None:
                    out.update({k: str(v) for k, v in cm.get("data", {}).items()})
        for e in self.container.get("env", []):
            out[e["name"]] = str(e["value"]) if "value" in e else e.get("valueFrom", {})
        return out

    def setting(self, name: str) -> str | None:
        """A FERRY_* setting as the worker sees it: from the environment, else its default."""
        value = self.env().get(name, WORKER_DEFAULTS.get(name))
        return value if isinstance(value, str) or value is None else None

    def volume_at(self, path: str) -> dict[str, Any] | None:
        """The pod volume the worker container mounts at `path` or at a directory above it."""
        best = None
        for m in self.container.get("volumeMounts", []):
            mount = m["mountPath"].rstrip("/")
            covers = path == mount or path.startswith(mount + "/")
            if covers and (best is None or len(mount) > len(best["mountPath"].rstrip("/"))):
                best = m
        if best is None:
            return None
        return next((v for v in self.pod_spec.get("volumes", []) if v["name"] == best["name"]), None)


def lanes(topics: str) -> list[tuple[str, int]]:
    """FERRY_REQUEST_TOPIC as the worker parses it: `topic[:weight]`, comma-separated."""
    out = []
    for item in topics.split(","):
        topic, colon, weight = item.rpartition(":")
        if not colon:
            topic, weight = item, "1"
        out.append((topic.strip(), int(weight)))
    return out


_UNITS = {
    "ms": 0.001,
    "msec": 0.001,
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
}


def seconds(duration: str) -> float:
    """A duration as humantime (the worker's parser) writes it: `20s`, `1m 30s`, `500ms`."""
    parts = re.findall(r"(\d+)\s*([a-z]+)", duration)
    if not parts or re.sub(r"[\d\sa-z]", "", duration) or any(u not in _UNITS for _, u in parts):
        raise ValueError(f"{duration!r} is not a duration this test understands")
    return sum(int(n) * _UNITS[u] for n, u in parts)


BYTE_UNITS = {
    "": 1, "B": 1,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
    "k": 10**3, "K": 10**3, "kB": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6,
    "G": 10**9, "GB": 10**9, "T": 10**12, "TB": 10**12,
}


def size_bytes(size: str | int) -> int | None:
    """A size as the worker's `--kv-budget` and Kubernetes' memory quantities write it (`2GiB`,
    `3Gi`, `512M`, plain bytes); `None` when it is not one."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2) not in BYTE_UNITS:
        return None
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2)])


def cpu_cores(quantity: str | int | float) -> float:
    q = str(quantity)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template in the documents, named `Kind/name`."""
    for d in docs:
        template = d.get("spec", {}).get("template")
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            yield f"{d['kind']}/{d['metadata']['name']}", template
