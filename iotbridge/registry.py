"""The device registry: devices, credentials and config versions, stored in Firestore (Native mode).

Cloud IoT Core kept this state for its devices; this module keeps it for the bridge, the config-push
function and ``iotctl``. Locally it runs against the Firestore emulator (``FIRESTORE_EMULATOR_HOST``).

Layout (one registry per deployment)::

    registries/{registry_id}                                          project, region
    registries/{registry_id}/devices/{device_id}                      the device
    registries/{registry_id}/devices/{device_id}/configs/{v:010d}     the latest 10 config versions
    registries/{registry_id}/devices/{device_id}/requests/{msg_id}    idempotency markers (TTL field expire_at)
    registries/{registry_id}/num_ids/{num_id}                         reserves a numeric id (unique)

Config versions are written in one transaction per update, as IoT Core versioned them: server-assigned,
monotonic, compare-and-set on ``version_to_update``, at most one update per second per device, and a request
id (the Pub/Sub message id) that was already applied returns the version it created instead of a new one.

This module is also copied next to the config-push function's ``main.py`` when it is packaged, so it imports
nothing from the rest of the project.
"""

from __future__ import annotations

import re
import secrets
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from cryptography import x509
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

CredentialFormat = Literal["RSA_PEM", "RSA_X509_PEM", "ES256_PEM", "ES256_X509_PEM"]
CREDENTIAL_FORMATS: tuple[str, ...] = get_args(CredentialFormat)


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
    """A binding IoT Core refused: the gateway is not a GATEWAY, or the device to bind is one."""


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
class Grant:
    """A device's blocked flag, numeric id and credentials (public key PEM -> expiration time), as read for the
    sessions already connected on its behalf."""

    num_id: str
    blocked: bool
    credentials: dict[str, datetime | None]
    bound_gateways: tuple[str, ...] = ()


GatewayType = Literal["GATEWAY", "NON_GATEWAY"]
GatewayAuthMethod = Literal["ASSOCIATION_ONLY", "DEVICE_AUTH_TOKEN_ONLY", "ASSOCIATION_AND_DEVICE_AUTH_TOKEN"]
GATEWAY_AUTH_METHODS: tuple[str, ...] = get_args(GatewayAuthMethod)


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
    gateway_config: GatewayConfig = field(default_factory=GatewayConfig)
    bound_gateways: tuple[str, ...] = ()  # the gateways this device is bound to (IoT Core's bindings)

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
            gateway_config=GatewayConfig.from_doc(doc.get("gateway_config")),
            bound_gateways=tuple(doc.get("bound_gateways") or ()),
        )


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


# ------------------------------------------------------------------------------------------ registry


class Registry:
    """One device registry. Every method is a few Firestore reads/writes; safe to share between threads."""

    def __init__(self, project: str, registry_id: str, region: str, client: firestore.Client | None = None,
                 database: str | None = None):
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

    def _load(self, device_id: str, transaction: Any = None) -> tuple[firestore.DocumentReference, dict[str, Any]]:
        ref = self._device_ref(device_id)
        snap = ref.get(transaction=transaction)
        if not snap.exists:
            raise DeviceNotFound(f"device {device_id!r} not found in registry {self.registry_id!r}")
        return ref, snap.to_dict() or {}

    # ----------------------------------------------------------------------------- devices

    def create_device(self, device_id: str, credentials: Sequence[Credential] = (),
                      metadata: Mapping[str, str] | None = None, blocked: bool = False,
                      gateway_config: GatewayConfig | None = None) -> Device:
        ref = self._device_ref(device_id)
        gateway = gateway_config or GatewayConfig()
        _check_credentials(credentials)
        meta = _check_metadata(metadata)
        # Random 63-bit numbers, as IoT Core's were opaque; reserving it in num_ids makes it unique without a
        # registry-wide counter document (Firestore sustains about one write per second on one document).
        for _ in range(5):
            num_id = str(secrets.randbelow(2**63 - 10**15) + 10**15)
            doc = {
                "id": device_id, "num_id": num_id, "registry_id": self.registry_id,
                "credentials": [c.to_doc() for c in credentials], "blocked": bool(blocked), "metadata": meta,
                "config_version": 0, "created_time": firestore.SERVER_TIMESTAMP,
                "gateway_config": gateway.to_doc(), "bound_gateways": [],
            }

            @firestore.transactional
            def create(tx: Any, num_id: str = num_id, doc: dict[str, Any] = doc) -> bool:
                if ref.get(transaction=tx).exists:
                    raise DeviceExists(f"device {device_id!r} already exists in registry {self.registry_id!r}")
                num_ref = self._num_ids.document(num_id)
                if num_ref.get(transaction=tx).exists:
                    return False
                if not self._root.get(transaction=tx).exists:
                    tx.set(self._root, {"project": self.project, "region": self.region,
                                        "registry_id": self.registry_id})
                tx.create(num_ref, {"device_id": device_id})
                tx.create(ref, doc)
                return True

            if create(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS)):
                return self.get_device(device_id)
        raise RegistryError("could not reserve a unique numeric id")  # pragma: no cover - 5 collisions in 2**63

    def get_device(self, device_id: str) -> Device:
        return Device.from_doc(self._load(device_id)[1])

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

    def list_devices(self) -> list[Device]:
        return [Device.from_doc(s.to_dict() or {}) for s in self._devices.order_by("id").stream()]

    def set_blocked(self, device_id: str, blocked: bool) -> Device:
        self._update(device_id, {"blocked": bool(blocked)})
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

        with self._device_lock(device_id):
            bind(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))

    def unbind_device_from_gateway(self, gateway_id: str, device_id: str) -> None:
        """Remove the binding (IoT Core's ``unbindDeviceFromGateway``); idempotent. DeviceNotFound if the device
        is missing."""
        validate_device_id(gateway_id)
        self._update(device_id, {"bound_gateways": firestore.ArrayRemove([gateway_id])})

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
        ref, doc = self._load(device_id)
        batch = self.client.batch()
        n = 0
        for sub in ("configs", "requests"):
            for snap in ref.collection(sub).list_documents():
                batch.delete(snap)
                n += 1
                if n >= 400:  # a batch holds at most 500 writes
                    batch.commit()
                    batch, n = self.client.batch(), 0
        batch.delete(self._num_ids.document(doc["num_id"]))
        batch.delete(ref)
        batch.commit()

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

        add(self.client.transaction(max_attempts=TRANSACTION_ATTEMPTS))
        return self.get_device(device_id)

    def set_credentials(self, device_id: str, credentials: Sequence[Credential]) -> Device:
        _check_credentials(credentials)
        self._update(device_id, {"credentials": [c.to_doc() for c in credentials]})
        return self.get_device(device_id)

    def _update(self, device_id: str, fields: dict[str, Any]) -> None:
        from google.api_core.exceptions import NotFound

        try:
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

    def get_config(self, device_id: str) -> ConfigVersion | None:
        _, doc = self._load(device_id)
        version = int(doc.get("config_version", 0))
        if version == 0:
            return None
        snap = self._config_ref(device_id, version).get()
        return ConfigVersion.from_doc(snap.to_dict() or {}) if snap.exists else None

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
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"state is {len(data)} bytes; at most {MAX_STATE_BYTES}")
        self._update(device_id, {"state": bytes(data), "last_state_time": _utc(when)})

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
