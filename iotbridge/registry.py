"""The device registry: devices, credentials and config versions, stored in Firestore (Native mode).

Cloud IoT Core kept this state for its devices; this module keeps it for the bridge, the config-push
function and ``iotctl``. Locally it runs against the Firestore emulator (``FIRESTORE_EMULATOR_HOST``).

Layout (any number of registries per deployment, as IoT Core had)::

    registries/{registry_id}                                          project, region, the registry's settings
    registries/{registry_id}/devices/{device_id}                      the device
    registries/{registry_id}/devices/{device_id}/configs/{v:010d}     the latest 10 config versions
    registries/{registry_id}/devices/{device_id}/states/{t:020d}      the latest 10 states (t: ns since epoch)
    registries/{registry_id}/devices/{device_id}/requests/{msg_id}    idempotency markers (TTL field expire_at)
    registries/{registry_id}/num_ids/{num_id}                         reserves a numeric id (unique)
    registries/{deployment}/device_index/{device_id}                  the registry of a device id
    registries/{registry_id}/changes/{device_id}                      when its right to connect changed (TTL expire_at)

A device id is unique across the deployment's registries (IoT Core's was unique per registry): devices of every
registry share one broker, whose topics (``/devices/{device}/...``) do not name the registry. The index kept
under the deployment's own registry (``deployment``, by default the registry itself) says which registry a
device id belongs to (``registry_of``); a device created before the index existed has no entry and belongs to
the deployment's own registry. Creating a device in another registry also reads the own registry's device of
that id, so such a device still blocks its id; ``ensure_registry`` on the own registry backfills the missing
entries (``backfill_index``) once, then marks the registry ``device_index_complete``.

Config versions are written in one transaction per update, as IoT Core versioned them: server-assigned,
monotonic, compare-and-set on ``version_to_update``, at most one update per second per device, and a request
id (the Pub/Sub message id) that was already applied returns the version it created instead of a new one.

A new device has config version 1, with empty data unless it was created with a config, as IoT Core gave it.
A gateway's bound devices carry its id in their ``bound_gateways`` array (listed with ``array_contains``).

Every write a connected session rests on (credentials, blocked, gateway settings, bindings, creation, deletion)
also sets the device's change stamp ``changes/{device_id}.at`` to the commit time, in the same batch or
transaction; a deletion leaves its stamp behind as a tombstone. A broker host asks ``changed_since`` for the
devices whose stamp moved and re-reads only those (docs/broker-scaling.md, "Registry re-check"). A stamp carries
``expire_at``, ``CHANGE_STAMP_KEEP_S`` after it was written, for the database's TTL policy: tombstones of deleted
devices do not pile up.

This module is also copied next to the config-push function's ``main.py`` when it is packaged, so it imports
nothing from the rest of the project.
"""

from __future__ import annotations

import re
import secrets
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.cloud import firestore

# IoT Core's device id rule without '+': '+' is a wildcard in MQTT topic filters and in Mosquitto ACL
# patterns, so an id carrying it could widen a device's ACL. The class also excludes '/', '#', spaces, NUL.
DEVICE_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.~%-]{2,254}")
REGISTRY_ID_RE = DEVICE_ID_RE
# IoT Core's metadata limits.
METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-][a-zA-Z0-9_-]{0,127}")
MAX_METADATA_PAIRS = 500
MAX_METADATA_BYTES = 256 * 1024
MAX_METADATA_VALUE_BYTES = 32 * 1024

MAX_CREDENTIALS = 3
MAX_CONFIG_BYTES = 64 * 1024
MAX_STATE_BYTES = 64 * 1024
KEEP_CONFIG_VERSIONS = 10
MIN_RSA_BITS = 2048  # IoT Core refused smaller RSA keys
# Pub/Sub keeps an unacknowledged message for at most 7 days, so a redelivery cannot come later than that;
# the Firestore TTL policy on `requests.expire_at` removes the markers afterwards.
REQUEST_MARKER_TTL = timedelta(days=8)
# Two writers on one device (redelivery racing a new request) abort each other's transactions; the client
# retries them. Five attempts (the library default) is too few under a burst.
TRANSACTION_ATTEMPTS = 25

KEEP_STATES = 10
MAX_EVENT_NOTIFICATION_CONFIGS = 10  # IoT Core's limit on a registry's event routes
MAX_REGISTRY_CREDENTIALS = 10  # IoT Core's limit on a registry's CA certificates
# A Pub/Sub topic's full name, as a registry's notification configs give it.
TOPIC_NAME_RE = re.compile(r"projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[a-zA-Z][a-zA-Z0-9._~%+-]{2,254}")

CredentialFormat = Literal["RSA_PEM", "RSA_X509_PEM", "ES256_PEM", "ES256_X509_PEM"]
CREDENTIAL_FORMATS: tuple[str, ...] = get_args(CredentialFormat)
LogLevel = Literal["NONE", "ERROR", "INFO", "DEBUG"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)
GatewayType = Literal["GATEWAY", "NON_GATEWAY"]
GATEWAY_TYPES: tuple[str, ...] = get_args(GatewayType)
GatewayAuthMethod = Literal["ASSOCIATION_ONLY", "DEVICE_AUTH_TOKEN_ONLY", "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"]
GATEWAY_AUTH_METHODS: tuple[str, ...] = get_args(GatewayAuthMethod)


class RegistryError(Exception):
    """Base of every error this module raises on purpose."""


class InvalidDeviceId(RegistryError, ValueError):
    pass


class DeviceNotFound(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "device not found"


class DeviceExists(RegistryError):
    pass


class DeviceBlocked(RegistryError):
    pass


class VersionConflict(RegistryError):
    """``version_to_update`` is not the device's current config version."""


class ConfigTooLarge(RegistryError, ValueError):
    pass


class RateLimited(RegistryError):
    """More than one config update per ``min_interval_s`` for one device."""


class InvalidCredential(RegistryError, ValueError):
    pass


class InvalidMetadata(RegistryError, ValueError):
    pass


class InvalidBinding(RegistryError, ValueError):
    """A binding whose gateway is not a gateway, or whose device is one."""


class RegistryNotFound(RegistryError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "registry not found"


class RegistryExists(RegistryError):
    pass


class RegistryNotEmpty(RegistryError):
    """A registry that still has devices cannot be deleted (IoT Core's rule)."""


class InvalidSettings(RegistryError, ValueError):
    """A registry setting out of its rules (a topic name, too many routes or certificates, a log level)."""


def validate_device_id(device_id: object) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidDeviceId(
            f"invalid device id {device_id!r}: must match [a-zA-Z][a-zA-Z0-9_.~%-]{{2,254}} "
            "(3-255 characters, starting with a letter; no '/', '+', '#', spaces or control characters)"
        )
    return device_id


def _utc(when: datetime | None) -> datetime:
    if when is None:
        return datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: give a timezone-aware time")
    return when.astimezone(UTC)


# ------------------------------------------------------------------------------------------ credentials


@dataclass(frozen=True)
class Credential:
    """A device's public key (or X.509 certificate holding it), parsed and checked when constructed."""

    format: CredentialFormat
    public_key_pem: str
    expiration_time: datetime | None = None
    _key: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.format not in CREDENTIAL_FORMATS:
            raise InvalidCredential(f"unknown credential format {self.format!r}; allowed: {list(CREDENTIAL_FORMATS)}")
        if not isinstance(self.public_key_pem, str) or not self.public_key_pem.strip():
            raise InvalidCredential(f"{self.format}: empty key")
        if "PRIVATE KEY" in self.public_key_pem:
            # Refuse loudly: storing it would leak the device's secret into the registry.
            raise InvalidCredential(f"{self.format}: this is a private key; register the public key")
        if self.expiration_time is not None and self.expiration_time.tzinfo is None:
            raise InvalidCredential("expiration_time must be timezone-aware")
        object.__setattr__(self, "_key", self._parse())

    def _parse(self) -> Any:
        data = self.public_key_pem.encode()
        try:
            if self.format.endswith("_X509_PEM"):
                key = x509.load_pem_x509_certificate(data).public_key()
            else:
                key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            kind = "X.509 certificate" if self.format.endswith("_X509_PEM") else "public key"
            raise InvalidCredential(f"{self.format}: not a PEM {kind} ({exc})") from None
        if self.format.startswith("RSA"):
            if not isinstance(key, rsa.RSAPublicKey):
                raise InvalidCredential(f"{self.format}: expected an RSA key, got {type(key).__name__}")
            if key.key_size < MIN_RSA_BITS:
                raise InvalidCredential(f"{self.format}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
        else:
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise InvalidCredential(f"{self.format}: expected an EC P-256 key (ES256)")
        return key

    def algorithm(self) -> str:
        return "RS256" if self.format.startswith("RSA") else "ES256"

    def public_key(self) -> Any:
        """The ``cryptography`` public key object (taken from the certificate for ``*_X509_PEM``)."""
        return self._key

    def expired(self, now: datetime | None = None) -> bool:
        return self.expiration_time is not None and _utc(now) >= self.expiration_time

    def to_doc(self) -> dict[str, Any]:
        return {"format": self.format, "public_key_pem": self.public_key_pem,
                "expiration_time": self.expiration_time}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Credential:
        return cls(format=doc["format"], public_key_pem=doc["public_key_pem"],
                   expiration_time=doc.get("expiration_time"))


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class ConfigVersion:
    version: int
    data: bytes
    cloud_update_time: datetime
    device_ack_time: datetime | None = None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> ConfigVersion:
        return cls(version=int(doc["version"]), data=bytes(doc["data"]),
                   cloud_update_time=doc["cloud_update_time"], device_ack_time=doc.get("device_ack_time"))


@dataclass(frozen=True)
class DeviceState:
    data: bytes
    update_time: datetime


@dataclass(frozen=True)
class EventRoute:
    """Events whose subfolder is ``subfolder_matches`` go to ``topic`` (a full topic name); an empty
    ``subfolder_matches`` matches every event, and is the last route of a registry when there is one."""

    topic: str
    subfolder_matches: str = ""


@dataclass(frozen=True)
class RegistrySettings:
    """What IoT Core kept for a registry: where its devices' events and states go, whether MQTT/HTTP are on, the
    default log level and the CA certificates of its devices (PEM)."""

    event_routes: tuple[EventRoute, ...] = ()
    state_topic: str = ""
    mqtt_enabled: bool = True
    http_enabled: bool = True
    log_level: str = ""
    ca_certificates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.event_routes) > MAX_EVENT_NOTIFICATION_CONFIGS:
            raise InvalidSettings(f"{len(self.event_routes)} event notification configs; "
                                  f"at most {MAX_EVENT_NOTIFICATION_CONFIGS}")
        for i, r in enumerate(self.event_routes):
            if not TOPIC_NAME_RE.fullmatch(r.topic):
                raise InvalidSettings(f"event notification config {i}: pubsubTopicName {r.topic!r} is not "
                                      "projects/{project}/topics/{topic}")
            if not r.subfolder_matches and i != len(self.event_routes) - 1:
                raise InvalidSettings(f"event notification config {i}: only the last one may omit subfolderMatches")
        seen = [r.subfolder_matches for r in self.event_routes]
        if len(set(seen)) != len(seen):
            raise InvalidSettings("two event notification configs have the same subfolderMatches")
        if self.state_topic and not TOPIC_NAME_RE.fullmatch(self.state_topic):
            raise InvalidSettings(f"stateNotificationConfig.pubsubTopicName {self.state_topic!r} is not "
                                  "projects/{project}/topics/{topic}")
        if self.log_level and self.log_level not in LOG_LEVELS:
            raise InvalidSettings(f"logLevel must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")
        if len(self.ca_certificates) > MAX_REGISTRY_CREDENTIALS:
            raise InvalidSettings(f"{len(self.ca_certificates)} registry credentials; at most "
                                  f"{MAX_REGISTRY_CREDENTIALS}")
        for pem in self.ca_certificates:
            try:
                x509.load_pem_x509_certificate(pem.encode())
            except (ValueError, TypeError) as exc:
                raise InvalidSettings(f"registry credential is not a PEM X.509 certificate ({exc})") from None

    def event_topic(self, sub_folder: str) -> str | None:
        """The topic of an event in ``sub_folder``, IoT Core's way: the route matching the subfolder, else the
        route without ``subfolder_matches``; None when neither exists (the event is not published)."""
        fallback = None
        for r in self.event_routes:
            if not r.subfolder_matches:
                fallback = r.topic
            elif sub_folder and r.subfolder_matches == sub_folder:
                return r.topic
        return fallback

    def to_doc(self) -> dict[str, Any]:
        return {"event_routes": [{"topic": r.topic, "subfolder_matches": r.subfolder_matches}
                                 for r in self.event_routes],
                "state_topic": self.state_topic, "mqtt_enabled": self.mqtt_enabled,
                "http_enabled": self.http_enabled, "log_level": self.log_level,
                "ca_certificates": list(self.ca_certificates)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RegistrySettings:
        return cls(event_routes=tuple(EventRoute(r["topic"], r.get("subfolder_matches") or "")
                                      for r in doc.get("event_routes") or ()),
                   state_topic=str(doc.get("state_topic") or ""), mqtt_enabled=bool(doc.get("mqtt_enabled", True)),
                   http_enabled=bool(doc.get("http_enabled", True)), log_level=str(doc.get("log_level") or ""),
                   ca_certificates=tuple(doc.get("ca_certificates") or ()))


@dataclass(frozen=True)
class Grant:
    """A device's blocked flag, numeric id and credentials (public key PEM -> expiration time), as read for the
    sessions already connected on its behalf."""

    num_id: str
    blocked: bool
    credentials: dict[str, datetime | None]
    bound_gateways: tuple[str, ...] = ()


def grant_of(device: Device) -> Grant:
    """The grant of a device read whole (what ``Registry.session_grants`` reads of it)."""
    return Grant(num_id=device.num_id, blocked=device.blocked,
                 credentials={c.public_key_pem: c.expiration_time for c in device.credentials},
                 bound_gateways=device.bound_gateways)


@dataclass(frozen=True)
class GatewayConfig:
    """IoT Core's ``gatewayConfig``: whether the device is a gateway, how the devices it attaches prove themselves
    (only the binding, a JWT of the device's own in the attach message, or both), and the last gateway a device
    was attached through."""

    gateway_type: GatewayType = "NON_GATEWAY"
    gateway_auth_method: GatewayAuthMethod | None = None
    last_accessed_gateway_id: str | None = None
    last_accessed_gateway_time: datetime | None = None

    def __post_init__(self) -> None:
        if self.gateway_type not in ("GATEWAY", "NON_GATEWAY"):
            raise InvalidBinding(f"unknown gateway type {self.gateway_type!r}; allowed: GATEWAY, NON_GATEWAY")
        if self.gateway_auth_method is not None and self.gateway_auth_method not in GATEWAY_AUTH_METHODS:
            raise InvalidBinding(f"unknown gateway auth method {self.gateway_auth_method!r}; allowed: "
                                 f"{list(GATEWAY_AUTH_METHODS)}")

    @property
    def is_gateway(self) -> bool:
        return self.gateway_type == "GATEWAY"

    def to_doc(self) -> dict[str, Any]:
        return {"gateway_type": self.gateway_type, "gateway_auth_method": self.gateway_auth_method,
                "last_accessed_gateway_id": self.last_accessed_gateway_id,
                "last_accessed_gateway_time": self.last_accessed_gateway_time}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> GatewayConfig:
        doc = doc or {}
        return cls(gateway_type=doc.get("gateway_type") or "NON_GATEWAY",
                   gateway_auth_method=doc.get("gateway_auth_method"),
                   last_accessed_gateway_id=doc.get("last_accessed_gateway_id"),
                   last_accessed_gateway_time=doc.get("last_accessed_gateway_time"))


@dataclass(frozen=True)
class Device:
    id: str
    num_id: str
    registry_id: str
    credentials: tuple[Credential, ...] = ()
    blocked: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    config_version: int = 0
    last_config_ack_time: datetime | None = None
    last_config_update_time: datetime | None = None
    last_event_time: datetime | None = None
    last_state_time: datetime | None = None
    last_heartbeat_time: datetime | None = None
    state: bytes | None = None
    last_error_time: datetime | None = None
    last_error_status: str = ""
    log_level: str = ""
    gateway_config: GatewayConfig = field(default_factory=GatewayConfig)
    bound_gateways: tuple[str, ...] = ()
    last_config_send_time: datetime | None = None

    def valid_credentials(self, now: datetime | None = None) -> tuple[Credential, ...]:
        return tuple(c for c in self.credentials if not c.expired(now))

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Device:
        state = doc.get("state")
        return cls(
            id=doc["id"], num_id=doc["num_id"], registry_id=doc["registry_id"],
            credentials=tuple(Credential.from_doc(c) for c in doc.get("credentials", ())),
            blocked=bool(doc.get("blocked", False)), metadata=dict(doc.get("metadata") or {}),
            config_version=int(doc.get("config_version", 0)),
            last_config_ack_time=doc.get("last_config_ack_time"),
            last_config_update_time=doc.get("last_config_update_time"),
            last_event_time=doc.get("last_event_time"), last_state_time=doc.get("last_state_time"),
            last_heartbeat_time=doc.get("last_heartbeat_time"),
            state=bytes(state) if state is not None else None,
            last_error_time=doc.get("last_error_time"), last_error_status=str(doc.get("last_error_status") or ""),
            log_level=str(doc.get("log_level") or ""), gateway_config=GatewayConfig.from_doc(doc.get("gateway_config")),
            bound_gateways=tuple(doc.get("bound_gateways") or ()),
            last_config_send_time=doc.get("last_config_send_time"),
        )


def signed_by_one_of(certificate_pem: str, ca_certificates: Sequence[str]) -> bool:
    """Whether the X.509 certificate ``certificate_pem`` was issued and signed by one of ``ca_certificates`` (a
    registry's CA certificates, PEM), as IoT Core checked the ``*_X509_PEM`` credentials of such a registry."""
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    for pem in ca_certificates:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pem.encode()))
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _check_credentials(credentials: Sequence[Credential]) -> None:
    if len(credentials) > MAX_CREDENTIALS:
        raise InvalidCredential(f"{len(credentials)} credentials; a device has at most {MAX_CREDENTIALS}")
    for c in credentials:
        if not isinstance(c, Credential):
            raise InvalidCredential(f"expected a Credential, got {type(c).__name__}")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    if len(out) > MAX_METADATA_PAIRS:
        raise InvalidMetadata(f"{len(out)} metadata pairs; at most {MAX_METADATA_PAIRS}")
    total = 0
    for k, v in out.items():
        if not isinstance(k, str) or not METADATA_KEY_RE.fullmatch(k):
            raise InvalidMetadata(f"invalid metadata key {k!r}: [a-zA-Z0-9_-]{{1,128}}")
        if not isinstance(v, str):
            raise InvalidMetadata(f"metadata value for {k!r} must be a string")
        size = len(v.encode())
        if size > MAX_METADATA_VALUE_BYTES:
            raise InvalidMetadata(f"metadata value for {k!r} is {size} bytes; at most {MAX_METADATA_VALUE_BYTES}")
        total += len(k) + size
    if total > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata is {total} bytes; at most {MAX_METADATA_BYTES}")
    return out


def _check_log_level(log_level: str) -> str:
    if log_level and log_level not in LOG_LEVELS:
        raise InvalidSettings(f"logLevel must be one of {list(LOG_LEVELS)}, got {log_level!r}")
    return log_level


def registry_of(client: firestore.Client, deployment: str, device_id: str) -> str | None:
    """The registry a device id of the deployment (named by its own registry) belongs to; None for an unknown id
    or one created before the index existed."""
    snap = (client.collection("registries").document(deployment).collection("device_index")
            .document(validate_device_id(device_id)).get())
    return (snap.to_dict() or {}).get("registry_id") if snap.exists else None


def registries_of(client: firestore.Client, deployment: str, device_ids: Sequence[str],
                  chunk: int = 300) -> dict[str, str | None]:
    """:func:`registry_of` for many device ids, in one batched read (``get_all``) per ``chunk``."""
    index = client.collection("registries").document(deployment).collection("device_index")
    ids = [validate_device_id(d) for d in dict.fromkeys(device_ids)]
    found: dict[str, str | None] = dict.fromkeys(ids)
    for i in range(0, len(ids), chunk):
        for snap in client.get_all([index.document(d) for d in ids[i:i + chunk]], field_paths=["registry_id"]):
            if snap.exists:
                found[snap.id] = (snap.to_dict() or {}).get("registry_id")
    return found


def list_registries(client: firestore.Client, deployment: str) -> list[str]:
    """The ids of the deployment's registries (its own and those created for it), in order."""
    own = client.collection("registries").document(deployment).get(field_paths=["registry_id"]).exists
    others = client.collection("registries").where(filter=firestore.FieldFilter("deployment", "==", deployment))
    return sorted({*([deployment] if own else []), *(snap.id for snap in others.stream())})


# ------------------------------------------------------------------------------------------ registry

CHANGES = "changes"  # registries/{registry}/changes/{device}: {"at": the commit time of the device's last change}
# How long a change stamp is kept at least (the TTL policy on ``changes.expire_at`` removes it after that). A host
# whose change-feed rounds have failed for half of it no longer trusts the feed and reads its devices again.
CHANGE_STAMP_KEEP_S = 7 * 86_400


# Set on a deployment's own registry once every device it holds has its device-index entry.
INDEX_COMPLETE = "device_index_complete"


class Registry:
    """One device registry. Every method is a few Firestore reads/writes; safe to share between threads."""

    def __init__(self, project: str, registry_id: str, region: str, client: firestore.Client | None = None,
                 database: str | None = None, deployment: str | None = None):
        if not isinstance(registry_id, str) or not REGISTRY_ID_RE.fullmatch(registry_id):
            raise ValueError(f"invalid registry id {registry_id!r}: must match {REGISTRY_ID_RE.pattern}")
        self.project = project
        self.registry_id = registry_id
        self.region = region
        # With FIRESTORE_EMULATOR_HOST set the client talks to the emulator with anonymous credentials.
        self.client = client or (firestore.Client(project=project, database=database) if database
                                 else firestore.Client(project=project))
        self._root = self.client.collection("registries").document(registry_id)
        self._devices = self._root.collection("devices")
        self._num_ids = self._root.collection("num_ids")
        self._changes = self._root.collection(CHANGES)
        # The deployment's own registry, which keeps the index of device ids across its registries.
        self.deployment = deployment or registry_id
        self._index = self.client.collection("registries").document(self.deployment).collection("device_index")
        # Two transactions on one device abort each other and retry with backoff (seconds on the emulator).
        # Within one process they are queued here instead; across processes Firestore still serialises them.
        self._device_locks = [threading.Lock() for _ in range(64)]

    def _device_lock(self, device_id: str) -> threading.Lock:
        return self._device_locks[zlib.crc32(device_id.encode()) % len(self._device_locks)]

    # ----------------------------------------------------------------------------- paths

    def _device_ref(self, device_id: str) -> firestore.DocumentReference:
        return self._devices.document(validate_device_id(device_id))

    def _config_ref(self, device_id: str, version: int) -> firestore.DocumentReference:
        return self._device_ref(device_id).collection("configs").document(f"{version:010d}")

    def _request_ref(self, device_id: str, request_id: str) -> firestore.DocumentReference:
        # Pub/Sub message ids are decimal strings; anything else could not be a document id safely.
        if not request_id or "/" in request_id or request_id.startswith("__") or request_id in {".", ".."}:
            raise ValueError(f"invalid request id {request_id!r}")
        return self._device_ref(device_id).collection("requests").document(request_id)

    def _mark_changed(self, writer: Any, device_id: str) -> None:
        """Stamp the device as changed, in the batch or transaction ``writer`` that makes the change: the stamp
        and the change commit together, with the same commit time."""
        writer.set(self._changes.document(device_id), {
            "at": firestore.SERVER_TIMESTAMP,
            "expire_at": datetime.now(UTC) + timedelta(seconds=CHANGE_STAMP_KEEP_S)})

    def changed_since(self, since: datetime) -> dict[str, datetime]:
        """Device id -> the commit time of its last change, for the devices whose connection rights changed (or
        that were deleted) at or after ``since``: one query, billed one read per device returned (at least one)."""
        query = self._changes.where(filter=firestore.FieldFilter("at", ">=", _utc(since)))
        return {snap.id: (snap.to_dict() or {})["at"] for snap in query.select(["at"]).stream()}

    def _load(self, device_id: str, transaction: Any = None) -> tuple[firestore.DocumentReference, dict[str, Any]]:
        ref = self._device_ref(device_id)
        snap = ref.get(transaction=transaction)
        if not snap.exists:
            raise DeviceNotFound(f"device {device_id!r} not found in registry {self.registry_id!r}")
        return ref, snap.to_dict() or {}

    # ----------------------------------------------------------------------------- the registry itself

    def create_registry(self, settings: RegistrySettings) -> RegistrySettings:
        """RegistryExists when it was created before (explicitly, or by a device created in it)."""
        from google.api_core.exceptions import AlreadyExists

        try:
            self._root.create({"project": self.project, "region": self.region, "registry_id": self.registry_id,
                               "deployment": self.deployment, "settings": settings.to_doc(),
                               "created_time": firestore.SERVER_TIMESTAMP})
        except AlreadyExists:
            raise RegistryExists(f"registry {self.registry_id!r} already exists") from None
        return settings

    def ensure_registry(self, settings: RegistrySettings) -> RegistrySettings:
        """The registry's settings; created with ``settings`` when it has none yet (a deployment's own registry)."""
        snap = self._root.get()
        doc = (snap.to_dict() or {}) if snap.exists else {}
        if self.registry_id == self.deployment and not doc.get(INDEX_COMPLETE):
            # Once per deployment: a cold start must not re-read every device.
            self.backfill_index()
            self._root.set({INDEX_COMPLETE: True}, merge=True)
        if "settings" in doc:
            return RegistrySettings.from_doc(doc["settings"])
        self._root.set({"project": self.project, "region": self.region, "registry_id": self.registry_id,
                        "settings": settings.to_doc()}, merge=True)
        return settings

    def backfill_index(self, chunk: int = 400) -> int:
        """Give every device of this registry that has no entry in the deployment's device index (one created
        before the index existed) its entry; returns how many were added. Idempotent: an entry is created only
        where none exists, so one naming another registry is left as it is."""
        from google.api_core.exceptions import AlreadyExists

        added = 0
        for ref in self._devices.list_documents(page_size=chunk):
            try:
                self._index.document(ref.id).create({"registry_id": self.registry_id})
            except AlreadyExists:
                continue
            added += 1
        return added

    def exists(self) -> bool:
        return self._root.get(field_paths=["registry_id"]).exists

    def get_settings(self) -> RegistrySettings:
        snap = self._root.get()
        if not snap.exists:
            raise RegistryNotFound(f"registry {self.registry_id!r} not found")
        return RegistrySettings.from_doc((snap.to_dict() or {}).get("settings") or {})

    def update_settings(self, settings: RegistrySettings) -> RegistrySettings:
        from google.api_core.exceptions import NotFound

        try:
            self._root.update({"settings": settings.to_doc()})
        except NotFound:
            raise RegistryNotFound(f"registry {self.registry_id!r} not found") from None
        return settings

    def delete_registry(self) -> None:
        """RegistryNotEmpty while it has devices, as IoT Core refused."""
        if not self.exists():
            raise RegistryNotFound(f"registry {self.registry_id!r} not found")
        if any(True for _ in self._devices.limit(1).stream()):
            raise RegistryNotEmpty(f"registry {self.registry_id!r} has devices; delete them first")
        self._root.delete()

    # ----------------------------------------------------------------------------- devices

    def create_device(self, device_id: str, credentials: Sequence[Credential] = (),
                      metadata: Mapping[str, str] | None = None, blocked: bool = False,
                      gateway_config: GatewayConfig | None = None, log_level: str = "",
                      config: bytes = b"") -> Device:
        """A new device; its config version 1 carries ``config`` (empty by default, as IoT Core's)."""
        ref = self._device_ref(device_id)
        if not isinstance(config, (bytes, bytearray)):
            raise TypeError("config data must be bytes")
        config = bytes(config)
        if len(config) > MAX_CONFIG_BYTES:
            raise ConfigTooLarge(f"config is {len(config)} bytes; at most {MAX_CONFIG_BYTES}")
        _check_credentials(credentials)
        meta = _check_metadata(metadata)
        gateway = gateway_config or GatewayConfig()
        _check_log_level(log_level)
        now = datetime.now(UTC)
        index_ref = self._index.document(device_id)
        own_ref = (None if self.deployment == self.registry_id else
                   self.client.collection("registries").document(self.deployment).collection("devices")
                   .document(device_id))
        # Random 63-bit numbers, as IoT Core's were opaque; reserving it in num_ids makes it unique without a
        # registry-wide counter document (Firestore sustains about one write per second on one document).
        for _ in range(5):
            num_id = str(secrets.randbelow(2**63 - 10**15) + 10**15)
            doc = {
                "id": device_id, "num_id": num_id, "registry_id": self.registry_id,
                "credentials": [c.to_doc() for c in credentials], "blocked": bool(blocked), "metadata": meta,
                "config_version": 1, "created_time": firestore.SERVER_TIMESTAMP, "log_level": log_level,
                "gateway_config": gateway.to_doc(), "bound_gateways": [],
            }

            @firestore.transactional
            def create(tx: Any, num_id: str = num_id, doc: dict[str, Any] = doc) -> bool:
                if ref.get(transaction=tx).exists:
                    raise DeviceExists(f"device {device_id!r} already exists in registry {self.registry_id!r}")
                num_ref = self._num_ids.document(num_id)
                if num_ref.get(transaction=tx).exists:
                    return False
                index = index_ref.get(transaction=tx)
                if index.exists:
                    other = (index.to_dict() or {}).get("registry_id")
                    raise DeviceExists(f"device id {device_id!r} is taken by registry {other!r}: a device id is "
                                       "unique across the deployment's registries")
                # A device of the deployment's own registry created before the index existed has no entry.
                if own_ref is not None and own_ref.get(transaction=tx).exists:
                    raise DeviceExists(f"device id {device_id!r} is taken by registry {self.deployment!r}: a "
                                       "device id is unique across the deployment's registries")
                if not self._root.get(transaction=tx).exists:
                    tx.set(self._root, {"project": self.project, "region": self.region,
                                        "registry_id": self.registry_id})
                tx.create(num_ref, {"device_id": device_id})
                tx.create(ref, doc)
                tx.create(index_ref, {"registry_id": self.registry_id})
                self._mark_changed(tx, device_id)  # replaces the tombstone of a device deleted under this id
                # IoT Core's first version (empty unless given), so a device subscribing to its config always
                # gets one.
                tx.set(self._config_ref(device_id, 1),
                       {"version": 1, "data": config, "cloud_update_time": now, "device_ack_time": None})
                return True

            if create(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS)):
                return self.get_device(device_id)
        raise RegistryError("could not reserve a unique numeric id")  # pragma: no cover - 5 collisions in 2**63

    def get_device(self, device_id: str) -> Device:
        return Device.from_doc(self._load(device_id)[1])

    def get_devices(self, device_ids: Sequence[str]) -> dict[str, Device]:
        """The devices of ``device_ids`` that exist, in one batched read (``get_all``) per 300."""
        found: dict[str, Device] = {}
        ids = list(dict.fromkeys(device_ids))
        for i in range(0, len(ids), 300):
            for snap in self.client.get_all([self._device_ref(d) for d in ids[i:i + 300]]):
                if snap.exists:
                    found[snap.id] = Device.from_doc(snap.to_dict() or {})
        return found

    def session_grants(self, device_ids: Sequence[str], chunk: int = 300) -> dict[str, Grant]:
        """Device id -> what its sessions' right to stay connected rests on, for those of ``device_ids`` that
        exist. Batched reads of three fields (no key parsing): the front re-checks every connected device this way
        each few seconds and ends the sessions that their device's blocked flag, numeric id (a device deleted and
        created again gets a new one) or credentials no longer allow."""
        found: dict[str, Grant] = {}
        ids = list(dict.fromkeys(device_ids))
        for i in range(0, len(ids), chunk):
            refs = [self._device_ref(d) for d in ids[i:i + chunk]]
            for snap in self.client.get_all(refs, field_paths=["blocked", "num_id", "credentials", "bound_gateways"]):
                if snap.exists:
                    doc = snap.to_dict() or {}
                    found[snap.id] = Grant(
                        num_id=str(doc.get("num_id", "")), blocked=bool(doc.get("blocked", False)),
                        credentials={str(c.get("public_key_pem", "")): c.get("expiration_time")
                                     for c in doc.get("credentials", ())},
                        bound_gateways=tuple(doc.get("bound_gateways") or ()))
        return found

    def record_error(self, device_id: str, message: str, when: datetime | None = None) -> None:
        """Something the device did was refused or limited (IoT Core's ``lastErrorTime``/``lastErrorStatus``)."""
        self._update(device_id, {"last_error_time": _utc(when), "last_error_status": str(message)[:1024]})

    def get_device_by_num_id(self, num_id: str) -> Device:
        snap = self._num_ids.document(str(num_id)).get()
        if not snap.exists:
            raise DeviceNotFound(f"no device with numeric id {num_id!r} in registry {self.registry_id!r}")
        return self.get_device((snap.to_dict() or {})["device_id"])

    def list_devices(self, limit: int | None = None, start_after: str | None = None) -> list[Device]:
        """Devices in id order; ``limit`` of them after the id ``start_after`` (paging)."""
        query = self._devices.order_by("id")
        if start_after:
            query = query.start_after({"id": start_after})
        if limit:
            query = query.limit(limit)
        return [Device.from_doc(s.to_dict() or {}) for s in query.stream()]

    def set_log_level(self, device_id: str, log_level: str) -> Device:
        self._update(device_id, {"log_level": _check_log_level(log_level)})
        return self.get_device(device_id)

    def set_gateway_auth_method(self, device_id: str, method: GatewayAuthMethod | None) -> Device:
        """The one gateway setting IoT Core let a patch change."""
        device = self.get_device(device_id)
        config = replace(device.gateway_config, gateway_auth_method=method)
        self._update(device_id, {"gateway_config": config.to_doc()}, changed=True)
        return self.get_device(device_id)

    def set_blocked(self, device_id: str, blocked: bool) -> Device:
        self._update(device_id, {"blocked": bool(blocked)}, changed=True)
        return self.get_device(device_id)

    def set_metadata(self, device_id: str, metadata: Mapping[str, str]) -> Device:
        self._update(device_id, {"metadata": _check_metadata(metadata)})
        return self.get_device(device_id)

    # ----------------------------------------------------------------------------- gateways

    def bind_device_to_gateway(self, gateway_id: str, device_id: str) -> None:
        """Bind ``device_id`` to ``gateway_id`` (IoT Core's ``bindDeviceToGateway``): the gateway may then attach
        it. Idempotent. DeviceNotFound if either is missing; InvalidBinding if the gateway is not a GATEWAY or the
        device is one."""
        device_ref = self._device_ref(device_id)

        @firestore.transactional
        def bind(tx: Any) -> None:
            _, gateway = self._load(gateway_id, tx)
            _, device = self._load(device_id, tx)
            if not GatewayConfig.from_doc(gateway.get("gateway_config")).is_gateway:
                raise InvalidBinding(f"device {gateway_id!r} is not a gateway (gateway_type GATEWAY)")
            if GatewayConfig.from_doc(device.get("gateway_config")).is_gateway:
                raise InvalidBinding(f"device {device_id!r} is a gateway; a gateway cannot be bound to another")
            # The binding lives on the bound device's document: listed with array_contains, one write per binding.
            tx.update(device_ref, {"bound_gateways": firestore.ArrayUnion([gateway_id])})
            self._mark_changed(tx, device_id)

        with self._device_lock(device_id):
            bind(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))

    def unbind_device_from_gateway(self, gateway_id: str, device_id: str) -> None:
        """Remove the binding (IoT Core's ``unbindDeviceFromGateway``); idempotent. DeviceNotFound if the device
        is missing."""
        validate_device_id(gateway_id)
        self._update(device_id, {"bound_gateways": firestore.ArrayRemove([gateway_id])}, changed=True)

    def devices_bound_to(self, gateway_id: str) -> list[Device]:
        """The devices bound to ``gateway_id``, by id."""
        validate_device_id(gateway_id)
        query = self._devices.where(filter=firestore.FieldFilter("bound_gateways", "array_contains", gateway_id))
        return sorted((Device.from_doc(s.to_dict() or {}) for s in query.stream()), key=lambda d: d.id)

    def is_bound(self, gateway_id: str, device_id: str) -> bool:
        """Whether ``device_id`` exists and is bound to ``gateway_id``."""
        snap = self._device_ref(device_id).get(field_paths=["bound_gateways"])
        return snap.exists and gateway_id in ((snap.to_dict() or {}).get("bound_gateways") or ())

    def record_gateway_access(self, device_id: str, gateway_id: str, when: datetime | None = None) -> None:
        """A gateway attached ``device_id`` (``gatewayConfig.lastAccessedGatewayId`` / ``...Time``)."""
        self._update(device_id, {"gateway_config.last_accessed_gateway_id": gateway_id,
                                 "gateway_config.last_accessed_gateway_time": _utc(when)})

    def delete_device(self, device_id: str) -> None:
        """Delete the device, its configs, states and requests. A gateway's bindings go with it: the devices bound
        to it are unbound first (so that a gateway created again under the id binds nothing), and a device's own
        bindings are kept on the device, so they go with its document."""
        ref, doc = self._load(device_id)
        batch = self.client.batch()
        n = 0
        bound = self._devices.where(filter=firestore.FieldFilter("bound_gateways", "array_contains", device_id))
        for snap in bound.stream():
            batch.update(snap.reference, {"bound_gateways": firestore.ArrayRemove([device_id])})
            self._mark_changed(batch, snap.id)
            n += 2
            if n >= 400:  # a batch holds at most 500 writes
                batch.commit()
                batch, n = self.client.batch(), 0
        for sub in ("configs", "requests", "states"):
            for snap in ref.collection(sub).list_documents():
                batch.delete(snap)
                n += 1
                if n >= 400:  # a batch holds at most 500 writes
                    batch.commit()
                    batch, n = self.client.batch(), 0
        batch.delete(self._num_ids.document(doc["num_id"]))
        batch.delete(ref)
        self._mark_changed(batch, device_id)  # the tombstone: a deleted document matches no query
        batch.commit()
        index_ref = self._index.document(device_id)
        index = index_ref.get()
        if index.exists and (index.to_dict() or {}).get("registry_id") == self.registry_id:
            index_ref.delete()

    def add_credential(self, device_id: str, credential: Credential) -> Device:
        _check_credentials([credential])
        ref = self._device_ref(device_id)

        @firestore.transactional
        def add(tx: Any) -> None:
            _, doc = self._load(device_id, tx)
            creds = list(doc.get("credentials", ()))
            if len(creds) >= MAX_CREDENTIALS:
                raise InvalidCredential(f"device {device_id!r} already has {MAX_CREDENTIALS} credentials")
            tx.update(ref, {"credentials": [*creds, credential.to_doc()]})
            self._mark_changed(tx, device_id)

        add(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))
        return self.get_device(device_id)

    def set_credentials(self, device_id: str, credentials: Sequence[Credential]) -> Device:
        _check_credentials(credentials)
        self._update(device_id, {"credentials": [c.to_doc() for c in credentials]}, changed=True)
        return self.get_device(device_id)

    def _update(self, device_id: str, fields: dict[str, Any], changed: bool = False) -> None:
        """Update the device's fields; ``changed``: a change its sessions rest on, stamped in the same commit."""
        from google.api_core.exceptions import NotFound

        try:
            if changed:
                batch = self.client.batch()
                batch.update(self._device_ref(device_id), fields)
                self._mark_changed(batch, device_id)
                batch.commit()
            else:
                self._device_ref(device_id).update(fields)
        except NotFound:
            raise DeviceNotFound(f"device {device_id!r} not found in registry {self.registry_id!r}") from None

    # ----------------------------------------------------------------------------- configs

    def update_config(self, device_id: str, data: bytes, version_to_update: int = 0,
                      request_id: str | None = None, min_interval_s: float = 1.0) -> ConfigVersion:
        """Write a new config version; see the module docstring for the rules. Returns the version written
        (or, for a ``request_id`` already applied, the version that request created)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("config data must be bytes")
        data = bytes(data)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigTooLarge(f"config is {len(data)} bytes; at most {MAX_CONFIG_BYTES}")
        if not isinstance(version_to_update, int) or version_to_update < 0:
            raise ValueError(f"version_to_update must be a non-negative integer, got {version_to_update!r}")
        ref = self._device_ref(device_id)
        req_ref = self._request_ref(device_id, request_id) if request_id else None

        @firestore.transactional
        def update(tx: Any) -> ConfigVersion:
            _, doc = self._load(device_id, tx)
            # Every read comes before any write in a Firestore transaction.
            if req_ref is not None:
                marker = req_ref.get(transaction=tx)
                if marker.exists:
                    m = marker.to_dict() or {}
                    existing = self._config_ref(device_id, int(m["version"])).get(transaction=tx)
                    if existing.exists:
                        return ConfigVersion.from_doc(existing.to_dict() or {})
                    # Pruned since (10 newer versions): the request's own data is what it wrote.
                    return ConfigVersion(int(m["version"]), data, m["cloud_update_time"])
            if doc.get("blocked"):
                raise DeviceBlocked(f"device {device_id!r} is blocked")
            current = int(doc.get("config_version", 0))
            if version_to_update and version_to_update != current:
                raise VersionConflict(
                    f"version_to_update {version_to_update} is stale: device {device_id!r} is at version {current}"
                )
            now = datetime.now(UTC)
            last = doc.get("last_config_update_time")
            if last is not None and min_interval_s > 0 and (now - last).total_seconds() < min_interval_s:
                raise RateLimited(
                    f"device {device_id!r}: config updated {(now - last).total_seconds():.3f}s ago; "
                    f"at most one update per {min_interval_s:g}s"
                )
            version = current + 1
            cfg = ConfigVersion(version=version, data=data, cloud_update_time=now)
            tx.set(self._config_ref(device_id, version),
                   {"version": version, "data": data, "cloud_update_time": now, "device_ack_time": None})
            tx.update(ref, {"config_version": version, "last_config_update_time": now})
            if version > KEEP_CONFIG_VERSIONS:
                # One version per transaction, so deleting the one that falls out keeps exactly the last 10.
                tx.delete(self._config_ref(device_id, version - KEEP_CONFIG_VERSIONS))
            if req_ref is not None:
                tx.set(req_ref, {"version": version, "cloud_update_time": now,
                                 "expire_at": now + REQUEST_MARKER_TTL})
            return cfg

        with self._device_lock(device_id):
            return update(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))

    def mark_config_sent(self, device_id: str, when: datetime | None = None) -> None:
        """A config version was handed to the broker for the device (IoT Core's ``lastConfigSendTime``)."""
        self._update(device_id, {"last_config_send_time": _utc(when)})

    def connected_host(self, device_id: str, now: datetime | None = None) -> str | None:
        """The broker host that holds the device now (its presence record, written by the front on connect and
        removed on disconnect; one past its ``until`` counts as gone), or None."""
        snap = (self.client.collection("registries").document(self.registry_id).collection("presence")
                .document(device_id).get())
        doc = snap.to_dict() or {} if snap.exists else {}
        until = doc.get("until")
        if until is None or until <= (now or datetime.now(UTC)) or not doc.get("host"):
            return None
        return str(doc["host"])

    def get_config(self, device_id: str) -> ConfigVersion | None:
        _, doc = self._load(device_id)
        version = int(doc.get("config_version", 0))
        if version == 0:
            return None
        snap = self._config_ref(device_id, version).get()
        return ConfigVersion.from_doc(snap.to_dict() or {}) if snap.exists else None

    def get_configs(self, device_ids: Sequence[str], chunk: int = 300) -> dict[str, ConfigVersion | None]:
        """:meth:`get_config` for many devices: device id -> its latest config (None: it has none), for those of
        ``device_ids`` that exist (a missing id is a device not found). Two batched reads (``get_all``) per
        ``chunk``: the devices' config versions, then those configs."""
        found: dict[str, ConfigVersion | None] = {}
        ids = list(dict.fromkeys(device_ids))
        for i in range(0, len(ids), chunk):
            refs = [self._device_ref(d) for d in ids[i:i + chunk]]
            wanted: dict[str, str] = {}  # config document path -> device id
            for snap in self.client.get_all(refs, field_paths=["config_version"]):
                if not snap.exists:
                    continue
                found[snap.id] = None
                version = int((snap.to_dict() or {}).get("config_version", 0))
                if version:
                    wanted[self._config_ref(snap.id, version).path] = snap.id
            if wanted:
                configs = [self.client.document(path) for path in wanted]
                for snap in self.client.get_all(configs):
                    if snap.exists:
                        found[wanted[snap.reference.path]] = ConfigVersion.from_doc(snap.to_dict() or {})
        return found

    def list_config_versions(self, device_id: str, limit: int = KEEP_CONFIG_VERSIONS) -> list[ConfigVersion]:
        ref, _ = self._load(device_id)
        query = ref.collection("configs").order_by("version", direction=firestore.Query.DESCENDING).limit(limit)
        return [ConfigVersion.from_doc(s.to_dict() or {}) for s in query.stream()]

    def ack_config(self, device_id: str, version: int, when: datetime | None = None) -> None:
        """Record that the device received config ``version`` (the bridge calls this on its PUBACK)."""
        when = _utc(when)
        ref = self._device_ref(device_id)
        cfg_ref = self._config_ref(device_id, int(version))

        @firestore.transactional
        def ack(tx: Any) -> None:
            _, doc = self._load(device_id, tx)
            cfg = cfg_ref.get(transaction=tx)
            last = doc.get("last_config_ack_time")
            if last is None or when > last:
                tx.update(ref, {"last_config_ack_time": when})
            # An ack for a version already pruned still counts for the device; there is nothing else to mark.
            if cfg.exists and (cfg.to_dict() or {}).get("device_ack_time") is None:
                tx.update(cfg_ref, {"device_ack_time": when})

        with self._device_lock(device_id):
            ack(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))

    # ----------------------------------------------------------------------------- device activity

    def record_state(self, device_id: str, data: bytes, when: datetime | None = None) -> None:
        """The device's latest state, and one more of its last ``KEEP_STATES`` (IoT Core's ``states.list``)."""
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"state is {len(data)} bytes; at most {MAX_STATE_BYTES}")
        when = _utc(when)
        self._update(device_id, {"state": bytes(data), "last_state_time": when})
        states = self._device_ref(device_id).collection("states")
        key = int(when.timestamp() * 1_000_000) * 1000
        states.document(f"{key:020d}").set({"data": bytes(data), "update_time": when})
        old = states.order_by("update_time", direction=firestore.Query.DESCENDING).offset(KEEP_STATES).stream()
        for snap in old:
            snap.reference.delete()

    def list_states(self, device_id: str, limit: int = KEEP_STATES) -> list[DeviceState]:
        """The device's last states, newest first."""
        ref, _ = self._load(device_id)
        query = ref.collection("states").order_by("update_time", direction=firestore.Query.DESCENDING)
        return [DeviceState(bytes(d["data"]), d["update_time"])
                for d in (s.to_dict() or {} for s in query.limit(min(limit, KEEP_STATES)).stream())]

    def record_event(self, device_id: str, when: datetime | None = None) -> None:
        """A telemetry event arrived (``last_event_time``)."""
        self._update(device_id, {"last_event_time": _utc(when)})

    def record_heartbeat(self, device_id: str, when: datetime | None = None) -> None:
        """An MQTT PINGREQ or any other sign of life without data (``last_heartbeat_time``)."""
        self._update(device_id, {"last_heartbeat_time": _utc(when)})

    def record_heartbeats(self, times: Mapping[str, datetime], chunk: int = 500) -> int:
        """``record_heartbeat`` for many devices in batched writes (Firestore allows 500 per batch); a device
        deleted meanwhile is skipped. Returns the number written. A host's front records the PINGREQs of all
        its devices this way: one write per device and keep-alive was most of an idle front's CPU
        (``make bench``, section connections)."""
        from google.api_core.exceptions import NotFound

        written = 0
        items = list(times.items())
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            batch = self.client.batch()
            for device_id, when in part:
                batch.update(self._device_ref(device_id), {"last_heartbeat_time": _utc(when)})
            try:
                batch.commit()
                written += len(part)
            except NotFound:  # a device of this batch is gone: the others one by one
                for device_id, when in part:
                    try:
                        self.record_heartbeat(device_id, when)
                        written += 1
                    except DeviceNotFound:
                        pass
        return written


# ------------------------------------------------------------------------------------------ config push


@dataclass(frozen=True)
class PushOutcome:
    config: ConfigVersion
    status: Literal["delivered", "superseded", "skipped_blocked"]


def push_config(registry: Registry, device_id: str, data: bytes, deliver: Callable[[str, int, bytes], None],
                version_to_update: int = 0, request_id: str | None = None,
                min_interval_s: float = 1.0) -> PushOutcome:
    """The one path of a new config version, for the config-push function and the admin API alike: stored in the
    registry (its refusals raise), then handed to ``deliver(device_id, version, data)`` unless a newer version was
    stored meanwhile (which must not be overtaken) or the device was blocked since."""
    cfg = registry.update_config(device_id, data, version_to_update=version_to_update, request_id=request_id,
                                 min_interval_s=min_interval_s)
    device = registry.get_device(device_id)
    if device.config_version > cfg.version:
        return PushOutcome(cfg, "superseded")
    if device.blocked:
        return PushOutcome(cfg, "skipped_blocked")
    deliver(device_id, cfg.version, cfg.data)
    return PushOutcome(cfg, "delivered")
