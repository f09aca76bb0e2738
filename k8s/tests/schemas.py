"""Validates documents offline: Kubernetes kinds against the API's own JSON schemas (bundled by
kubernetes-validate), custom resources against their CRDs' OpenAPI schemas (in `schemas/`).

Both are strict: a field the schema does not define is an error, as `kubectl apply` with
server-side field validation (the default since Kubernetes 1.27) would make it. CRD schemas do
not say so themselves (the API server prunes unknown fields of custom resources silently, which
is worse: a misspelt field just vanishes), so `strict()` closes every object schema that lists
its properties and does not preserve unknown fields.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest Kubernetes the manifests support (unhealthyPodEvictionPolicy and matchLabelKeys are
# on by default from 1.27; 1.29 is the oldest release its cloud providers still support) and
# the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


@functools.cache
def custom_resource_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> JSON schema, from the CRD schemas in `schemas/`."""
    out = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        crd = json.loads(path.read_text())
        out[(crd["apiVersion"], crd["kind"])] = strict(crd["openAPIV3Schema"])
    return out


def strict(node: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as a JSON schema, closed against unknown fields."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate(doc: dict[str, Any], version: str) -> list[str]:
    """Problems of one document, as `Kind/name: path: message` sentences."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    schema = custom_resource_schemas().get((doc.get("apiVersion"), doc.get("kind")))
    if schema is not None:
        # The API server checks metadata for custom resources as for any object.
        problems = _validate_metadata(doc, version)
        validator = jsonschema.Draft7Validator(schema)
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            problems.append(f"{_path(e.absolute_path)}: {e.message}")
        return [f"{where}: {p}" for p in problems]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version} "
            "nor among the CRD schemas in k8s/tests/schemas"
        ]
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {_path(e.absolute_path)}: {e.message} (Kubernetes {version})"]
    return []


def _validate_metadata(doc: dict[str, Any], version: str) -> list[str]:
    # ConfigMap's schema checks ObjectMeta like any other kind's; borrow it.
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": copy.deepcopy(doc.get("metadata", {}))}
    try:
        kubernetes_validate.validate(probe, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_path(['metadata', *e.absolute_path])}: {e.message}"]
    return []


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(document)"
