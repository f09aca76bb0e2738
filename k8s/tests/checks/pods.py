"""The worker pods: probes, identity, device and resources, model, placement, privileges."""

from __future__ import annotations

import re

from checks import Problems, check
from manifests import Rendered, cpu_cores, matches, pod_templates, size_bytes

QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# The worker's listener for the probes alone (`--probe-addr`), as the container declares it.
PROBE_PORT_NAME = "probe"
PROBE_PORT = 9091


def _budget(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _startup_on_healthz(r: Rendered) -> None:
    r.container["startupProbe"]["httpGet"]["path"] = "/healthz"


@check(_startup_on_healthz)
def probes_follow_the_model(r: Rendered) -> Problems:
    # Ready means loaded, verified and consuming; startup therefore waits on /readyz too, so a
    # load that hangs is restarted. Liveness asks only whether the process still answers.
    # They ask the probes' own port, which a flood of clients on `http` cannot hold up.
    c = r.container
    want = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in want.items():
        got = c.get(probe, {}).get("httpGet")
        if not got:
            yield f"{probe} is missing or not an HTTP probe"
        elif got.get("path") != path or got.get("port") not in (PROBE_PORT, PROBE_PORT_NAME):
            yield f"{probe} asks {got.get('path')} on port {got.get('port')}, not {path} on {PROBE_PORT_NAME}"
    startup = _budget(c.get("startupProbe", {}))
    least = 900 if r.overlay == "gpu" else 300
    if startup < least:
        yield f"startupProbe allows {startup} s to download and load the model; the {r.overlay} overlay needs {least} s"
    deadline = r.deployment["spec"].get("progressDeadlineSeconds", 600)
    if deadline <= startup:
        yield f"progressDeadlineSeconds {deadline} would call a rollout failed while its pods may still be loading"


def _other_port(r: Rendered) -> None:
    r.worker_config()["FERRY_HTTP_ADDR"] = "0.0.0.0:8080"


@check(_other_port)
def http_port_is_the_workers(r: Rendered) -> Problems:
    ports = {p.get("name"): p["containerPort"] for p in r.container.get("ports", [])}
    if ports.get("http") != 9090:
        yield f"the worker container has no port named http on 9090: {ports}"
    addr = r.setting("FERRY_HTTP_ADDR") or ""
    if not addr.startswith("0.0.0.0:") or addr.rsplit(":", 1)[-1] != str(ports.get("http")):
        yield f"FERRY_HTTP_ADDR {addr!r} does not listen on all addresses at the http port"


def _probes_on_the_http_port(r: Rendered) -> None:
    r.worker_config()["FERRY_PROBE_ADDR"] = "0.0.0.0:9090"


@check(_probes_on_the_http_port)
def probe_port_is_the_workers(r: Rendered) -> Problems:
    ports = {p.get("name"): p["containerPort"] for p in r.container.get("ports", [])}
    if ports.get(PROBE_PORT_NAME) != PROBE_PORT:
        yield f"the worker container has no port named {PROBE_PORT_NAME} on {PROBE_PORT}: {ports}"
    addr = r.setting("FERRY_PROBE_ADDR") or ""
    port = addr.rsplit(":", 1)[-1]
    if not addr.startswith("0.0.0.0:") or port != str(ports.get(PROBE_PORT_NAME)):
        yield f"FERRY_PROBE_ADDR {addr!r} does not listen on all addresses at the {PROBE_PORT_NAME} port"
    if port == str(ports.get("http")):
        yield f"FERRY_PROBE_ADDR {addr!r} is the http port: the probes need a port of their own"


def _no_worker_id(r: Rendered) -> None:
    r.container["env"] = [e for e in r.container["env"] if e["name"] != "FERRY_WORKER_ID"]


@check(_no_worker_id)
def worker_identity(r: Rendered) -> Problems:
    wid = r.env().get("FERRY_WORKER_ID")
    if not isinstance(wid, dict) or wid.get("fieldRef", {}).get("fieldPath") != "metadata.name":
        yield "FERRY_WORKER_ID must come from the pod name (fieldRef metadata.name)"
    # A Deployment's pods get new names, so a static member id would be a new member each time
    # while the old one holds its partitions until the session timeout: only a StatefulSet.
    if "FERRY_GROUP_INSTANCE_ID" in r.env():
        yield "FERRY_GROUP_INSTANCE_ID (static membership) needs stable pod names: use a StatefulSet"
    if r.setting("FERRY_LOG_FORMAT") != "json":
        yield "FERRY_LOG_FORMAT must be json for the cluster's log collector"


def _swap_device(r: Rendered) -> None:
    r.worker_config()["FERRY_DEVICE"] = "cpu" if r.overlay == "gpu" else "cuda"


@check(_swap_device)
def device_matches_the_overlay(r: Rendered) -> Problems:
    device = r.setting("FERRY_DEVICE") or ""
    res = r.container.get("resources", {})
    gpus = res.get("limits", {}).get("nvidia.com/gpu")
    image = r.container["image"]
    if r.overlay == "gpu":
        if not re.fullmatch(r"cuda(:\d+)?", device):
            yield f"FERRY_DEVICE {device!r} on the gpu overlay"
        if str(gpus) != "1" or str(res.get("requests", {}).get("nvidia.com/gpu", gpus)) != "1":
            yield f"the gpu overlay's worker must request and limit one nvidia.com/gpu, not {gpus!r}"
        if "cuda" not in image:
            yield f"the gpu overlay runs {image}, not the CUDA image"
    else:
        if device != "cpu":
            yield f"FERRY_DEVICE {device!r} on the cpu overlay"
        if gpus is not None or "cuda" in image:
            yield "the cpu overlay asks for a GPU or runs the CUDA image"


def _no_limits(r: Rendered) -> None:
    del r.container["resources"]["limits"]


@check(_no_limits)
def resources_are_bounded(r: Rendered) -> Problems:
    for where, template in pod_templates(r.docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    q = res.get(kind, {}).get(resource)
                    if q is None:
                        yield f"{where} container {c['name']}: no {resource} {kind[:-1]}"
                    elif not QUANTITY.match(str(q)):
                        yield f"{where} container {c['name']}: {resource} {kind[:-1]} {q!r} is not a quantity"
    threads = r.setting("FERRY_THREADS")
    limit = r.container.get("resources", {}).get("limits", {}).get("cpu")
    if threads is None or limit is None or int(threads) > cpu_cores(limit) - 1:
        yield (
            f"FERRY_THREADS {threads} must leave one core of the cpu limit {limit} free: candle's "
            "threads spin, and Kafka, HTTP and snapshots need CPU too"
        )


# What a CPU worker holds beside its KV caches: SmolLM2-135M re-quantised to Q8_0 and the
# process, about 300 MiB resident once loaded, with room to spare.
MODEL_ALLOWANCE = 512 * 2**20


def _kv_budget_past_the_limit(r: Rendered) -> None:
    r.worker_config()["FERRY_KV_BUDGET"] = "lots" if r.overlay == "gpu" else "3Gi"


@check(_kv_budget_past_the_limit)
def kv_budget_fits_the_memory_limit(r: Rendered) -> Problems:
    # On the CPU the KV caches live in the container's memory: their budget, the model and the
    # worker's reserve (a tenth of the limit, at least 128 MiB, as its own default keeps) must
    # fit in the memory limit, or the pod is OOM-killed under load instead of queueing. On a GPU
    # they live in device memory, which the container's limit does not bound.
    budget = (r.setting("FERRY_KV_BUDGET") or "auto").strip()
    keyword = budget.lower() in ("auto", "off", "none", "unlimited")
    if not keyword and size_bytes(budget) is None:
        yield f"FERRY_KV_BUDGET {budget!r} is not a size (such as 2GiB), auto or off"
        return
    if r.setting("FERRY_DEVICE") != "cpu":
        return
    if budget.lower() in ("off", "none", "unlimited") or size_bytes(budget) == 0:
        yield "FERRY_KV_BUDGET must not be off on the CPU: long requests would get the pod OOM-killed"
        return
    limit = size_bytes(r.container.get("resources", {}).get("limits", {}).get("memory", ""))
    if keyword or limit is None:
        return
    reserve = max(limit // 10, 128 * 2**20)
    need = size_bytes(budget) + reserve + MODEL_ALLOWANCE
    if need > limit:
        yield (
            f"FERRY_KV_BUDGET {budget} with the model ({MODEL_ALLOWANCE >> 20} MiB) and the reserve "
            f"({reserve >> 20} MiB) needs {need >> 20} MiB, more than the memory limit of {limit >> 20} MiB"
        )


def _unverified(r: Rendered) -> None:
    del r.worker_config()["FERRY_MODEL_SHA256"]


@check(_unverified)
def model_is_pinned_verified_and_cached(r: Rendered) -> Problems:
    model = r.setting("FERRY_MODEL") or ""
    if not model:
        yield "FERRY_MODEL is not set"
    if not re.fullmatch(r"[0-9a-f]{64}", r.setting("FERRY_MODEL_SHA256") or ""):
        yield "FERRY_MODEL_SHA256 must pin the model file (64 hex digits): ready means verified"
    if model.startswith("hf://"):
        if "@" not in model:
            yield f"{model}: pin a revision (@commit), or a new upload changes the model under the fleet"
        cache = r.setting("FERRY_MODEL_CACHE_DIR")
        volume = r.volume_at(cache) if cache else None
        if volume is None or not ("hostPath" in volume or "persistentVolumeClaim" in volume):
            yield f"FERRY_MODEL_CACHE_DIR {cache!r} is not on a node-shared (hostPath) or persistent volume"
        owner = [c for c in r.pod_spec.get("initContainers", []) if cache and cache in c.get("command", [])]
        if volume is not None and "hostPath" in volume and not owner:
            yield "nothing gives the hostPath model cache to the worker's user (it is created owned by root)"


FETCH_FLAG = "--fetch-model-only"
MODEL_SETTINGS = ("FERRY_MODEL", "FERRY_MODEL_SHA256", "FERRY_MODEL_CACHE_DIR", "HF_HOME")


def _fetches(c: dict) -> bool:
    """Whether a container runs the worker's fetch-and-verify mode."""
    argv = c.get("command", []) + c.get("args", [])
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    return FETCH_FLAG in argv or str(env.get("FERRY_FETCH_MODEL_ONLY", "")).lower() == "true"


def _container_env(r: Rendered, c: dict) -> dict:
    """A container's environment as `Rendered.env` computes the worker's."""
    out: dict = {}
    for source in c.get("envFrom", []):
        if ref := source.get("configMapRef"):
            cm = r.find("ConfigMap", ref["name"])
            if cm is not None:
                out.update({k: str(v) for k, v in cm.get("data", {}).items()})
    for e in c.get("env", []):
        out[e["name"]] = str(e["value"]) if "value" in e else e.get("valueFrom", {})
    return out


def _no_fetch_step(r: Rendered) -> None:
    r.pod_spec["initContainers"] = [c for c in r.pod_spec.get("initContainers", []) if not _fetches(c)]


@check(_no_fetch_step)
def model_is_fetched_and_verified_before_the_worker(r: Rendered) -> Problems:
    # An init container runs `ferry-worker --fetch-model-only` with the worker's own model
    # settings and cache volume, so the worker starts only on a file that is on the node and
    # verified, and a download is never bounded by the worker's startup probe.
    inits = r.pod_spec.get("initContainers", [])
    fetchers = [i for i, c in enumerate(inits) if _fetches(c)]
    if len(fetchers) != 1:
        yield f"{len(fetchers)} init containers run `ferry-worker {FETCH_FLAG}`; the pod needs exactly one"
        return
    index = fetchers[0]
    fetch = inits[index]
    if fetch["image"] != r.container["image"]:
        yield f"the model-fetch init container runs {fetch['image']}, not the worker's image"
    if _fetches(r.container) or r.setting("FERRY_FETCH_MODEL_ONLY") not in (None, "false"):
        yield "the worker container itself is in fetch-only mode: it would exit instead of serving"
    worker_env, fetch_env = r.env(), _container_env(r, fetch)
    for name in MODEL_SETTINGS:
        if worker_env.get(name) != fetch_env.get(name):
            yield f"{name} differs between the worker and its model-fetch step: the worker would load another file"
    cache = r.setting("FERRY_MODEL_CACHE_DIR")
    model = r.setting("FERRY_MODEL") or ""
    paths = [cache] if model.startswith("hf://") and cache else [model] if model.startswith("/") else []
    home = worker_env.get("HF_HOME")
    if isinstance(home, str) and model.startswith("hf://"):
        paths.append(home)
    for path in paths:
        worker_mount = _mount_for(r.container, path)
        fetch_mount = _mount_for(fetch, path)
        if fetch_mount is None or worker_mount is None or fetch_mount["name"] != worker_mount["name"] or (
            fetch_mount["mountPath"] != worker_mount["mountPath"]
        ):
            yield f"{path} is not the same volume, at the same path, for the model-fetch step and the worker"
    owners = [i for i, c in enumerate(inits) if cache and cache in c.get("command", []) and "chown" in c.get("command", [])]
    if owners and min(owners) > index:
        yield "the model-fetch step runs before the cache is given to the worker's user: it cannot write there"
    sc = fetch.get("securityContext", {})
    if sc.get("runAsUser") == 0 or sc.get("allowPrivilegeEscalation") is not False:
        yield "the model-fetch step must run as the worker's user, without privilege escalation"


def _mount_for(container: dict, path: str) -> dict | None:
    """The mount of `container` holding `path` (the deepest one)."""
    best = None
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if path == mount or path.startswith(mount + "/"):
            if best is None or len(mount) > len(best["mountPath"].rstrip("/")):
                best = m
    return best


def _same_zone(r: Rendered) -> None:
    r.pod_spec["topologySpreadConstraints"][0]["topologyKey"] = "kubernetes.io/hostname"


@check(_same_zone)
def spread_over_nodes_and_zones(r: Rendered) -> Problems:
    labels = r.pod_labels
    anti = r.pod_spec.get("affinity", {}).get("podAntiAffinity", {})
    terms = [
        t.get("podAffinityTerm", t)
        for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        + anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    ]
    if not any(t["topologyKey"] == "kubernetes.io/hostname" and matches(t["labelSelector"], labels) for t in terms):
        yield "no pod anti-affinity between workers on kubernetes.io/hostname"
    spread = r.pod_spec.get("topologySpreadConstraints", [])
    if not any(
        s["topologyKey"] == "topology.kubernetes.io/zone" and matches(s["labelSelector"], labels) for s in spread
    ):
        yield "no topology spread of the workers over topology.kubernetes.io/zone"


def _privileged(r: Rendered) -> None:
    r.container["securityContext"]["privileged"] = True


@check(_privileged)
def runs_unprivileged(r: Rendered) -> Problems:
    pod = r.pod_spec.get("securityContext", {})
    if pod.get("runAsNonRoot") is not True or not pod.get("runAsUser"):
        yield "the worker pod must run as a non-root user"
    sc = r.container.get("securityContext", {})
    if sc.get("privileged") or sc.get("allowPrivilegeEscalation") is not False:
        yield "the worker container must not be privileged or escalate"
    if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
        yield "the worker container must drop every capability and add none"
    for c in r.pod_spec.get("initContainers", []):
        caps = c.get("securityContext", {}).get("capabilities", {})
        if set(caps.get("add", [])) - {"CHOWN"} or caps.get("drop") != ["ALL"]:
            yield f"init container {c['name']} may hold only CHOWN"


def _no_priority(r: Rendered) -> None:
    r.pod_spec["priorityClassName"] = "ferry-critical"


@check(_no_priority)
def priority_class_exists(r: Rendered) -> Problems:
    for where, template in pod_templates(r.docs):
        name = template["spec"].get("priorityClassName")
        if name is None and where == f"Deployment/{r.deployment['metadata']['name']}":
            yield "the workers have no priorityClassName"
        elif name is not None and r.find("PriorityClass", name) is None:
            yield f"{where}: PriorityClass {name} is not in the manifests"


def _latest_tag(r: Rendered) -> None:
    r.container["image"] = r.container["image"].rsplit(":", 1)[0] + ":latest"


@check(_latest_tag)
def images_are_pinned(r: Rendered) -> Problems:
    for where, template in pod_templates(r.docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
            if tag in (None, "latest") and "@sha256:" not in image:
                yield f"{where} container {c['name']}: image {image} has no fixed tag"
    images = {c["image"] for c in r.pod_spec.get("initContainers", []) + r.pod_spec["containers"]}
    if len(images) != 1:
        yield f"the worker pod's containers should share one image, not {sorted(images)}"


def _surge_half(r: Rendered) -> None:
    r.deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = "50%"


@check(_surge_half)
def rollout_replaces_one_at_a_time(r: Rendered) -> Problems:
    strategy = r.deployment["spec"].get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        yield "the Deployment must roll, not recreate: Recreate drains every worker at once"
    elif str(rolling.get("maxUnavailable", "25%")) not in ("0", "1"):
        yield f"maxUnavailable {rolling.get('maxUnavailable')!r}: a rollout should drain one worker at a time"
