"""The HTTP device bridge: Cloud IoT Core's ``cloudiotdevice`` API (``publishEvent``, ``setState``, ``config``) on
a broker host, over TLS on its own port (docs/device-protocol.md, "HTTP bridge").

It runs in the front's process and on the front's event loop (aiohttp's server is plain asyncio): a request is
authenticated by :meth:`Front.verify_device`, the very checks of an MQTT CONNECT (address failures, unknown-device
memory, JWT against the registry's credentials, blocked), and is charged to the same per-device token buckets as
the device's MQTT session, so a device is held to one set of limits whichever protocol it speaks. Over a limit, the
request is answered 429 ``RESOURCE_EXHAUSTED`` at once (an HTTP device cannot be slowed by not reading its socket).

A JWT that passed is remembered (by its hash) for ``recheck_interval_s``, bounded by its ``exp``: a device that
reuses its token is re-read from the registry at most that often, the same window in which the front drops the
MQTT session of a device blocked, deleted or stripped of its credential.

Events and states are published to the loopback Mosquitto on the device's own topics (user ``bridge``, client id
``iotbridge:http:{host}``), QoS 1: the request is answered 200 only after the broker acknowledged the message,
which then reaches Pub/Sub through the bridge service exactly as an MQTT device's message does — the same topics,
subfolder routes, attributes and dead-lettering. ``config`` reads the registry; a config returned with its data is
recorded as acknowledged by the device (``device_ack_time``), as IoT Core's HTTP bridge did.

Errors carry Google's error body ``{"error": {"code", "message", "status"}}``: 401 ``UNAUTHENTICATED`` (no, bad or
expired JWT, unknown device or one not in the registry the path names), 403 ``PERMISSION_DENIED`` (blocked
device, or its registry has HTTP disabled), 404 ``NOT_FOUND`` (another project or region, an unknown method),
400 ``INVALID_ARGUMENT`` (bad JSON or base64, a payload over 256 KB / 64 KB, a bad subfolder), 400
``OUT_OF_RANGE`` (``local_version`` ahead of the server), 413 (a body over ``MAX_BODY_BYTES``), 429
``RESOURCE_EXHAUSTED`` (over a per-device limit, or the address spent its failed attempts), 503 ``UNAVAILABLE``
(registry or broker unreachable).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from iotbridge import spec
from iotbridge.bridge import limits
from iotbridge.bridge.front import LIMIT_REPORT_S, Front, Refusal, address_key, no_delay, printable
from iotbridge.bridge.settings import EVENTS_MAX_BYTES, STATE_MAX_BYTES
from iotbridge.registry import DEVICE_ID_RE, REGISTRY_ID_RE, Registry

log = logging.getLogger("iotbridge.http")

# The largest request body read at all: a 256 KB event, base64-encoded (4/3), plus its JSON and subfolder.
MAX_BODY_BYTES = EVENTS_MAX_BYTES * 4 // 3 + 8 * 1024
PUBLISH_TIMEOUT_S = 10.0
MAX_REMEMBERED_TOKENS = 100_000
_PATH_RE = re.compile(r"/v1/projects/([^/]+)/locations/([^/]+)/registries/([^/]+)/devices/([^/:]+)"
                      r"(:publishEvent|:setState|/config)")
_METHODS = {":publishEvent": "POST", ":setState": "POST", "/config": "GET"}
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           405: "NOT_FOUND", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
_REFUSAL_CODE = {Refusal.BAD_CREDENTIALS: 401, Refusal.BLOCKED: 403, Refusal.DISABLED: 403,
                 Refusal.ADDRESS_LIMITED: 429, Refusal.UNAVAILABLE: 503}


class HttpError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or _STATUS.get(code, "UNKNOWN")


def error_body(code: int, message: str, status: str) -> dict[str, Any]:
    """Google's JSON error body, as IoT Core answered."""
    return {"error": {"code": code, "message": message, "status": status}}


def _b64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, f"Invalid value at '{field}' (TYPE_BYTES): expected a base64 string")
    try:
        # Proto3 JSON accepts standard and URL-safe base64, with or without padding.
        return base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed") from None


def _field(body: dict[str, Any], snake: str, camel: str) -> Any:
    """Proto3 JSON: a field may be named in snake_case or lowerCamelCase."""
    return body.get(snake, body.get(camel))


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


class HttpBridge:
    def __init__(self, front: Front, bridge_password: str):
        self.front = front
        self.settings = front.settings
        self._password = bridge_password
        self._runner: web.AppRunner | None = None
        self._mqtt: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._limit_reported: dict[str, float] = {}
        # sha256 of (registry id, device id, JWT) -> (monotonic time until which it counts as verified, the JWT's
        # exp, the device's Registry): a device that reuses its JWT is not re-read from the registry for every
        # request, but at most every recheck_interval_s — the window within which an MQTT session of a blocked
        # device is dropped.
        self._verified: OrderedDict[bytes, tuple[float, float, Registry]] = OrderedDict()
        self.stats = {"requests": 0, "published": 0, "refused": 0, "rate_limited": 0}

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"iotbridge:http:{self.settings.host_id}",
                        clean_session=True)
        c.username_pw_set("bridge", self._password)
        c.max_inflight_messages_set(1000)
        c.on_publish = self._on_publish
        c.on_socket_open = no_delay  # one device request's publish is not held for the ack of the one before
        c.connect_async(self.settings.broker_host, self.settings.broker_port, keepalive=30)
        c.loop_start()
        self._mqtt = c
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.front_host, self.settings.http_port,
                           ssl_context=self.front.ssl_context)
        await site.start()
        log.info("HTTP bridge listening on %s:%d (TLS)", self.settings.front_host, self.settings.http_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._mqtt is not None:
            self._mqtt.loop_stop()
            self._mqtt.disconnect()

    # ---------------------------------------------------------------------------------- broker

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._acked, mid)

    def _acked(self, mid: int) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 to the loopback broker; returns once the broker has the message."""
        assert self._mqtt is not None and self._loop is not None
        if not self._mqtt.is_connected():
            raise HttpError(503, "broker unavailable; retry later")
        fut: asyncio.Future[None] = self._loop.create_future()
        info = self._mqtt.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise HttpError(503, "broker unavailable; retry later")
        self._acks[info.mid] = fut
        if info.is_published():  # acknowledged before the future was registered
            self._acked(info.mid)
        try:
            await asyncio.wait_for(fut, PUBLISH_TIMEOUT_S)
        except TimeoutError:
            self._acks.pop(info.mid, None)
            raise HttpError(503, "broker did not acknowledge the message; retry later") from None
        self.stats["published"] += 1

    # ---------------------------------------------------------------------------------- requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        try:
            return web.json_response(await self._dispatch(request))
        except HttpError as exc:
            self.stats["refused"] += 1
            return web.json_response(error_body(exc.code, exc.message, exc.status), status=exc.code)
        except web.HTTPRequestEntityTooLarge:
            self.stats["refused"] += 1
            message = f"request body over {MAX_BODY_BYTES} bytes"
            return web.json_response(error_body(413, message, _STATUS[413]), status=413)

    async def _dispatch(self, request: web.Request) -> dict[str, Any]:
        m = _PATH_RE.fullmatch(request.path)
        if m is None:
            raise HttpError(404, "not found: /v1/projects/{p}/locations/{r}/registries/{reg}/devices/{d}"
                                 ":publishEvent | :setState | /config")
        project, region, registry_id, device_id, verb = m.groups()
        s = self.settings
        if ((project, region) != (s.project, s.region) or not REGISTRY_ID_RE.fullmatch(registry_id)
                or not DEVICE_ID_RE.fullmatch(device_id)):
            raise HttpError(404, f"device path names {project}/{region}/{registry_id}, not this deployment's")
        if request.method != _METHODS[verb]:
            raise HttpError(405, f"{verb.lstrip(':/')} takes {_METHODS[verb]}")
        registry = await self._authenticate(request, registry_id, device_id)
        if verb == "/config":
            self._charge(device_id, 0, state=False)
            return await self._config(registry, device_id, request.query.get("local_version", "0"))
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise HttpError(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body is not a JSON object")
        if verb == ":setState":
            state = body.get("state")
            data = _b64(_field(state, "binary_data", "binaryData") if isinstance(state, dict) else None,
                        "state.binary_data")
            if len(data) > STATE_MAX_BYTES:
                raise HttpError(400, f"state of {len(data)} bytes exceeds {STATE_MAX_BYTES}")
            self._charge(device_id, len(raw), state=True)
            await self._publish(spec.device_topic(device_id, spec.STATE), data)
            return {}
        data = _b64(_field(body, "binary_data", "binaryData"), "binary_data")
        sub_folder = _field(body, "sub_folder", "subFolder") or ""
        if not isinstance(sub_folder, str) or not spec.valid_sub_folder(sub_folder):
            raise HttpError(400, "sub_folder may not contain '+', '#', NUL or start or end with '/'")
        if len(data) > EVENTS_MAX_BYTES:
            raise HttpError(400, f"event of {len(data)} bytes exceeds {EVENTS_MAX_BYTES}")
        topic = spec.device_topic(device_id, spec.EVENTS, sub_folder)
        if (violation := limits.event_topic_violation(topic, device_id)) is not None:
            raise HttpError(400, f"{violation[0]}: {violation[1]}")
        self._charge(device_id, len(raw), state=False)
        await self._publish(topic, data)
        return {}

    async def _authenticate(self, request: web.Request, registry_id: str, device_id: str) -> Registry:
        """The device's registry (the one its path names) once the request's JWT proved the device."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        address = address_key(request.remote or "")
        key = hashlib.sha256(f"{registry_id}\n{device_id}\n{token.strip()}".encode()).digest()
        known = self._verified.get(key)
        if known is not None and time.monotonic() < known[0] and time.time() < known[1]:
            return known[2]
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise Refusal(Refusal.BAD_CREDENTIALS, "no Authorization: Bearer <JWT> header")
            proof = await self.front.verify_device(device_id, token.strip().encode(), None, address, registry_id,
                                                   protocol="http")
        except Refusal as exc:
            log.warning("HTTP request of %s from %s refused: %s", device_id, address, printable(exc.reason))
            message = {Refusal.BAD_CREDENTIALS: "the JWT is missing, invalid or expired, or names no device",
                       Refusal.BLOCKED: f"the device {device_id} is blocked"}.get(exc.kind, exc.reason)
            raise HttpError(_REFUSAL_CODE[exc.kind], message) from None
        self._verified[key] = (time.monotonic() + self.settings.recheck_interval_s, proof.expires_at.timestamp(),
                               proof.registry)
        while len(self._verified) > MAX_REMEMBERED_TOKENS:
            self._verified.popitem(last=False)
        return proof.registry

    def _charge(self, device_id: str, nbytes: int, state: bool) -> None:
        """Charge one request to the device's buckets (shared with its MQTT sessions), or refuse it with 429
        without charging anything when one of them has not got enough."""
        buckets = self.front.device_limits(device_id)
        now = time.monotonic()
        cost = {"messages": 1.0, "bytes": float(nbytes), **({"state": 1.0} if state else {})}
        short = [k for k, c in cost.items() if buckets[k].available(now) < c]
        if short:
            self.stats["rate_limited"] += 1
            s = self.settings
            message = (f"rate limit: over {s.device_messages_per_s:g} messages/s, {s.device_bytes_per_s / 1024:g} "
                       f"KiB/s or {s.device_state_per_s:g} state updates/s ({', '.join(short)})")
            if now - self._limit_reported.get(device_id, float("-inf")) >= LIMIT_REPORT_S:
                self._limit_reported[device_id] = now
                log.warning("HTTP device %s: %s", device_id, message)
                asyncio.get_running_loop().create_task(self.front.record_error(device_id, message))
            raise HttpError(429, message)
        for k, c in cost.items():
            buckets[k].take(c, now)

    async def _config(self, registry: Registry, device_id: str, local_version: str) -> dict[str, Any]:
        try:
            local = int(local_version)
            if local < 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, f"local_version must be a non-negative integer, got {local_version!r}") from None
        try:
            cfg = await asyncio.to_thread(registry.get_config, device_id)
        except Exception as exc:  # noqa: BLE001 - the device retries
            raise HttpError(503, f"registry error {type(exc).__name__}; retry later") from None
        current = cfg.version if cfg is not None else 0
        if local > current:
            raise HttpError(400, f"local_version {local} is ahead of the latest version {current}", "OUT_OF_RANGE")
        if cfg is None:
            return {"version": "0"}
        out: dict[str, Any] = {"version": str(cfg.version), "cloudUpdateTime": _rfc3339(cfg.cloud_update_time)}
        if local == 0 or local < cfg.version:
            out["binaryData"] = base64.b64encode(cfg.data).decode()
            if cfg.device_ack_time is not None:
                out["deviceAckTime"] = _rfc3339(cfg.device_ack_time)
            try:
                await asyncio.to_thread(registry.ack_config, device_id, cfg.version, datetime.now(UTC))
            except Exception as exc:  # noqa: BLE001 - the device has its config; only the ack time is missing
                log.warning("could not record the config ack of %s: %s", device_id, exc)
        return out
