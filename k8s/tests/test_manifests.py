"""Every variant renders, validates against its schemas, and passes every check; every check and
the validation itself fail on a broken copy."""

from __future__ import annotations

import pytest

import checks
from manifests import FALLBACK_OVERLAY, MAIN_OVERLAYS, STORES, VARIANTS, Rendered, fleet
from schemas import KUBERNETES_VERSIONS, validate

CHECKS = checks.load()
PAIR_CHECKS = checks.load_pairs()
# The fallback fleet beside each main fleet, on each store: `fallback+STORE` with `.main` set.
PAIRS = tuple((main, store) for main in MAIN_OVERLAYS for store in STORES)

EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "PriorityClass",
    "Deployment",
    "PodDisruptionBudget",
    "Service",
    "ServiceMonitor",
    "ScaledObject",
    "TriggerAuthentication",
    "NetworkPolicy",
}
STORE_KINDS = {"redis": {"StatefulSet", "NetworkPolicy"}, "s3": set(), "rwx": {"PersistentVolumeClaim"}}


def rendered(variant: str) -> Rendered:
    return fleet(variant)


def pair(main: str, store: str) -> Rendered:
    return fleet(f"{FALLBACK_OVERLAY}+{store}", main)


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_every_part(variant):
    r = rendered(variant)
    kinds = {d["kind"] for d in r.docs}
    # The fallback fleet is applied beside a main fleet, whose Namespace and store it uses.
    expected = EXPECTED_KINDS - {"Namespace"} if r.main else EXPECTED_KINDS | STORE_KINDS[r.store]
    assert expected <= kinds, f"missing: {sorted(expected - kinds)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_validates_against_schemas(variant, version):
    problems = [p for d in rendered(variant).docs for p in validate(d, version)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_check(variant, check):
    problems = list(check.run(rendered(variant)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_check_notices_breakage(variant, check):
    r = rendered(variant)
    check.breaker(r)
    assert list(check.run(r)), f"{check.name} saw nothing wrong after {check.breaker.__name__}"


@pytest.mark.parametrize("check", PAIR_CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize(("main", "store"), PAIRS, ids=[f"{m}+{s}" for m, s in PAIRS])
def test_pair_check(main, store, check):
    problems = list(check.run(pair(main, store)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("check", PAIR_CHECKS, ids=lambda c: c.name)
@pytest.mark.parametrize(("main", "store"), PAIRS, ids=[f"{m}+{s}" for m, s in PAIRS])
def test_pair_check_notices_breakage(main, store, check):
    r = pair(main, store)
    check.breaker(r)
    assert list(check.run(r)), f"{check.name} saw nothing wrong after {check.breaker.__name__}"


def _unknown_container_field(r: Rendered) -> None:
    r.container["resource"] = r.container.pop("resources")


def _string_replicas(r: Rendered) -> None:
    r.scaled_object["spec"]["minReplicaCount"] = "3"


def _number_in_trigger(r: Rendered) -> None:
    r.triggers[0]["metadata"]["lagThreshold"] = 8


def _unknown_monitor_field(r: Rendered) -> None:
    r.one("ServiceMonitor")["spec"]["endpoints"][0]["scrapeInterval"] = "15s"


def _bad_auth_field(r: Rendered) -> None:
    spec = r.one("TriggerAuthentication", "ferry-kafka")["spec"]
    spec["secretTargetRefs"] = spec.pop("secretTargetRef")


def _unknown_kind(r: Rendered) -> None:
    r.docs.append({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "x"}})


def _misspelt_metadata(r: Rendered) -> None:
    r.scaled_object["metadata"]["label"] = {"app.kubernetes.io/name": "ferry-worker"}


@pytest.mark.parametrize(
    "breaker",
    [
        _unknown_container_field,
        _string_replicas,
        _number_in_trigger,
        _unknown_monitor_field,
        _bad_auth_field,
        _unknown_kind,
        _misspelt_metadata,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_validation_notices_breakage(breaker):
    r = rendered(VARIANTS[0])
    breaker(r)
    problems = [p for d in r.docs for p in validate(d, KUBERNETES_VERSIONS[0])]
    assert problems, f"schema validation saw nothing wrong after {breaker.__name__}"


def test_every_check_has_its_own_breaker():
    names = [c.breaker.__name__ for c in CHECKS + PAIR_CHECKS]
    assert len(set(names)) == len(names) and len(CHECKS) >= 20 and len(PAIR_CHECKS) >= 5
