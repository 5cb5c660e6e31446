"""The API's JSON (camelCase, as ``cloudiot.v1.json`` describes it) to and from the registry's records."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from iotbridge import registry as reg
from iotbridge.admin.errors import InvalidArgument

# IoT Core answered a credential without expiration with the epoch.
NO_EXPIRATION = "1970-01-01T00:00:00Z"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RFC3339_RE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def timestamp(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: object, field: str) -> datetime:
    match = RFC3339_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidArgument(f"Invalid value at '{field}': {value!r} is not an RFC 3339 timestamp")
    head, frac, zone = match.groups()
    text = head + (frac[:7].ljust(7, "0") if frac else "") + ("+00:00" if zone == "Z" else zone)
    return datetime.fromisoformat(text).astimezone(UTC)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"Invalid value at '{field}': expected a base64 string")
    try:
        # JSON bytes are base64, standard or URL-safe alphabet, padding optional.
        text = value.replace("-", "+").replace("_", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"Invalid value at '{field}': not base64") from None


def parse_int64(value: object, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"Invalid value at '{field}': expected an integer")
    try:
        number = int(value)
    except ValueError:
        raise InvalidArgument(f"Invalid value at '{field}': {value!r} is not an integer") from None
    if number < minimum:
        raise InvalidArgument(f"Invalid value at '{field}': must be at least {minimum}")
    return number


def expect_object(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"Invalid value at '{field}': expected an object")
    return value


def check_fields(body: Mapping[str, Any], allowed: set[str], field: str) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidArgument(f"Invalid JSON payload received. Unknown name \"{key}\" at '{field}': "
                                  "Cannot find field.")


def snake(path: str) -> str:
    """A field mask path in the snake_case the API documents, from either spelling."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), path)


def mask_paths(value: str | None) -> list[str]:
    return [snake(p.strip()) for p in (value or "").split(",") if p.strip()]


# ------------------------------------------------------------------------------------------- devices


def config_json(cfg: reg.ConfigVersion | None) -> dict[str, Any]:
    if cfg is None:
        return {"version": "0", "binaryData": ""}
    out: dict[str, Any] = {"version": str(cfg.version), "cloudUpdateTime": timestamp(cfg.cloud_update_time),
                           "binaryData": b64(cfg.data)}
    if cfg.device_ack_time is not None:
        out["deviceAckTime"] = timestamp(cfg.device_ack_time)
    return out


def state_json(state: reg.DeviceState) -> dict[str, Any]:
    return {"updateTime": timestamp(state.update_time), "binaryData": b64(state.data)}


def credential_json(c: reg.Credential) -> dict[str, Any]:
    return {"publicKey": {"format": c.format, "key": c.public_key_pem},
            "expirationTime": timestamp(c.expiration_time) or NO_EXPIRATION}


def gateway_json(g: reg.GatewayConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"gatewayType": g.gateway_type}
    if g.gateway_auth_method:
        out["gatewayAuthMethod"] = g.gateway_auth_method
    if g.last_accessed_gateway_id:
        out["lastAccessedGatewayId"] = g.last_accessed_gateway_id
    if g.last_accessed_gateway_time:
        out["lastAccessedGatewayTime"] = timestamp(g.last_accessed_gateway_time)
    return out


# Device fields a fieldMask may name (snake_case), each with how to render it.
DEVICE_FIELDS = ("credentials", "last_heartbeat_time", "last_event_time", "last_state_time", "last_config_ack_time",
                 "last_config_send_time", "blocked", "last_error_time", "last_error_status", "config", "state",
                 "log_level", "metadata", "gateway_config")


def device_json(d: reg.Device, name: str, config: reg.ConfigVersion | None,
                fields: list[str] | None = None) -> dict[str, Any]:
    """``fields`` None: every field; otherwise ``id``, ``name`` and ``numId`` and the fields named."""
    full: dict[str, Any] = {
        "credentials": [credential_json(c) for c in d.credentials],
        "last_heartbeat_time": timestamp(d.last_heartbeat_time), "last_event_time": timestamp(d.last_event_time),
        "last_state_time": timestamp(d.last_state_time), "last_config_ack_time": timestamp(d.last_config_ack_time),
        "last_config_send_time": timestamp(d.last_config_send_time), "blocked": d.blocked,
        "last_error_time": timestamp(d.last_error_time),
        "last_error_status": {"code": 9, "message": d.last_error_status} if d.last_error_status else None,
        "config": config_json(config),
        "state": ({"updateTime": timestamp(d.last_state_time), "binaryData": b64(d.state)}
                  if d.state is not None and d.last_state_time is not None else None),
        "log_level": d.log_level or None, "metadata": dict(d.metadata),
        "gateway_config": gateway_json(d.gateway_config),
    }
    out: dict[str, Any] = {"id": d.id, "name": name, "numId": d.num_id}
    for key in DEVICE_FIELDS if fields is None else fields:
        value = full[key]
        if value is not None and value != [] and value is not False and value != {}:
            out[_camel(key)] = value
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def check_mask(fields: list[str], field: str) -> list[str]:
    for f in fields:
        if f not in DEVICE_FIELDS and f not in ("id", "name", "num_id"):
            raise InvalidArgument(f"Invalid value at '{field}': unknown device field {f!r}")
    return [f for f in fields if f in DEVICE_FIELDS]


def parse_credentials(value: object, field: str) -> list[reg.Credential]:
    if not isinstance(value, list):
        raise InvalidArgument(f"Invalid value at '{field}': expected a list")
    if len(value) > reg.MAX_CREDENTIALS:
        raise InvalidArgument(f"Invalid value at '{field}': {len(value)} credentials; a device has at most "
                              f"{reg.MAX_CREDENTIALS}")
    out = []
    for i, item in enumerate(value):
        at = f"{field}[{i}]"
        item = expect_object(item, at)
        check_fields(item, {"publicKey", "expirationTime"}, at)
        key = expect_object(item.get("publicKey"), f"{at}.publicKey")
        check_fields(key, {"format", "key"}, f"{at}.publicKey")
        fmt = key.get("format")
        if fmt not in reg.CREDENTIAL_FORMATS:
            raise InvalidArgument(f"Invalid value at '{at}.publicKey.format': {fmt!r}; one of "
                                  f"{list(reg.CREDENTIAL_FORMATS)}")
        expiration = item.get("expirationTime")
        when = parse_timestamp(expiration, f"{at}.expirationTime") if expiration is not None else None
        if when == EPOCH:
            when = None  # IoT Core's "never"
        try:
            out.append(reg.Credential(fmt, key.get("key") or "", when))
        except reg.InvalidCredential as exc:
            raise InvalidArgument(f"Invalid value at '{at}.publicKey.key': {exc}") from None
    return out


def parse_metadata(value: object, field: str) -> dict[str, str]:
    body = expect_object(value, field)
    try:
        return reg._check_metadata(dict(body))  # noqa: SLF001 - the registry's own rules, applied before any write
    except reg.InvalidMetadata as exc:
        raise InvalidArgument(f"Invalid value at '{field}': {exc}") from None


def parse_create_config(value: object, field: str) -> bytes:
    """The data of a device's first config version from ``Device.config`` on creation: ``version`` must be 0 (or
    absent) there, as IoT Core required; the output-only times are ignored."""
    config = expect_object(value, field)
    check_fields(config, {"binaryData", "version", "cloudUpdateTime", "deviceAckTime"}, field)
    if parse_int64(config.get("version", 0), f"{field}.version") != 0:
        raise InvalidArgument(f"Invalid value at '{field}.version': must be 0 on creation (the server assigns 1)")
    data = unb64(config.get("binaryData", ""), f"{field}.binary_data")
    if len(data) > reg.MAX_CONFIG_BYTES:
        raise InvalidArgument(f"Invalid value at '{field}.binary_data': {len(data)} bytes; at most "
                              f"{reg.MAX_CONFIG_BYTES}")
    return data


def parse_log_level(value: object, field: str) -> str:
    if value in (None, "", "LOG_LEVEL_UNSPECIFIED"):
        return ""
    if value not in reg.LOG_LEVELS:
        raise InvalidArgument(f"Invalid value at '{field}': {value!r}; one of {list(reg.LOG_LEVELS)}")
    return str(value)


def parse_gateway_config(value: object, field: str) -> reg.GatewayConfig:
    body = expect_object(value, field)
    check_fields(body, {"gatewayType", "gatewayAuthMethod", "lastAccessedGatewayId", "lastAccessedGatewayTime"},
                 field)
    gtype = body.get("gatewayType") or "NON_GATEWAY"
    if gtype == "GATEWAY_TYPE_UNSPECIFIED":
        gtype = "NON_GATEWAY"
    if gtype not in reg.GATEWAY_TYPES:
        raise InvalidArgument(f"Invalid value at '{field}.gatewayType': {gtype!r}")
    method = body.get("gatewayAuthMethod")
    if method in (None, "", "GATEWAY_AUTH_METHOD_UNSPECIFIED"):
        method = None
    elif method not in reg.GATEWAY_AUTH_METHODS:
        raise InvalidArgument(f"Invalid value at '{field}.gatewayAuthMethod': {method!r}")
    if gtype == "NON_GATEWAY" and method is not None:
        raise InvalidArgument(f"Invalid value at '{field}.gatewayAuthMethod': only a GATEWAY has one")
    return reg.GatewayConfig(gateway_type=gtype, gateway_auth_method=method)


# ------------------------------------------------------------------------------------------ registries


def certificate_json(pem: str) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    key = cert.public_key()
    key_type = ("RSA_X509_PEM" if isinstance(key, rsa.RSAPublicKey)
                else "ES256_X509_PEM" if isinstance(key, ec.EllipticCurvePublicKey) else "")
    algorithm = cert.signature_algorithm_oid._name  # noqa: SLF001 - the OID's readable name
    return {"publicKeyCertificate": {
        "format": "X509_CERTIFICATE_PEM", "certificate": pem,
        "x509Details": {"issuer": cert.issuer.rfc4514_string(), "subject": cert.subject.rfc4514_string(),
                        "startTime": timestamp(cert.not_valid_before_utc),
                        "expiryTime": timestamp(cert.not_valid_after_utc),
                        "signatureAlgorithm": algorithm, "publicKeyType": key_type}}}


def registry_json(registry_id: str, name: str, s: reg.RegistrySettings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": registry_id, "name": name,
        "mqttConfig": {"mqttEnabledState": "MQTT_ENABLED" if s.mqtt_enabled else "MQTT_DISABLED"},
        "httpConfig": {"httpEnabledState": "HTTP_ENABLED" if s.http_enabled else "HTTP_DISABLED"},
    }
    if s.event_routes:
        out["eventNotificationConfigs"] = [
            {"pubsubTopicName": r.topic, **({"subfolderMatches": r.subfolder_matches} if r.subfolder_matches else {})}
            for r in s.event_routes]
    if s.state_topic:
        out["stateNotificationConfig"] = {"pubsubTopicName": s.state_topic}
    if s.log_level:
        out["logLevel"] = s.log_level
    if s.ca_certificates:
        out["credentials"] = [certificate_json(pem) for pem in s.ca_certificates]
    return out


REGISTRY_BODY_FIELDS = {"id", "name", "eventNotificationConfigs", "stateNotificationConfig", "mqttConfig",
                        "httpConfig", "logLevel", "credentials"}


def registry_settings(body: Mapping[str, Any], base: reg.RegistrySettings, paths: list[str] | None,
                      field: str = "device_registry") -> reg.RegistrySettings:
    """``base`` with the fields of ``body`` that ``paths`` names (None: every field the body may set)."""
    check_fields(body, REGISTRY_BODY_FIELDS, field)
    changes: dict[str, Any] = {}

    def wanted(path: str) -> bool:
        return paths is None or path in paths or any(p.startswith(path + ".") for p in paths)

    if wanted("event_notification_configs"):
        routes = []
        for i, item in enumerate(body.get("eventNotificationConfigs") or []):
            at = f"{field}.event_notification_configs[{i}]"
            item = expect_object(item, at)
            check_fields(item, {"pubsubTopicName", "subfolderMatches"}, at)
            routes.append(reg.EventRoute(str(item.get("pubsubTopicName") or ""), str(item.get("subfolderMatches")
                                                                                      or "")))
        changes["event_routes"] = tuple(routes)
    if wanted("state_notification_config"):
        state = expect_object(body.get("stateNotificationConfig") or {}, f"{field}.state_notification_config")
        changes["state_topic"] = str(state.get("pubsubTopicName") or "")
    if wanted("mqtt_config"):
        mqtt = expect_object(body.get("mqttConfig") or {}, f"{field}.mqtt_config")
        value = mqtt.get("mqttEnabledState") or "MQTT_ENABLED"
        if value not in ("MQTT_ENABLED", "MQTT_DISABLED", "MQTT_STATE_UNSPECIFIED"):
            raise InvalidArgument(f"Invalid value at '{field}.mqtt_config.mqtt_enabled_state': {value!r}")
        changes["mqtt_enabled"] = value != "MQTT_DISABLED"
    if wanted("http_config"):
        http = expect_object(body.get("httpConfig") or {}, f"{field}.http_config")
        value = http.get("httpEnabledState") or "HTTP_ENABLED"
        if value not in ("HTTP_ENABLED", "HTTP_DISABLED", "HTTP_STATE_UNSPECIFIED"):
            raise InvalidArgument(f"Invalid value at '{field}.http_config.http_enabled_state': {value!r}")
        changes["http_enabled"] = value != "HTTP_DISABLED"
    if wanted("log_level"):
        changes["log_level"] = parse_log_level(body.get("logLevel"), f"{field}.log_level")
    if wanted("credentials"):
        pems = []
        for i, item in enumerate(body.get("credentials") or []):
            at = f"{field}.credentials[{i}].public_key_certificate"
            cert = expect_object(expect_object(item, at).get("publicKeyCertificate"), at)
            if cert.get("format") != "X509_CERTIFICATE_PEM":
                raise InvalidArgument(f"Invalid value at '{at}.format': must be X509_CERTIFICATE_PEM")
            pems.append(str(cert.get("certificate") or ""))
        changes["ca_certificates"] = tuple(pems)
    try:
        return reg.RegistrySettings(**{**base.__dict__, **changes})
    except reg.InvalidSettings as exc:
        raise InvalidArgument(f"Invalid value at '{field}': {exc}") from None


# ------------------------------------------------------------------------------------------ enums

# Proto numbers of the API's enums: a client may send an enum as its number (google-cloud-iot's REST transport
# asks for ``enum-encoding=int``). Answers always name them.
_LOG_LEVELS = {0: "LOG_LEVEL_UNSPECIFIED", 10: "NONE", 20: "ERROR", 30: "INFO", 40: "DEBUG"}
ENUM_NUMBERS: dict[str, dict[int, str]] = {
    "logLevel": _LOG_LEVELS,
    "publicKey.format": {0: "UNSPECIFIED_PUBLIC_KEY_FORMAT", 3: "RSA_PEM", 1: "RSA_X509_PEM", 2: "ES256_PEM",
                         4: "ES256_X509_PEM"},
    "publicKeyCertificate.format": {0: "UNSPECIFIED_PUBLIC_KEY_CERTIFICATE_FORMAT", 1: "X509_CERTIFICATE_PEM"},
    "gatewayType": {0: "GATEWAY_TYPE_UNSPECIFIED", 1: "GATEWAY", 2: "NON_GATEWAY"},
    "gatewayAuthMethod": {0: "GATEWAY_AUTH_METHOD_UNSPECIFIED", 1: "ASSOCIATION_ONLY", 2: "DEVICE_AUTH_TOKEN_ONLY",
                          3: "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"},
    "mqttEnabledState": {0: "MQTT_STATE_UNSPECIFIED", 1: "MQTT_ENABLED", 2: "MQTT_DISABLED"},
    "httpEnabledState": {0: "HTTP_STATE_UNSPECIFIED", 1: "HTTP_ENABLED", 2: "HTTP_DISABLED"},
}


def enum_name(key: str, value: object, parent: str = "") -> object:
    """``value`` of field ``key`` (inside ``parent``) with an enum number replaced by its name."""
    numbers = ENUM_NUMBERS.get(f"{parent}.{key}") or ENUM_NUMBERS.get(key)
    if numbers is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if value not in numbers:
            raise InvalidArgument(f"Invalid value at '{snake(key)}': {value} is not a value of the enum")
        return numbers[value]
    return value


def named_enums(value: object, parent: str = "") -> object:
    """A request body with every enum given as a number named instead."""
    if isinstance(value, dict):
        return {k: named_enums(enum_name(k, v, parent), k) for k, v in value.items()}
    if isinstance(value, list):
        return [named_enums(v, parent) for v in value]
    return value
