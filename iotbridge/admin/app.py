"""The ``cloudiot.googleapis.com/v1`` REST surface over the registry: every method of ``cloudiot.v1.json``.

``create_app(access, publisher, authorize)`` returns a Flask (WSGI) app. ``authorize(request, writes)`` is called
before every method (``writes``: whether it changes anything) and raises :class:`iotbridge.admin.errors.ApiError`
(``Unauthenticated``, ``PermissionDenied``) to refuse; any other exception it raises refuses with
PERMISSION_DENIED. Allowing, it returns whether the caller may also write (``True`` only; anything else is a
reader), which ``testIamPermissions`` answers from. Locally it accepts every caller as a writer
(:func:`allow_all`), as Google's emulators do.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

from flask import Flask, Request, Response, g, request
from google.cloud import firestore, pubsub_v1

from iotbridge import registry as reg
from iotbridge.admin import wire
from iotbridge.admin.errors import ApiError, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from iotbridge.bridge import fanout

log = logging.getLogger("iotbridge.admin")

Authorize = Callable[[Request, bool], bool]  # (request, writes) -> may the caller write; raises to refuse
MAX_PAGE_SIZE = 1000  # IoT Core's largest page of devices or registries
DEFAULT_PAGE_SIZE = 1000
# The permissions of IoT Core's roles that testIamPermissions can answer for.
PERMISSIONS = (
    "cloudiot.registries.create", "cloudiot.registries.delete", "cloudiot.registries.get", "cloudiot.registries.list",
    "cloudiot.registries.update", "cloudiot.registries.getIamPolicy", "cloudiot.registries.setIamPolicy",
    "cloudiot.devices.create", "cloudiot.devices.delete", "cloudiot.devices.get", "cloudiot.devices.list",
    "cloudiot.devices.update", "cloudiot.devices.updateConfig", "cloudiot.devices.sendCommand",
    "cloudiot.devices.bindGateway", "cloudiot.devices.unbindGateway",
)
# Those a reader holds (IoT Core's roles/cloudiot.viewer); the others need a writer.
READ_PERMISSIONS = frozenset({
    "cloudiot.registries.get", "cloudiot.registries.list", "cloudiot.registries.getIamPolicy",
    "cloudiot.devices.get", "cloudiot.devices.list",
})


def allow_all(_request: Request, _writes: bool) -> bool:
    """The local ``authorize`` hook: any credentials, as Google's emulators accept them, allowed to write."""
    return True


@dataclass
class Access:
    """The deployment's registries in Firestore: its own (``registry_id``, created with ``default_settings`` when
    first served) and any created through the API; configs and commands fanned out on ``{prefix}-device-commands``."""

    project: str
    region: str
    registry_id: str
    prefix: str
    client: firestore.Client
    default_settings: reg.RegistrySettings = field(default_factory=reg.RegistrySettings)
    _registries: dict[str, reg.Registry] = field(default_factory=dict)

    def registry(self, registry_id: str) -> reg.Registry:
        """The registry's handle; kept for later calls only once ``keep`` is told it exists, so made-up ids
        cannot grow the process's memory."""
        cached = self._registries.get(registry_id)
        if cached is not None:
            return cached
        return reg.Registry(self.project, registry_id, self.region, client=self.client, deployment=self.registry_id)

    def keep(self, registry: reg.Registry) -> reg.Registry:
        """Remember a registry known to exist (a handle holds about 7 KB of locks and references)."""
        return self._registries.setdefault(registry.registry_id, registry)

    def forget(self, registry_id: str) -> None:
        self._registries.pop(registry_id, None)

    def ensure_default(self) -> None:
        self.keep(self.registry(self.registry_id)).ensure_registry(self.default_settings)


@cache
def discovery_document() -> dict[str, Any]:
    return json.loads(resources.files("iotbridge.admin").joinpath("cloudiot.v1.json").read_text())


# ------------------------------------------------------------------------------------------ routing

SEG = r"([^/:]+)"
LOC = rf"projects/{SEG}/locations/{SEG}"
REG = rf"{LOC}/registries/{SEG}"
DEV = rf"{REG}/devices/{SEG}"


@dataclass(frozen=True)
class Route:
    http: str
    pattern: re.Pattern[str]
    handler: str
    writes: bool


def _r(http: str, path: str, handler: str, writes: bool) -> Route:
    return Route(http, re.compile(path), handler, writes)


ROUTES = (
    _r("POST", rf"{LOC}/registries", "create_registry", True),
    _r("GET", rf"{LOC}/registries", "list_registries", False),
    _r("GET", REG, "get_registry", False),
    _r("PATCH", REG, "patch_registry", True),
    _r("DELETE", REG, "delete_registry", True),
    _r("POST", rf"{REG}:bindDeviceToGateway", "bind", True),
    _r("POST", rf"{REG}:unbindDeviceFromGateway", "unbind", True),
    _r("POST", rf"{REG}:getIamPolicy", "get_iam_policy", False),
    _r("POST", rf"{REG}:setIamPolicy", "set_iam_policy", True),
    _r("POST", rf"{REG}:testIamPermissions", "test_iam_permissions", False),
    _r("GET", rf"{REG}/groups/{SEG}/devices", "list_group_devices", False),
    _r("POST", rf"{REG}/groups/{SEG}:getIamPolicy", "get_group_iam_policy", False),
    _r("POST", rf"{REG}/groups/{SEG}:setIamPolicy", "set_group_iam_policy", True),
    _r("POST", rf"{REG}/groups/{SEG}:testIamPermissions", "test_group_iam_permissions", False),
    _r("POST", rf"{REG}/devices", "create_device", True),
    _r("GET", rf"{REG}/devices", "list_devices", False),
    _r("GET", DEV, "get_device", False),
    _r("PATCH", DEV, "patch_device", True),
    _r("DELETE", DEV, "delete_device", True),
    _r("POST", rf"{DEV}:modifyCloudToDeviceConfig", "modify_config", True),
    _r("POST", rf"{DEV}:sendCommandToDevice", "send_command", True),
    _r("GET", rf"{DEV}/configVersions", "config_versions", False),
    _r("GET", rf"{DEV}/states", "states", False),
)


def create_app(access: Access, publisher: pubsub_v1.PublisherClient, authorize: Authorize = allow_all) -> Flask:
    app = Flask("iotbridge.admin")
    api = Api(access, publisher)

    @app.route("/$discovery/rest", methods=["GET"])
    def discovery() -> Response:
        version = request.args.get("version", "v1")
        if version != "v1":
            return _error(NotFound(f"no discovery document for version {version!r}"))
        doc = copy.deepcopy(discovery_document())
        proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
        root = f"{proto}://{request.host}/"
        doc["rootUrl"] = root
        doc["baseUrl"] = root
        if "mtlsRootUrl" in doc:
            doc["mtlsRootUrl"] = root
        return Response(json.dumps(doc), mimetype="application/json")

    @app.route("/v1/<path:path>", methods=["GET", "POST", "PATCH", "DELETE", "PUT"])
    def dispatch(path: str) -> Response:
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match is not None and route.http == request.method:
                break
        else:
            return _error(NotFound(f"Method not found: {request.method} /v1/{path}"))
        try:
            try:
                g.may_write = authorize(request, route.writes) is True
            except ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - the hook refuses by raising anything
                raise PermissionDenied(f"The caller does not have permission: {exc}") from None
            body: Any = {}
            if request.method in ("POST", "PATCH", "PUT") and request.get_data():
                try:
                    body = json.loads(request.get_data())
                except ValueError as exc:
                    raise InvalidArgument(f"Invalid JSON payload received. {exc}") from None
                if not isinstance(body, dict):
                    raise InvalidArgument("Invalid JSON payload received. Expected an object.")
                body = wire.named_enums(body)
            access_check(access, match.group(1), match.group(2))
            result = getattr(api, route.handler)(*match.groups()[2:], body=body, args=request.args)
        except ApiError as exc:
            return _error(exc)
        except reg.RegistryError as exc:
            return _error(registry_error(exc))
        except Exception:
            log.exception("%s /v1/%s failed", request.method, path)
            return _error(ApiError("INTERNAL", "Internal error encountered."))
        return Response(json.dumps(result), mimetype="application/json")

    @app.errorhandler(404)
    def not_found(_exc: Exception) -> Response:
        return _error(NotFound(f"Method not found: {request.method} {request.path}"))

    @app.errorhandler(405)
    def not_allowed(_exc: Exception) -> Response:
        return _error(NotFound(f"Method not found: {request.method} {request.path}"))

    return app


def _error(exc: ApiError) -> Response:
    return Response(json.dumps(exc.body()), status=exc.code, mimetype="application/json")


def access_check(access: Access, project: str, location: str) -> None:
    if project != access.project:
        raise PermissionDenied(f"Permission denied on resource project {project} (this deployment serves project "
                               f"{access.project})")
    if location != access.region:
        raise NotFound(f"Location {location} is not served here: this deployment's registries are in "
                       f"{access.region}")


def registry_error(exc: reg.RegistryError) -> ApiError:
    if isinstance(exc, (reg.DeviceNotFound, reg.RegistryNotFound)):
        return NotFound(str(exc))
    if isinstance(exc, (reg.DeviceExists, reg.RegistryExists)):
        return ApiError("ALREADY_EXISTS", str(exc))
    if isinstance(exc, reg.VersionConflict):
        return FailedPrecondition(f"versionToUpdate: {exc}")
    if isinstance(exc, reg.RateLimited):
        return ApiError("RESOURCE_EXHAUSTED", str(exc))
    if isinstance(exc, (reg.DeviceBlocked, reg.RegistryNotEmpty)):
        return FailedPrecondition(str(exc))
    if isinstance(exc, reg.ConfigTooLarge):
        return InvalidArgument(f"binaryData: {exc}")
    return InvalidArgument(str(exc))


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def _page_after(token: str | None) -> str | None:
    if not token:
        return None
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"Invalid value at 'page_token': {token!r}") from None


def _page_size(args: Any) -> int:
    value = args.get("pageSize")
    if value is None:
        return DEFAULT_PAGE_SIZE
    size = wire.parse_int64(value, "page_size")
    return min(size, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE


def _etag(policy: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(policy.get("bindings", []), sort_keys=True).encode()).digest()[:8]
    return base64.b64encode(digest).decode()


class Api:
    def __init__(self, access: Access, publisher: pubsub_v1.PublisherClient):
        self.a = access
        self.publisher = publisher

    # ------------------------------------------------------------------------------------ names

    def _loc(self) -> str:
        return f"projects/{self.a.project}/locations/{self.a.region}"

    def _reg_name(self, registry_id: str) -> str:
        return f"{self._loc()}/registries/{registry_id}"

    def _registry(self, registry_id: str) -> reg.Registry:
        if not reg.REGISTRY_ID_RE.fullmatch(registry_id):
            raise InvalidArgument(f"Invalid value at 'name': registry id {registry_id!r}")
        registry = self.a.registry(registry_id)
        if not registry.exists():
            raise NotFound(f"The registry `{registry_id}` does not exist")
        return self.a.keep(registry)

    def _device(self, registry: reg.Registry, device: str) -> reg.Device:
        """A device named by its id or its numeric id, as IoT Core resolved either."""
        if device.isdigit():
            return registry.get_device_by_num_id(device)
        if not reg.DEVICE_ID_RE.fullmatch(device):
            raise InvalidArgument(f"Invalid value at 'name': device id {device!r}")
        return registry.get_device(device)

    def _device_json(self, registry: reg.Registry, d: reg.Device, fields: list[str] | None = None) -> dict[str, Any]:
        config = registry.get_config(d.id) if fields is None or "config" in fields else None
        return wire.device_json(d, f"{self._reg_name(registry.registry_id)}/devices/{d.num_id}", config, fields)

    # ------------------------------------------------------------------------------------ registries

    def create_registry(self, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry_id = body.get("id")
        if not isinstance(registry_id, str) or not reg.REGISTRY_ID_RE.fullmatch(registry_id):
            raise InvalidArgument(f"Invalid value at 'device_registry.id': {registry_id!r} must match "
                                  f"{reg.REGISTRY_ID_RE.pattern}")
        settings = wire.registry_settings(body, reg.RegistrySettings(), None)
        self.a.keep(self.a.registry(registry_id)).create_registry(settings)
        return wire.registry_json(registry_id, self._reg_name(registry_id), settings)

    def list_registries(self, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        size, after = _page_size(args), _page_after(args.get("pageToken"))
        ids = [i for i in reg.list_registries(self.a.client, self.a.registry_id) if after is None or i > after]
        page = ids[:size]
        out: dict[str, Any] = {"deviceRegistries": [
            wire.registry_json(i, self._reg_name(i), self.a.registry(i).get_settings()) for i in page]}
        if len(ids) > size:
            out["nextPageToken"] = _page_token(page[-1])
        return out

    def get_registry(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        return wire.registry_json(registry_id, self._reg_name(registry_id), registry.get_settings())

    def patch_registry(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        paths = wire.mask_paths(args.get("updateMask"))
        if not paths:
            raise InvalidArgument("Invalid value at 'update_mask': the mask must name the fields to update")
        allowed = ("event_notification_configs", "state_notification_config", "mqtt_config", "http_config",
                   "log_level", "credentials")
        for p in paths:
            if p.split(".")[0] not in allowed:
                raise InvalidArgument(f"Invalid value at 'update_mask': {p!r} cannot be updated; updatable: "
                                      f"{', '.join(allowed)}")
        registry = self._registry(registry_id)
        settings = wire.registry_settings(body, registry.get_settings(), paths)
        registry.update_settings(settings)
        return wire.registry_json(registry_id, self._reg_name(registry_id), settings)

    def delete_registry(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        if registry_id == self.a.registry_id:
            raise FailedPrecondition(f"The registry `{registry_id}` is this deployment's own registry (its broker "
                                     "hosts, bridge and device index use it): it cannot be deleted through the API; "
                                     "remove the deployment's stack instead")
        registry.delete_registry()
        self.a.forget(registry_id)
        return {}

    # ------------------------------------------------------------------------------------ gateways

    def _binding(self, registry_id: str, body: dict[str, Any], verb: str) -> tuple[reg.Registry, str, str]:
        wire.check_fields(body, {"gatewayId", "deviceId"}, verb)
        registry = self._registry(registry_id)
        ids = []
        for key in ("gatewayId", "deviceId"):
            value = body.get(key)
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"Invalid value at '{wire.snake(key)}': required")
            ids.append(self._device(registry, value).id)
        return registry, ids[0], ids[1]

    def bind(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry, gateway_id, device_id = self._binding(registry_id, body, "bind")
        registry.bind_device_to_gateway(gateway_id, device_id)
        return {}

    def unbind(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry, gateway_id, device_id = self._binding(registry_id, body, "unbind")
        registry.unbind_device_from_gateway(gateway_id, device_id)
        return {}

    # ------------------------------------------------------------------------------------ IAM

    def _policy_doc(self, registry: reg.Registry, group: str | None) -> Any:
        doc = registry.client.collection("registries").document(registry.registry_id)
        return doc.collection("iam").document(group or "_registry")

    def _get_policy(self, registry: reg.Registry, group: str | None) -> dict[str, Any]:
        snap = self._policy_doc(registry, group).get()
        policy = (snap.to_dict() or {}) if snap.exists else {"bindings": []}
        return {"version": 1, "bindings": policy.get("bindings", []), "etag": _etag(policy)}

    def get_iam_policy(self, registry_id: str, *, body: dict[str, Any], args: Any,
                       group: str | None = None) -> dict[str, Any]:
        wire.check_fields(body, {"options"}, "get_iam_policy_request")
        return self._get_policy(self._registry(registry_id), group)

    def set_iam_policy(self, registry_id: str, *, body: dict[str, Any], args: Any,
                       group: str | None = None) -> dict[str, Any]:
        wire.check_fields(body, {"policy", "updateMask"}, "set_iam_policy_request")
        registry = self._registry(registry_id)
        policy = wire.expect_object(body.get("policy"), "policy")
        wire.check_fields(policy, {"version", "bindings", "etag", "auditConfigs"}, "policy")
        bindings = policy.get("bindings") or []
        if not isinstance(bindings, list):
            raise InvalidArgument("Invalid value at 'policy.bindings': expected a list")
        clean = []
        for i, b in enumerate(bindings):
            b = wire.expect_object(b, f"policy.bindings[{i}]")
            role, members = b.get("role"), b.get("members") or []
            if not isinstance(role, str) or not role.startswith("roles/"):
                raise InvalidArgument(f"Invalid value at 'policy.bindings[{i}].role': {role!r}")
            if not isinstance(members, list) or not all(isinstance(m, str) and ":" in m for m in members):
                raise InvalidArgument(f"Invalid value at 'policy.bindings[{i}].members': type:identity strings")
            clean.append({"role": role, "members": sorted(set(members))})
        current = self._get_policy(registry, group)
        if policy.get("etag") and policy["etag"] != current["etag"]:
            raise ApiError("ABORTED", "policy.etag: the policy was changed since it was read")
        self._policy_doc(registry, group).set({"bindings": clean})
        return self._get_policy(registry, group)

    def test_iam_permissions(self, registry_id: str, *, body: dict[str, Any], args: Any,
                             group: str | None = None) -> dict[str, Any]:
        wire.check_fields(body, {"permissions"}, "test_iam_permissions_request")
        self._registry(registry_id)
        asked = body.get("permissions") or []
        if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
            raise InvalidArgument("Invalid value at 'permissions': a list of permission names")
        for p in asked:
            if "*" in p or "." not in p:
                raise InvalidArgument(f"Invalid value at 'permissions': {p!r} is not a permission name")
        # The caller got past authorize(): a writer holds every cloudiot permission served, a reader the read ones.
        held = PERMISSIONS if getattr(g, "may_write", False) else READ_PERMISSIONS
        return {"permissions": [p for p in asked if p in held]}

    def _group(self, registry_id: str, group: str) -> None:
        # One implicit group per registry, named like it: IoT Core never documented groups beyond this list.
        if group != registry_id:
            raise NotFound(f"The group `{group}` does not exist in registry `{registry_id}`")

    def list_group_devices(self, registry_id: str, group: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        self._group(registry_id, group)
        return self.list_devices(registry_id, body=body, args=args)

    def get_group_iam_policy(self, registry_id: str, group: str, *, body: dict[str, Any], args: Any
                             ) -> dict[str, Any]:
        self._group(registry_id, group)
        return self.get_iam_policy(registry_id, body=body, args=args, group=group)

    def set_group_iam_policy(self, registry_id: str, group: str, *, body: dict[str, Any], args: Any
                             ) -> dict[str, Any]:
        self._group(registry_id, group)
        return self.set_iam_policy(registry_id, body=body, args=args, group=group)

    def test_group_iam_permissions(self, registry_id: str, group: str, *, body: dict[str, Any], args: Any
                                   ) -> dict[str, Any]:
        self._group(registry_id, group)
        return self.test_iam_permissions(registry_id, body=body, args=args, group=group)

    # ------------------------------------------------------------------------------------ devices

    @staticmethod
    def _signed(registry: reg.Registry, credentials: list[reg.Credential]) -> list[reg.Credential]:
        """``credentials``, once every X.509 one is signed by one of the registry's CA certificates (when it has
        any; IoT Core's rule); INVALID_ARGUMENT naming the credential otherwise."""
        x509_at = [i for i, c in enumerate(credentials) if c.format.endswith("_X509_PEM")]
        cas = registry.get_settings().ca_certificates if x509_at else ()
        for i in x509_at:
            if cas and not reg.signed_by_one_of(credentials[i].public_key_pem, cas):
                raise InvalidArgument(f"Invalid value at 'device.credentials[{i}].publicKey.key': the certificate "
                                      "is not signed by any of the registry's CA certificates")
        return credentials

    def create_device(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        wire.check_fields(body, {"id", "name", "numId", "credentials", "blocked", "metadata", "logLevel",
                                 "gatewayConfig", "config"}, "device")
        registry = self._registry(registry_id)
        device_id = body.get("id")
        if not isinstance(device_id, str) or not reg.DEVICE_ID_RE.fullmatch(device_id):
            raise InvalidArgument(f"Invalid value at 'device.id': {device_id!r} must match {reg.DEVICE_ID_RE.pattern}")
        if "numId" in body:
            raise InvalidArgument("Invalid value at 'device.num_id': set by the server")
        blocked = body.get("blocked", False)
        if not isinstance(blocked, bool):
            raise InvalidArgument("Invalid value at 'device.blocked': expected a boolean")
        d = registry.create_device(
            device_id, self._signed(registry, wire.parse_credentials(body.get("credentials") or [],
                                                                     "device.credentials")),
            metadata=wire.parse_metadata(body.get("metadata") or {}, "device.metadata"), blocked=blocked,
            gateway_config=wire.parse_gateway_config(body.get("gatewayConfig") or {}, "device.gateway_config"),
            log_level=wire.parse_log_level(body.get("logLevel"), "device.log_level"),
            config=wire.parse_create_config(body.get("config") or {}, "device.config"))
        return self._device_json(registry, d)

    def list_devices(self, registry_id: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        fields = wire.check_mask(wire.mask_paths(args.get("fieldMask")), "field_mask")
        size, after = _page_size(args), _page_after(args.get("pageToken"))
        ids = set(args.getlist("deviceIds"))
        num_ids = set(args.getlist("deviceNumIds"))
        gateway_type = wire.enum_name("gatewayType", args.get("gatewayListOptions.gatewayType"))
        of_gateway = args.get("gatewayListOptions.associationsGatewayId")
        of_device = args.get("gatewayListOptions.associationsDeviceId")
        if sum(x is not None for x in (gateway_type, of_gateway, of_device)) > 1:
            raise InvalidArgument("Invalid value at 'gateway_list_options': give one of gateway_type, "
                                  "associations_gateway_id, associations_device_id")
        if gateway_type is not None and gateway_type not in reg.GATEWAY_TYPES:
            raise InvalidArgument(f"Invalid value at 'gateway_list_options.gateway_type': {gateway_type!r}")
        if len(ids) + len(num_ids) > 10000:
            raise InvalidArgument("Invalid value at 'device_ids': at most 10000 ids")
        filtered = bool(ids or num_ids or gateway_type or of_gateway or of_device)
        if of_gateway is not None:
            candidates = registry.devices_bound_to(self._device(registry, of_gateway).id)
        elif of_device is not None:
            bound = self._device(registry, of_device).bound_gateways
            candidates = [registry.get_device(g) for g in bound]
        elif filtered:
            candidates = registry.list_devices()
        else:
            candidates = registry.list_devices(limit=size + 1, start_after=after)
        chosen = [d for d in candidates
                  if (not ids or d.id in ids) and (not num_ids or d.num_id in num_ids)
                  and (gateway_type is None or d.gateway_config.gateway_type == gateway_type)
                  and (after is None or d.id > after)]
        page = chosen[:size]
        out: dict[str, Any] = {"devices": [self._device_json(registry, d, fields) for d in page]}
        if len(chosen) > size:
            out["nextPageToken"] = _page_token(page[-1].id)
        return out

    def get_device(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        paths = wire.mask_paths(args.get("fieldMask"))
        fields = wire.check_mask(paths, "field_mask") if paths else None
        return self._device_json(registry, self._device(registry, device), fields)

    def patch_device(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        wire.check_fields(body, {"id", "name", "numId", "credentials", "blocked", "metadata", "logLevel",
                                 "gatewayConfig", "config"}, "device")
        registry = self._registry(registry_id)
        paths = wire.mask_paths(args.get("updateMask"))
        if not paths:
            raise InvalidArgument("Invalid value at 'update_mask': the mask must name the fields to update")
        allowed = ("credentials", "blocked", "metadata", "log_level", "gateway_config.gateway_auth_method")
        for p in paths:
            if p not in allowed:
                raise InvalidArgument(f"Invalid value at 'update_mask': {p!r} cannot be updated; updatable: "
                                      f"{', '.join(allowed)}")
        d = self._device(registry, device)
        # Everything is checked before the first write.
        creds = self._signed(registry, wire.parse_credentials(body.get("credentials") or [], "device.credentials")) \
            if "credentials" in paths else None
        meta = wire.parse_metadata(body.get("metadata") or {}, "device.metadata") if "metadata" in paths else None
        level = wire.parse_log_level(body.get("logLevel"), "device.log_level") if "log_level" in paths else None
        blocked = body.get("blocked", False)
        if "blocked" in paths and not isinstance(blocked, bool):
            raise InvalidArgument("Invalid value at 'device.blocked': expected a boolean")
        method = None
        if "gateway_config.gateway_auth_method" in paths:
            gateway = wire.expect_object(body.get("gatewayConfig") or {}, "device.gateway_config")
            method = gateway.get("gatewayAuthMethod")
            if method in ("", "GATEWAY_AUTH_METHOD_UNSPECIFIED"):
                method = None
            if method is not None and method not in reg.GATEWAY_AUTH_METHODS:
                raise InvalidArgument(f"Invalid value at 'device.gateway_config.gateway_auth_method': {method!r}")
            if method is not None and d.gateway_config.gateway_type != "GATEWAY":
                raise InvalidArgument("Invalid value at 'device.gateway_config.gateway_auth_method': the device is "
                                      "not a gateway")
        if creds is not None:
            registry.set_credentials(d.id, creds)  # the front ends the sessions the new set no longer allows
        if meta is not None:
            registry.set_metadata(d.id, meta)
        if level is not None:
            registry.set_log_level(d.id, level)
        if "blocked" in paths:
            registry.set_blocked(d.id, blocked)
        if "gateway_config.gateway_auth_method" in paths:
            registry.set_gateway_auth_method(d.id, method)
        return self._device_json(registry, registry.get_device(d.id))

    def delete_device(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        registry.delete_device(self._device(registry, device).id)
        return {}

    def modify_config(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        wire.check_fields(body, {"binaryData", "versionToUpdate"}, "modify_cloud_to_device_config_request")
        registry = self._registry(registry_id)
        data = wire.unb64(body.get("binaryData", ""), "binary_data")
        version = wire.parse_int64(body.get("versionToUpdate", 0), "version_to_update")
        d = self._device(registry, device)

        def deliver(device_id: str, version: int, data: bytes) -> None:
            host = registry.connected_host(device_id)
            if host is None:
                return  # stored: the device gets it from the registry when it next connects
            fanout.publish_config(self.publisher, self.a.project, self.a.prefix, device_id,
                                  reg.ConfigVersion(version, data, datetime.now(UTC)), host,
                                  registry_id=registry.registry_id)
            registry.mark_config_sent(device_id)

        pushed = reg.push_config(registry, d.id, data, deliver, version_to_update=version)
        return wire.config_json(pushed.config)

    def send_command(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        wire.check_fields(body, {"binaryData", "subfolder"}, "send_command_to_device_request")
        registry = self._registry(registry_id)
        if "binaryData" not in body:
            raise InvalidArgument("Invalid value at 'binary_data': required")
        data = wire.unb64(body["binaryData"], "binary_data")
        if len(data) > fanout.MAX_COMMAND_BYTES:
            raise InvalidArgument(f"Invalid value at 'binary_data': {len(data)} bytes; at most "
                                  f"{fanout.MAX_COMMAND_BYTES}")
        sub = body.get("subfolder")
        if sub is not None and (not isinstance(sub, str) or any(c in sub for c in "+#\x00")):
            raise InvalidArgument(f"Invalid value at 'subfolder': {sub!r}")
        d = self._device(registry, device)
        try:
            fanout.send_command(registry, self.publisher, self.a.prefix, d.id, data, sub or None)
        except fanout.DeviceNotConnected:
            raise FailedPrecondition(f"Device `{d.id}` is not connected.") from None
        return {}

    def config_versions(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        n = wire.parse_int64(args.get("numVersions", 0), "num_versions")
        d = self._device(registry, device)
        versions = registry.list_config_versions(d.id, limit=min(n or reg.KEEP_CONFIG_VERSIONS,
                                                                  reg.KEEP_CONFIG_VERSIONS))
        return {"deviceConfigs": [wire.config_json(c) for c in versions]}

    def states(self, registry_id: str, device: str, *, body: dict[str, Any], args: Any) -> dict[str, Any]:
        registry = self._registry(registry_id)
        n = wire.parse_int64(args.get("numStates", 0), "num_states")
        d = self._device(registry, device)
        return {"deviceStates": [wire.state_json(s) for s in registry.list_states(d.id, n or reg.KEEP_STATES)]}
