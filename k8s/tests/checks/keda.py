"""The ScaledObject and its Kafka trigger: documented keys only, and the worker's own group,
topics and servers.

KEDA ignores a trigger metadata key it does not know (unless its operator runs with
KEDA_CHECK_UNEXPECTED_SCALERS_PARAMS) and falls back to the default, so a misspelt
`lagTreshold` would silently scale on a threshold of 10. The lists below are KEDA's documented
ones: the "Parameter list" and "Authentication Parameters" of the Apache Kafka scaler page,
keda-docs `content/docs/2.20/scalers/apache-kafka.md` (KEDA 2.20, the latest release), which
agree with the `keda:"name=..."` tags of `pkg/scalers/kafka_scaler.go` at v2.20.2. KEDA 2.21
adds `fullMetadata`; it is left out until 2.21 is released.
"""

from __future__ import annotations

import re
from typing import Any

from checks import Problems, check
from manifests import DRAIN_MARGIN_S, Rendered, lanes, seconds
from readme import partitions

# Keys a `kafka` trigger's `metadata` may hold.
TRIGGER_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "version",
    "partitionLimitation",
    "sasl",
    "saslTokenProvider",
    "tls",
    "unsafeSsl",
    "awsRegion",
}
# Parameters a TriggerAuthentication may give the Kafka scaler.
AUTH_PARAMETERS = {
    "sasl",
    "saslTokenProvider",
    "username",
    "password",
    "keytab",
    "realm",
    "kerberosConfig",
    "kerberosServiceName",
    "kerberosDisableFAST",
    "oauthTokenEndpointUri",
    "scopes",
    "oauthExtensions",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
    "awsRoleArn",
    "awsAccessKeyID",
    "awsSecretAccessKey",
}
# Documented values of the keys that take one of a few.
ENUMS = {
    "offsetResetPolicy": {"latest", "earliest"},
    "sasl": {"plaintext", "scram_sha256", "scram_sha512", "gssapi", "oauthbearer", "none"},
    "saslTokenProvider": {"bearer", "aws_msk_iam"},
    "tls": {"enable", "disable"},
}
BOOLEANS = {
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "unsafeSsl",
}
INTEGERS = {"lagThreshold", "activationLagThreshold"}
REQUIRED = {"bootstrapServers", "consumerGroup", "topic"}


def _trigger(r: Rendered, i: int = 0) -> dict[str, Any]:
    return r.triggers[i]["metadata"]


def _misspell(r: Rendered) -> None:
    m = _trigger(r)
    m["lagTreshold"] = m.pop("lagThreshold")


@check(_misspell)
def trigger_keys_are_documented(r: Rendered) -> Problems:
    for t in r.triggers:
        name = t.get("name", t["type"])
        if t["type"] != "kafka":
            yield f"trigger {name}: type {t['type']!r}, not kafka"
        m = t.get("metadata", {})
        for key in sorted(set(m) - TRIGGER_METADATA):
            yield f"trigger {name}: {key!r} is not a documented Kafka trigger key (KEDA would ignore it)"
        for key in sorted(REQUIRED - set(m)):
            yield f"trigger {name}: {key!r} is missing (a trigger without `topic` sums every topic's lag)"
        for key, value in m.items():
            if not isinstance(value, str):
                yield f"trigger {name}: {key} must be a string, not {value!r}"
            elif key in ENUMS and value not in ENUMS[key]:
                yield f"trigger {name}: {key}={value!r}, not one of {sorted(ENUMS[key])}"
            elif key in BOOLEANS and value not in ("true", "false"):
                yield f"trigger {name}: {key}={value!r}, not 'true' or 'false'"
            elif key in INTEGERS and not re.fullmatch(r"\d+", value):
                yield f"trigger {name}: {key}={value!r}, not a whole number"


def _bad_parameter(r: Rendered) -> None:
    r.one("TriggerAuthentication", "ferry-kafka")["spec"]["secretTargetRef"][0]["parameter"] = "saslMechanism"


@check(_bad_parameter)
def trigger_authentication_is_documented_and_used(r: Rendered) -> Problems:
    auths = {a["metadata"]["name"]: a for a in r.all("TriggerAuthentication")}
    for name, auth in auths.items():
        for ref in auth["spec"].get("secretTargetRef", []):
            if ref["parameter"] not in AUTH_PARAMETERS:
                yield f"TriggerAuthentication {name}: {ref['parameter']!r} is not a documented Kafka parameter"
    for t in r.triggers:
        ref = t.get("authenticationRef")
        if ref and ref.get("kind", "TriggerAuthentication") == "TriggerAuthentication" and ref["name"] not in auths:
            yield f"trigger {t.get('name')}: authenticationRef {ref['name']} is not in the manifests"


def _other_group(r: Rendered) -> None:
    _trigger(r)["consumerGroup"] = "ferry-workers-v2"


@check(_other_group)
def trigger_reads_the_workers_group(r: Rendered) -> Problems:
    group = r.setting("FERRY_GROUP_ID")
    servers = r.setting("FERRY_BOOTSTRAP_SERVERS")
    for t in r.triggers:
        m = t["metadata"]
        name = t.get("name")
        if m.get("consumerGroup") != group:
            yield f"trigger {name}: consumerGroup {m.get('consumerGroup')!r}, the workers' is {group!r}"
        if m.get("bootstrapServers") != servers:
            yield f"trigger {name}: bootstrapServers {m.get('bootstrapServers')!r}, the workers' are {servers!r}"


def _other_topic(r: Rendered) -> None:
    _trigger(r)["topic"] = "ferry.request"


@check(_other_topic)
def one_trigger_per_request_topic(r: Rendered) -> Problems:
    worker = [t for t, _ in lanes(r.setting("FERRY_REQUEST_TOPIC") or "")]
    scaled = [t["metadata"].get("topic") for t in r.triggers]
    for topic in sorted(set(worker) - set(scaled)):
        yield f"request topic {topic!r} has no trigger: its lag would not scale the fleet"
    for topic in sorted(set(t for t in scaled if t) - set(worker)):
        yield f"trigger topic {topic!r} is not one the workers consume (FERRY_REQUEST_TOPIC)"
    for topic in sorted(set(t for t in scaled if scaled.count(t) > 1)):
        yield f"topic {topic!r} has more than one trigger"


def _latest(r: Rendered) -> None:
    _trigger(r)["offsetResetPolicy"] = "latest"


@check(_latest)
def uncommitted_partitions_count_their_backlog(r: Rendered) -> Problems:
    # The worker sets auto.offset.reset=earliest (worker/src/consumer/mod.rs): a partition the
    # group never committed is read from its start, so its whole backlog is work to scale for.
    for t in r.triggers:
        if t["metadata"].get("offsetResetPolicy") != "earliest":
            yield f"trigger {t.get('name')}: offsetResetPolicy must be 'earliest', as the workers read"
        if t["metadata"].get("allowIdleConsumers") == "true":
            yield f"trigger {t.get('name')}: allowIdleConsumers adds workers that get no partition"


def _threshold_below_in_flight(r: Rendered) -> None:
    _trigger(r)["lagThreshold"] = "2"


@check(_threshold_below_in_flight)
def busy_workers_do_not_look_like_lag(r: Rendered) -> Problems:
    # Requests in flight count as lag until committed. The bulk lanes (the lowest weight) must
    # allow a replica its FERRY_MAX_IN_FLIGHT; an urgent lane may ask for replicas sooner.
    in_flight = int(r.setting("FERRY_MAX_IN_FLIGHT") or 0)
    weights = dict(lanes(r.setting("FERRY_REQUEST_TOPIC") or ""))
    lowest = min(weights.values(), default=1)
    for t in r.triggers:
        m = t["metadata"]
        if weights.get(m.get("topic")) == lowest and int(m.get("lagThreshold", "10")) < in_flight:
            yield (
                f"trigger {t.get('name')}: lagThreshold {m.get('lagThreshold')} is below "
                f"FERRY_MAX_IN_FLIGHT {in_flight}: a fully busy fleet would scale out"
            )


def _min_zero(r: Rendered) -> None:
    r.scaled_object["spec"]["minReplicaCount"] = 0


@check(_min_zero)
def replica_bounds(r: Rendered) -> Problems:
    spec = r.scaled_object["spec"]
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if low < 1:
        yield f"minReplicaCount {low}: a group that never committed would never scale up from 0"
    if high < low:
        yield f"maxReplicaCount {high} is below minReplicaCount {low}"
    replicas = r.deployment["spec"].get("replicas", 1)
    if not low <= replicas <= high:
        yield f"the Deployment's replicas {replicas} is outside [{low}, {high}]"
    counts = partitions()  # as k8s/README.md creates the topics
    for t in r.triggers:
        topic = t["metadata"].get("topic")
        if topic not in counts:
            yield f"k8s/README.md creates no topic {topic!r} with --partitions"
        elif high > counts[topic]:
            yield f"maxReplicaCount {high} exceeds the {counts[topic]} partitions of {topic}"
    ref = spec["scaleTargetRef"]
    if ref.get("kind", "Deployment") != "Deployment" or ref["name"] != r.deployment["metadata"]["name"]:
        yield f"scaleTargetRef {ref} is not the worker Deployment"


def _fast_scale_down(r: Rendered) -> None:
    behavior = r.scaled_object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["policies"] = [{"type": "Percent", "value": 50, "periodSeconds": 15}]


@check(_fast_scale_down)
def scale_down_waits_for_each_drain(r: Rendered) -> Problems:
    # Removing a worker costs its drain (up to the grace period) and a rebalance (at worst the
    # session timeout, if its leave was lost). Scaling in faster than that drains several
    # workers at once and piles their requests on the survivors while lag still reads high.
    grace = r.pod_spec.get("terminationGracePeriodSeconds", 30)
    session = seconds(r.setting("FERRY_SESSION_TIMEOUT") or "10s")
    behavior = (
        r.scaled_object["spec"]
        .get("advanced", {})
        .get("horizontalPodAutoscalerConfig", {})
        .get("behavior", {})
        .get("scaleDown")
    )
    if behavior is None:
        yield "no scaleDown behavior: the HPA default removes up to 100% of the pods every 15 s"
        return
    if behavior.get("selectPolicy") == "Disabled":
        return
    if behavior.get("stabilizationWindowSeconds", 300) < grace + session:
        yield f"scaleDown stabilizationWindowSeconds is shorter than a drain and a rebalance ({grace + session:.0f} s)"
    for p in behavior.get("policies", []):
        if p["type"] != "Pods" or p["value"] > 1:
            yield f"scaleDown policy {p} may remove more than one worker at a time"
        if p["periodSeconds"] < grace + session:
            yield (
                f"scaleDown policy period {p['periodSeconds']} s is shorter than a drain and a "
                f"rebalance ({grace} s grace + {session:.0f} s session timeout)"
            )


def _grace_too_short(r: Rendered) -> None:
    r.pod_spec["terminationGracePeriodSeconds"] = 22


@check(_grace_too_short)
def grace_period_outlasts_the_drain(r: Rendered) -> Problems:
    grace = r.pod_spec.get("terminationGracePeriodSeconds", 30)
    drain = seconds(r.setting("FERRY_DRAIN_TIMEOUT") or "")
    told = seconds(r.setting("FERRY_TERMINATION_GRACE_PERIOD") or "")
    if grace < drain + DRAIN_MARGIN_S:
        yield (
            f"terminationGracePeriodSeconds {grace} leaves less than {DRAIN_MARGIN_S:.0f} s "
            f"after the {drain:.0f} s drain"
        )
    if told != grace:
        yield f"FERRY_TERMINATION_GRACE_PERIOD is {told:.0f} s but the pod's grace period is {grace} s"
