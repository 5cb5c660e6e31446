"""The device manager API as its own process (``python -m iotbridge.admin``) next to a bridge stack, and a checker
of its answers against the schemas of IoT Core's discovery document."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import googleapiclient

from iotbridge.local import services
from iotbridge.local.broker_host import BridgeStack

DISCOVERY = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "cloudiot.v1.json"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def start_admin(stack: BridgeStack, env: dict[str, str], workdir: Path) -> tuple[services.Service, str]:
    """The API for the stack's deployment (project, region, registry, topic prefix), accepting any caller."""
    s = stack.settings
    port = services.free_port()
    svc = services.spawn("admin-api", [services.python_executable(), "-m", "iotbridge.admin"], port, workdir, env={
        **env, "PROJECT_ID": s.project, "REGION": s.region, "REGISTRY_ID": s.registry_id, "TOPIC_PREFIX": s.prefix,
        "ADMIN_AUTH": "none", "ADMIN_HOST": services.LOOPBACK, "PORT": str(port), "PYTHONUNBUFFERED": "1"})
    services.wait_for_port(svc, 60)
    return svc, f"http://{svc.address}/"


def document() -> dict[str, Any]:
    return json.loads(DISCOVERY.read_text())


def all_methods(resource: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Method id (``cloudiot.projects.locations.registries.devices.get``) -> its description."""
    resource = resource if resource is not None else document()
    out = {m["id"]: m for m in resource.get("methods", {}).values()}
    for sub in resource.get("resources", {}).values():
        out.update(all_methods(sub))
    return out


def check(schema: str, value: object, path: str = "$") -> None:
    """AssertionError naming the place where ``value`` breaks the document's schema ``schema``: a field the schema
    does not have, a wrong JSON type, a string that is not of its format (int64, google-datetime, byte) or enum."""
    _check(document()["schemas"], {"$ref": schema}, value, path)


def _check(schemas: dict[str, Any], spec: dict[str, Any], value: object, path: str) -> None:
    if "$ref" in spec:
        spec = schemas[spec["$ref"]]
    kind = spec.get("type")
    if kind == "object" or "properties" in spec:
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        props = spec.get("properties")
        if props is None:  # a map (additionalProperties) or a free object
            extra = spec.get("additionalProperties")
            for k, v in value.items():
                if extra:
                    _check(schemas, extra, v, f"{path}.{k}")
            return
        for k, v in value.items():
            assert k in props, f"{path}: field {k!r} is not in the schema ({sorted(props)})"
            _check(schemas, props[k], v, f"{path}.{k}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: expected an array, got {value!r}"
        for i, v in enumerate(value):
            _check(schemas, spec["items"], v, f"{path}[{i}]")
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: expected a boolean, got {value!r}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer, got {value!r}"
    elif kind == "string":
        assert isinstance(value, str), f"{path}: expected a string, got {value!r}"
        fmt = spec.get("format")
        if fmt in ("int64", "uint64"):
            assert re.fullmatch(r"-?\d+", value), f"{path}: {value!r} is not an {fmt}"
        elif fmt == "google-datetime":
            assert RFC3339.fullmatch(value), f"{path}: {value!r} is not RFC 3339"
        elif fmt == "byte":
            base64.b64decode(value, validate=True)
        if "enum" in spec:
            assert value in spec["enum"], f"{path}: {value!r} is not one of {spec['enum']}"
    elif kind == "any":
        pass
    else:
        raise AssertionError(f"{path}: schema of unknown type {spec!r}")
