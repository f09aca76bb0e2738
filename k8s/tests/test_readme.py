"""k8s/README.md against the files: what it applies exists, and what the manifests point to in
it is there."""

from __future__ import annotations

import re

import readme
from manifests import K8S

REPOSITORY = K8S.parent


def headings() -> set[str]:
    return {h.strip() for h in re.findall(r"^#+\s+(.+)$", readme.text(), re.M)}


def test_applied_directories_exist():
    paths = readme.applied_paths()
    assert {"k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/fallback"} <= paths
    missing = [p for p in paths if not (REPOSITORY / p / "kustomization.yaml").exists()]
    assert not missing, f"k8s/README.md applies directories without a kustomization: {missing}"


def test_sections_the_manifests_cite_exist():
    # Comments cite `k8s/README.md, "Heading"`; a renamed heading leaves them pointing nowhere.
    cited = set()
    for path in K8S.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".env", ".conf", "") and "tests" not in path.parts:
            cited |= set(re.findall(r'k8s/README\.md,\s*"([^"]+)"', path.read_text(errors="replace")))
    assert cited, "no citations found: the pattern is out of date"
    assert not cited - headings(), f"cited but not headings of k8s/README.md: {sorted(cited - headings())}"


def test_request_topics_are_created_with_partitions():
    assert readme.partitions().get("ferry.requests", 0) >= 1


def test_network_policy_is_described():
    # An operator whose Prometheus runs elsewhere must learn here that the policy shuts it out.
    text = readme.text()
    assert (K8S / "base" / "networkpolicy.yaml").exists()
    assert "base/networkpolicy.yaml" in text, "k8s/README.md does not mention base/networkpolicy.yaml"
    assert "Network policy" in headings(), "k8s/README.md has no Network policy section"
    for needed in ("monitoring", "app.kubernetes.io/name: prometheus", "probe", "FERRY_PROBE_ADDR"):
        assert needed in text, f"k8s/README.md does not say {needed!r} about the NetworkPolicy"
