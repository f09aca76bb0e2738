"""What k8s/README.md tells an operator to create, read back so the manifests can be checked
against it: the request topics' partition counts and the Secrets."""

from __future__ import annotations

import re

from manifests import K8S

README = K8S / "README.md"


def text() -> str:
    return README.read_text()


def partitions() -> dict[str, int]:
    """`--topic NAME ... --partitions N` on one line of a `kafka-topics.sh --create` command."""
    out = {}
    for line in text().splitlines():
        topic = re.search(r"--topic\s+(\S+)", line)
        count = re.search(r"--partitions\s+(\d+)", line)
        if "--create" in line and topic and count:
            out[topic.group(1)] = int(count.group(1))
    return out


def secrets() -> set[str]:
    """Names given to `kubectl ... create secret generic NAME`."""
    return set(re.findall(r"create secret generic\s+([a-z0-9.-]+)", text()))


def applied_paths() -> set[str]:
    """Directories given to `kubectl apply -k` (relative to the repository root)."""
    return set(re.findall(r"kubectl apply -k\s+(\S+)", text()))
