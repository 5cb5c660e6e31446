"""Config push-back: a CloudEvent function on the config-requests topic (docs/messages.md).

Operators (``iotctl config push``) and the pipeline's rules publish a request on the config-requests topic;
this function is the one writer of config versions. For each request it

1. parses it (:func:`parse_request`) — a JSON object::

       {"device_id": "pump-17", "config": {"rpm_max": 1200}}                   # a JSON object, sent as JSON
       {"device_id": "pump-17", "binary_data": "AAEC", "version_to_update": 3}  # base64 bytes, IoT Core style

   (IoT Core's camelCase names ``deviceId``, ``binaryData``, ``versionToUpdate`` are accepted too;
   ``version_to_update`` 0 or absent means unconditional, otherwise compare-and-set);
2. writes the new version in the device registry in one Firestore transaction (:func:`store_and_deliver`, the
   path the admin API takes too): the device exists and is not blocked, at most one update per second per
   device, ≤ 64 KiB, server-assigned monotonic version, the last 10 kept. The Pub/Sub message id is the request
   id, so a redelivered message returns the version it already created instead of a second one;
3. publishes it with paho-mqtt, QoS 1 and retained, on ``/devices/{id}/config`` and waits for the broker's
   PUBACK (:class:`MqttPublisher`) — unless a newer version was stored meanwhile, which must not be
   overtaken by this older one. With broker hosts, ``CONFIG_DELIVERY=fanout`` hands the version to the
   bridge's fan-out topic instead, addressed to the host that holds the device (:class:`FanoutPublisher`; a
   device connected nowhere gets it from the registry when it connects). The device's own PUBACK is recorded as
   its ack time by the bridge, which sees it; the function only ever sees the broker's.

Failures: a permanent one (:class:`PermanentError`: malformed, not an object, unknown or blocked device,
too large, stale ``version_to_update``, flood) is logged with its reason, copied to the dead-letter topic with
``error``/``errorDetail`` attributes, and acknowledged — retrying cannot fix it. A transient one (broker
unreachable, no PUBACK, Firestore or Pub/Sub unavailable) raises, the framework answers 500 and Eventarc
redelivers the same message later; step 2 makes that redelivery harmless. A request still failing 23 h after
it was published is dead-lettered with reason ``retries_exhausted`` before the trigger's subscription would drop
it at 24 h (that subscription cannot be given a dead-letter policy; see ``MAX_RETRY_AGE_S``).

Configuration (environment; in the cloud the MQTT password is a Secret Manager secret mounted as
``MQTT_PASSWORD`` by the function's ``secret_environment_variables``):

    PROJECT_ID, REGISTRY_ID, REGION, FIRESTORE_DATABASE (optional)
    MQTT_HOST, MQTT_PORT (8883), MQTT_TLS (true), MQTT_CA_CERT (PEM text; system CAs if empty),
    MQTT_USERNAME, MQTT_PASSWORD, MQTT_TIMEOUT_S (10), MQTT_RETAIN (true),
    MQTT_CLIENT_ID (default: ``iotbridge:config-push:{random}``; a broker host's ``backend`` user takes only its own)
    CONFIG_DELIVERY: mqtt (default: the broker above) | fanout (FANOUT_TOPIC, the bridge's device-commands
        topic, with the host that holds the device as ``hostId``; the deployed and the local stacks use this)
    DEAD_LETTER_TOPIC (projects/{p}/topics/{t}), CONFIG_MIN_INTERVAL_S (1.0), MAX_RETRY_AGE_S (82800)

Run locally: ``functions-framework --source functions/config_push/main.py --target handle
--signature-type cloudevent`` with a Pub/Sub push subscription pointed at it. Packaged for the cloud, this
folder is zipped together with ``iotbridge/registry.py`` and ``iotbridge/spec.py``
(see ``gcp_iot_bridge/infra/config_push.py``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import functions_framework
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge import registry as reg
from iotbridge import spec

MAX_CONFIG_BYTES = reg.MAX_CONFIG_BYTES
# Pub/Sub refuses attribute values over 1024 bytes.
MAX_ATTRIBUTE_CHARS = 1000
# The subscription Eventarc creates for the trigger keeps a message 24 h and has no dead-letter policy, which
# neither the Eventarc API nor pulumi-gcp can set: a request still
# failing after this age is dead-lettered by the function itself instead of being dropped silently at 24 h.
MAX_RETRY_AGE_S = 23 * 3600.0

log = logging.getLogger("config_push")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line on stdout: Cloud Logging reads ``severity``, ``message`` and the rest as
    ``jsonPayload`` fields. Config data and credentials are never passed to the logger."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage(), "logger": record.name,
                 **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


if not log.handlers:
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(_JsonFormatter())
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


# ------------------------------------------------------------------------------------------ errors


class PermanentError(Exception):
    """The request can never succeed: acknowledge it and keep it on the dead-letter topic."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """Worth retrying later (broker unreachable, no PUBACK): raised so that Eventarc redelivers."""


# ------------------------------------------------------------------------------------------ parsing


ConfigRequest = spec.ConfigRequest


def parse_request(raw: bytes) -> ConfigRequest:
    """The request carried by one Pub/Sub message (its format: ``iotbridge.spec.parse_config_request``), or
    :class:`PermanentError` saying what is wrong."""
    try:
        request = spec.parse_config_request(raw)
    except spec.MessageError as exc:
        raise PermanentError(exc.reason, exc.detail) from None
    try:
        reg.validate_device_id(request.device_id)
        if request.registry_id:
            reg.validate_device_id(request.registry_id)  # the registry id rule is the device id's
    except reg.InvalidDeviceId as exc:
        raise PermanentError("invalid_device_id", str(exc)) from None
    if len(request.data) > MAX_CONFIG_BYTES:
        raise PermanentError("config_too_large",
                             f"config is {len(request.data)} bytes; at most {MAX_CONFIG_BYTES}")
    return request


# ------------------------------------------------------------------------------------------ registry


_PERMANENT = {
    reg.DeviceNotFound: "unknown_device",
    reg.DeviceBlocked: "device_blocked",
    reg.ConfigTooLarge: "config_too_large",
    reg.VersionConflict: "version_conflict",
    reg.RateLimited: "rate_limited",
    reg.InvalidDeviceId: "invalid_device_id",
}


def permanent(exc: reg.RegistryError) -> PermanentError | None:
    """The dead-letter reason of a registry refusal; None for an error worth retrying."""
    for cls, reason in _PERMANENT.items():
        if isinstance(exc, cls):
            return PermanentError(reason, str(exc))
    return None


def store_and_deliver(deps: Deps, request: ConfigRequest, request_id: str) -> reg.PushOutcome:
    """``iotbridge.registry.push_config``, the path the admin API takes too: the version is written (or the one
    this request id already wrote is found), then delivered. Registry refusals become :class:`PermanentError`;
    anything else (Firestore unavailable, :class:`TransientError` from the delivery) propagates and is retried."""
    registry = deps.registry_for(request.registry_id)

    def deliver(device_id: str, version: int, data: bytes) -> None:
        try:
            deps.publisher.deliver(registry, device_id, version, data)
        except TransientError as exc:
            log.error("config v%d of %s stored, not delivered (will retry): %s", version, device_id, exc,
                      extra={"fields": {"messageId": request_id, "deviceId": device_id, "version": version,
                                        "outcome": "retry", "reason": "delivery_failed"}})
            raise

    try:
        return reg.push_config(registry, request.device_id, request.data, deliver,
                               version_to_update=request.version_to_update, request_id=request_id,
                               min_interval_s=deps.min_interval_s)
    except reg.RegistryError as exc:
        err = permanent(exc)
        if err is None:
            raise
        raise err from None


# ------------------------------------------------------------------------------------------ MQTT


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int = 8883
    tls: bool = True
    ca_cert: str = ""  # PEM text; empty = the system's CAs
    username: str = ""
    password: str = field(default="", repr=False)
    timeout_s: float = 10.0
    retain: bool = True
    keepalive_s: int = 60
    # Between requests a function instance gets no CPU, so paho cannot answer the broker's keepalive and the
    # connection may be dead while paho still believes it up; one idle this long is replaced before use.
    idle_reconnect_s: float = 45.0
    # A ':' cannot occur in a device id, so no device can take this session over; the random part keeps two
    # function instances from disconnecting each other (MQTT allows one session per client id).
    client_id: str = field(default_factory=lambda: f"iotbridge:config-push:{secrets.token_hex(6)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MqttSettings:
        if not env.get("MQTT_HOST"):
            raise RuntimeError("MQTT_HOST is not set: the broker the configs are published to")
        settings = cls(host=env["MQTT_HOST"], port=int(env.get("MQTT_PORT", "8883")),
                       tls=_flag(env.get("MQTT_TLS", "true")), ca_cert=env.get("MQTT_CA_CERT", ""),
                       username=env.get("MQTT_USERNAME", ""), password=env.get("MQTT_PASSWORD", ""),
                       timeout_s=float(env.get("MQTT_TIMEOUT_S", "10")),
                       retain=_flag(env.get("MQTT_RETAIN", "true")))
        if env.get("MQTT_CLIENT_ID"):
            # A broker host binds its backend user to one client id (iotbridge.bridge.settings).
            settings = replace(settings, client_id=env["MQTT_CLIENT_ID"])
        return settings


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes"}:
        return True
    if v in {"0", "false", "no", ""}:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


class Publisher(Protocol):
    """Delivers one stored config version towards the device; raises :class:`TransientError` to be retried."""

    def deliver(self, registry: reg.Registry, device_id: str, version: int, payload: bytes) -> None: ...


class MqttPublisher:
    """One broker connection per function instance, kept across invocations while it stays up and recently used.

    ``publish`` returns once the broker acknowledged (QoS 1 PUBACK) or raises :class:`TransientError`. After a
    failure the client is thrown away with whatever paho still queued: a stale copy sent on a later reconnect
    could overtake a newer config.
    """

    def __init__(self, settings: MqttSettings):
        self.s = settings
        self._client: paho.Client | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()

    def _connect(self) -> paho.Client:
        s = self.s
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, clean_session=True,
                             protocol=paho.MQTTv311)
        if s.username or s.password:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            ctx = ssl.create_default_context(cadata=s.ca_cert or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            client.tls_set_context(ctx)
        client.connect_timeout = s.timeout_s
        connected = threading.Event()
        outcome: dict[str, Any] = {}

        def on_connect(_c, _u, _flags, reason_code, _props) -> None:  # noqa: ANN001 - paho callback
            outcome["rc"] = reason_code
            connected.set()

        client.on_connect = on_connect
        try:
            client.connect(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ssl.SSLError) as exc:
            raise TransientError(f"broker {s.host}:{s.port} unreachable: {exc}") from None
        client.loop_start()
        if not connected.wait(s.timeout_s) or outcome["rc"].is_failure:
            client.loop_stop()
            client.disconnect()
            why = outcome.get("rc", "no CONNACK")
            raise TransientError(f"broker {s.host}:{s.port} refused the connection: {why}")
        return client

    def _reset(self, only: paho.Client | None = None) -> None:
        """Drop the current client (or ``only`` that one, if it is still the current one)."""
        if only is not None and self._client is not only:
            return
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def deliver(self, registry: reg.Registry | None, device_id: str, version: int, payload: bytes) -> None:
        self.publish(config_topic(device_id), payload)

    def publish(self, topic: str, payload: bytes) -> None:
        with self._lock:
            idle = time.monotonic() - self._last_used
            if self._client is None or not self._client.is_connected() or idle > self.s.idle_reconnect_s:
                self._reset()
                self._client = self._connect()
            client = self._client
        info = client.publish(topic, payload, qos=1, retain=self.s.retain)
        try:
            info.wait_for_publish(self.s.timeout_s)
        except (RuntimeError, ValueError) as exc:
            with self._lock:
                self._reset(only=client)
            raise TransientError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            with self._lock:
                self._reset(only=client)
            raise TransientError(f"no PUBACK from the broker for {topic} within {self.s.timeout_s:g}s")
        with self._lock:
            self._last_used = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._reset()


class FanoutPublisher:
    """Delivery through the bridge's ``device-commands`` fan-out topic instead of one broker connection.

    With several broker hosts a device may be connected to any of them: the version is published with the host
    that holds the device (its presence in the registry) as ``hostId``, and only that host's filtered subscription
    receives it; that bridge publishes it, retained at QoS 1, on its own broker. A device connected nowhere gets
    nothing published: it reads the latest version when it next connects. The message format is the bridge's
    (``iotbridge/bridge/fanout.py``): data = the config bytes; attributes ``kind=config``, ``deviceId``,
    ``version``, ``hostId``. Pub/Sub accepting it is the acknowledgement waited for here.
    """

    def __init__(self, topic: str, timeout_s: float = 30.0):
        from google.cloud import pubsub_v1  # honours PUBSUB_EMULATOR_HOST

        self.topic = topic
        self.timeout_s = timeout_s
        self.client = pubsub_v1.PublisherClient()

    def deliver(self, registry: reg.Registry, device_id: str, version: int, payload: bytes) -> None:
        try:
            host = registry.connected_host(device_id)
        except Exception as exc:  # Firestore briefly away: worth a retry
            raise TransientError(f"presence of {device_id} unreadable: {exc}") from exc
        if host is None:
            # Stored, not published: the device is connected nowhere and gets the latest version from the registry
            # when it next connects, on whichever host.
            return
        # No registryId: a host finds the device's registry itself (device ids are unique across registries).
        attrs = spec.FanoutMessage(spec.FANOUT_KIND_CONFIG, device_id, version, host_id=host).attributes()
        try:
            self.client.publish(self.topic, payload, **attrs).result(timeout=self.timeout_s)
        except Exception as exc:  # the Pub/Sub client's errors are all worth a retry here
            raise TransientError(f"fan-out publish of v{version} for {device_id} failed: {exc}") from exc


# ------------------------------------------------------------------------------------------ dead letters


@dataclass(frozen=True)
class Message:
    """The Pub/Sub message a CloudEvent carries."""

    id: str
    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    publish_time: datetime | None = None

    def age_s(self, now: datetime | None = None) -> float:
        if self.publish_time is None:
            return 0.0
        return ((now or datetime.now(UTC)) - self.publish_time).total_seconds()


class DeadLetterSink(Protocol):
    def send(self, message: Message, error: PermanentError) -> None: ...


class PubsubDeadLetter:
    """Copies a refused request, untouched, to the dead-letter topic with the reason as attributes."""

    def __init__(self, topic: str):
        from google.cloud import pubsub_v1  # honours PUBSUB_EMULATOR_HOST

        self.topic = topic
        self.client = pubsub_v1.PublisherClient()

    def send(self, message: Message, error: PermanentError) -> None:
        attrs = {**message.attributes, "error": error.reason, "errorDetail": error.detail[:MAX_ATTRIBUTE_CHARS],
                 "sourceMessageId": message.id, "failedBy": "config-push"}
        # Raises when Pub/Sub does not take it: the request is then retried rather than lost.
        self.client.publish(self.topic, message.data, **attrs).result(timeout=30)


# ------------------------------------------------------------------------------------------ the flow


@dataclass(frozen=True)
class Outcome:
    status: str  # "delivered" | "superseded" | "skipped_blocked" | "rejected"
    device_id: str = ""
    version: int = 0
    reason: str = ""


@dataclass
class Deps:
    registry: reg.Registry
    publisher: Publisher
    dead_letter: DeadLetterSink | None
    min_interval_s: float = 1.0
    max_retry_age_s: float = MAX_RETRY_AGE_S
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))  # a request's age is taken by it
    _others: dict[str, reg.Registry] = field(default_factory=dict)

    def registry_for(self, registry_id: str) -> reg.Registry:
        """The request's registry (empty: the deployment's own), sharing the Firestore client."""
        if not registry_id or registry_id == self.registry.registry_id:
            return self.registry
        if registry_id not in self._others:
            self._others[registry_id] = reg.Registry(self.registry.project, registry_id, self.registry.region,
                                                     client=self.registry.client)
        return self._others[registry_id]


def config_topic(device_id: str) -> str:
    return spec.device_topic(device_id, spec.CONFIG)


def process(message: Message, deps: Deps) -> Outcome:
    """Handle one request end to end; see the module docstring. Raises only for transient failures, and
    only while the request is younger than ``deps.max_retry_age_s``; after that it is dead-lettered."""
    try:
        return _process(message, deps)
    except Exception as exc:
        age = message.age_s(deps.clock())
        if age < deps.max_retry_age_s or deps.dead_letter is None:
            raise
        err = PermanentError("retries_exhausted", f"still failing after {age / 3600:.1f} h: {exc}")
        log.error("config request given up (%s): %s", err.reason, err.detail,
                  extra={"fields": {"messageId": message.id, "reason": err.reason, "outcome": "given_up"}})
        deps.dead_letter.send(message, err)
        return Outcome("rejected", reason=err.reason)


def _process(message: Message, deps: Deps) -> Outcome:
    started = time.monotonic()
    fields: dict[str, Any] = {"messageId": message.id}
    try:
        request = parse_request(message.data)
        fields["deviceId"] = request.device_id
        pushed = store_and_deliver(deps, request, message.id)
    except PermanentError as err:
        fields.update(outcome="rejected", reason=err.reason, detail=err.detail, bytes=len(message.data))
        log.warning("config request refused (%s): %s", err.reason, err.detail, extra={"fields": fields})
        if deps.dead_letter is not None:
            deps.dead_letter.send(message, err)
        return Outcome("rejected", fields.get("deviceId", ""), reason=err.reason)
    cfg = pushed.config
    fields.update(version=cfg.version, bytes=len(cfg.data), outcome=pushed.status)
    if pushed.status == "superseded":
        log.info("config v%d of %s superseded by a newer version; not published", cfg.version, request.device_id,
                 extra={"fields": fields})
    elif pushed.status == "skipped_blocked":
        log.info("device %s blocked since v%d was stored; not published", request.device_id, cfg.version,
                 extra={"fields": fields})
    else:
        fields["durationMs"] = round((time.monotonic() - started) * 1000, 1)
        log.info("config v%d of %s delivered", cfg.version, request.device_id, extra={"fields": fields})
    return Outcome(pushed.status, request.device_id, cfg.version)


def message_from_event(data: Mapping[str, Any], event_id: str = "") -> Message:
    """The Pub/Sub message inside an Eventarc ``messagePublished`` event (``MessagePublishedData``)."""
    msg = data.get("message") if isinstance(data, Mapping) else None
    if not isinstance(msg, Mapping):
        raise PermanentError("invalid_event", "the event carries no Pub/Sub message")
    message_id = msg.get("messageId") or msg.get("message_id") or event_id
    if not message_id:
        raise PermanentError("invalid_event", "the Pub/Sub message has no id")
    try:
        payload = base64.b64decode(msg.get("data") or "", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PermanentError("invalid_event", f"message data is not base64: {exc}") from None
    attributes = {str(k): str(v) for k, v in (msg.get("attributes") or {}).items()}
    return Message(id=str(message_id), data=payload, attributes=attributes,
                   publish_time=_rfc3339(msg.get("publishTime") or msg.get("publish_time")))


def _rfc3339(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:  # Pub/Sub sends up to nanoseconds; fromisoformat takes at most microseconds
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------ wiring


_deps: Deps | None = None
_deps_lock = threading.Lock()


def deps_from_env(env: Mapping[str, str] = os.environ) -> Deps:
    """Everything checked before any client is created, so a misconfigured deployment says what is wrong."""
    missing = [k for k in ("PROJECT_ID", "REGISTRY_ID") if not env.get(k)]
    if missing:
        raise RuntimeError(f"environment variables not set: {', '.join(missing)}")
    delivery = env.get("CONFIG_DELIVERY", "mqtt")
    if delivery not in ("mqtt", "fanout"):
        raise RuntimeError(f"CONFIG_DELIVERY must be mqtt or fanout, got {delivery!r}")
    if delivery == "fanout" and not env.get("FANOUT_TOPIC"):
        raise RuntimeError("CONFIG_DELIVERY=fanout needs FANOUT_TOPIC (projects/{p}/topics/{prefix}-device-commands)")
    mqtt = MqttSettings.from_env(env) if delivery == "mqtt" else None
    min_interval_s = float(env.get("CONFIG_MIN_INTERVAL_S", "1.0"))
    max_retry_age_s = float(env.get("MAX_RETRY_AGE_S", str(MAX_RETRY_AGE_S)))

    registry = reg.Registry(env["PROJECT_ID"], env["REGISTRY_ID"], env.get("REGION", ""),
                            database=env.get("FIRESTORE_DATABASE") or None)
    dead_letter = PubsubDeadLetter(env["DEAD_LETTER_TOPIC"]) if env.get("DEAD_LETTER_TOPIC") else None
    if dead_letter is None:
        log.warning("DEAD_LETTER_TOPIC not set: refused requests are only logged")
    publisher: Publisher = MqttPublisher(mqtt) if mqtt is not None else FanoutPublisher(env["FANOUT_TOPIC"])
    return Deps(registry=registry, publisher=publisher, dead_letter=dead_letter, min_interval_s=min_interval_s,
                max_retry_age_s=max_retry_age_s)


def get_deps() -> Deps:
    """Built once per instance on first use, so warm invocations reuse the Firestore and MQTT connections."""
    global _deps
    with _deps_lock:
        if _deps is None:
            _deps = deps_from_env()
        return _deps


def reset_deps() -> None:
    global _deps
    with _deps_lock:
        if _deps is not None and isinstance(_deps.publisher, MqttPublisher):
            _deps.publisher.close()
        _deps = None


@functions_framework.cloud_event
def handle(cloud_event: Any) -> None:
    deps = get_deps()
    try:
        message = message_from_event(cloud_event.data, cloud_event["id"])
    except PermanentError as err:
        log.error("event refused (%s): %s", err.reason, err.detail,
                  extra={"fields": {"eventId": cloud_event["id"], "reason": err.reason}})
        return
    process(message, deps)
